"""The device mesh and how parameters, optimizer state and batches are laid out on it.

The mesh has three axes: `data` (pure data parallelism: parameters replicated), `fsdp` (data parallelism with
parameters and optimizer state sharded, ZeRO-3 style) and `tensor` (heads, MLP width and vocabulary split across
devices, Megatron style). Their sizes come from the config as ICI sizes (within a slice) and DCN sizes (across
slices), -1 meaning "all the devices left". Parameters carry logical axis names (embed, heads, kv, mlp, vocab); the
config's logical-axis rules map those names onto mesh axes. A batch is split along its first axis over
(data, fsdp) and replicated over tensor. The training loop also sets the rules as Flax's context
(`nn.logical_axis_rules`), where the model reads the activation axes of its attention kernels and context
parallelism (`model/sharding.py`: `batch`, `heads`, `context`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from perceiver_ar_jax.errors import check
from perceiver_ar_jax.model.sharding import DEFAULT_LOGICAL_AXIS_RULES as DEFAULT_LOGICAL_AXIS_RULES  # re-export

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def logical_axis_rules(config) -> tuple[tuple[str, Any], ...]:
    """config.mesh.logical_axis_rules as a tuple of (logical name, mesh axes) rules.

    A config of an earlier version that sets `model.context_parallel_axis` (the mesh axis to split the prefix over,
    now the logical axis `context`) gets the rule ("context", that axis) in front of the others.
    """
    rules = tuple(tuple(rule) for rule in config.mesh.logical_axis_rules)
    axis = config.model.get("context_parallel_axis")
    if axis:
        logging.warning("model.context_parallel_axis=%r is replaced by the logical-axis rule ('context', %r), "
                        "used for this run; set it in mesh.logical_axis_rules instead", axis, axis)
        rules = (("context", axis), *rules)
    return rules


# ----------------------------------------------------------------------------------------------------------------
# multi-host start-up
def initialize_distributed(config) -> None:
    """Start jax.distributed when this is (or is configured as) one process of several. Call before any JAX op.

    config: the `distributed` sub-config: initialize ("auto" | "yes" | "no"), coordinator_address, num_processes,
    process_id, cpu_collectives. "auto" initializes when a coordinator address is given (explicit cluster, tests)
    or on a Cloud TPU VM (then without arguments: JAX finds the other hosts of the slice in the TPU metadata, and
    a single-host slice is simply one process). "yes" always initializes (JAX detects TPU, SLURM, MPI, k8s).
    """
    mode = config.initialize  # checked by training.config.check_config
    explicit = bool(config.coordinator_address)
    if mode == "no" or (mode == "auto" and not explicit and not _cloud_tpu_vm()):
        return
    if config.cpu_collectives:
        # CPU devices of different processes only talk through an explicit collectives backend
        jax.config.update("jax_cpu_collectives_implementation", config.cpu_collectives)
    if explicit:
        jax.distributed.initialize(coordinator_address=config.coordinator_address,
                                   num_processes=config.num_processes, process_id=config.process_id)
    else:
        jax.distributed.initialize()
    logging.info("jax.distributed initialized: process %d of %d", jax.process_index(), jax.process_count())


def _cloud_tpu_vm() -> bool:
    """libtpu installed and TPU chips attached (checked without starting a JAX backend)."""
    import glob
    import importlib.util

    has_chips = glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
    return bool(has_chips) and importlib.util.find_spec("libtpu") is not None


# ----------------------------------------------------------------------------------------------------------------
# mesh
def fill_parallelism(sizes: Sequence[int], total: int, name: str) -> tuple[int, ...]:
    """Replace the one -1 in `sizes` by what is left of `total`; check that the product is `total`."""
    sizes = tuple(int(s) for s in sizes)
    check(len(sizes) == len(MESH_AXES) and all(s >= 1 or s == -1 for s in sizes) and sizes.count(-1) <= 1, name,
          sizes, f"{len(MESH_AXES)} sizes for {MESH_AXES}, each >= 1 or one -1 (= the devices left)")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        check(total % known == 0, name, sizes, f"sizes whose product divides the {total} devices: they cannot be "
              f"split into {known} x (the rest)")
        sizes = tuple(total // known if s == -1 else s for s in sizes)
    check(math.prod(sizes) == total, name, sizes, f"sizes whose product is the {total} devices (this needs "
          f"{math.prod(sizes)})")
    return sizes


def create_mesh(mesh_config, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh from mesh_config.ici_parallelism and mesh_config.dcn_parallelism.

    DCN sizes split the slices (multi-slice TPU), ICI sizes the devices of one slice; their product per axis is
    the mesh shape. With one slice the DCN sizes must all be 1 (or -1).
    """
    devices = list(jax.devices() if devices is None else devices)
    num_slices = 1 + max(getattr(d, "slice_index", 0) or 0 for d in devices)
    dcn = fill_parallelism(mesh_config.dcn_parallelism, num_slices, "mesh.dcn_parallelism")
    ici = fill_parallelism(mesh_config.ici_parallelism, len(devices) // num_slices, "mesh.ici_parallelism")
    if num_slices > 1:
        device_array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    else:
        device_array = mesh_utils.create_device_mesh(ici, devices)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


# ----------------------------------------------------------------------------------------------------------------
# shardings
def mesh_spec(logical_spec: P, shape: Sequence[int], mesh: Mesh, rules, dropped: set | None = None) -> P:
    """Logical PartitionSpec -> mesh PartitionSpec; a dimension that its mesh axes do not divide evenly stays
    replicated (e.g. 10 heads over 4 tensor devices), so any config runs on any mesh. Such dimensions are added to
    `dropped` as (logical name, size, mesh axes)."""
    spec = nn.logical_to_mesh_axes(logical_spec, rules)
    logical = tuple(logical_spec) + (None,) * (len(shape) - len(logical_spec))
    out = []
    for i, (dim, axes) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True)):
        names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        divides = dim % math.prod(mesh.shape[a] for a in names) == 0
        out.append(axes if divides else None)
        if not divides and dropped is not None:
            dropped.add((logical[i], dim, axes))
    return P(*out)


def tree_shardings(logical_specs: Any, abstract_tree: Any, mesh: Mesh, rules) -> Any:
    """A NamedSharding for every leaf of `abstract_tree`, from the matching tree of logical PartitionSpecs."""
    dropped = set()
    shardings = jax.tree.map(
        lambda spec, leaf: NamedSharding(mesh, mesh_spec(spec, leaf.shape, mesh, rules, dropped)),
        logical_specs, abstract_tree, is_leaf=lambda x: isinstance(x, P))
    for name, dim, axes in sorted(dropped, key=str):
        logging.warning("logical axis %r of size %d is not divisible by mesh axes %s %s: kept replicated there",
                        name, dim, axes, {a: mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)})
    return shardings


def abstract_with_shardings(abstract_tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the given shardings (the restore target of a checkpoint)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of a batch split over (data, fsdp), replicated over tensor."""
    return NamedSharding(mesh, P(BATCH_AXES))


def num_batch_shards(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def make_global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows (its share, in process order) -> global arrays (process_count x local rows, ...)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
