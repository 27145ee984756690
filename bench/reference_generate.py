"""perceiver-io's own cached `generate` on a model directory, timed: the reference side of bench/sample_455m.py.

Runs in the reference venv (../shared/reference/setup-reference.sh), one workload per process so that its peak RSS
is its own:

    /tmp/ref-venv/bin/python bench/reference_generate.py HF_DIR --prompt-len 600 --num-latents 512 \
        --new-tokens 200 --batch 1 --threads 2 --json OUT.json

Prints nothing else; the JSON holds the first call's seconds (model already loaded), the timed calls' seconds,
new tokens/s and the peak RSS. Prompts are seeded random token ids, greedy decoding, `use_cache=True`.
"""

import argparse
import json
import resource
import statistics
import time
import warnings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--prompt-len", type=int, required=True)
    ap.add_argument("--num-latents", type=int, required=True)
    ap.add_argument("--new-tokens", type=int, required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--pad-to", type=int, nargs="*", default=None,
                    help="per-row prompt lengths (left-padded to --prompt-len); default: all full length")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=1, help="timed calls after the first")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()

    warnings.filterwarnings("ignore")
    import torch
    from perceiver.model.text.clm import PerceiverCausalLanguageModel

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = PerceiverCausalLanguageModel.from_pretrained(args.model_dir).eval()
    load_s = time.perf_counter() - t0
    generator = torch.Generator().manual_seed(1)
    vocab_size = model.backend_model.input_adapter.vocab_size
    ids = torch.randint(0, vocab_size, (args.batch, args.prompt_len), generator=generator)
    mask = torch.ones_like(ids)
    for row, length in enumerate(args.pad_to or []):
        mask[row, : args.prompt_len - length] = 0
        ids[row, : args.prompt_len - length] = 0

    def generate() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, num_latents=args.num_latents,
                                 max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                                 use_cache=True, pad_token_id=0)
        assert out.shape == (args.batch, args.prompt_len + args.new_tokens), out.shape
        return time.perf_counter() - start

    first_s = generate()
    times = [generate() for _ in range(args.runs)]
    best = min(times) if times else first_s
    result = dict(load_s=load_s, first_s=first_s, times_s=times, median_s=statistics.median(times or [first_s]),
                  new_tokens_per_s=args.batch * args.new_tokens / statistics.median(times or [first_s]),
                  best_new_tokens_per_s=args.batch * args.new_tokens / best,
                  peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  threads=torch.get_num_threads(), torch=torch.__version__)
    with open(args.json, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
