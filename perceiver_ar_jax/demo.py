"""Offline demo: train a small Perceiver AR on Python's own help texts on CPU, then sample from its checkpoint.

    pip install -e . && python -m perceiver_ar_jax.demo [--workdir workdir-demo] [--steps 400]

Needs no network and no data beyond the Python installation: the corpus is the English help texts of the standard
library's `pydoc_data.topics` (what `help("for")` prints, 79 topics, ~460k characters). The demo
  1. writes the topics as text files to <workdir>/corpus,
  2. trains a 1024-piece SentencePiece vocabulary on them (perceiver_ar_jax.tokenizer.train_tokenizer) into the
     workdir, where training keeps its tokenizer files anyway,
  3. trains configs/tiny.py for --steps steps (about two minutes on 2 CPU cores), printing the falling loss,
  4. loads the parameters back from the checkpoint it wrote and samples continuations of a few prompts.
Rerunning with the same --workdir resumes (or, when training finished, only samples again). Exit statuses as
train.py's (README): 0 done, 2 bad input, 130 Ctrl-C / 143 SIGTERM (both after saving: rerun to resume).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
import time
from pathlib import Path

from perceiver_ar_jax.errors.console import configure_logging, run_command

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny.py"
PROMPTS = ("The return statement", "A for loop", "If the exception")


def load_config_file(path: Path):
    """configs/X.py -> its get_config() (what ml_collections' config_flags does for --config)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the demo from a source checkout (pip install -e .)")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def write_corpus(directory: Path) -> list[Path]:
    """One UTF-8 file per pydoc topic (one document each)."""
    from pydoc_data.topics import topics

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in sorted(topics.items()):
        path = directory / (re.sub(r"[^A-Za-z0-9_-]", "_", name) + ".txt")
        path.write_text(text.strip() + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="workdir-demo", help="where corpus, tokenizer and checkpoints go")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: configs/tiny.py's)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="tokens sampled per prompt")
    parser.add_argument("--verbosity", type=int, default=None,
                        help="show every library's log records at this level (-1 warning, 0 info, 1 debug)")
    args = parser.parse_args(argv)
    configure_logging(args.verbosity)
    return run_command(lambda: run_demo(args))


def run_demo(args: argparse.Namespace) -> int:
    # imported here so that --help is instant
    import jax
    import numpy as np

    from perceiver_ar_jax import backend, checkpoints, training
    from perceiver_ar_jax.model import CausalLanguageModel
    from perceiver_ar_jax.sampling import generate
    from perceiver_ar_jax.tokenizer import Tokenizer, train_tokenizer

    backend.reuse_host_memory()  # before JAX's first computation: each step reuses the last one's buffers
    workdir = Path(args.workdir).resolve()
    config = load_config_file(TINY_CONFIG)
    if args.steps is not None:
        config.num_train_steps = args.steps
    t0 = time.perf_counter()

    corpus = write_corpus(workdir / "corpus")
    # the tokenizer goes where training keeps its tokenizer files, so the workdir holds them once
    if not (workdir / "spiece.model").is_file():
        print(f"training a {config.model.vocab_size}-piece SentencePiece vocabulary on {len(corpus)} help topics")
        train_tokenizer(corpus, workdir, vocab_size=config.model.vocab_size, seed=0)
    config.tokenizer_dir = str(workdir)
    config.data.text_paths = (str(workdir / "corpus"),)

    done, total = max(checkpoints.saved_steps(workdir), default=0), config.num_train_steps
    devices = f"{jax.device_count()} {jax.devices()[0].platform} device(s)"
    if done >= total:
        print(f"training finished earlier ({done} steps in {workdir}): sampling only")
    elif done:
        print(f"resuming configs/tiny.py at step {done} of {total} in {workdir} ({devices})")
    else:
        print(f"training configs/tiny.py for {total} steps in {workdir} ({devices})")
    result = training.train_and_evaluate(config, str(workdir))
    if result.stopped_early:
        return 128 + result.stopped_by  # stopped by a signal after saving: rerunning resumes
    if result.history:
        first, last = result.history[: config.log_every_steps], result.history[-config.log_every_steps:]
        print(f"training loss fell from {np.mean([h['loss'] for h in first]):.3f} (first {len(first)} steps) to "
              f"{np.mean([h['loss'] for h in last]):.3f} (last {len(last)} steps)")
    if result.evals:
        e = result.evals[-1]
        print(f"validation at step {e['step']}: loss {e['loss']:.3f}, perplexity {e['perplexity']:.1f}")

    # everything below reads the workdir only, as any other program would
    model_config, params = checkpoints.load_model(workdir)
    tokenizer = Tokenizer.from_pretrained(workdir)
    model = CausalLanguageModel(model_config)
    print(f"\nsamples from the checkpoint in {workdir / 'checkpoints'} (top-k 10):")
    for i, prompt in enumerate(PROMPTS):
        ids = [tokenizer.eos_id] + tokenizer.encode(prompt)  # documents start after an end-of-sequence token
        out = generate(model, params, np.asarray([ids], np.int32), max_new_tokens=args.max_new_tokens,
                       do_sample=True, top_k=10, rng=jax.random.key(i))
        # decode prompt and continuation together: a piece's leading space is dropped at the start of a decode
        text = tokenizer.decode(np.asarray(out)[0, 1:].tolist(), skip_special_tokens=True)
        print(f"\n>>> {text}")
    print(f"\ndone in {time.perf_counter() - t0:.0f} s; rerun with the same --workdir to sample again")
    return 0


if __name__ == "__main__":
    sys.exit(main())
