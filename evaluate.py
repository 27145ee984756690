"""Score long documents with a Perceiver AR checkpoint: every token once, with as much context as the model allows.

    python evaluate.py --checkpoint DIR --text_file F [--text_file G ...] [--held_out 0.05]
    python evaluate.py --checkpoint DIR --tfds c4/en:3.1.0 --split validation --data_dir D [--max_documents N]
        [--num_latents N] [--stride K] [--batch_size B] [--dtype bfloat16] [--output evaluation.json]

DIR: a converted model directory or a training run's --workdir (its newest checkpoint), with the tokenizer files.
Windows of max_seq_len tokens (max_seq_len - max_latents + num_latents with fewer latents) slide over each
document by --stride; the first window scores all its tokens, every later one its last --stride tokens, and each
document is scored after a `</s>` as in training's token stream (see perceiver_ar_jax/evaluation/windows.py).
Prints tokens, loss, perplexity, bits per token and per byte (UTF-8 bytes of the text) and the loss against
context; writes the figures, the context buckets and the per-document losses to --output, and the plot of loss
against context beside it (the same name, .png).
"""

from __future__ import annotations

import argparse
import os
import sys
from types import SimpleNamespace


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="model directory or training workdir")
    ap.add_argument("--text_file", action="append", default=None,
                    help="UTF-8 text file, or a directory of *.txt files (repeat for several); one document each")
    ap.add_argument("--text_doc_separator", default=None,
                    help="split each text file into documents at this string (e.g. a form feed)")
    ap.add_argument("--held_out", type=float, default=None,
                    help="score only the documents training holds out with data.eval_fraction=FRACTION")
    ap.add_argument("--tfds", help="a prepared TFDS dataset NAME:VERSION, e.g. c4/en:3.1.0")
    ap.add_argument("--split", default="validation", help="TFDS split (default validation)")
    ap.add_argument("--data_dir", default=None, help="TFDS data directory (gs:// on TPU VMs); default TFDS's")
    ap.add_argument("--tfds_text_key", default="text", help="the feature that holds the text")
    ap.add_argument("--max_documents", type=int, default=None, help="score only the first N documents")
    ap.add_argument("--num_latents", type=int, default=None,
                    help="latents per window, in [1, max_latents] (default max_latents)")
    ap.add_argument("--stride", type=int, default=None,
                    help="tokens scored per window after the first, in [1, num_latents] (default num_latents); "
                         "smaller gives every token more context and costs more windows")
    ap.add_argument("--batch_size", type=int, default=8,
                    help="windows per step, a multiple of the devices the batch is split over")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                    help="compute dtype (default the checkpoint's)")
    ap.add_argument("--mesh", default="1,-1,1",
                    help="mesh sizes data,fsdp,tensor within a slice, -1 = the rest (as mesh.ici_parallelism)")
    ap.add_argument("--output", default="evaluation.json", help="JSON of the results; the plot goes beside it")
    ap.add_argument("--traceback", action="store_true", help="show the full traceback of a bad-input error")
    ap.add_argument("--verbosity", type=int, default=None,
                    help="show every library's log records at this level (-1 warning, 0 info, 1 debug)")
    return ap.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Checks that need neither data nor model, so that bad input fails before anything is read."""
    if (args.text_file is None) == (args.tfds is None):
        raise ValueError("give the documents with --text_file or with --tfds (one of the two)")
    if args.held_out is not None and (args.text_file is None or not 0.0 < args.held_out < 1.0):
        raise ValueError(f"--held_out {args.held_out} is out of range: must be in (0, 1), with --text_file")
    for flag in ("max_documents", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag} {value} is out of range: must be >= 1")
    if not os.path.isdir(args.checkpoint):
        raise ValueError(f"--checkpoint {args.checkpoint} is not a directory")
    if not args.output.endswith(".json"):
        raise ValueError(f"--output {args.output} must end in .json (the plot is written beside it as .png)")


def mesh_sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise ValueError(f"--mesh {text!r} is not three comma-separated sizes (data,fsdp,tensor), "
                         "e.g. 1,-1,1") from None


def read_documents(args: argparse.Namespace):
    from perceiver_ar_jax.evaluation import sources

    if args.text_file is not None:
        return sources.text_documents(args.text_file, args.text_doc_separator, args.held_out, args.max_documents)
    return sources.tfds_documents(args.tfds, args.split, args.data_dir, args.tfds_text_key, args.max_documents)


def run(args: argparse.Namespace) -> None:
    import jax

    from perceiver_ar_jax import checkpoints
    from perceiver_ar_jax.evaluation import WindowSpec, evaluate, report
    from perceiver_ar_jax.evaluation.step import param_shardings
    from perceiver_ar_jax.model import CausalLanguageModel
    from perceiver_ar_jax.sampling import enable_compilation_cache
    from perceiver_ar_jax.tokenizer import Tokenizer
    from perceiver_ar_jax.training import partitioning

    partitioning.initialize_distributed(SimpleNamespace(initialize="auto", coordinator_address=None,
                                                        num_processes=None, process_id=None, cpu_collectives=None))
    config = checkpoints.read_config(args.checkpoint)  # CheckpointError if it is no model directory
    if args.dtype is not None:
        config = config.replace(dtype=args.dtype)
    WindowSpec.for_model(config.max_seq_len, config.max_latents, args.num_latents, args.stride)  # flags in range
    documents = read_documents(args)
    tokenizer = Tokenizer.from_pretrained(args.checkpoint)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"the tokenizer in {args.checkpoint} has {tokenizer.vocab_size} pieces, more than the "
                         f"model's vocab_size {config.vocab_size}")

    enable_compilation_cache()
    mesh = partitioning.create_mesh(SimpleNamespace(ici_parallelism=mesh_sizes(args.mesh), dcn_parallelism=(-1, 1, 1)))
    model = CausalLanguageModel(config)
    _, params = checkpoints.load_model(args.checkpoint, sharding=param_shardings(model, mesh))
    bar = report.ProgressBar()
    try:
        result = evaluate(model, params, documents.texts, tokenizer=tokenizer, num_latents=args.num_latents,
                          stride=args.stride, batch_size=args.batch_size, mesh=mesh, keep_token_losses=False,
                          num_documents=documents.count, progress=bar)
    finally:
        bar.close()
    if jax.process_index() != 0:
        return
    print(report.figures(result))
    print("\nloss against context:\n" + report.context_table(result))
    extra = {"checkpoint": os.path.abspath(args.checkpoint), **documents.description, "dtype": config.dtype}
    report.write_json(result, args.output, extra)
    plot = os.path.splitext(args.output)[0] + ".png"
    report.plot_loss_vs_context(result, plot, title=f"{os.path.basename(os.path.normpath(args.checkpoint))}: "
                                f"loss against context (window {result.window}, stride {result.stride})")
    print(f"\nwrote {args.output} and {plot}")


def main(argv: list[str] | None = None) -> int:
    from perceiver_ar_jax.errors.console import configure_logging, run_command

    args = parse_args(argv)
    configure_logging(args.verbosity)
    # the statuses and the one `error:` line of every command line (README, "Exit statuses")
    return run_command(lambda: check_then_run(args), show_traceback=args.traceback)


def check_then_run(args: argparse.Namespace) -> None:
    check_args(args)
    run(args)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow (TFDS) start-up chatter
    sys.exit(main())
