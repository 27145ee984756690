"""XLNet-style SentencePiece tokenizer with the ids of Hugging Face's ``XLNetTokenizerFast``.

perceiver-io trained and generates with ``AutoTokenizer.from_pretrained("xlnet-base-cased")``, i.e. the *fast*
``XLNetTokenizerFast`` (tokenizers 0.15.2), always with ``add_special_tokens=False``. Its pipeline (``tokenizer.json``)
is not what plain ``sentencepiece`` does, so :class:`Tokenizer` rebuilds it step by step, using only the
``sentencepiece`` library and the Python standard library:

1. *Added tokens* (``tokenizer.py``): the special tokens (``<unk> <s> </s> <cls> <sep> <pad> <mask> <eod> <eop>``, ids
   0-8) are split off the raw text first (leftmost-longest); every stretch of text between them goes through steps 2-4
   on its own.
2. *Normalizer* (``normalize.py``): ``Replace("``" -> '"')``, ``Replace("''" -> '"')``, ``NFKD``, ``StripAccents``
   (drop the characters of Unicode category Mark, by the older Unicode tables compiled into tokenizers:
   ``unicode_tables.py``), ``Precompiled`` (the ``nmt_nfkc`` charsmap stored in ``spiece.model``, read by
   ``charsmap.py``, applied the way tokenizers applies it: per grapheme cluster shorter than 6 bytes, else per
   character; never the longest-match composition SentencePiece itself would do).
3. *Pre-tokenizer* (``normalize.py``): ``WhitespaceSplit`` (split on Unicode White_Space and drop it) then
   ``Metaspace`` (every word gets a leading ``▁``).
4. *Model* (``segment.py``): unigram Viterbi over the pieces of ``spiece.model`` with its scores, except that pieces
   ending in a digit followed by ``,`` have their score lowered by 100 (XLNet's fast stand-in for the slow digit-comma
   re-split); a run of characters the vocabulary lacks becomes one ``<unk>``.

Steps 1-3 run in Python (``str`` methods, ``re`` and ``unicodedata``: C code inside). Step 4 runs in SentencePiece's
C++ on a modified copy of the model built at load time. SentencePiece sums scores in float32 and tokenizers in float64,
which decides exact ties (``=====``, ``hahaha``, ``▁cab c cc`` vs ``▁cab cc c``) differently; the scores are rounded and
the rare words where that matters are found and redone in float64 Python (see ``segment.py``).

Decoding (``decode.py``) mirrors the fast tokenizer too: ``Metaspace`` decoder then transformers'
``clean_up_tokenization_spaces``. Streaming: :meth:`Tokenizer.incremental_decoder` returns an
:class:`IncrementalDecoder`; feed it ids as they are generated and print what :meth:`IncrementalDecoder.push` returns;
the concatenation of all pieces plus :meth:`IncrementalDecoder.flush` equals ``tokenizer.decode(all_ids)`` exactly.

Files: ``pretrained.py`` reads and writes the directory layout of transformers (``spiece.model``,
``tokenizer_config.json``, ``special_tokens_map.json``); ``train.py`` trains a new model with XLNet's flags.

Checked against tokenizers 0.15.2 on all golden cases and on ~200,000 more texts (every pydoc line and topic, numbers,
repeated characters, random Unicode): identical ids and decodes. What can still differ: a near-tie within ~1e-5
between two different segmentations of a word (below float32 resolution; seen once in 40,000 random 4-40 digit
strings), and characters added to Unicode after 14.0.0 when Python is newer than 3.11 (the Unicode exception tables
in ``unicode_tables.py`` were measured against Python 3.11, the version the fixtures were made with). Lone surrogates
cannot be encoded.
"""

from .decode import IncrementalDecoder
from .pretrained import (
    SPECIAL_TOKENS_MAP,
    SPIECE_MODEL,
    TOKENIZER_CONFIG,
    XLNET_ADDITIONAL_SPECIAL_TOKENS,
    XLNET_SPECIAL_TOKENS,
)
from .tokenizer import Tokenizer
from .train import XLNET_CONTROL_SYMBOLS, XLNET_USER_DEFINED_SYMBOLS, train_tokenizer

__all__ = [
    "SPECIAL_TOKENS_MAP",
    "SPIECE_MODEL",
    "TOKENIZER_CONFIG",
    "XLNET_ADDITIONAL_SPECIAL_TOKENS",
    "XLNET_CONTROL_SYMBOLS",
    "XLNET_SPECIAL_TOKENS",
    "XLNET_USER_DEFINED_SYMBOLS",
    "IncrementalDecoder",
    "Tokenizer",
    "train_tokenizer",
]
