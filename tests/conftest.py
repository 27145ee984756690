"""Shared test fixtures: paths to the golden data and a converted copy of the public fixture model."""

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The shared fixtures directory sits beside the repository (../shared); PERCEIVER_AR_SHARED points elsewhere.
SHARED = Path(os.environ.get("PERCEIVER_AR_SHARED", REPO.parent / "shared"))
SHARED_FIXTURES = SHARED / "fixtures"
# A tiny Perceiver AR in three checkpoint formats with golden logits, generations and tokenizer cases.
PUBLIC_FIXTURE = SHARED_FIXTURES / "public"
# The real xlnet-base-cased spiece.model with golden XLNetTokenizerFast encodings.
XLNET_FIXTURE = SHARED_FIXTURES / "xlnet-base-cased"
# The parameter names and shapes of the released 455M perceiver-io checkpoint.
STATE_DICT_455M = SHARED_FIXTURES / "455m-state-dict.txt"
REFERENCE_ASSETS = REPO / "tests" / "assets" / "reference"
# The PyTorch reference venv made by ../shared/reference/setup-reference.sh, for the cross-checks against the
# real perceiver-io (.ci/run builds it and points PERCEIVER_IO_PYTHON at it).
REFERENCE_PYTHON = Path(os.environ.get("PERCEIVER_IO_PYTHON", "/tmp/ref-venv/bin/python"))
# PERCEIVER_AR_REQUIRE_ALL=1 (.ci/run): a missing fixture or reference venv fails the test instead of skipping it
REQUIRE_ALL = os.environ.get("PERCEIVER_AR_REQUIRE_ALL") == "1"


def require(path: Path) -> Path:
    if not path.exists():
        message = f"{path} is not on this machine (../shared, or ../shared/reference/setup-reference.sh)"
        if REQUIRE_ALL:
            pytest.fail(message + " and PERCEIVER_AR_REQUIRE_ALL=1")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def public_fixture() -> Path:
    return require(PUBLIC_FIXTURE)


@pytest.fixture(scope="session")
def local_text(tmp_path_factory) -> tuple[Path, Path]:
    """(corpus directory, tokenizer directory): 40 of Python's help topics as text files and a 300-piece
    SentencePiece vocabulary trained on them, for train.py on the real local-text input pipeline."""
    from pydoc_data.topics import topics

    from perceiver_ar_jax.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("local_text")
    corpus = root / "corpus"
    corpus.mkdir()
    for name in sorted(topics)[:40]:
        (corpus / f"{name}.txt").write_text(topics[name])
    train_tokenizer(sorted(corpus.glob("*.txt")), root / "tokenizer", vocab_size=300)
    return corpus, root / "tokenizer"


def tiny_train_py_flags(workdir: Path, corpus: Path, tokenizer: Path, **overrides) -> list[str]:
    """train.py's command line for a tiny model (32 channels, 64 tokens) on `corpus`; overrides: config fields."""
    values = {"num_train_steps": 4, "batch_size": 4, "eval_batch_size": 4, "model.vocab_size": 300,
              "model.num_channels": 32, "model.max_seq_len": 64, "model.max_latents": 32, "data.min_seq_len": 32,
              "data.text_paths": f"('{corpus}',)", "tokenizer_dir": str(tokenizer), "log_every_steps": 2,
              "eval_every_steps": 0, "sample_every_steps": 0, "tensorboard": False,
              "mesh.ici_parallelism": "(1,1,1)", **overrides}
    return [sys.executable, str(REPO / "train.py"), "--config=" + str(REPO / "configs" / "tiny.py"),
            f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in values.items()]
