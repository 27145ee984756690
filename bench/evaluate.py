"""Long-document evaluation throughput: our `evaluate` against perceiver-io's forward over the same windows, one run.

    python bench/evaluate.py [--documents 8] [--doc-tokens 3000] [--batch-size 8] [--stride 256] [--runs 3]
                             [--cores 0,1] [--ref-python /tmp/ref-venv/bin/python] [--skip-reference] [--json OUT]

The "bench" model (bench_model.py: vocab 32000, 512 channels, 8 heads, 6 self-attention layers, max_seq_len
1024, 256 latents), fp32, random parameters. Documents of random token ids are scored by our `evaluate` (windows
of 1024 tokens, 256 latents, the given stride; first window in blocks of 256); the very same batches of windows
are written to a file and scored by perceiver-io 0.11 (bench/evaluate_reference.py in the reference venv: its
forward under no_grad + the cross-entropy of the scored positions), from our parameters exported with
`export_torch_checkpoint`, so the summed losses of the two must agree too. Both processes are pinned to the same
cores (--cores, default the first two this process may use), torch with as many threads. The reference process
stays loaded and the two sides alternate, round after round (a matmul peak, our pass, its pass), so that both see
the machine in the same state (on a shared machine its speed drifts by up to 2x within minutes).

Reported: scored tokens per second of each side (the whole evaluate call for ours, host work included; compile
time left out, reported separately), their ratio, and each side's model FLOP/s (matmul FLOPs of the forward
passes, training.metrics.forward_flops) as a fraction of the machine's fp32 matmul peak, measured in every round
as the best of a 2048^3 float32 matmul in numpy and in JAX.
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

from bench_model import BENCH_MODEL  # bench/, this script's directory

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_REF_PYTHON = os.environ.get("PERCEIVER_IO_PYTHON", "/tmp/ref-venv/bin/python")


def matmul_peak(size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Best FLOP/s of a size^3 float32 matmul in numpy and in JAX (the machine's practical fp32 peak)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((size, size), dtype=np.float32)
    flops = 2.0 * size**3
    out = {}
    for name, fn in (("numpy", lambda: a @ b), ("jax", jax.jit(jnp.matmul).lower(a, b).compile())):
        args = () if name == "numpy" else (jnp.asarray(a), jnp.asarray(b))
        best = float("inf")
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            result = fn(*args)
            if name == "jax":
                result.block_until_ready()
            best = min(best, time.perf_counter() - t0)
        out[name] = flops / best
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--documents", type=int, default=8)
    ap.add_argument("--doc-tokens", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3, help="rounds: a matmul peak, our pass, the reference's pass")
    ap.add_argument("--cores", default=None, help="CPU ids both sides are pinned to (default: the first two)")
    ap.add_argument("--ref-python", default=DEFAULT_REF_PYTHON)
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--json", help="write all results to this file")
    args = ap.parse_args()

    cores = sorted(os.sched_getaffinity(0))[:2] if args.cores is None else [int(c) for c in args.cores.split(",")]
    os.sched_setaffinity(0, set(cores))  # before JAX starts its thread pools

    import jax
    import numpy as np

    from perceiver_ar_jax.evaluation import WindowSpec, evaluate
    from perceiver_ar_jax.evaluation.batches import batches
    from perceiver_ar_jax.evaluation.results import DocumentScore
    from perceiver_ar_jax.model import CausalLanguageModel, CausalLanguageModelConfig
    from perceiver_ar_jax.model.causal_lm import abstract_params
    from perceiver_ar_jax.training.metrics import forward_flops

    config = CausalLanguageModelConfig(**BENCH_MODEL, dtype="float32")
    model = CausalLanguageModel(config)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: (rng.standard_normal(a.shape) * 0.05).astype(np.float32), abstract_params(config))
    bos = 1
    docs = [rng.integers(2, config.vocab_size, args.doc_tokens).tolist() for _ in range(args.documents)]
    spec = WindowSpec.for_model(config.max_seq_len, config.max_latents, stride=args.stride)

    # the windows our evaluate runs, as batches (for the reference and for the FLOP count)
    prepared = [(DocumentScore(i, len(d), None), np.asarray([bos, *d], np.int32)) for i, d in enumerate(docs)]
    plan = list(batches(prepared, spec, args.batch_size, pad_id=0))
    num_windows = len(plan) * args.batch_size
    flops = forward_flops(config, num_windows, spec.window, spec.prefix_len)
    def ours_pass() -> tuple[float, float]:
        t0 = time.perf_counter()
        result = evaluate(model, params, docs, bos_id=bos, stride=args.stride, batch_size=args.batch_size,
                          keep_token_losses=False)
        return time.perf_counter() - t0, result.loss_sum

    first_s, _ = ours_pass()  # compiles
    tokens = sum(len(d) for d in docs)
    with tempfile.TemporaryDirectory() as tmp:
        reference = None if args.skip_reference else start_reference(args, config, params, spec, plan, cores, tmp)
        rounds = []
        for _ in range(args.runs):  # alternate, so that both sides see the machine in the same state
            peak = matmul_peak()
            entry = {"matmul_peak_flops": peak, "peak": max(peak.values())}
            entry["ours_s"], entry["ours_loss_sum"] = ours_pass()
            if reference is not None:
                reference.stdin.write("pass\n")
                reference.stdin.flush()
                answer = json.loads(reference.stdout.readline())
                entry["reference_s"], entry["reference_loss_sum"] = answer["seconds"], answer["loss_sum"]
            rounds.append(entry)
            print("round: " + " | ".join(f"{k} {v:.4g}" for k, v in entry.items() if k != "matmul_peak_flops"),
                  flush=True)
        if reference is not None:
            reference.stdin.close()
            reference.wait()

    def side(name: str) -> dict:
        seconds = [r[f"{name}_s"] for r in rounds]
        median = statistics.median(seconds)
        fractions = [flops / r[f"{name}_s"] / r["peak"] for r in rounds]
        return {"seconds": seconds, "median_s": median, "tokens_per_s": tokens / median,
                "flops_per_s": flops / median, "peak_fraction": statistics.median(fractions),
                "loss_sum": rounds[-1][f"{name}_loss_sum"]}

    peak_median = statistics.median(r["peak"] for r in rounds)
    print(f"cores {cores} | fp32 matmul peak (best of numpy / JAX 2048^3, median over rounds) "
          f"{peak_median / 1e9:.0f} GFLOP/s | {args.documents} documents x {args.doc_tokens} tokens = {tokens} "
          f"tokens, {len(plan)} batches of {args.batch_size} windows ({spec.window} tokens, {spec.num_latents} "
          f"latents, stride {spec.stride}), {flops / num_windows / 1e9:.1f} GFLOP per window")
    ours = side("ours")
    ours["first_call_s"] = first_s
    out = {"config": BENCH_MODEL, "dtype": "float32", "documents": args.documents, "doc_tokens": args.doc_tokens,
           "batch_size": args.batch_size, "window": spec.window, "num_latents": spec.num_latents,
           "stride": spec.stride, "windows": num_windows, "tokens": tokens, "model_flops": flops, "cores": cores,
           "rounds": rounds, "ours": ours, "jax": jax.__version__}
    print(f"ours:         {ours['tokens_per_s']:8.1f} tokens/s ({ours['median_s']:.2f} s per pass; first call "
          f"{first_s:.1f} s incl. compile) | {ours['flops_per_s'] / 1e9:.0f} GFLOP/s, "
          f"{100 * ours['peak_fraction']:.0f}% of peak")
    if reference is not None:
        ref = side("reference")
        ratios = [r["reference_s"] / r["ours_s"] for r in rounds]
        out.update(reference=ref, ratio=ours["tokens_per_s"] / ref["tokens_per_s"], round_ratios=ratios)
        print(f"perceiver-io: {ref['tokens_per_s']:8.1f} tokens/s ({ref['median_s']:.2f} s per pass) | "
              f"{ref['flops_per_s'] / 1e9:.0f} GFLOP/s, {100 * ref['peak_fraction']:.0f}% of peak")
        print(f"ratio ours / perceiver-io: {out['ratio']:.2f}x (medians; per round "
              f"{', '.join(f'{x:.2f}' for x in ratios)}) | summed loss ours {ours['loss_sum']:.4f}, perceiver-io "
              f"{ref['loss_sum']:.4f} (relative difference {abs(ours['loss_sum'] / ref['loss_sum'] - 1):.1e})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


def start_reference(args, config, params, spec, plan, cores, tmp) -> subprocess.Popen:
    """perceiver-io, loaded from our exported parameters with our batches of windows, waiting for `pass` lines."""
    import numpy as np

    from perceiver_ar_jax.convert import export_torch_checkpoint

    export_torch_checkpoint(config, params, os.path.join(tmp, "model"))
    windows = {k: np.stack([getattr(b.rows, k) for b in plan]) for k in ("input_ids", "pad_mask", "labels",
                                                                         "weights")}
    np.savez(os.path.join(tmp, "windows.npz"), prefix_len=spec.prefix_len, **windows)
    proc = subprocess.Popen([args.ref_python, str(REPO / "bench" / "evaluate_reference.py"),
                             os.path.join(tmp, "model"), os.path.join(tmp, "windows.npz"), "--threads",
                             str(len(cores)), "--cores", ",".join(map(str, cores))],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("ready"):
        raise SystemExit(f"reference failed to start ({args.ref_python}): {line}")
    return proc


if __name__ == "__main__":
    main()
