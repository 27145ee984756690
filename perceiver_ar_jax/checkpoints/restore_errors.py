"""Why a checkpoint could not be restored: its files are damaged, the storage failed for a moment, or neither.

    failure = classify(error)   # -> RestoreFailure(kind="damaged" | "transient" | "unknown", cause="...")

Only a checkpoint whose files are demonstrably incomplete or corrupt ("damaged") may be set aside and an older
one used; a transient storage error ("transient": an unavailable or overloaded service, a timeout, a dropped
connection) is retried, since the files are fine; anything else ("unknown": e.g. a config that no longer fits
the checkpoint) changes nothing on disk and stops with the cause.

orbax wraps TensorStore's errors (`ValueError("OUT_OF_RANGE: Error reading ... in OCDBT database at local file
...: Requested byte range [a, b) is not valid for value of size 3")`) in an `Exception("Encountered error while
reading array index ... See full TensorStore details: <the whole spec>")`; `cause` is the innermost useful
message of the chain, on one line, without the spec.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import re

# TensorStore / absl status codes at the start of a message ("NOT_FOUND: Error opening ...")
_STATUS = re.compile(r"\b(OK|CANCELLED|UNKNOWN|INVALID_ARGUMENT|DEADLINE_EXCEEDED|NOT_FOUND|ALREADY_EXISTS|"
                     r"PERMISSION_DENIED|RESOURCE_EXHAUSTED|FAILED_PRECONDITION|ABORTED|OUT_OF_RANGE|UNIMPLEMENTED|"
                     r"INTERNAL|UNAVAILABLE|DATA_LOSS|UNAUTHENTICATED): ")
# a file that is missing, or shorter than its index says, or whose bytes do not decode
_DAMAGED_CODES = {"NOT_FOUND", "OUT_OF_RANGE", "DATA_LOSS"}
_DAMAGED_WORDS = re.compile(r"truncat|corrupt|checksum|crc|decod|malformed|unexpected end|invalid (magic|header)|"
                            r"was not found in the checkpoint|no such file", re.IGNORECASE)
# the storage (GCS, a network file system) failing for now: the same read can succeed a moment later
_TRANSIENT_CODES = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "RESOURCE_EXHAUSTED"}
_TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED,
                     errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ESTALE, errno.EBUSY}
# google-cloud / google-api-core exception class names of retryable HTTP answers (429, 5xx) and timeouts
_TRANSIENT_TYPES = {"ServiceUnavailable", "TooManyRequests", "InternalServerError", "BadGateway", "GatewayTimeout",
                    "DeadlineExceeded", "RetryError", "TransportError", "ReadTimeout", "ConnectTimeout"}
_SPEC_DUMP = re.compile(r"\s*See full TensorStore details:.*", re.DOTALL)
_MAX_CAUSE = 300


@dataclasses.dataclass(frozen=True)
class RestoreFailure:
    kind: str  # "damaged", "transient" or "unknown"
    cause: str  # one line: what failed, without orbax's spec dumps


def classify(error: BaseException) -> RestoreFailure:
    """The kind of a restore error (see the module docstring), judged on every exception of its chain."""
    chain = [e for e in exception_chain(error) if not _useless(e)] or [error]
    for kind, test in (("transient", _is_transient), ("damaged", _is_damaged)):
        for e in chain:
            if test(e):
                return RestoreFailure(kind, describe(e))
    return RestoreFailure("unknown", describe(chain[0]))


def exception_chain(error: BaseException) -> list[BaseException]:
    """error, its cause, the cause's cause, ... (each once)."""
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        chain.append(error)
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return chain


def describe(error: BaseException) -> str:
    """`Type: message` on one line, TensorStore's spec dump cut off, at most _MAX_CAUSE characters."""
    text = " ".join(_SPEC_DUMP.sub("", str(error)).split())
    if isinstance(error, KeyError) and len(error.args) == 1:
        text = str(error.args[0])  # str(KeyError) quotes its message
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= _MAX_CAUSE else text[: _MAX_CAUSE - 1] + "…"


def _text(error: BaseException) -> str:
    return _SPEC_DUMP.sub("", str(error))[:2000]


def _code(error: BaseException) -> str | None:
    match = _STATUS.search(_text(error)[:200])
    return match.group(1) if match else None


def _is_transient(error: BaseException) -> bool:
    if isinstance(error, (ConnectionError, TimeoutError)) or type(error).__name__ in _TRANSIENT_TYPES:
        return True
    if isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS:
        return True
    code = _code(error)
    # RESOURCE_EXHAUSTED is also XLA's out-of-memory; only storage quotas ("rate", "quota") count here
    return code in _TRANSIENT_CODES and (code != "RESOURCE_EXHAUSTED" or "memory" not in _text(error).lower())


def _is_damaged(error: BaseException) -> bool:
    if isinstance(error, (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, EOFError)):
        return True
    if _code(error) in _DAMAGED_CODES:
        return True
    # other codes (FAILED_PRECONDITION, INVALID_ARGUMENT, ...) can also mean "another config": only words that say
    # the bytes are missing or do not decode count
    return not isinstance(error, (TypeError, AttributeError)) and bool(_DAMAGED_WORDS.search(_text(error)))


def _useless(error: BaseException) -> bool:
    """orbax's wrapper, whose message is only the array index and the spec dump (its cause says what failed)."""
    return "See full TensorStore details" in str(error) and (error.__cause__ or error.__context__) is not None
