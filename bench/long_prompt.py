"""Sampling from a very long prompt: time and peak memory of `generate` on a 64k-token prompt, on CPU.

    python bench/long_prompt.py [--prompt-len 65536] [--new-tokens 32] [--modes perceiver-io,exact]
                                [--dtype fp32|bf16] [--json OUT]

Model: the "bench" config of ../shared/reference/bench_torch.py (vocab 32000, 512 channels, 8 heads, 6
self-attention layers, 256 latents, random weights) with max_seq_len = the prompt length, so the prompt fills the
context: 256 latents and a prefix of prompt_len - 256 tokens, and every new token slides the window. The prompt is
prefilled in chunks (the cross-attention cache spanning max_seq_len is the only prefix-sized state), then
`new_tokens` tokens are decoded greedily. Each mode runs in its own subprocess, so its peak RSS (ru_maxrss,
compilation included) is its own. perceiver-io has no comparable path (its generate materialises latents x
prefix scores per head chunk), so this reports ours only.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench_model import BENCH_MODEL, DTYPES  # bench/, this script's directory

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measure(prompt_len: int, new_tokens: int, mode: str, dtype: str) -> dict:
    """One mode in this process: generate twice (compile, then timed) and report times and peak RSS."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from perceiver_ar_jax.model import CausalLanguageModel, CausalLanguageModelConfig
    from perceiver_ar_jax.sampling import Decoding
    from perceiver_ar_jax.sampling.request import decoding_params

    config = CausalLanguageModelConfig(**dict(BENCH_MODEL, max_seq_len=prompt_len), dtype=DTYPES[dtype],
                                       param_dtype=DTYPES[dtype])
    model = CausalLanguageModel(config)
    params = jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32),
                                                 prefix_len=0)["params"]))()
    params = decoding_params(params, config, "float32", remember=False)  # what generate() and Generator run
    prompt = np.random.default_rng(1).integers(0, config.vocab_size, (1, prompt_len))

    def run(stop: int) -> np.ndarray:
        decoding = Decoding(config, prompt, num_latents=config.max_latents, max_new_tokens=new_tokens, cache=mode)
        decoding.advance(params, stop)
        return decoding.new_tokens()  # fetching the tokens waits for the computation

    t0 = time.perf_counter()
    tokens = run(new_tokens)
    first_s = time.perf_counter() - t0
    assert tokens.shape == (1, new_tokens), tokens.shape
    t0 = time.perf_counter()
    run(1)
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    run(new_tokens)
    generate_s = time.perf_counter() - t0
    return dict(prompt_len=prompt_len, new_tokens=new_tokens, mode=mode, dtype=dtype, generate_s=generate_s,
                prefill_s=prefill_s, decode_tokens_per_s=(new_tokens - 1) / max(generate_s - prefill_s, 1e-9),
                first_call_s=first_s, peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                params_mib=sum(x.nbytes for x in jax.tree.leaves(params)) / 2**20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-len", type=int, default=65536)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--modes", default="perceiver-io,exact", help="comma-separated cache modes")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--json", help="write the results to this file")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._child:
        print(json.dumps(measure(args.prompt_len, args.new_tokens, args._child, args.dtype)))
        return
    results = []
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
               "--dtype", args.dtype, "--_child", mode]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{mode}: failed\n{proc.stdout}{proc.stderr}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(r)
        print(f"prompt {r['prompt_len']:,} tokens, {mode:12s} {args.dtype}: prefill {r['prefill_s']:.2f} s, "
              f"{r['new_tokens']} new tokens in {r['generate_s']:.2f} s ({r['decode_tokens_per_s']:.1f} tok/s "
              f"after prefill), peak RSS {r['peak_rss_mib']:.0f} MiB (params {r['params_mib']:.0f} MiB), "
              f"first call {r['first_call_s']:.1f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
