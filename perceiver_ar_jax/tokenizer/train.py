"""Training an XLNet-style unigram SentencePiece model (XLNet's ``spm_train`` flags) and loading it as a Tokenizer."""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

import sentencepiece as spm

from .tokenizer import Tokenizer

#: ``spm_train`` flags of XLNet (ids 0..16 of every such model: <unk> <s> </s>, controls, then user-defined symbols).
XLNET_CONTROL_SYMBOLS: tuple[str, ...] = ("<cls>", "<sep>", "<pad>", "<mask>", "<eod>")
XLNET_USER_DEFINED_SYMBOLS: tuple[str, ...] = ("<eop>", ".", "(", ")", '"', "-", "–", "£", "€")


def _training_lines(source: Any) -> Iterator[str]:
    """Non-blank lines (SentencePiece's "sentences") of files and/or texts; see :func:`train_tokenizer`."""
    items = [source] if isinstance(source, (str, os.PathLike)) else source
    for item in items:
        if isinstance(item, os.PathLike) or (item is source and isinstance(item, str)):
            with open(item, encoding="utf-8") as handle:
                lines: Iterable[str] = list(handle)
        elif isinstance(item, str):
            lines = item.splitlines()
        else:
            raise TypeError(f"expected texts (str) or file paths (os.PathLike), got {type(item).__name__}")
        for line in lines:
            line = line.rstrip("\r\n")
            if line.strip():
                yield line


def train_tokenizer(
    text_iterator_or_files: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    directory: str | os.PathLike[str],
    vocab_size: int,
    seed: int = 0,
) -> Tokenizer:
    """Train an XLNet-style unigram SentencePiece model, save it to ``directory`` and load it back.

    Args:
        text_iterator_or_files: a path (``str`` or ``os.PathLike``) to one UTF-8 text file, or an iterable whose items
            are texts (``str``) or file paths (``os.PathLike``, e.g. ``pathlib.Path``); each non-blank line is one
            training sentence.
        directory: where :meth:`Tokenizer.save` writes ``spiece.model`` and the configs.
        vocab_size: number of pieces, special tokens included (``ValueError`` if the corpus cannot fill that many;
            Python's pydoc help texts, about 0.5 MB, fill up to about 3,800).
        seed: SentencePiece's random seed; with one thread the model is then deterministic.

    Uses XLNet's ``spm_train`` flags: unigram, ``character_coverage=0.99995``, control symbols
    ``<cls> <sep> <pad> <mask> <eod>``, user-defined symbols ``<eop> . ( ) " - – £ €``, unk/bos/eos ids 0/1/2, no
    pad id, ``nmt_nfkc`` normalization, shuffled input, plus ``num_threads=1`` for determinism.
    """
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        _train(_training_lines(text_iterator_or_files), model, vocab_size)
    except RuntimeError as error:
        found = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", str(error))
        if found is None:
            raise
        raise ValueError(
            f"vocab_size={vocab_size} is too large for this corpus: SentencePiece can fill at most {found[2]} pieces"
        ) from error
    Tokenizer(model.getvalue()).save(directory)
    return Tokenizer.from_pretrained(directory)


def _train(lines: Iterator[str], model: io.BytesIO, vocab_size: int) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines,
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        character_coverage=0.99995,
        control_symbols=list(XLNET_CONTROL_SYMBOLS),
        user_defined_symbols=list(XLNET_USER_DEFINED_SYMBOLS),
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="nmt_nfkc",
        shuffle_input_sentence=True,
        input_sentence_size=10_000_000,
        num_threads=1,
        minloglevel=2,
    )
