"""Train state (params + optimizer state + counters), optimizers, and sharded creation.

Params are the model's `nnx.Param` state (float32 master copy, `param_dtype`); the model casts
them to its compute `dtype` (bf16) inside the forward pass, so mixed precision needs nothing
here. Optimizer moments are created with the same `nnx.Param` wrappers (optax maps over the
arrays inside them), so they carry the same `logical_axes` and shard exactly like the params.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from prime_jax.parallel import tree_shardings


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything a train step reads and writes. A pytree; pass it in and out of `jit`.

    params: `nnx.State` of the model's `nnx.Param`s. opt_state: optax state of those params.
    step: int32, number of optimizer updates applied. nan_skips: int32, number of steps skipped
    because the loss or gradient norm was not finite.
    """

    params: Any
    opt_state: Any
    step: jax.Array
    nan_skips: jax.Array


def make_optimizer(lr: float | optax.Schedule, weight_decay: float = 0.0, clip_norm: float | None = None,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay on every parameter, as torch's AdamW), after global-norm clipping.

    Policy (reference): `make_optimizer(5e-7, weight_decay=0.01, clip_norm=1.0)`.
    PRM (reference): `make_optimizer(1e-6, weight_decay=0.0, clip_norm=10.0)`.
    `lr` may be a float (constant) or an optax schedule.
    """
    adamw = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    if clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(clip_norm), adamw)


def policy_optimizer(lr: float = 5e-7, weight_decay: float = 0.01, clip_norm: float = 1.0,
                     b1: float = 0.9, b2: float = 0.999) -> optax.GradientTransformation:
    """The reference policy optimizer (Eurus-2-7B-PRIME defaults)."""
    return make_optimizer(lr, weight_decay, clip_norm, b1, b2)


def prm_optimizer(lr: float = 1e-6, weight_decay: float = 0.0, clip_norm: float = 10.0,
                  b1: float = 0.9, b2: float = 0.999) -> optax.GradientTransformation:
    """The reference PRM optimizer (Eurus-2-7B-PRIME defaults)."""
    return make_optimizer(lr, weight_decay, clip_norm, b1, b2)


def split_params(model: nnx.Module):
    """`(graphdef, params)` of a model; params = its `nnx.Param` state (the only state Qwen2 has)."""
    return nnx.split(model, nnx.Param)


def _init_state(optimizer: optax.GradientTransformation, params) -> TrainState:
    return TrainState(
        params=params,
        opt_state=optimizer.init(params),
        step=jnp.zeros((), jnp.int32),
        nan_skips=jnp.zeros((), jnp.int32),
    )


def abstract_train_state(params, optimizer: optax.GradientTransformation) -> TrainState:
    """Shapes/dtypes of the train state (no memory), e.g. to derive shardings."""
    return jax.eval_shape(lambda p: _init_state(optimizer, p), params)


def train_state_shardings(params, optimizer: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """The TrainState of NamedShardings that `create_train_state` and the steps use."""
    return tree_shardings(abstract_train_state(params, optimizer), mesh)


def create_train_state(model_or_params, optimizer: optax.GradientTransformation, mesh: Mesh, *,
                       donate: bool = False) -> TrainState:
    """A sharded TrainState, built inside `jit` with `out_shardings`.

    The optimizer state is created directly in its sharded layout (never materialised whole on
    one device: creating it outside jit is what runs 7B out of memory). The params are copied
    into fresh sharded buffers, so two states made from one model (policy and PRM) never share
    buffers that a donating step would free. `donate=True` hands the input params to XLA
    instead (saves one params' worth of memory; the model object is unusable afterwards).
    """
    if isinstance(model_or_params, nnx.Module):
        _, params = split_params(model_or_params)
    else:
        params = model_or_params
    shardings = train_state_shardings(params, optimizer, mesh)

    def init(p):
        return _init_state(optimizer, jax.tree.map(jnp.copy, p))

    return jax.jit(init, out_shardings=shardings, donate_argnums=(0,) if donate else ())(params)
