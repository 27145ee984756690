"""Long-context training cost: our train step vs perceiver-io's, step time and peak RSS per context length.

    python bench/long_context.py [--seq-lens 4096,16384,65536] [--reference-seq-lens 4096,16384,65536]
                                 [--extra-seq-lens 131072] [--ref-python /tmp/ref-venv/bin/python] [--json OUT]

Model: the "bench" config of ../shared/reference/bench_torch.py (vocab 32000, 512 channels, 8 heads, 6
self-attention layers after the hybrid layer, 256 latents, rotary positions, output norm, no dropout), batch 4,
max_seq_len = the context length L, so the prefix is L - 256 tokens. One step = forward, cross-entropy on the 256
latent positions, backward and an AdamW update (lr 3e-4, torch's defaults), float32; ours is
`perceiver_ar_jax.training.step.train_step` jitted with the state donated, the reference is `bench_torch.py --only
train --seq-len L` (LitCausalLanguageModel.step + backward + torch.optim.AdamW).

Every measurement runs in its own subprocess, so its peak RSS (ru_maxrss, compilation included for ours) is its
own. The reference at 64k needs about a minute per step and 12 GB (--reference-seq-lens picks where it runs).
`--extra-seq-lens` are lengths measured for ours only (the 131,072-token goal: within 8 GB on this 2-core CPU).
Timings on a shared machine are noisy: compare ratios measured in the same run, and use --rounds N to alternate
ours and the reference N times per length, keeping each side's fastest round. Both sides run on the same cores
(--cores, default all this process may use; the reference with one torch thread per core: bench/cores.py).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_model import BENCH_MODEL  # bench/, this script's directory
from cores import on_cores, pin_cores

REPO = Path(__file__).resolve().parents[1]
REFERENCE_BENCH = REPO.parent / "shared" / "reference" / "bench_torch.py"
BATCH = 4


# ----------------------------------------------------------------------------------------------------------------
# child: one measurement of our train step
def measure_ours(seq_len: int, impl: str, block_size: int, remat: bool, budget_s: float) -> dict:
    sys.path.insert(0, str(REPO))
    import jax
    import numpy as np
    import optax
    from flax import linen as nn

    from perceiver_ar_jax.model import CausalLanguageModel, CausalLanguageModelConfig
    from perceiver_ar_jax.training.step import TrainState, train_step

    config = CausalLanguageModelConfig(**dict(BENCH_MODEL, max_seq_len=max(seq_len, 1024)), attention_impl=impl,
                                       attention_block_size=block_size, activation_checkpointing=remat)
    model = CausalLanguageModel(config)
    optimizer = optax.adamw(3e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)  # torch.optim.AdamW defaults

    def init():
        # parameter shapes do not depend on the sequence length (rotary positions, no position table)
        params = nn.unbox(model.init(jax.random.key(0), np.zeros((1, 512), np.int32), prefix_len=256)["params"])
        return TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
                          opt_state=optimizer.init(params), rng=jax.random.key_data(jax.random.key(1)))

    state = jax.jit(init)()
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, config.vocab_size, (BATCH, seq_len + 1), dtype=np.int32)
    batch = {"input_ids": jax.numpy.asarray(tokens[:, :-1]), "labels": jax.numpy.asarray(tokens[:, 1:]),
             "pad_mask": jax.numpy.zeros((BATCH, seq_len), bool)}
    step = jax.jit(lambda s, b: train_step(s, b, model=model, optimizer=optimizer), donate_argnums=0)

    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    losses, times = [], []

    def run():
        nonlocal state
        t = time.perf_counter()
        state, metrics = compiled(state, batch)
        losses.append(float(metrics["loss"]))  # blocks until the step is done
        return time.perf_counter() - t

    run()  # warm-up: first execution allocates buffers
    start = time.perf_counter()
    while len(times) < 20:
        times.append(run())
        if len(times) >= 3 and time.perf_counter() - start + times[-1] > budget_s:
            break
    return dict(step_s=_stats(times), compile_s=compile_s, loss_first_last=[losses[0], losses[-1]],
                peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
                num_params=int(sum(x.size for x in jax.tree_util.tree_leaves(state.params))),
                attention_impl=impl, block_size=block_size, remat=remat, backend=jax.default_backend())


def _stats(xs: list[float]) -> dict:
    return dict(min=min(xs), median=statistics.median(xs), max=max(xs), n=len(xs))


# ----------------------------------------------------------------------------------------------------------------
# parent: subprocesses and the table
def run_ours(seq_len: int, args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--_child", str(seq_len), "--impl", args.impl,
               "--block-size", str(args.block_size), "--budget", str(args.budget)] + (["--remat"] if args.remat else [])
    return _run(command, lambda out: json.loads(out.split("@@RESULT@@", 1)[1].splitlines()[0]), args.cores)


def run_reference(seq_len: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ref.json"
        command = [args.ref_python, str(args.ref_script), "--only", "train", "--seq-len", str(seq_len), "--json",
                   str(out), "--threads", str(len(args.cores)), "--budget", str(args.budget)]
        return _run(command, lambda _: json.loads(out.read_text())["measurements"]["train"], args.cores)


def _run(command: list[str], parse, cores: list[int]) -> dict:
    t0 = time.time()
    proc = subprocess.run(command, capture_output=True, text=True, **on_cores(cores))
    if proc.returncode != 0:
        return dict(error=(proc.stdout + proc.stderr)[-2000:], returncode=proc.returncode)
    result = parse(proc.stdout)
    result["wall_s_incl_setup"] = time.time() - t0
    return result


def table(results: dict) -> str:
    rows = ["| L | prefix | ours step s (median) | ours peak RSS MiB | ref step s (median) | ref peak RSS MiB "
            "| speed-up | memory ratio |", "|---|---|---|---|---|---|---|---|"]
    for seq_len, r in sorted(results.items(), key=lambda kv: int(kv[0])):
        ours, ref = r.get("ours", {}), r.get("reference", {})
        cell = lambda m, key: (f"{m['step_s']['median']:.2f}" if key == "step" else f"{m['peak_rss_mib']:.0f}") \
            if m and "error" not in m else ("failed" if m else "-")  # noqa: E731
        speed = mem = "-"
        if ours and ref and "error" not in ours and "error" not in ref:
            speed = f"{ref['step_s']['median'] / ours['step_s']['median']:.2f}x"
            mem = f"{ours['peak_rss_mib'] / ref['peak_rss_mib']:.2f}"
        rows.append(f"| {seq_len} | {int(seq_len) - BENCH_MODEL['max_latents']} | {cell(ours, 'step')} | "
                    f"{cell(ours, 'rss')} | {cell(ref, 'step')} | {cell(ref, 'rss')} | {speed} | {mem} |")
    return "\n".join(rows)


def linearity(results: dict) -> str:
    """Seconds per 1k prefix tokens between consecutive lengths: constant if the step is linear in the prefix."""
    points = sorted((int(n), r["ours"]["step_s"]["median"]) for n, r in results.items()
                    if "ours" in r and "error" not in r["ours"])
    slopes = [f"{a}->{b}: {1000 * (tb - ta) / (b - a):.4f} s per 1k prefix tokens"
              for (a, ta), (b, tb) in zip(points, points[1:], strict=False)]
    return "ours, marginal cost: " + ("; ".join(slopes) if slopes else "(needs two lengths)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-lens", default="4096,16384,65536", help="context lengths for ours (and the reference)")
    ap.add_argument("--reference-seq-lens", default="4096,16384,65536",
                    help="subset of the lengths the reference runs for ('' = none); 65536 takes minutes")
    ap.add_argument("--extra-seq-lens", default="", help="lengths for ours only, e.g. 131072")
    ap.add_argument("--ref-python", default=os.environ.get("PERCEIVER_IO_PYTHON", "/tmp/ref-venv/bin/python"))
    ap.add_argument("--ref-script", default=str(REFERENCE_BENCH))
    ap.add_argument("--impl", default="auto", choices=("auto", "xla", "blockwise", "splash"))
    ap.add_argument("--block-size", type=int, default=512, help="key block length of the blockwise attention")
    ap.add_argument("--remat", action="store_true", help="activation checkpointing (recompute layers in backward)")
    ap.add_argument("--cores", default=None, help="CPU cores of both sides, e.g. 0,1 (default: all allowed); the "
                    "reference runs one torch thread per core")
    ap.add_argument("--budget", type=float, default=60.0, help="seconds of timed steps per measurement")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure ours and the reference alternately this many times per length, keep the fastest")
    ap.add_argument("--json", help="write all results to this file")
    ap.add_argument("--_child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        result = measure_ours(args._child, args.impl, args.block_size, args.remat, args.budget)
        print("@@RESULT@@" + json.dumps(result))
        return

    args.cores = pin_cores(args.cores)
    print(f"both sides on cores {args.cores} ({len(args.cores)} torch threads)", flush=True)
    lengths = [int(n) for n in args.seq_lens.split(",") if n]
    reference_lengths = {int(n) for n in args.reference_seq_lens.split(",") if n}
    extra = [int(n) for n in args.extra_seq_lens.split(",") if n]
    if reference_lengths and not Path(args.ref_python).exists():
        sys.exit(f"--ref-python {args.ref_python} does not exist (make it with ../shared/reference/"
                 "setup-reference.sh, or pass --reference-seq-lens '')")
    results: dict[str, dict] = {}
    for seq_len in sorted(set(lengths) | set(extra)):
        entry = results.setdefault(str(seq_len), {})
        # alternate ours and the reference, keeping each side's fastest round: on a shared machine the load
        # changes between measurements, and the least disturbed round is the best estimate of either
        for round_index in range(args.rounds):
            sides = [("ours", run_ours)] + ([("reference", run_reference)] if seq_len in reference_lengths else [])
            for side, run in sides:
                result = run(seq_len, args)
                result["round"] = round_index
                print(f"L={seq_len} {side} (round {round_index + 1}/{args.rounds}): {_summary(result)}", flush=True)
                entry.setdefault("all_rounds", {}).setdefault(side, []).append(result)
                if _better(result, entry.get(side)):
                    entry[side] = result
    print()
    print(table(results))
    print(linearity(results))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(batch=BATCH, model=BENCH_MODEL, impl=args.impl, cores=args.cores,
                                                   block_size=args.block_size, remat=args.remat,
                                                   loadavg=os.getloadavg(), results=results), indent=1))


def _better(result: dict, best: dict | None) -> bool:
    if best is None or "error" in best:
        return True
    return "error" not in result and result["step_s"]["median"] < best["step_s"]["median"]


def _summary(r: dict) -> str:
    if "error" in r:
        return f"FAILED (rc {r['returncode']}): {r['error'][-300:]}"
    s = r["step_s"]
    extra = f", compile {r['compile_s']:.1f} s" if "compile_s" in r else ""
    return (f"step s min/med/max {s['min']:.2f}/{s['median']:.2f}/{s['max']:.2f} (n={s['n']}), "
            f"peak RSS {r['peak_rss_mib']:.0f} MiB{extra}")


if __name__ == "__main__":
    main()
