"""Convert a randomly initialised checkpoint of the released 455M model and report seconds and peak RSS.

    python bench/convert_455m.py [--workdir /tmp/convert-455m] [--formats safetensors,bin] [--keep]

Writes random tensors of exactly the shapes in ../shared/fixtures/455m-state-dict.txt (perceiver-io's HF layout,
config.json with the released model_config) one tensor at a time, then runs `python -m perceiver_ar_jax.convert`
in a child process per format, so that the peak RSS reported (ru_maxrss of the child) is the converter's own.
The target: peak RSS at most about twice the model's bytes (453,950,720 float32 parameters = 1.82 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from perceiver_ar_jax.convert.safetensors_io import write_safetensors  # noqa: E402

LISTING = REPO.parent / "shared" / "fixtures" / "455m-state-dict.txt"


def read_listing(path: Path) -> tuple[dict, list[tuple[str, tuple[int, ...]]]]:
    lines = path.read_text().splitlines()
    config = json.loads(next(line for line in lines if line.startswith("# {")).lstrip("# "))
    shapes = [(key, tuple(int(d) for d in re.findall(r"\d+", shape)))
              for key, shape, _ in (line.split("\t") for line in lines if line and not line.startswith("#"))]
    return config, shapes


def random_tensor(key: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if key.endswith("inv_freq"):
        dim = 2 * shape[0]
        return (1.0 / 10000 ** (np.arange(0, dim, 2, dtype=np.float32) / dim)).astype(np.float32)
    if key.endswith("norm.weight") or re.search(r"\.module\.0\.weight$", key):
        return np.ones(shape, np.float32)
    return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)


def make_checkpoint(directory: Path, formats: list[str]) -> int:
    config, shapes = read_listing(LISTING)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["PerceiverCausalLanguageModel"], "is_decoder": True, "model_config": config,
        "model_type": "perceiver-ar-causal-language-model"}))
    rng = np.random.default_rng(0)
    if "safetensors" in formats:
        write_safetensors(directory / "model.safetensors", [(k, s, np.float32) for k, s in shapes],
                          lambda k: random_tensor(k, dict(shapes)[k], rng), metadata={"format": "pt"})
    if "bin" in formats:
        import torch

        bin_dir = directory.parent / (directory.name + "-bin")
        shutil.copytree(directory, bin_dir, ignore=shutil.ignore_patterns("*.safetensors"), dirs_exist_ok=True)
        torch.save({k: torch.from_numpy(random_tensor(k, s, rng)) for k, s in shapes}, bin_dir / "pytorch_model.bin")
    return sum(int(np.prod(s)) for k, s in shapes if not k.endswith("inv_freq"))


def convert(src: Path, dst: Path) -> dict:
    shutil.rmtree(dst, ignore_errors=True)
    t0 = time.perf_counter()
    code = ("import resource, sys; from perceiver_ar_jax.convert import main; rc = main(sys.argv[1:]); "
            "print('@@RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code, str(src), str(dst)], capture_output=True, text=True,
                            cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    seconds = time.perf_counter() - t0
    if result.returncode != 0:
        raise SystemExit(f"conversion of {src} failed:\n{result.stdout}\n{result.stderr}")
    rss_kib = int(next(line.split()[1] for line in result.stdout.splitlines() if line.startswith("@@RSS")))
    return {"seconds": seconds, "peak_rss_mib": rss_kib / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/convert-455m")
    parser.add_argument("--formats", default="safetensors", help="comma-separated: safetensors, bin")
    parser.add_argument("--keep", action="store_true", help="keep the files written")
    args = parser.parse_args()
    formats = args.formats.split(",")
    workdir = Path(args.workdir)
    src = workdir / "hf"
    t0 = time.perf_counter()
    num_params = make_checkpoint(src, formats)
    print(f"wrote a random 455M checkpoint ({num_params:,} parameters) in {time.perf_counter() - t0:.1f} s")
    model_mib = num_params * 4 / 2**20
    for fmt in formats:
        source = src if fmt == "safetensors" else workdir / "hf-bin"
        r = convert(source, workdir / f"converted-{fmt}")
        print(f"{fmt:12s} convert: {r['seconds']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB = "
              f"{r['peak_rss_mib'] / model_mib:.2f} x the model's {model_mib:.0f} MiB (float32)")
    print(f"(this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB peak while writing)")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
