"""Where the model's arrays lie on a device mesh: logical axis names, their default rules, and the specs of the
attention kernels' `shard_map`.

Parameters carry logical axis names (`embed`, `heads`, `kv`, `mlp`, `vocab`). Attention uses three logical axes
of activations: `batch` (rows of a batch), `heads`, and `context` (the length of the hybrid layer's prefix: the
axis context parallelism splits). The rules that map logical names onto mesh axes are Flax's
(`with nn.logical_axis_rules(rules):`, which the training loop sets); where none are set,
DEFAULT_LOGICAL_AXIS_RULES apply. The mesh is the one set with `jax.set_mesh` (`jax.sharding.get_abstract_mesh()`);
without a mesh nothing here shards anything.

A Pallas kernel (splash) is a custom call that XLA's partitioner cannot split: under a mesh it would be run on
the whole global batch on every device. So every kernel call runs inside `jax.shard_map` over all mesh axes
(`kernel_shard_map`): each device calls the kernel on its rows and heads only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P

# logical name -> mesh axes of the (data, fsdp, tensor) mesh. "batch", "heads" and "context" also name activation
# axes (module docstring); "context" maps to no mesh axis unless context parallelism is wanted: put
# ("context", "tensor") first to split the prefix over the tensor axis.
DEFAULT_LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("context", None),
)


def active_rules() -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """The logical-axis rules of the Flax context (`nn.logical_axis_rules`), else DEFAULT_LOGICAL_AXIS_RULES."""
    rules = nn.get_logical_axis_rules()
    return tuple(tuple(rule) for rule in rules) if rules else DEFAULT_LOGICAL_AXIS_RULES


def free_mesh_axes() -> tuple[str, ...]:
    """The axes of the active mesh that are not already manual (inside a shard_map); () without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    return tuple(a for a in mesh.axis_names if a not in mesh.manual_axes)


def mesh_spec(logical: Sequence[str | None], shape: Sequence[int]) -> P:
    """The PartitionSpec of an activation with these logical axis names under the active rules and mesh.

    Mapped as Flax maps them (rules in order, a mesh axis used once), keeping only free axes of the active mesh;
    a dimension that its mesh axes do not divide stays replicated.
    """
    axes = free_mesh_axes()
    if not axes:
        return P(*([None] * len(shape)))
    mesh = jax.sharding.get_abstract_mesh()
    spec = nn.logical_to_mesh_axes(tuple(logical), active_rules())
    out = []
    for dim, names in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = () if names is None else (names,) if isinstance(names, str) else tuple(names)
        names = tuple(a for a in names if a in axes)
        divides = names and dim % math.prod(mesh.shape[a] for a in names) == 0
        out.append(None if not divides else names[0] if len(names) == 1 else names)
    return P(*out)


def context_axes() -> tuple[str, ...]:
    """The mesh axes that the logical axis `context` maps to: the axes the hybrid layer splits its prefix over
    (context parallelism), () when it is not split or there is no mesh. Axes already manual (inside a shard_map)
    are left out; an axis the mesh does not have is kept, for `context_parallel` to name in its error."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    spec = nn.logical_to_mesh_axes(("context",), active_rules())
    names = spec[0] if len(spec) else None
    names = () if names is None else (names,) if isinstance(names, str) else tuple(names)
    return tuple(a for a in names if a not in mesh.manual_axes)


def kernel_shard_map(kernel: Callable, q, k, v, key_pad):
    """kernel(q, k, v, key_pad) -> out, run per device on its rows (`batch`) and heads (`heads`).

    q (batch, queries, heads, head_dim); k, v (batch, keys, heads, head_dim); key_pad (batch, keys) bool or None.
    Returns out shaped like q. Without a mesh the kernel is called directly. All free mesh axes are manual inside,
    so no mesh axis is left for the partitioner to replicate the kernel's operands over.
    """
    axes = free_mesh_axes()
    if not axes:
        return kernel(q, k, v, key_pad)
    spec = mesh_spec(("batch", None, "heads", None), q.shape)
    pad_spec = None if key_pad is None else P(spec[0], None)
    return jax.shard_map(kernel, in_specs=(spec, spec, spec, pad_spec), out_specs=spec, axis_names=set(axes),
                         check_vma=False)(q, k, v, key_pad)
