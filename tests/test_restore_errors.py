"""Sorting restore failures: damaged files, transient storage errors, and everything else; the one-line cause."""

import errno
import json

import pytest

from perceiver_ar_jax.checkpoints.restore_errors import classify
from perceiver_ar_jax.errors import (
    EXIT_BAD_INPUT,
    EXIT_DIVERGED,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OUT_OF_MEMORY,
    EXIT_STORAGE_UNAVAILABLE,
    CheckpointError,
    ConfigError,
    NonFiniteLossError,
    StorageUnavailableError,
    exit_status,
    one_line,
)

SPEC = "See full TensorStore details: <bound method pybind11_detail.spec of TensorStore({\n  'driver': 'zarr',\n" \
       "  'kvstore': {'crc32c': 'checksum decode'},\n})>."


def orbax_wrapped(inner: Exception) -> Exception:
    """orbax's restore error as it arrives: a bare Exception with the array index and the spec, `from` the cause."""
    try:
        try:
            raise inner
        except Exception as e:
            raise Exception(f"Encountered error while reading array index: (slice(0, 4, 1),). {SPEC}") from e
    except Exception as outer:
        return outer


@pytest.mark.parametrize("inner", [
    ValueError('OUT_OF_RANGE: Error reading "w/0.0" in OCDBT database at local file "/ckpt/7/params/": Requested '
               "byte range [121358, 182117) is not valid for value of size 3"),
    ValueError('FAILED_PRECONDITION: Error reading "w/0.0" in OCDBT database: Truncated Zstd-compressed stream'),
    ValueError('NOT_FOUND: Error opening "zarr" driver: Metadata at "w/.zarray" does not exist'),
    ValueError("DATA_LOSS: checksum mismatch"),
    FileNotFoundError(errno.ENOENT, "No such file or directory", "/ckpt/7/params/_METADATA"),
    KeyError('Item "meta" was not found in the checkpoint. Available items: [\'params\']'),
], ids=["truncated", "missing-data-file", "missing-metadata", "checksum", "missing-file", "missing-item"])
def test_missing_or_truncated_files_are_damage(inner):
    failure = classify(orbax_wrapped(inner))
    assert failure.kind == "damaged"
    assert "See full TensorStore" not in failure.cause and "\n" not in failure.cause
    assert failure.cause.startswith(type(inner).__name__ + ": ")


def test_a_json_file_cut_short_is_damage():
    try:
        json.loads('{"index": 3')
    except json.JSONDecodeError as e:
        assert classify(e).kind == "damaged"


@pytest.mark.parametrize("error", [
    orbax_wrapped(ValueError('UNAVAILABLE: Error reading "w/0.0" in OCDBT database at gs://b/7/params: HTTP 503')),
    orbax_wrapped(ValueError("DEADLINE_EXCEEDED: Error reading gs://b/7/params/manifest.ocdbt")),
    ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
    TimeoutError("read timed out"),
    OSError(errno.EIO, "Input/output error"),
    type("ServiceUnavailable", (Exception,), {})("503 GET https://storage.googleapis.com/..."),
], ids=["unavailable", "deadline", "reset", "timeout", "eio", "gcs-503"])
def test_storage_that_fails_for_now_is_transient(error):
    assert classify(error).kind == "transient"


@pytest.mark.parametrize("error", [
    orbax_wrapped(ValueError("INVALID_ARGUMENT: Error aligning dimensions: shape (32, 64) vs (48, 64)")),
    ValueError("User-provided restore item and on-disk value metadata tree structures do not match"),
    TypeError("unsupported operand"),
    RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2 GiB"),
], ids=["other-shape", "other-tree", "bug", "out-of-memory"])
def test_anything_else_is_neither_damage_nor_transient(error):
    failure = classify(error)
    assert failure.kind == "unknown"
    assert "See full TensorStore" not in failure.cause


def test_the_cause_is_one_short_line():
    failure = classify(orbax_wrapped(ValueError("OUT_OF_RANGE: " + "x " * 1000)))
    assert "\n" not in failure.cause and len(failure.cause) <= 300 and failure.cause.endswith("…")


# ------------------------------------------------------------------------------------------------ exit statuses
@pytest.mark.parametrize("error, status", [
    (ConfigError("model.num_heads", 0, "an integer >= 1"), EXIT_BAD_INPUT),
    (CheckpointError("not a model directory"), EXIT_BAD_INPUT),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "corpus/"), EXIT_BAD_INPUT),
    (FileExistsError("out already exists"), EXIT_BAD_INPUT),
    (NonFiniteLossError("training diverged at step 7"), EXIT_DIVERGED),
    (RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 12.0GiB."), EXIT_OUT_OF_MEMORY),
    (MemoryError(), EXIT_OUT_OF_MEMORY),
    (StorageUnavailableError("gs://b/7: UNAVAILABLE on all 4 attempts"), EXIT_STORAGE_UNAVAILABLE),
    (KeyboardInterrupt(), EXIT_INTERRUPTED),
    (RuntimeError("an assertion deep inside"), EXIT_ERROR),
    (TypeError("unsupported operand"), EXIT_ERROR),
])
def test_every_failure_has_its_documented_exit_status(error, status):
    assert exit_status(error) == status


def test_one_line_names_the_path_of_a_missing_file_and_advises_on_memory():
    assert one_line(FileNotFoundError(errno.ENOENT, "No such file or directory", "corpus/")) == \
        "No such file or directory: corpus/"
    oom = one_line(RuntimeError("RESOURCE_EXHAUSTED: Out of memory\nwhile allocating"))
    assert "\n" not in oom and oom.startswith("out of memory: RESOURCE_EXHAUSTED") and "batch_size" in oom


def test_the_cpu_clients_failed_allocation_is_out_of_memory_in_one_short_line():
    import jax

    error = jax.errors.JaxRuntimeError("INTERNAL: " + "Error dispatching computation: " * 19
                                       + "Out of memory allocating 25584336896 bytes.")
    assert exit_status(error) == EXIT_OUT_OF_MEMORY
    assert one_line(error).startswith("out of memory: INTERNAL: Out of memory allocating 25584336896 bytes.")
