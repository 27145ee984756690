"""What one machine's accelerators do with this library, in one table, whatever the backend.

    python bench/accelerator.py                 # full sizes on TPU / GPU; tiny sizes on CPU (no accelerator)
    python bench/accelerator.py --tiny          # tiny sizes anywhere: a smoke test of every row
    python bench/accelerator.py --json OUT.json [--steps 5] [--max-batch 256] [--impls splash,blockwise]

Rows (full sizes):
- **train 455M**: the model of configs/c4_455m.py (bf16 compute, float32 parameters, its remat policy), 1024-token
  sequences, AdamW; the largest per-device batch that fits (doubling from 1 up to --max-batch until the step runs
  out of memory, found with the first implementation), then every attention implementation that applies on this
  backend at that batch. tokens/s = global batch x 1024 / step time (as the training loop counts); MFU =
  `training.metrics.train_flops_per_step` / step time / (devices x the peak of the device kind,
  `metrics.PEAK_FLOPS`).
- **decode 455M**: `sampling.generate` on that model (bf16), batch 1, 8 and 64, 512-token prompts with 256
  latents, 128 new tokens, greedy, cache "perceiver-io"; new tokens per second of the whole call (prefill
  included, compilation excluded: each shape runs once before it is timed).
- **train 64k**: the model of configs/long_context_64k.py, one 65,536-token sequence per device (half the prefix
  dropped, as configured), every implementation that applies.

Implementations that apply: TPU splash, blockwise, xla; GPU cudnn, blockwise, xla; CPU blockwise, xla. A row that
runs out of memory says so. The devices form one FSDP mesh (1, -1, 1) with the default logical-axis rules.
--tiny shrinks every model to 128 channels, 2 heads, 2 self-attention layers and a 1024-token vocabulary, and the
lengths to 256 (train) / 64 + 16 (decode) / 4096 (long context), so the table also comes out on a CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

IMPLS = {"tpu": ("splash", "blockwise", "xla"), "gpu": ("cudnn", "blockwise", "xla"), "cpu": ("blockwise", "xla")}
TINY_MODEL = dict(num_channels=128, num_heads=2, num_self_attention_layers=2, vocab_size=1024)
DECODE_BATCHES = (1, 8, 64)


def out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def training_config(name: str, tiny: bool, seq_len: int, max_latents: int):
    """The training config of configs/<name>.py; tiny: the small model and lengths of --tiny."""
    import importlib

    config = importlib.import_module(f"configs.{name}").get_config()
    if tiny:
        config.model.update(TINY_MODEL, max_seq_len=seq_len, max_latents=max_latents)
        config.data.max_seq_len = seq_len
    config.mesh.ici_parallelism = (1, -1, 1)
    config.mesh.dcn_parallelism = (-1, 1, 1)
    return config


def time_train_step(config, per_device_batch: int, steps: int) -> dict:
    """Median seconds per jitted train step (after one compiling step) at this per-device batch."""
    import flax.linen as nn
    import jax
    import numpy as np

    from perceiver_ar_jax.model import CausalLanguageModel
    from perceiver_ar_jax.training import model_config_from, partitioning
    from perceiver_ar_jax.training import optimizer as optimizer_lib
    from perceiver_ar_jax.training.loop import with_rules
    from perceiver_ar_jax.training.state import make_init_fn, state_layout
    from perceiver_ar_jax.training.step import train_step

    mesh = partitioning.create_mesh(config.mesh)
    rules = partitioning.logical_axis_rules(config)
    model = CausalLanguageModel(model_config_from(config))
    optimizer = optimizer_lib.make_optimizer(config)
    init_fn = make_init_fn(model, optimizer, config.seed)
    _, shardings = state_layout(init_fn, mesh, rules)
    batch_size, seq_len = per_device_batch * mesh.size, config.model.max_seq_len
    rng = np.random.default_rng(0)
    ids = rng.integers(1, config.model.vocab_size, (batch_size, seq_len + 1)).astype(np.int32)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "pad_mask": np.zeros((batch_size, seq_len), bool)}
    with jax.set_mesh(mesh):
        state = jax.jit(lambda: nn.unbox(init_fn()), out_shardings=shardings)()
        step = jax.jit(with_rules(rules, lambda s, b: train_step(s, b, model=model, optimizer=optimizer)),
                       in_shardings=(shardings, partitioning.batch_sharding(mesh)), donate_argnums=(0,))
        global_batch = partitioning.make_global_batch(batch, mesh)
        t0 = time.perf_counter()
        state, metrics = step(state, global_batch)
        jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            state, metrics = step(state, global_batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times), "compile_s": compile_s, "batch_size": batch_size,
            "loss": float(metrics["loss"]), "devices": mesh.size}


def train_rows(name: str, label: str, config, impls, batches, steps: int) -> list[dict]:
    """One row per implementation: the largest batch of `batches` that fits (searched with the first impl)."""
    import jax

    from perceiver_ar_jax.training import metrics as metrics_lib
    from perceiver_ar_jax.training import model_config_from

    rows, best = [], None
    for impl in impls:
        config.model.attention_impl = impl
        row = {"workload": label, "attention": impl}
        candidates = batches if best is None else [best]
        for per_device in candidates:
            try:
                result = time_train_step(config, per_device, steps)
            except Exception as e:  # noqa: BLE001 - an out-of-memory error ends the search; others are reported
                if out_of_memory(e):
                    row.setdefault("note", f"out of memory at per-device batch {per_device}")
                    break
                row["note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                break
            row.update(result, per_device_batch=per_device)
            row.pop("note", None)
        if "step_s" in row:
            best = row["per_device_batch"] if best is None else best
            seq_len = config.model.max_seq_len
            row["tokens_per_s"] = row["batch_size"] * seq_len / row["step_s"]
            peak = metrics_lib.peak_flops_per_device(jax.devices()[0])
            flops = metrics_lib.train_flops_per_step(model_config_from(config), row["batch_size"], seq_len)
            row["mfu"] = None if peak is None else flops / row["step_s"] / (peak * row["devices"])
        rows.append(row)
    return rows


def decode_rows(config, prompt_len: int, num_latents: int, new_tokens: int, size: str = "") -> list[dict]:
    """generate at batch 1, 8 and 64: new tokens per second of the whole call, compilation excluded."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from perceiver_ar_jax.model import CausalLanguageModel
    from perceiver_ar_jax.sampling import generate
    from perceiver_ar_jax.training import model_config_from

    model_config = model_config_from(config).replace(attention_impl="auto")
    model = CausalLanguageModel(model_config)
    params = jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32),
                                                 prefix_len=0)["params"]))()
    rows = []
    for batch in DECODE_BATCHES:
        ids = np.random.default_rng(batch).integers(1, model_config.vocab_size, (batch, prompt_len))
        row = {"workload": f"decode {size}455M, prompt {prompt_len}, {new_tokens} new", "attention": "cached",
               "batch_size": batch}
        try:
            def call(ids=ids):
                return jax.block_until_ready(generate(model, params, ids, num_latents=num_latents,
                                                      max_new_tokens=new_tokens, cache="perceiver-io"))

            t0 = time.perf_counter()
            call()
            row["compile_s"] = time.perf_counter() - t0
            times = []
            for _ in range(2):
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
            row["step_s"] = min(times)
            row["tokens_per_s"] = batch * new_tokens / row["step_s"]
        except Exception as e:  # noqa: BLE001
            row["note"] = "out of memory" if out_of_memory(e) else f"{type(e).__name__}: {str(e)[:120]}"
        rows.append(row)
    return rows


def table(rows: list[dict], header: str) -> str:
    lines = [header, "", "| workload | attention | batch (per device) | tokens/s | MFU | s per step / call | notes |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        batch = "" if "batch_size" not in r else (
            f"{r['batch_size']} ({r['per_device_batch']})" if "per_device_batch" in r else str(r["batch_size"]))
        tokens = f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "-"
        mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "-"
        step = f"{r['step_s']:.4f}" if "step_s" in r else "-"
        notes = r.get("note", "") or (f"compile {r['compile_s']:.0f} s" if "compile_s" in r else "")
        lines.append(f"| {r['workload']} | {r['attention']} | {batch} | {tokens} | {mfu} | {step} | {notes} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (the default when there is no accelerator)")
    parser.add_argument("--steps", type=int, default=5, help="timed train steps per row (after a compiling one)")
    parser.add_argument("--max-batch", type=int, default=256, help="largest per-device batch tried for 455M")
    parser.add_argument("--impls", default="", help="comma-separated attention implementations (default: all "
                                                    "that apply on this backend)")
    parser.add_argument("--skip", default="", help="comma-separated rows to skip: train,decode,long")
    parser.add_argument("--json", default="", help="also write the rows here")
    args = parser.parse_args(argv)

    import jax

    backend = jax.default_backend()
    tiny = args.tiny or backend == "cpu"
    impls = tuple(args.impls.split(",")) if args.impls else IMPLS.get(backend, IMPLS["cpu"])
    skip = set(filter(None, args.skip.split(",")))
    device = jax.devices()[0]
    header = (f"{jax.device_count()} x {getattr(device, 'device_kind', backend)} ({backend}), jax {jax.__version__}"
              f"{', tiny sizes (--tiny)' if tiny else ''}")
    print(header, flush=True)
    rows, size = [], "tiny " if tiny else ""
    if "train" not in skip:
        seq = 256 if tiny else 1024
        config = training_config("c4_455m", tiny, seq, seq // 2)
        batches = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if b <= (8 if tiny else args.max_batch)]
        rows += train_rows("c4_455m", f"train {size}455M, {seq} tokens", config, impls, batches, args.steps)
    if "decode" not in skip:
        config = training_config("c4_455m", tiny, 256 if tiny else 1024, 128 if tiny else 512)
        rows += decode_rows(config, 64 if tiny else 512, 32 if tiny else 256, 16 if tiny else 128, size)
    if "long" not in skip:
        seq = 4096 if tiny else 65536
        config = training_config("long_context_64k", tiny, seq, 256 if tiny else 1024)
        rows += train_rows("long_context_64k", f"train {size}64k-context model, {seq} tokens", config, impls, [1],
                           max(1, args.steps // 2))
    print(table(rows, header), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
