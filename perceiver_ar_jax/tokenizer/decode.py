"""Decoding as ``XLNetTokenizerFast.decode`` does it, all at once or streamed while ids are generated.

``Metaspace`` decoder (``▁`` -> space, every ``▁`` of the first token dropped) followed by transformers'
``clean_up_tokenization_spaces`` (``" ."`` -> ``"."``, ``" 's"`` -> ``"'s"``, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .normalize import SPIECE_UNDERLINE

if TYPE_CHECKING:  # only for the annotation: tokenizer.py imports this module
    from .tokenizer import Tokenizer


def as_id_list(ids: Any) -> list[int]:
    """A list, tuple or 1-D array of ids as a list of Python ints."""
    if isinstance(ids, (list, tuple)):
        return [int(i) for i in ids]
    array = np.asarray(ids)
    if array.ndim > 1:
        raise ValueError(f"decode expects a 1-D sequence of ids, got shape {array.shape}")
    return [int(i) for i in array.reshape(-1).tolist()]


def metaspace(tokens: Sequence[str], at_start: bool) -> str:
    """tokenizers' ``Metaspace`` decoder: ``▁`` -> space, except that every ``▁`` of the text's first token is dropped.

    ``at_start``: whether ``tokens[0]`` is the first token of the text (False when continuing a stream).
    """
    if not tokens:
        return ""
    first = tokens[0].replace(SPIECE_UNDERLINE, "" if at_start else " ")
    return first + "".join(tokens[1:]).replace(SPIECE_UNDERLINE, " ")


def clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization_spaces=True``: no space before punctuation and English contractions."""
    return (
        text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
    )


class IncrementalDecoder:
    """Turns ids arriving one (or a few) at a time into text that is never taken back.

    ``push(ids)`` returns the text that became final; ``flush()`` the rest. Their concatenation equals
    ``tokenizer.decode(all_ids, skip_special_tokens=...)`` exactly. Decoding is per token except for the clean-up
    (``" ."`` -> ``"."``, ``" n't"`` -> ``"n't"``, ...), which can still remove a space near the end of the text, so the
    last ``HOLD`` characters are held back until more tokens (or ``flush``) settle them.

    Example (``sample.py``)::

        stream = tokenizer.incremental_decoder()
        for token_id in generated:
            print(stream.push([token_id]), end="", flush=True)
        print(stream.flush())
    """

    #: held-back characters: 10 sequential replacements with patterns of at most 4 characters
    HOLD = 40

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._raw: list[str] = []
        self._emitted = 0

    def _text(self) -> str:
        text = "".join(self._raw)
        return clean_up_tokenization(text) if self._tokenizer.clean_up_tokenization_spaces else text

    def push(self, ids: Any) -> str:
        """Add generated ids; return the newly final text (possibly empty)."""
        tokens = self._tokenizer._tokens(ids, self._skip)
        if tokens:
            self._raw.append(metaspace(tokens, at_start=not self._raw))
        text = self._text()
        final = len(text) - (self.HOLD if self._tokenizer.clean_up_tokenization_spaces else 0)
        if final <= self._emitted:
            return ""
        new, self._emitted = text[self._emitted : final], final
        return new

    def flush(self) -> str:
        """Return the held-back rest of the text (call at the end of the sequence)."""
        text = self._text()
        new, self._emitted = text[self._emitted :], len(text)
        return new
