"""Shared test fixtures: paths to the golden data and a converted copy of the public fixture model."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PERCEIVER_AR_SHARED", REPO.parent / "shared"))
PUBLIC_FIXTURE = SHARED / "fixtures" / "public"
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
