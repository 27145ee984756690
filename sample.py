"""Generate text with a Perceiver AR checkpoint, streamed to the terminal as it is produced.

    python sample.py --checkpoint DIR --prompt "Recently, I started to work on my" --num_latents 2 \\
        --max_new_tokens 16 --top_k 20 [--temperature T] [--top_p P] [--seed S] [--greedy] [--num_samples N]
        [--prompt_file FILE] [--cache windowed|exact|perceiver-io] [--reset_fill N] [--weights int8]
        [--dtype bfloat16]

DIR: a converted model directory (`python -m perceiver_ar_jax.convert`) or a training run's --workdir (its newest
checkpoint), with the tokenizer files next to it. Sampling is the default (temperature, then top-k, then top-p);
--greedy takes the most likely token. Sample i uses seed S + i. Compiled programs are cached on disk
($JAX_COMPILATION_CACHE_DIR, else ~/.cache/perceiver_ar_jax/jax), so the next run starts fast. The prompt is echoed
as given (newlines kept), then the continuation. Exit status: 0 done, 2 bad input (one `error:` line), 130 Ctrl-C,
1 anything else (see the README).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

from perceiver_ar_jax.errors.console import configure_logging, run_command


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="model directory or training workdir")
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text")
    source.add_argument("--prompt_file", help="read the prompt from this UTF-8 file")
    ap.add_argument("--num_latents", type=int, default=1, help="latent positions at the end of the prompt")
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top_k", type=int, default=None, help="sample among the k most likely tokens")
    ap.add_argument("--top_p", type=float, default=None, help="nucleus sampling: smallest set with probability p")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--greedy", action="store_true", help="most likely token at every step (no sampling)")
    ap.add_argument("--num_samples", type=int, default=1)
    ap.add_argument("--cache", default="windowed",
                    help="windowed: the paper's decoding (cached steps, a full forward now and then); exact: as a "
                         "full forward over perceiver-io's window every step; perceiver-io: its cached generate")
    ap.add_argument("--reset_fill", type=int, default=None,
                    help="windowed: latents kept when the latent caches are full (default max(K - 128, K / 2, 1))")
    ap.add_argument("--weights", default="float32",
                    help="float32, bfloat16 (half the bytes a step reads) or int8 (a quarter, per-column scales)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="compute dtype")
    ap.add_argument("--ignore_eos", action="store_true", help="keep generating after the end-of-text token")
    ap.add_argument("--verbosity", type=int, default=None,
                    help="show every library's log records at this level (-1 warning, 0 info, 1 debug)")
    ap.add_argument("--traceback", action="store_true", help="show the traceback of a bad-input error too")
    return ap.parse_args(argv)


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompt = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read --prompt_file {args.prompt_file}: {e}") from None
    else:
        prompt = args.prompt
    if not prompt.strip():
        raise ValueError("the prompt is empty: give at least one token of text with --prompt or --prompt_file")
    return prompt


def generation_config(args: argparse.Namespace):
    """The flags as a GenerationConfig: validated where it is made, as for generate() and Generator."""
    from perceiver_ar_jax.sampling import GenerationConfig

    if args.max_new_tokens < 1:  # a command that generates nothing is a mistake, not a request
        raise ValueError(f"--max_new_tokens {args.max_new_tokens} is out of range: must be >= 1")
    return GenerationConfig(num_latents=args.num_latents, max_new_tokens=args.max_new_tokens,
                            do_sample=not args.greedy, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, cache=args.cache, reset_fill=args.reset_fill, weights=args.weights,
                            num_return_sequences=1)


def check_args(args: argparse.Namespace) -> None:
    """Checks that need no model, so that bad input fails before anything is loaded."""
    if args.num_samples < 1:
        raise ValueError(f"--num_samples {args.num_samples} is out of range: must be >= 1")
    if not os.path.isdir(args.checkpoint):
        raise ValueError(f"--checkpoint {args.checkpoint} is not a directory")


def generate_text(args: argparse.Namespace, prompt: str, config) -> None:
    from perceiver_ar_jax.sampling import Generator, enable_compilation_cache

    enable_compilation_cache()
    generator = Generator.from_pretrained(args.checkpoint, dtype=args.dtype, warm_up=(prompt, config))
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"{'-' * 30} sample {i + 1} {'-' * 30}", flush=True)
        pieces = generator.stream(prompt, config=config, stop_at_eos=not args.ignore_eos, rng=args.seed + i)
        for text in echo_prompt_then_continuation(prompt, generator.tokenizer.decode(
                generator.encode(prompt), skip_special_tokens=True), pieces):
            print(text, end="", flush=True)
        print(flush=True)


def echo_prompt_then_continuation(prompt: str, decoded_prompt: str, pieces):
    """The prompt as given, then the stream's text past the decoded prompt.

    The stream yields decode(prompt ids + new ids), whose prompt part is the tokenizer's normalised prompt (its
    newlines and runs of spaces collapsed); cutting the decoded prompt off the decoded whole is what
    Generator.__call__ and transformers' text-generation pipeline return."""
    pieces = iter(pieces)
    first = next(pieces, "")  # the stream checks the request before it yields: no echo of a refused prompt
    yield prompt
    seen = ""
    for piece in itertools.chain([first], pieces):
        start = max(len(decoded_prompt) - len(seen), 0)
        seen += piece
        if start < len(piece):
            yield piece[start:]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.verbosity)
    return run_command(lambda: sample(args), show_traceback=args.traceback)


def sample(args: argparse.Namespace) -> None:
    prompt = read_prompt(args)
    config = generation_config(args)
    check_args(args)
    generate_text(args, prompt, config)


if __name__ == "__main__":
    sys.exit(main())
