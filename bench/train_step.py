"""Training-step throughput: our jitted train step against perceiver-io's, on the same machine in one run.

    python bench/train_step.py [--dtypes fp32,bf16] [--budget 60] [--rounds 3] [--ref-python /tmp/ref-venv/bin/python]
                               [--skip-reference] [--cores 0,1] [--loss-chunk-tokens N] [--no-reuse-host-memory]
                               [--json OUT.json]

The "bench" config of ../shared/reference/bench_torch.py: vocab 32000, 512 channels, 8 heads, 6 self-attention
layers, max_seq_len 1024, 256 latents, no absolute position embedding, output norm, no output bias, no dropout;
batch 4 x 1024 tokens (prefix 768), AdamW lr 3e-4. The reference step is `LitCausalLanguageModel.step` + backward
+ `torch.optim.AdamW.step` (fp32, or under torch.autocast(bfloat16) for bf16); ours is `train_step.train_step`
(cross-entropy on the latent positions, AdamW from optax, no clipping as in the reference) with dtype float32 or
bfloat16 compute (float32 parameters and optimizer state). tokens/s count batch x latents (the positions trained).
Both sides run on the same cores (--cores, default all this process may use): ours pinned, the reference started
on them with one torch thread per core (bench/cores.py).

It also prints the step's FLOPs (the matrix products of the forward pass times 3, `training.metrics.
train_flops_per_step`, the same for both sides and dtypes; XLA's cost analysis of our compiled step is recorded
beside it, but it counts a while loop's body once and no custom call's products)
and the matmul peaks measured in the same run on the same cores: a 2048^3 product in float32 and in
bfloat16 x bfloat16 -> float32, in JAX and in torch. Each side's step is then given as a fraction of its own
library's peak of both dtypes (FLOPs / step time / peak). The two sides alternate for --rounds rounds (ours timed
in this process, then a fresh reference process, and again): this VM's speed drifts up to 2x within minutes, so
single back-to-back runs gave ratios from 0.86x to 1.29x for one and the same code; each round's ratio compares
minutes-apart measurements, and the median of the rounds is reported. --no-reuse-host-memory times our step without
`backend.reuse_host_memory` (every step page-faults its buffers in again, as before it existed).
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
from collections.abc import Callable
from pathlib import Path

from bench_model import BENCH_MODEL, DTYPES  # bench/, this script's directory
from cores import on_cores, pin_cores

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REF_SCRIPT = REPO.parent / "shared" / "reference" / "bench_torch.py"
BATCH, SEQ_LEN = 4, 1024


def repeat(fn, warmup: int, budget_s: float, min_runs: int = 3, max_runs: int = 20) -> tuple[list[float], list[float]]:
    """bench_torch.py's timing loop -> (wall seconds, process CPU seconds) per run."""
    for _ in range(warmup):
        fn()
    times, cpu_times, start = [], [], time.perf_counter()
    while len(times) < max_runs:
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        if len(times) >= min_runs and time.perf_counter() - start + times[-1] > budget_s:
            break
    return times, cpu_times


PEAK_N = 2048  # the matmul peaks: one N^3 product, best of a few runs

TORCH_PEAK = f"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
n = {PEAK_N}
a, b = torch.randn(n, n), torch.randn(n, n)
out = {{}}
for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
    x, y = a.to(dtype), b.to(dtype)
    x @ y
    times = []
    for _ in range(8):
        t0 = time.perf_counter()
        x @ y
        times.append(time.perf_counter() - t0)
    out[name] = 2 * n ** 3 / min(times) / 1e9
print(json.dumps(out))
"""


def jax_peaks() -> dict[str, float]:
    """GFLOP/s of one 2048^3 product in JAX: float32, and bfloat16 operands with float32 accumulation."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (PEAK_N, PEAK_N))
    out = {}
    for name, dtype in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
        x = a.astype(dtype)
        product = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
        product(x, x).block_until_ready()
        times = []
        for _ in range(8):
            t0 = time.perf_counter()
            product(x, x).block_until_ready()
            times.append(time.perf_counter() - t0)
        out[name] = 2 * PEAK_N ** 3 / min(times) / 1e9
    return out


def torch_peaks(ref_python: str, cores: list[int]) -> dict[str, float]:
    """The same products in torch, on the same cores with one thread per core."""
    proc = subprocess.run([ref_python, "-c", TORCH_PEAK, str(len(cores))], capture_output=True, text=True,
                          **on_cores(cores))
    if proc.returncode != 0:
        raise SystemExit(f"torch peak failed ({ref_python}):\n{proc.stdout}{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def stats(xs: list[float]) -> dict[str, float]:
    return dict(min=min(xs), median=statistics.median(xs), max=max(xs), n=len(xs))


def prepare_ours(dtype: str, remat_policy: str | None, attention_impl: str,
                 loss_chunk_tokens: int | None = None) -> tuple[dict, Callable[[float], dict]]:
    """Our compiled step -> (what it is, a timer: budget seconds -> the timings of that many seconds of steps)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np

    from perceiver_ar_jax.model import CausalLanguageModel, CausalLanguageModelConfig
    from perceiver_ar_jax.training import optimizer as optim
    from perceiver_ar_jax.training.metrics import train_flops_per_step
    from perceiver_ar_jax.training.step import TrainState, train_step

    config = CausalLanguageModelConfig(**BENCH_MODEL, dtype=DTYPES[dtype], attention_impl=attention_impl,
                                       activation_checkpointing=remat_policy is not None,
                                       remat_policy=remat_policy or "nothing_saveable")
    model = CausalLanguageModel(config)
    # constant lr 3e-4 (min_fraction 1), torch AdamW defaults, no clipping: the reference's optimizer step
    optimizer = optim.make_optimizer(ml_collections.ConfigDict(dict(
        learning_rate=3e-4, warmup_steps=0, num_train_steps=1, lr_min_fraction=1.0, adam_b1=0.9, adam_b2=0.999,
        adam_eps=1e-8, weight_decay=0.01, max_grad_norm=0.0)))
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32), prefix_len=0)["params"])
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                       rng=jax.random.key_data(jax.random.key(1)))
    rng = np.random.default_rng(1)
    seq = rng.integers(0, config.vocab_size, size=(BATCH, SEQ_LEN + 1))
    batch = {"input_ids": jnp.asarray(seq[:, :-1], jnp.int32), "labels": jnp.asarray(seq[:, 1:], jnp.int32),
             "pad_mask": jnp.zeros((BATCH, SEQ_LEN), bool)}
    # the cross-entropy's chunk (rows x vocab logits at once); None: train_step's default
    chunk = {} if loss_chunk_tokens is None else {"chunk_tokens": loss_chunk_tokens}
    step = jax.jit(lambda s, b: train_step(s, b, model=model, optimizer=optimizer, **chunk), donate_argnums=(0,))

    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    holder = {"state": state}
    losses = []

    def run():
        holder["state"], metrics = compiled(holder["state"], batch)
        losses.append(float(metrics["loss"]))  # waits for the step, as the reference's float(loss) does

    def timer(budget_s: float) -> dict:
        times, cpu_times = repeat(run, warmup=2, budget_s=budget_s)
        return dict(step_s=stats(times),
                    step_cpu_s=stats(cpu_times),  # all threads' CPU time: steadier than wall time on a busy machine
                    tokens_per_s_latents=stats([BATCH * config.max_latents / t for t in times]),
                    tokens_per_s_seq=stats([BATCH * SEQ_LEN / t for t in times]),
                    loss_first_last=[losses[0], losses[-1]])

    num_params = sum(x.size for x in jax.tree.leaves(params))
    return dict(impl="perceiver-ar-jax", dtype=dtype, compile_s=compile_s, num_params=int(num_params),
                step_flops=train_flops_per_step(config, BATCH, SEQ_LEN), xla_cost_analysis_flops=float(
                    cost.get("flops", 0.0)), remat_policy=remat_policy, attention_impl=attention_impl,
                loss_chunk_tokens=loss_chunk_tokens, jax=jax.__version__, devices=str(jax.devices())), timer


def bench_reference(dtype: str, budget_s: float, ref_python: str, ref_script: str, cores: list[int]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ref.json")
        proc = subprocess.run([ref_python, ref_script, "--only", "train", "--dtype", dtype, "--budget", str(budget_s),
                               "--json", out, "--threads", str(len(cores))], capture_output=True, text=True,
                              **on_cores(cores))
        if proc.returncode != 0:
            raise SystemExit(f"reference benchmark failed ({ref_python} {ref_script}):\n{proc.stdout}{proc.stderr}")
        with open(out) as f:
            result = json.load(f)
    train = result["measurements"]["train"]
    return dict(impl="perceiver-io", dtype=dtype, step_s=train["step_s"],
                tokens_per_s_latents=train["tokens_per_s_latents"], tokens_per_s_seq=train["tokens_per_s_seq"],
                num_params=train["num_params"], peak_rss_mib=train["peak_rss_mib"], env=result["env"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated subset of fp32,bf16")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds of timed steps per side and dtype")
    parser.add_argument("--rounds", type=int, default=3,
                        help="the sides alternate this many times per dtype, each round with budget / rounds "
                             "seconds; the ratio is the median of the rounds' ratios")
    parser.add_argument("--ref-python", default=os.environ.get("PERCEIVER_IO_PYTHON", "/tmp/ref-venv/bin/python"))
    parser.add_argument("--ref-script", default=str(DEFAULT_REF_SCRIPT))
    parser.add_argument("--skip-reference", action="store_true", help="time our step only")
    parser.add_argument("--remat-policy", default=None, help="rematerialise layers with this policy (default: off)")
    parser.add_argument("--attention-impl", default="auto")
    parser.add_argument("--loss-chunk-tokens", type=int, default=None,
                        help="rows of logits the cross-entropy computes at once (default: train_step's, 1024, "
                             "so the bench's 4 x 256 latents are one chunk; 0 = all at once)")
    parser.add_argument("--cores", default=None, help="CPU cores of both sides, e.g. 0,1 (default: all allowed)")
    parser.add_argument("--no-reuse-host-memory", action="store_true",
                        help="leave glibc's allocator as it is (every step maps its buffers afresh)")
    parser.add_argument("--json", help="write all results to this file")
    args = parser.parse_args()
    cores = pin_cores(args.cores)  # before JAX starts its thread pools
    print(f"both sides on cores {cores} ({len(cores)} torch threads)", flush=True)
    if not args.no_reuse_host_memory:
        from perceiver_ar_jax import backend

        print(f"backend.reuse_host_memory: {backend.reuse_host_memory()}")
    peaks = {"ours": jax_peaks()}
    if not args.skip_reference:
        peaks["reference"] = torch_peaks(args.ref_python, cores)
    for side, peak in peaks.items():
        print(f"{side} {PEAK_N}^3 matmul peak: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 (f32 accumulation) "
              f"{peak['bf16']:.0f} GFLOP/s", flush=True)

    def fractions(side: str, step_s: float, flops: float) -> str:
        peak = peaks[side]
        return (f"{flops / step_s / 1e9:.0f} GFLOP/s = {flops / step_s / 1e9 / peak['fp32']:.0%} of the fp32 peak, "
                f"{flops / step_s / 1e9 / peak['bf16']:.0%} of the bf16 peak")

    results = []
    for dtype in args.dtypes.split(","):
        if dtype not in DTYPES:
            raise SystemExit(f"--dtypes: {dtype!r} is not one of {sorted(DTYPES)}")
        info, timer = prepare_ours(dtype, args.remat_policy, args.attention_impl, args.loss_chunk_tokens)
        flops = info["step_flops"]
        print(f"{dtype} step: {flops / 1e9:.1f} GFLOP, compiled in {info['compile_s']:.1f} s", flush=True)
        rounds = []
        for index in range(args.rounds):  # the sides alternate: a drift of the machine's speed hits both
            ours = timer(args.budget / args.rounds)
            line = (f"{dtype} round {index + 1} ours:         step {ours['step_s']['median']:.3f} s "
                    f"(min {ours['step_s']['min']:.3f}, n={ours['step_s']['n']}), "
                    f"CPU {ours['step_cpu_s']['median']:.2f} s/step; "
                    f"{fractions('ours', ours['step_s']['median'], flops)}")
            print(line, flush=True)
            entry = {"ours": ours}
            if not args.skip_reference:
                ref = bench_reference(dtype, args.budget / args.rounds, args.ref_python, args.ref_script, cores)
                assert ref["num_params"] == info["num_params"], (ref["num_params"], info["num_params"])
                ratio = ref["step_s"]["median"] / ours["step_s"]["median"]
                print(f"{dtype} round {index + 1} perceiver-io: step {ref['step_s']['median']:.3f} s "
                      f"(min {ref['step_s']['min']:.3f}, n={ref['step_s']['n']}); "
                      f"{fractions('reference', ref['step_s']['median'], flops)}; ratio {ratio:.2f}x", flush=True)
                entry.update(reference=ref, ratio=ratio)
            rounds.append(entry)
        summary = {"dtype": dtype, "ours": info, "rounds": rounds}
        if not args.skip_reference:
            ratios = [r["ratio"] for r in rounds]
            summary["ratio_median"] = statistics.median(ratios)
            print(f"{dtype} ratio ours / perceiver-io (step time, median of {len(ratios)} rounds): "
                  f"{summary['ratio_median']:.2f}x (rounds {min(ratios):.2f}-{max(ratios):.2f}x)", flush=True)
        results.append(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": BENCH_MODEL, "batch": BATCH, "seq_len": SEQ_LEN, "cores": cores,
                       "peaks_gflops": peaks, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
