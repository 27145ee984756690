"""Unicode tables of tokenizers 0.15.2 (measured), and helpers to turn code point sets into regexes.

tokenizers compiles in Unicode tables older than Python 3.11's 14.0.0, so where the two disagree (which characters are
marks, which ones NFKD decomposes) the answer is stored here as measured, code point by code point, instead of taken
from ``unicodedata``; the rest comes from one pass over Python's database.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable

# StripAccents: tokenizers removes `is_combining_mark` characters of the Unicode tables compiled into it (older than
# Python 3.11's 14.0.0: e.g. U+07FD, U+0898-U+089F are kept, U+1CF2-U+1CF3 are removed). Measured code point by code
# point against tokenizers 0.15.2; stored whole so the result does not depend on Python's Unicode version.
_TOKENIZERS_MARK_RANGES = (
    "0300-036F 0483-0489 0591-05BD 05BF 05C1-05C2 05C4-05C5 05C7 0610-061A 064B-065F 0670 06D6-06DC 06DF-06E4 "
    "06E7-06E8 06EA-06ED 0711 0730-074A 07A6-07B0 07EB-07F3 0816-0819 081B-0823 0825-0827 0829-082D 0859-085B "
    "08D4-08E1 08E3-0903 093A-093C 093E-094F 0951-0957 0962-0963 0981-0983 09BC 09BE-09C4 09C7-09C8 09CB-09CD 09D7 "
    "09E2-09E3 0A01-0A03 0A3C 0A3E-0A42 0A47-0A48 0A4B-0A4D 0A51 0A70-0A71 0A75 0A81-0A83 0ABC 0ABE-0AC5 0AC7-0AC9 "
    "0ACB-0ACD 0AE2-0AE3 0B01-0B03 0B3C 0B3E-0B44 0B47-0B48 0B4B-0B4D 0B56-0B57 0B62-0B63 0B82 0BBE-0BC2 0BC6-0BC8 "
    "0BCA-0BCD 0BD7 0C00-0C03 0C3E-0C44 0C46-0C48 0C4A-0C4D 0C55-0C56 0C62-0C63 0C81-0C83 0CBC 0CBE-0CC4 0CC6-0CC8 "
    "0CCA-0CCD 0CD5-0CD6 0CE2-0CE3 0D01-0D03 0D3E-0D44 0D46-0D48 0D4A-0D4D 0D57 0D62-0D63 0D82-0D83 0DCA 0DCF-0DD4 "
    "0DD6 0DD8-0DDF 0DF2-0DF3 0E31 0E34-0E3A 0E47-0E4E 0EB1 0EB4-0EB9 0EBB-0EBC 0EC8-0ECD 0F18-0F19 0F35 0F37 0F39 "
    "0F3E-0F3F 0F71-0F84 0F86-0F87 0F8D-0F97 0F99-0FBC 0FC6 102B-103E 1056-1059 105E-1060 1062-1064 1067-106D "
    "1071-1074 1082-108D 108F 109A-109D 135D-135F 1712-1714 1732-1734 1752-1753 1772-1773 17B4-17D3 17DD 180B-180D "
    "1885-1886 18A9 1920-192B 1930-193B 1A17-1A1B 1A55-1A5E 1A60-1A7C 1A7F 1AB0-1ABE 1B00-1B04 1B34-1B44 1B6B-1B73 "
    "1B80-1B82 1BA1-1BAD 1BE6-1BF3 1C24-1C37 1CD0-1CD2 1CD4-1CE8 1CED 1CF2-1CF4 1CF8-1CF9 1DC0-1DF5 1DFB-1DFF "
    "20D0-20F0 2CEF-2CF1 2D7F 2DE0-2DFF 302A-302F 3099-309A A66F-A672 A674-A67D A69E-A69F A6F0-A6F1 A802 A806 A80B "
    "A823-A827 A880-A881 A8B4-A8C5 A8E0-A8F1 A926-A92D A947-A953 A980-A983 A9B3-A9C0 A9E5 AA29-AA36 AA43 AA4C-AA4D "
    "AA7B-AA7D AAB0 AAB2-AAB4 AAB7-AAB8 AABE-AABF AAC1 AAEB-AAEF AAF5-AAF6 ABE3-ABEA ABEC-ABED FB1E FE00-FE0F "
    "FE20-FE2F 101FD 102E0 10376-1037A 10A01-10A03 10A05-10A06 10A0C-10A0F 10A38-10A3A 10A3F 10AE5-10AE6 "
    "11000-11002 11038-11046 1107F-11082 110B0-110BA 11100-11102 11127-11134 11173 11180-11182 111B3-111C0 "
    "111CA-111CC 1122C-11237 1123E 112DF-112EA 11300-11303 1133C 1133E-11344 11347-11348 1134B-1134D 11357 "
    "11362-11363 11366-1136C 11370-11374 11435-11446 114B0-114C3 115AF-115B5 115B8-115C0 115DC-115DD 11630-11640 "
    "116AB-116B7 1171D-1172B 11C2F-11C36 11C38-11C3F 11C92-11CA7 11CA9-11CB6 16AF0-16AF4 16B30-16B36 16F51-16F7E "
    "16F8F-16F92 1BC9D-1BC9E 1D165-1D169 1D16D-1D172 1D17B-1D182 1D185-1D18B 1D1AA-1D1AD 1D242-1D244 1DA00-1DA36 "
    "1DA3B-1DA6C 1DA75 1DA84 1DA9B-1DA9F 1DAA1-1DAAF 1E000-1E006 1E008-1E018 1E01B-1E021 1E023-1E024 1E026-1E02A "
    "1E8D0-1E8D6 1E944-1E94A E0100-E01EF"
)
# NFKD: characters Python 3.11 decomposes but tokenizers (older tables) leaves alone, measured like the marks above.
_TOKENIZERS_NFKD_KEPT_RANGES = "32FF A7F2-A7F4 AB69 10781-10785 10787-107B0 107B2-107BA 11938 1F16C 1FBF0-1FBF9"


def _parse_ranges(spec: str) -> frozenset[int]:
    out: set[int] = set()
    for item in spec.split():
        lo, _, hi = item.partition("-")
        out.update(range(int(lo, 16), int(hi or lo, 16) + 1))
    return frozenset(out)


def char_class(code_points: Iterable[int]) -> str:
    """A regex character class of ranges (much faster to match than a long list of single characters)."""
    ranges: list[list[int]] = []
    for c in sorted(code_points):
        if ranges and ranges[-1][1] == c - 1:
            ranges[-1][1] = c
        else:
            ranges.append([c, c])
    return "[" + "".join(re.escape(chr(a)) + ("-" + re.escape(chr(b)) if b > a else "") for a, b in ranges) + "]"


MARKS = _parse_ranges(_TOKENIZERS_MARK_RANGES)


@functools.cache
def unicode_tables() -> tuple[frozenset[int], frozenset[int], frozenset[int]]:
    """(NFKD-kept characters, grapheme extenders surviving StripAccents, grapheme breakers), from one pass over
    Python's Unicode database.

    - Marks Python knows but tokenizers does not (e.g. U+07FD) are kept by StripAccents; for tokenizers' NFKD they are
      starters without decomposition, so NFKD runs separately on the text between those that have a combining class
      (and between the characters of ``_TOKENIZERS_NFKD_KEPT_RANGES``): they are neither decomposed nor reordered.
    - Grapheme extenders (UAX #29 Extend/ZWJ) that survive StripAccents: those newer marks, ZWNJ, ZWJ, emoji
      modifiers, tag characters.
    - Grapheme breakers (UAX #29 GB4, a cluster always ends after them): Cc, Zl, Zp and Cf other than ZWNJ/ZWJ.
    """
    newer_marks, kept, breakers = set(), set(_parse_ranges(_TOKENIZERS_NFKD_KEPT_RANGES)), set()
    for c in range(0x110000):
        category = unicodedata.category(chr(c))
        if category[0] == "M" and c not in MARKS:
            newer_marks.add(c)
            if unicodedata.combining(chr(c)):
                kept.add(c)
        elif category in ("Cc", "Zl", "Zp") or (category == "Cf" and c not in (0x200C, 0x200D)):
            breakers.add(c)
    extenders = newer_marks | {0x200C, 0x200D} | set(range(0x1F3FB, 0x1F400)) | set(range(0xE0020, 0xE0080))
    return frozenset(kept), frozenset(extenders), frozenset(breakers)


# Unicode White_Space, what tokenizers' WhitespaceSplit (Rust's char::is_whitespace) splits on.
WHITE_SPACE = frozenset(
    [*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F, 0x205F, 0x3000]
)
