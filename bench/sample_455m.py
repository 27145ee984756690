"""Sampling the released model's size (455M): ours against perceiver-io's own generate, one run, same cores.

    python bench/sample_455m.py [--workdir /tmp/bench-455m] [--quick] [--json OUT.json]

The checkpoint: random weights of exactly the shapes of ../shared/fixtures/455m-state-dict.txt in perceiver-io's
HF layout (bench/convert_455m.py writes it), converted with our converter. Workloads, batch 1 unless named, greedy:
  W1  prompt 600, num_latents 512 (the window is full at once, then slides), 200 new tokens
  W2  prompt 32, num_latents 2, 64 new tokens (the model card's call)
  W3  W1 with 8 new tokens, in "exact" mode (it recomputes the 512 latents at every step)
  B8  batch 8 (B32: 32) of prompts of 32 tokens left-padded from lengths 8..32, num_latents 2, 64 new tokens
Every measurement runs in its own process pinned to the same cores (--cores), so that its peak RSS is its own; ours
for every cache mode and weight format asked. In the same run the machine's memory read bandwidth (a 2 GiB sum) and
matmul peaks (2048^3 float32 and bfloat16 products) are measured, and each result says which fraction of them it
reaches: a cached decoding step reads every weight and cache once (bytes / step time / bandwidth); an exact step
is a forward pass over the latents (model FLOPs / step time / float32 peak).
First-call seconds include compilation; `--startup` also times sample.py twice on the converted model (the second
run loads the compiled loop from the persistent cache) to its first streamed token.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("PERCEIVER_AR_SHARED", REPO.parent / "shared"))
REF_PYTHON = os.environ.get("PERCEIVER_IO_PYTHON", "/tmp/ref-venv/bin/python")

WORKLOADS = {  # name: (batch, prompt length, shortest prompt, num_latents, new tokens)
    "W1": (1, 600, 600, 512, 200),
    "W2": (1, 32, 32, 2, 64),
    "W3": (1, 600, 600, 512, 8),
    "B8": (8, 32, 8, 2, 64),
    "B32": (32, 32, 8, 2, 64),
}


def prompt_lengths(workload: str) -> list[int]:
    batch, length, shortest, _, _ = WORKLOADS[workload]
    return [shortest + (length - shortest) * i // max(batch - 1, 1) for i in range(batch)]


# ------------------------------------------------------------------------------------------------ one measurement
def ours(model_dir: str, workload: str, mode: str, weights: str) -> dict:
    """Runs in a child process: load, prepare the weights, first call (compiles), a timed call, a prefill-only call."""
    import jax
    import numpy as np

    from perceiver_ar_jax.checkpoints import load_model
    from perceiver_ar_jax.sampling import Decoding
    from perceiver_ar_jax.sampling.request import decoding_params

    batch, length, _, num_latents, new_tokens = WORKLOADS[workload]
    config, params = load_model(model_dir)
    weights, _, compute = weights.partition("/")  # "float32/bfloat16": float32 weights, bfloat16 compute
    if compute:
        config = config.replace(dtype=compute)
    t0 = time.perf_counter()
    params = jax.block_until_ready(decoding_params(params, config, weights, remember=False))
    prepare_s = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    ids = rng.integers(0, config.vocab_size, (batch, length)).astype(np.int32)
    mask = np.zeros((batch, length), np.int32)
    for row, n in enumerate(prompt_lengths(workload)):
        mask[row, length - n:] = 1
    ids = np.where(mask == 1, ids, 0)

    def run(stop: int) -> float:
        start = time.perf_counter()
        decoding = Decoding(config, ids, mask, num_latents=num_latents, max_new_tokens=new_tokens, cache=mode,
                            weights=weights)
        decoding.advance(params, stop)
        decoding.new_tokens()  # waits for the loop
        return time.perf_counter() - start

    first_s = run(new_tokens)
    total_s = min(run(new_tokens) for _ in range(2 if new_tokens <= 64 else 1))
    prefill_s = run(1)
    step_s = (total_s - prefill_s) / (new_tokens - 1)
    weight_bytes = sum(x.nbytes for path, x in jax.tree_util.tree_leaves_with_path(params)
                       if "token_embedding" not in jax.tree_util.keystr(path))
    kv_bytes = 4 * 2 * config.num_channels * batch * (config.max_seq_len
                                                      + config.num_self_attention_layers * config.max_latents)
    import resource

    weights = weights + (f"/{compute}" if compute else "")
    return dict(workload=workload, mode=mode, weights=weights, batch=batch, new_tokens=new_tokens,
                prepare_s=prepare_s, first_s=first_s, total_s=total_s, prefill_s=prefill_s, step_s=step_s,
                new_tokens_per_s=batch * new_tokens / total_s, step_bytes=weight_bytes + kv_bytes,
                step_flops=_latents_forward_flops(config, batch),
                peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _latents_forward_flops(config, batch: int) -> float:
    from perceiver_ar_jax.training.metrics import forward_flops

    return forward_flops(config, batch, config.max_seq_len, config.max_prefix_len)


def machine() -> dict:
    """Read bandwidth and matmul peaks of this machine, measured now on the same cores."""
    import jax
    import jax.numpy as jnp

    def best(f, *args, reps=5):
        f(*args).block_until_ready()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            f(*args).block_until_ready()
            times.append(time.perf_counter() - t0)
        return min(times)

    big = jnp.ones(2**29, jnp.float32)  # 2 GiB: beyond any cache
    read_gbs = big.nbytes / best(jax.jit(jnp.sum), big) / 1e9
    del big
    n = 2048
    out = dict(read_gb_per_s=read_gbs)
    for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        a = jnp.ones((n, n), dtype)
        product = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
        out[f"matmul_{name}_gflop_per_s"] = 2 * n**3 / best(product, a, a) / 1e9
    return out


# ------------------------------------------------------------------------------------------------ orchestration
def child(args: list[str], cores: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = ["taskset", "-c", cores, *args, "--out", out.name]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        return json.loads(Path(out.name).read_text())


def reference(hf_dir: Path, workload: str, cores: str) -> dict:
    batch, length, _, num_latents, new_tokens = WORKLOADS[workload]
    cmd = [REF_PYTHON, str(REPO / "bench" / "reference_generate.py"), str(hf_dir), "--prompt-len", str(length),
           "--num-latents", str(num_latents), "--new-tokens", str(new_tokens), "--batch", str(batch),
           "--threads", str(len(cores.split(","))), "--pad-to", *map(str, prompt_lengths(workload))]
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        proc = subprocess.run(["taskset", "-c", cores, *cmd, "--json", out.name], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"reference failed ({workload}):\n{proc.stderr[-3000:]}")
        return json.loads(Path(out.name).read_text())


def startup(model_dir: Path, cores: str) -> list[float]:
    """Seconds from starting sample.py to its first streamed token, twice with one compilation cache."""
    times = []
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache}
        for _ in range(2):
            t0 = time.perf_counter()
            proc = subprocess.Popen(["taskset", "-c", cores, sys.executable, str(REPO / "sample.py"), "--checkpoint",
                                     str(model_dir), "--prompt", "Hello", "--max_new_tokens", "8", "--greedy"],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
            proc.stdout.read(len("Hello") + 1)  # the prompt echo, then the first generated piece
            times.append(time.perf_counter() - t0)
            proc.communicate()
    return times


def ensure_checkpoint(workdir: Path) -> tuple[Path, Path]:
    sys.path.insert(0, str(REPO / "bench"))
    from convert_455m import convert, make_checkpoint

    hf, converted = workdir / "hf", workdir / "converted"
    if not (hf / "model.safetensors").exists():
        make_checkpoint(hf, ["safetensors"])
    if not (converted / "config.json").exists():
        convert(hf, converted)
        tokenizer = SHARED / "fixtures" / "xlnet-base-cased"
        for name in ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (tokenizer / name).exists():
                (converted / name).write_bytes((tokenizer / name).read_bytes())
    return hf, converted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/bench-455m")
    ap.add_argument("--cores", default="0,1", help="the cores both sides are pinned to (taskset list)")
    ap.add_argument("--workloads", default="W1,W2,W3,B8,B32")
    ap.add_argument("--modes", default="windowed,perceiver-io", help="cache modes for W1, W2 and the batches")
    ap.add_argument("--weights", default="float32,bfloat16,int8",
                    help="weight formats; FORMAT/bfloat16 computes in bfloat16 (exact mode: also float32/bfloat16)")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--startup", action="store_true", help="also time sample.py's first token, cold and cached")
    ap.add_argument("--quick", action="store_true", help="W2 only, windowed, every weight format")
    ap.add_argument("--json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:  # a child: one measurement
        result = machine() if args.worker == "machine" else ours(*args.worker.split("|"))
        Path(args.out).write_text(json.dumps(result))
        return
    if args.quick:
        args.workloads, args.modes = "W2", "windowed"
    hf, converted = ensure_checkpoint(Path(args.workdir))
    me = [sys.executable, str(Path(__file__).resolve())]
    results = dict(machine=child([*me, "--worker", "machine"], args.cores), reference={}, ours=[])
    m = results["machine"]
    print(f"machine: read {m['read_gb_per_s']:.1f} GB/s, matmul float32 {m['matmul_float32_gflop_per_s']:.0f} "
          f"GFLOP/s, bfloat16 {m['matmul_bfloat16_gflop_per_s']:.0f} GFLOP/s (cores {args.cores})", flush=True)
    for workload in args.workloads.split(","):
        ref = None
        if not args.skip_reference:
            ref = results["reference"][workload] = reference(hf, workload, args.cores)
            print(f"{workload} perceiver-io fp32: {ref['new_tokens_per_s']:7.2f} tok/s, first call "
                  f"{ref['first_s']:.1f} s, peak RSS {ref['peak_rss_mib']:.0f} MiB", flush=True)
        modes = ["exact"] if workload == "W3" else args.modes.split(",")
        for mode in modes:
            formats = args.weights.split(",") + (["float32/bfloat16"] if workload == "W3" else [])
            for weights in formats:
                r = child([*me, "--worker", f"{converted}|{workload}|{mode}|{weights}"], args.cores)
                results["ours"].append(r)
                ratio = f"{r['new_tokens_per_s'] / ref['new_tokens_per_s']:5.2f}x" if ref else "  -  "
                bandwidth = r["step_bytes"] / r["step_s"] / 1e9 / m["read_gb_per_s"]
                bf16 = weights.endswith("/bfloat16")
                peak = m["matmul_bfloat16_gflop_per_s" if bf16 else "matmul_float32_gflop_per_s"]
                flops = r["step_flops"] / r["step_s"] / 1e9 / peak
                kind = "bf16" if bf16 else "fp32"
                fraction = f"{flops:5.0%} of {kind} peak" if mode == "exact" else f"{bandwidth:5.0%} of bandwidth"
                print(f"{workload} ours {mode:12s} {weights:16s}: {r['new_tokens_per_s']:7.2f} tok/s {ratio}, step "
                      f"{r['step_s'] * 1e3:6.1f} ms ({fraction}), prefill {r['prefill_s']:.2f} s, first call "
                      f"{r['first_s']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
    if args.startup:
        results["startup_s"] = startup(converted, args.cores)
        print(f"sample.py to its first token: {results['startup_s'][0]:.1f} s cold, {results['startup_s'][1]:.1f} s "
              "with the compilation cache", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
