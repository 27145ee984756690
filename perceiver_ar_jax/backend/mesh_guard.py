"""Whether the kernels of this folder may run: XLA's partitioner would gather a custom call's operands onto every
device of a mesh, so under a mesh of several devices the callers take XLA's own operations (the tiny training
model's step on 8 simulated devices, data parallel: 27 all-gathers and 1.8x the time with the kernels, 1 without).
`partitioned()` for plain custom calls, which may run on each device's shard inside a `shard_map`;
`several_devices()` for those with a custom VJP of their own."""

from __future__ import annotations

import jax


def partitioned() -> bool:
    """Whether the active mesh (`jax.set_mesh`) has a free (not manual) axis of more than one device."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and any(size > 1 for axis, size in mesh.shape.items() if axis not in mesh.manual_axes)


def several_devices() -> bool:
    """Whether the active mesh has any axis of more than one device, free or manual (inside `shard_map`, where a
    custom VJP's outputs would also have to carry the manual axes its inputs vary over)."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and any(size > 1 for size in mesh.shape.values())
