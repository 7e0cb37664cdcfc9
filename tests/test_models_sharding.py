"""Sharded loading and forward pass on 8 fake CPU devices (conftest.py): each tensor is placed with
its logical sharding by `from_pretrained(path, mesh=mesh)`, and jitted logits equal the
single-device ones.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from prime_jax.models import Qwen2Config, Qwen2ForCausalLM, from_pretrained, save_pretrained
from prime_jax.parallel import batch_sharding, logical_to_spec, make_mesh

CONFIG = Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0)
BATCH, LENGTH = 8, 10


def random_model(config: Qwen2Config, seed: int = 0) -> Qwen2ForCausalLM:
    abstract = nnx.eval_shape(lambda: Qwen2ForCausalLM(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)

    def fill(path, variable):
        name = str(path[-1])
        scale, base = (0.3, 1.0) if "norm" in name else (0.5, 0.0) if "bias" in name else (0.2, 0.0)
        return variable.replace(jnp.asarray(base + scale * rng.standard_normal(variable.shape), jnp.float32))

    flat = {path: fill(path, v) for path, v in nnx.to_flat_state(state)}
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharding_ckpt")
    save_pretrained(random_model(CONFIG, seed=3), folder)
    return folder


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, CONFIG.vocab_size, (BATCH, LENGTH)).astype(np.int32)
    mask = np.ones((BATCH, LENGTH), np.int32)
    for row in range(BATCH):
        mask[row, : row % 4 * 2] = 0  # left padding of 0, 2, 4, 6 tokens
    return ids, mask


def forward(model, ids, mask):
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask))
    return fn(state, ids, mask)


@pytest.fixture(scope="module")
def single_device_logits(checkpoint, batch):
    model = from_pretrained(checkpoint)
    return np.asarray(forward(model, *map(jnp.asarray, batch)))


@pytest.mark.parametrize("data,fsdp,tensor", [(2, 2, 2), (1, 4, 2), (1, 2, 4)])
def test_sharded_load_and_forward_match_single_device(checkpoint, batch, single_device_logits, data, fsdp, tensor):
    mesh = make_mesh(data=data, fsdp=fsdp, tensor=tensor)
    assert dict(mesh.shape) == {"data": data, "fsdp": fsdp, "tensor": tensor}
    model = from_pretrained(checkpoint, mesh=mesh)

    specs = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        array = variable[...]
        name = ".".join(map(str, path))
        assert isinstance(array.sharding, NamedSharding) and array.sharding.mesh.shape == mesh.shape, name
        expected = logical_to_spec(variable.logical_axes, mesh, array.shape)
        assert array.sharding.spec == expected, (name, array.sharding.spec, expected)
        specs[name] = array.sharding.spec
        # every device holds exactly its piece, and the pieces are smaller when the spec splits
        shard_shape = array.sharding.shard_shape(array.shape)
        assert all(s.data.shape == shard_shape for s in array.addressable_shards), name
        if any(axis is not None for axis in expected):
            assert np.prod(shard_shape) < np.prod(array.shape), name

    # The big tensors are really split (fsdp over the model dim, tensor over heads/mlp/vocab).
    assert specs["embed_tokens"] == PartitionSpec("tensor", "fsdp")
    assert specs["lm_head"] == PartitionSpec("fsdp", "tensor")
    assert specs["layers.q_kernel"] == PartitionSpec(None, "fsdp", "tensor", None)
    assert specs["layers.gate_kernel"] == PartitionSpec(None, "fsdp", "tensor")
    assert specs["layers.down_kernel"] == PartitionSpec(None, "tensor", "fsdp")
    assert specs["layers.o_kernel"] == PartitionSpec(None, "tensor", None, "fsdp")
    # 2 kv heads cannot split 4 ways: replicated on that dimension instead of failing.
    kv_spec = PartitionSpec(None, "fsdp", "tensor" if tensor <= CONFIG.num_key_value_heads else None, None)
    assert specs["layers.k_kernel"] == kv_spec
    q = model.layers.q_kernel[...]
    assert q.addressable_shards[0].data.shape == (CONFIG.num_hidden_layers, CONFIG.hidden_size // fsdp,
                                                  CONFIG.num_attention_heads // tensor, CONFIG.head_size)

    ids, mask = batch
    sharded_ids = jax.device_put(jnp.asarray(ids), batch_sharding(mesh, 2))
    sharded_mask = jax.device_put(jnp.asarray(mask), batch_sharding(mesh, 2))
    assert sharded_ids.addressable_shards[0].data.shape[0] == BATCH // (data * fsdp)
    logits = forward(model, sharded_ids, sharded_mask)
    assert len(logits.sharding.device_set) == 8
    real = mask.astype(bool)
    diff = float(np.abs(np.asarray(logits)[real] - single_device_logits[real]).max())
    assert diff <= 1e-5, diff  # float32 reduction order differs across shards: ~3e-6 on logits up to ~5
