"""The command line of `python -m perceiver_ar_jax.convert` (see the package docstring).

Exit status: 0 written, 2 bad input (a source that is no checkpoint, a destination that exists, ...: one `error:`
line), 130 Ctrl-C, 1 anything else; the same table as every command line (README).
"""

from __future__ import annotations

import argparse
import os

from perceiver_ar_jax.checkpoints import load_model, save_model
from perceiver_ar_jax.convert.export import export_torch_checkpoint
from perceiver_ar_jax.convert.importer import convert_checkpoint
from perceiver_ar_jax.convert.torch_reader import read_perceiver_io_checkpoint
from perceiver_ar_jax.errors.console import configure_logging, run_command


def main(argv: list[str] | None = None) -> int:
    from perceiver_ar_jax import convert  # its docstring is the help text

    parser = argparse.ArgumentParser(prog="python -m perceiver_ar_jax.convert", description=convert.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="perceiver-io HF model directory or Lightning .ckpt (or, with --to-pytorch, "
                                    "a perceiver-ar-jax model directory)")
    parser.add_argument("dst", help="destination directory (must not exist unless --overwrite)")
    parser.add_argument("--to-pytorch", action="store_true", help="export our model directory to perceiver-io")
    parser.add_argument("--param-dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="dtype to store the parameters in (default: float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace dst if it exists")
    parser.add_argument("--verbosity", type=int, default=None,
                        help="show every library's log records at this level (-1 warning, 0 info, 1 debug)")
    parser.add_argument("--traceback", action="store_true", help="show the traceback of a bad-input error too")
    args = parser.parse_args(argv)
    configure_logging(args.verbosity)
    return run_command(lambda: run_conversion(args), show_traceback=args.traceback)


def run_conversion(args: argparse.Namespace) -> None:
    if args.to_pytorch:
        config, params = load_model(args.src)
        export_torch_checkpoint(config, params, args.dst, tokenizer_dir=args.src,
                                dtype=args.param_dtype or "float32", overwrite=args.overwrite)
    else:
        if os.path.exists(args.dst) and not args.overwrite:
            raise FileExistsError(f"{args.dst} already exists; choose another destination or pass --overwrite")
        ckpt = read_perceiver_io_checkpoint(args.src)
        config, params = convert_checkpoint(ckpt, args.param_dtype, {})
        save_model(args.dst, config, params, tokenizer_dir=ckpt.tokenizer_dir, overwrite=args.overwrite)
    print(f"wrote {args.dst}")

