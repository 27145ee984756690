"""The normalizer and pre-tokenizer of ``XLNetTokenizerFast``, step by step as its ``tokenizer.json`` runs them.

Normalizer: ``Replace("``" -> '"')``, ``Replace("''" -> '"')``, ``NFKD``, ``StripAccents``, ``Precompiled`` (the
charsmap of ``spiece.model``); pre-tokenizer: ``WhitespaceSplit`` then ``Metaspace``. Everything runs in ``str``
methods, ``re`` and ``unicodedata`` (C code inside); the Python loops only touch the rare texts where tokenizers'
older Unicode tables or its grapheme rule make a difference.
"""

from __future__ import annotations

import re
import unicodedata

from .unicode_tables import MARKS, WHITE_SPACE, char_class, unicode_tables

SPIECE_UNDERLINE = "\u2581"  # SentencePiece's word-boundary mark, prepended to every word by Metaspace

_WHITE_SPACE_RE = re.compile(char_class(WHITE_SPACE) + "+")
_ASTRAL_RE = re.compile("[\U00010000-\U0010ffff]")


class Normalizer:
    """tokenizers' normalizer and pre-tokenizer for one precompiled charsmap.

    StripAccents and Precompiled act per character apart from one grapheme corner case, so they mostly run as one
    ``str.translate``.
    """

    def __init__(self, charsmap: dict[int, str]) -> None:
        """Build the tables for ``charsmap`` (single character -> replacement, see ``charsmap_single_chars``)."""
        kept, extenders, breakers = unicode_tables()
        self._charsmap = charsmap
        # A whitespace character the charsmap maps to a space needs no mapping: the word split drops it anyway.
        self._charsmap_table: dict[int, str] = {
            c: v for c, v in charsmap.items() if not (chr(c).isspace() and v and v.isspace())
        }
        self._strip_table: dict[int, None] = dict.fromkeys(MARKS)
        # StripAccents then Precompiled in one pass: a mark is gone before the charsmap could see it.
        self._char_table: dict[int, str | None] = {**self._charsmap_table, **self._strip_table}
        self._char_table_bmp_re = re.compile(char_class(c for c in self._char_table if c < 0x10000))
        ascii_keys = [c for c in self._char_table if c < 0x80]
        self._ascii_re = re.compile(char_class(ascii_keys)) if ascii_keys else None
        # str.split() is WhitespaceSplit if the characters it alone takes for whitespace never survive normalization.
        python_only_space = (0x1C, 0x1D, 0x1E, 0x1F)  # str.isspace() but not White_Space (Python 3.11: just these)
        self._split_re = (
            None if all(self._char_table.get(c, "x") in ("", None) for c in python_only_space) else _WHITE_SPACE_RE
        )
        # Cheap gate: the NFKD and grapheme exceptions only concern characters from U+07FD (Python 3.11) on.
        self._rare_re = re.compile("[^\x00-" + re.escape(chr(min(kept | extenders) - 1)) + "]")
        self._nfkd_kept_bmp_re = re.compile(char_class(c for c in kept if c < 0x10000))
        self._nfkd_kept_re = re.compile("(" + char_class(kept) + ")")
        # tokenizers replaces a whole grapheme cluster shorter than 6 bytes by the charsmap value of its first
        # character when that character is a key: then the characters extending it are dropped, not mapped. That
        # only happens for a 3-byte key that starts a cluster (e.g. U+FFFD, U+2581, U+1680; ZWJ/ZWNJ at a cluster
        # start) followed by exactly one 2-byte extender surviving StripAccents (U+07FD with Python 3.11).
        two_byte_extenders = {c for c in extenders if 0x80 <= c < 0x800}
        keys3 = {c for c in charsmap if 0x800 <= c < 0x10000}
        starters = {c for c in keys3 if c not in breakers and c not in extenders}
        joiners = keys3 & extenders
        alternatives = []
        if two_byte_extenders:
            tail = char_class(two_byte_extenders) + "(?!" + char_class(extenders) + ")"
            if starters:
                alternatives.append(char_class(starters) + tail)
            if joiners:
                alternatives.append("(?:^|(?<=" + char_class(breakers) + "))" + char_class(joiners) + tail)
        self._grapheme_trigger_re = re.compile(char_class(two_byte_extenders)) if alternatives else None
        self._grapheme_re = re.compile("|".join(alternatives)) if alternatives else None

    def _nfkd(self, text: str) -> str:
        """NFKD as tokenizers' older tables do it: characters they do not know stay as they are (and, being starters
        for them, are never reordered), so Python's NFKD runs on the text between them."""
        if (
            self._rare_re.search(text) is None
            or (_ASTRAL_RE.search(text) is None and self._nfkd_kept_bmp_re.search(text) is None)
            or self._nfkd_kept_re.search(text) is None
        ):
            return unicodedata.normalize("NFKD", text)
        parts = self._nfkd_kept_re.split(text)
        parts[::2] = [unicodedata.normalize("NFKD", part) for part in parts[::2]]
        return "".join(parts)

    def normalize(self, text: str) -> str:
        """tokenizers' normalizer: ``Replace('``')``, ``Replace("''")``, ``NFKD``, ``StripAccents``, ``Precompiled``.

        Whitespace the charsmap would turn into a space may be left as it is (the word split drops both)."""
        if "``" in text:
            text = text.replace("``", '"')
        if "''" in text:
            text = text.replace("''", '"')
        if text.isascii():  # NFKD and StripAccents change no ASCII text; the charsmap deletes controls only
            if self._ascii_re is not None and self._ascii_re.search(text) is not None:
                return text.translate(self._char_table)
            return text
        text = self._nfkd(text)
        if (
            self._grapheme_re is None
            or self._rare_re.search(text) is None
            or self._grapheme_trigger_re.search(text) is None  # type: ignore[union-attr]
        ):
            if _ASTRAL_RE.search(text) is None and self._char_table_bmp_re.search(text) is None:
                return text  # nothing to strip or map
            return text.translate(self._char_table)
        # rare: the grapheme rule of Precompiled applies, so strip the marks first and map the rest around it
        text = text.translate(self._strip_table)
        out, start = [], 0
        for match in self._grapheme_re.finditer(text):
            out.append(text[start : match.start()].translate(self._charsmap_table))
            out.append(self._charsmap[ord(match.group()[0])])
            start = match.end()
        out.append(text[start:].translate(self._charsmap_table))
        return "".join(out)

    def pretokenize(self, text: str) -> str:
        """Normalizer + ``WhitespaceSplit`` + ``Metaspace``: ``'▁word1▁word2...'`` (``''`` when no words).

        The only characters ``str.split()`` takes for whitespace that are not Unicode White_Space (``\\x1c``-``\\x1f``)
        are deleted by the ``nmt_nfkc`` charsmap, so ``str.split()`` is tokenizers' split then (else a regex)."""
        normalized = self.normalize(text)
        words = normalized.split() if self._split_re is None else [w for w in self._split_re.split(normalized) if w]
        if not words:
            return ""
        if SPIECE_UNDERLINE not in normalized:
            return SPIECE_UNDERLINE + SPIECE_UNDERLINE.join(words)
        # Metaspace only prepends '▁' to words not already starting with it, and every '▁' starts a new word (the
        # charsmap maps '▁' to a space, so this is for charsmaps that do not).
        return "".join(w if w.startswith(SPIECE_UNDERLINE) else SPIECE_UNDERLINE + w for w in words)
