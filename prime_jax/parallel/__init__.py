"""Mesh construction, logical-axis sharding rules and multi-host start-up."""

from prime_jax.parallel.mesh import (
    LOGICAL_AXIS_RULES,
    MESH_AXES,
    batch_sharding,
    logical_to_spec,
    make_mesh,
    named_sharding,
    shard_state,
    state_shardings,
)

__all__ = [
    "LOGICAL_AXIS_RULES",
    "MESH_AXES",
    "batch_sharding",
    "logical_to_spec",
    "make_mesh",
    "named_sharding",
    "shard_state",
    "state_shardings",
]
