"""The compiled scoring step: a batch of windows -> the cross-entropy at every latent position, on the mesh.

One program for every batch (all windows have one shape, see windows.py), jitted once with the training job's
layout: parameters sharded by their logical axes (fsdp / tensor), the batch's rows split over (data, fsdp). Each
process feeds its own rows and gets back the losses of those rows; with several processes, every process runs the
same number of steps (one that has run out of windows feeds filler rows until all have).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from perceiver_ar_jax.evaluation.windows import Rows, WindowSpec
from perceiver_ar_jax.model import CausalLanguageModel, output_params
from perceiver_ar_jax.training import partitioning
from perceiver_ar_jax.training.loss import DEFAULT_CHUNK_TOKENS, chunked_token_losses
from perceiver_ar_jax.training.step import project_with


def default_mesh() -> Mesh:
    """The training job's default mesh: every device on the fsdp axis (multi-slice: slices on data)."""
    return partitioning.create_mesh(SimpleNamespace(ici_parallelism=(1, -1, 1), dcn_parallelism=(-1, 1, 1)))


def param_shardings(model: CausalLanguageModel, mesh: Mesh,
                    rules=partitioning.DEFAULT_LOGICAL_AXIS_RULES) -> Any:
    """A NamedSharding for every parameter, from the logical axis names it was defined with."""
    ids = jnp.zeros((1, model.config.max_latents), jnp.int32)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, prefix_len=0)["params"])
    return partitioning.tree_shardings(nn.get_partition_spec(boxed), nn.unbox(boxed), mesh, rules)


def window_losses(params: Any, batch: dict[str, jnp.ndarray], *, model: CausalLanguageModel,
                  prefix_len: int, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> jnp.ndarray:
    """input_ids, pad_mask (batch, W), labels (batch, n) -> cross-entropy (batch, n) float32 of each latent; the
    logits of chunk_tokens rows at a time (training/loss.py), never all (batch, n, vocab) of them."""
    hidden = model.apply({"params": params}, batch["input_ids"], prefix_len=prefix_len, pad_mask=batch["pad_mask"],
                         method="hidden")
    return chunked_token_losses(project_with(model), output_params(params), hidden, batch["labels"],
                                chunk_tokens=chunk_tokens)[0]


@functools.lru_cache(maxsize=8)
def compiled_step(config, prefix_len: int, mesh: Mesh):
    """(the jitted `window_losses` of this model and prefix on `mesh`, the parameters' shardings): one jitted
    function per setting, so that evaluating again (a harness's many calls) reuses its compiled program."""
    model = CausalLanguageModel(config)
    shardings = param_shardings(model, mesh)
    batch_sharding = partitioning.batch_sharding(mesh)
    # the chunk is per device: the batch's rows are split over the batch shards
    chunk_tokens = DEFAULT_CHUNK_TOKENS * partitioning.num_batch_shards(mesh)
    step = jax.jit(functools.partial(window_losses, model=model, prefix_len=prefix_len, chunk_tokens=chunk_tokens),
                   in_shardings=(shardings, batch_sharding), out_shardings=batch_sharding)
    return step, shardings


class WindowScorer:
    """Scores batches of `batch_size` windows (the global batch: all processes' rows) with one compiled program.

    params: any parameter tree of the model (host arrays or device arrays); it is laid out on `mesh` once.
    """

    def __init__(self, model: CausalLanguageModel, params: Any, spec: WindowSpec, batch_size: int,
                 mesh: Mesh | None = None):
        self.mesh = default_mesh() if mesh is None else mesh
        shards = partitioning.num_batch_shards(self.mesh)
        if batch_size < 1 or batch_size % shards or batch_size % jax.process_count():
            raise ValueError(f"batch_size={batch_size} is out of range: must be a positive multiple of the "
                             f"{shards} devices the batch is split over (data x fsdp) and of the "
                             f"{jax.process_count()} processes")
        self.spec, self.batch_size = spec, batch_size
        self.local_batch_size = batch_size // jax.process_count()
        self._step, shardings = compiled_step(model.config, spec.prefix_len, self.mesh)
        self.params = jax.device_put(params, shardings)

    def dispatch(self, rows: Rows) -> jax.Array:
        """Start scoring this process's `local_batch_size` rows (asynchronously); `fetch` waits for the result."""
        batch = {"input_ids": rows.input_ids, "pad_mask": rows.pad_mask, "labels": rows.labels}
        with jax.set_mesh(self.mesh):
            return self._step(self.params, partitioning.make_global_batch(batch, self.mesh))

    def fetch(self, losses: jax.Array) -> np.ndarray:
        """This process's rows of a dispatched step's losses, (local_batch_size, n) float32."""
        if jax.process_count() == 1:
            return np.asarray(losses)
        local = multihost_utils.global_array_to_host_local_array(losses, self.mesh, P(partitioning.BATCH_AXES))
        return np.asarray(local)

    def run(self, batches: Iterator[Any]) -> Iterator[tuple[Any, np.ndarray]]:
        """(batch, its losses) for every batch of `batches` (objects with `.rows`), one step ahead: the next
        batch is prepared on the host while the device scores the current one. With several processes all run
        until every process is out of batches, feeding `filler()` rows meanwhile."""
        pending = None
        while True:
            batch = next(batches, None)
            if not self._any_process_has(batch is not None):
                break
            pending_next = (batch, self.dispatch(batch.rows if batch is not None else self.filler()))
            if pending is not None and pending[0] is not None:
                yield pending[0], self.fetch(pending[1])
            pending = pending_next
        if pending is not None and pending[0] is not None:
            yield pending[0], self.fetch(pending[1])

    def filler(self) -> Rows:
        """Rows that score nothing (a process with no windows left while others still have some)."""
        w, n, b = self.spec.window, self.spec.num_latents, self.local_batch_size
        return Rows(np.zeros((b, w), np.int32), np.zeros((b, w), bool), np.zeros((b, n), np.int32),
                    np.zeros((b, n), bool), np.zeros((b, n), np.int32))

    @staticmethod
    def _any_process_has(mine: bool) -> bool:
        if jax.process_count() == 1:
            return mine
        return bool(np.any(multihost_utils.process_allgather(np.asarray(mine, np.int32))))
