"""Shared test fixtures: paths to the golden data and a converted copy of the public fixture model."""

import os
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
# The PyTorch reference venv made by ../shared/reference/setup-reference.sh, for the optional cross-checks.
REFERENCE_PYTHON = Path(os.environ.get("PERCEIVER_IO_PYTHON", "/tmp/ref-venv/bin/python"))


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is not on this machine")
    return path


@pytest.fixture(scope="session")
def public_fixture() -> Path:
    return require(PUBLIC_FIXTURE)
