"""Runs in a subprocess of tests/test_evaluation_distributed.py, so that the parent keeps its single CPU device.

    python tests/evaluation_worker.py mesh OUT_JSON                                     (8 host-platform devices)
    python tests/evaluation_worker.py process OUT_JSON ADDRESS PROCESS_ID NUM_PROCESSES (2 devices each)

Writes the per-document loss sums and token counts as JSON to OUT_JSON.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LENGTHS = (47, 3, 30, 1, 12, 20, 5)  # process 0 of 2 gets the first 3 documents: far more windows than process 1
STRIDE = 3


def setup():
    from perceiver_ar_jax.model import CausalLanguageModel, CausalLanguageModelConfig
    from tests.test_evaluation import SMALL, documents, noisy_params

    config = CausalLanguageModelConfig(**SMALL, abs_pos_emb=False)
    return CausalLanguageModel(config), noisy_params(config), documents(LENGTHS)


def summary(result):
    return {"loss_sums": [d.loss_sum for d in result.documents], "tokens": [d.num_tokens for d in result.documents],
            "bucket_tokens": result.bucket_tokens.tolist()}


def mesh(out_path):
    from types import SimpleNamespace

    import jax

    from perceiver_ar_jax.evaluation import evaluate
    from perceiver_ar_jax.training import partitioning

    assert jax.device_count() == 8, jax.devices()
    model, params, docs = setup()
    out = {}
    for shape in ((2, 2, 2), (1, 8, 1)):
        m = partitioning.create_mesh(SimpleNamespace(ici_parallelism=shape, dcn_parallelism=(1, 1, 1)))
        result = evaluate(model, params, docs, stride=STRIDE, bos_id=1, batch_size=8, mesh=m)
        out[str(shape)] = summary(result)
    with open(out_path, "w") as f:
        json.dump(out, f)


def process(out_path, address, process_id, num_processes):
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=address, num_processes=num_processes, process_id=process_id)

    from perceiver_ar_jax.data.sources import process_range
    from perceiver_ar_jax.evaluation import evaluate

    model, params, docs = setup()
    start, stop = process_range(len(docs), process_id, num_processes)
    result = evaluate(model, params, docs[start:stop], stride=STRIDE, bos_id=1, batch_size=4)
    with open(out_path, "w") as f:
        json.dump({**summary(result), "devices": jax.device_count(), "own_token_losses": sum(
            d.token_losses is not None for d in result.documents)}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "mesh":
        mesh(*args)
    else:
        process(args[0], args[1], int(args[2]), int(args[3]))
