"""Generation throughput: our compiled decode loop against perceiver-io's `generate`, on the same machine in one run.

    python bench/generate.py [--quick] [--batch-sizes 1,8] [--modes perceiver-io,windowed,exact] [--dtypes fp32,bf16]
                             [--budget 30] [--threads 2] [--ref-python /tmp/ref-venv/bin/python]
                             [--ref-script ../shared/reference/bench_torch.py] [--skip-reference] [--json OUT.json]

The "bench" config of ../shared/reference/bench_torch.py (vocab 32000, 512 channels, 8 heads, 6 self-attention
layers, max_seq_len 1024, max_latents 256, no absolute position embedding, output norm, no output bias; random
init): prompts of 512 random tokens, num_latents 256, 128 new tokens, greedy. New tokens/s = batch * 128 / time
of the whole call (prefill included), as the reference counts them; compile time is reported separately (first
call minus a warm call). The reference runs `bench_torch.py --only generate1,generate8` in its own venv
(perceiver-io's cached generate, i.e. the work of our "perceiver-io" cache mode); "windowed" (the default) does the
same work plus a forward pass over 128 latents when the latent caches overflow (here at the first step and every
128 steps); "exact" mode recomputes the 256 latents every step (the prefix grows from the first step here), so it
does far more work and is reported for information. fp32: float32 parameters and compute; bf16: bfloat16
parameters and compute (the reference's bf16 is torch.autocast over float32 weights). Both sides are limited
to --threads cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_model import BENCH_MODEL, DTYPES  # bench/, this script's directory

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_REF_PYTHON = os.environ.get("PERCEIVER_IO_PYTHON", "/tmp/ref-venv/bin/python")
SHARED = Path(os.environ.get("PERCEIVER_AR_SHARED", REPO.parent / "shared"))
DEFAULT_REF_SCRIPT = SHARED / "reference" / "bench_torch.py"
PROMPT_LEN, NUM_LATENTS, NEW_TOKENS = 512, 256, 128


def stats(xs: list[float]) -> dict[str, float]:
    return dict(min=min(xs), median=statistics.median(xs), max=max(xs), n=len(xs))


def repeat(fn, budget_s: float, min_runs: int, max_runs: int = 10) -> list[float]:
    times, start = [], time.perf_counter()
    while len(times) < max_runs:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= min_runs and time.perf_counter() - start + times[-1] > budget_s:
            break
    return times


# ------------------------------------------------------------------------------------------------ ours
def bench_ours(dtype: str, mode: str, batch_size: int, budget_s: float, min_runs: int) -> dict:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from perceiver_ar_jax.model import CausalLanguageModel, CausalLanguageModelConfig
    from perceiver_ar_jax.sampling import Decoding
    from perceiver_ar_jax.sampling.request import decoding_params

    config = CausalLanguageModelConfig(**BENCH_MODEL, dtype=DTYPES[dtype], param_dtype=DTYPES[dtype])
    model = CausalLanguageModel(config)
    params = jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32),
                                                 prefix_len=0)["params"]))()
    params = decoding_params(params, config, "float32", remember=False)  # what generate() and Generator run
    prompt = np.random.default_rng(1).integers(0, config.vocab_size, (batch_size, PROMPT_LEN))

    def run(stop: int = NEW_TOKENS) -> np.ndarray:
        decoding = Decoding(config, prompt, num_latents=NUM_LATENTS, max_new_tokens=NEW_TOKENS, cache=mode)
        decoding.advance(params, stop)
        return decoding.new_tokens()  # fetching the tokens waits for the computation

    t0 = time.perf_counter()
    tokens = run()
    first_s = time.perf_counter() - t0
    assert tokens.shape == (batch_size, NEW_TOKENS), tokens.shape
    times = repeat(run, budget_s * 0.75, min_runs)
    prefill = repeat(lambda: run(1), budget_s * 0.25, min_runs)  # the same compiled loop, stopped after prefill
    generate_s, prefill_s = statistics.median(times), statistics.median(prefill)
    return dict(dtype=dtype, mode=mode, batch=batch_size, generate_s=stats(times), prefill_s=stats(prefill),
                compile_s=max(first_s - generate_s, 0.0),
                new_tokens_per_s=stats([batch_size * NEW_TOKENS / t for t in times]),
                decode_only_new_tokens_per_s_median=batch_size * (NEW_TOKENS - 1) / max(generate_s - prefill_s, 1e-9),
                device=str(jax.devices()[0]))


# ------------------------------------------------------------------------------------------------ reference
def bench_reference(python: str, script: Path, dtype: str, batch_sizes: list[int], budget_s: float,
                    threads: int) -> dict:
    only = ",".join(f"generate{b}" for b in batch_sizes)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ref.json"
        cmd = [python, str(script), "--only", only, "--threads", str(threads), "--budget", str(budget_s),
               "--dtype", dtype, "--json", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            raise SystemExit(f"reference benchmark failed ({' '.join(cmd)}):\n{proc.stdout}{proc.stderr}")
        return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------------ report
def summary_line(r: dict, ref: dict | None, ref_dtype: str | None) -> str:
    """Our result; the ratios divide our new tokens/s by the reference's (medians, and best runs: the best run
    is the least disturbed by other load on the machine)."""
    tps, best = r["new_tokens_per_s"]["median"], r["new_tokens_per_s"]["max"]
    ratio = "vs reference: -"
    if ref:
        ratio = (f"vs reference {ref_dtype}: {tps / ref['new_tokens_per_s']['median']:5.2f}x median, "
                 f"{best / ref['new_tokens_per_s']['max']:5.2f}x best")
    g = r["generate_s"]
    return (f"  ours {r['dtype']:4s} {r['mode']:12s} batch {r['batch']}: {tps:8.1f} new tok/s (best {best:.1f})"
            f"  {ratio}"
            f"\n      generate s {g['median']:.3f} (min {g['min']:.3f}, n={g['n']})  prefill s "
            f"{r['prefill_s']['median']:.3f}  decode-only tok/s {r['decode_only_new_tokens_per_s_median']:.1f}  "
            f"compile s {r['compile_s']:.1f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--modes", default="perceiver-io,windowed,exact", help="cache modes of ours (comma-separated)")
    ap.add_argument("--exact-batch-sizes", default="1",
                    help="batch sizes for exact mode (it recomputes 256 latents per step: slow at batch 8)")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--budget", type=float, default=30.0, help="seconds of timed runs per measurement")
    ap.add_argument("--threads", type=int, default=2, help="cores for both sides (the reference's torch threads)")
    ap.add_argument("--ref-python", default=DEFAULT_REF_PYTHON)
    ap.add_argument("--ref-script", default=str(DEFAULT_REF_SCRIPT))
    ap.add_argument("--ref-bf16", action="store_true", help="also run the reference under bf16 autocast")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--quick", action="store_true", help="fp32, perceiver-io mode, 1 timed run each, short budget")
    ap.add_argument("--json", help="write all results here")
    args = ap.parse_args(argv)

    if args.quick:
        args.dtypes, args.modes, args.budget = "fp32", "perceiver-io", min(args.budget, 5.0)
    min_runs = 1 if args.quick else 3
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    exact_batches = [int(b) for b in args.exact_batch_sizes.split(",")]
    # our process gets the same number of cores as the reference's torch threads (XLA:CPU uses every core it sees)
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > args.threads:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])

    results = dict(config=BENCH_MODEL, prompt_len=PROMPT_LEN, num_latents=NUM_LATENTS, new_tokens=NEW_TOKENS,
                   threads=args.threads, reference={}, ours=[])
    if not args.skip_reference:
        ref_dtypes = ["fp32"] + (["bf16"] if args.ref_bf16 else [])
        for dtype in ref_dtypes:
            print(f"reference (perceiver-io generate, {dtype}, {args.threads} threads) ...", flush=True)
            ref = bench_reference(args.ref_python, Path(args.ref_script), dtype, batch_sizes, args.budget,
                                  args.threads)
            results["reference"][dtype] = ref
            for name, m in ref["measurements"].items():
                g = m["generate_s"]
                print(f"  reference {dtype} {name}: {m['new_tokens_per_s']['median']:8.1f} new tok/s (best "
                      f"{m['new_tokens_per_s']['max']:.1f})\n      generate s {g['median']:.3f} (min {g['min']:.3f}, "
                      f"n={g['n']})  prefill s {m['prefill_s']['median']:.3f}  decode-only tok/s "
                      f"{m['decode_only_new_tokens_per_s_median']:.1f}", flush=True)

    for dtype in args.dtypes.split(","):
        for mode in args.modes.split(","):
            for batch_size in batch_sizes:
                if mode == "exact" and batch_size not in exact_batches:
                    continue
                r = bench_ours(dtype, mode, batch_size, args.budget, min_runs)
                results["ours"].append(r)
                ref_dtype = dtype if dtype in results["reference"] else "fp32"
                ref = results["reference"].get(ref_dtype)
                ref_m = ref["measurements"].get(f"generate{batch_size}") if ref else None
                print(summary_line(r, ref_m, ref_dtype), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
