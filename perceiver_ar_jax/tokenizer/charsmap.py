"""Reading the ``precompiled_charsmap`` of a SentencePiece model (the ``nmt_nfkc`` normalization rules)."""

from __future__ import annotations

import struct

import numpy as np


def charsmap_single_chars(blob: bytes) -> dict[int, str]:
    """Entries of a SentencePiece precompiled charsmap whose key is exactly one character.

    The blob is ``uint32 trie_size`` + a darts-clone double-array trie (keys: UTF-8 bytes, values: offsets into the
    pool) + a pool of NUL-terminated replacement strings. tokenizers applies the charsmap per character for every
    grapheme cluster of 6 bytes or more and to the grapheme as a whole otherwise; the multi-character keys of the
    ``nmt_nfkc`` maps all contain marks that StripAccents has already removed (checked for the XLNet models), so
    single characters are what matters. The trie is walked breadth first, all 255 byte labels of a level at once.
    """
    if len(blob) < 4:
        return {}
    (trie_size,) = struct.unpack_from("<I", blob, 0)
    units = np.frombuffer(blob, dtype="<u4", count=trie_size // 4, offset=4).astype(np.int64)
    pool = blob[4 + trie_size :]

    def offset(unit: np.ndarray) -> np.ndarray:
        return (unit >> 10) << ((unit & (1 << 9)) >> 6)

    labels = np.arange(1, 256, dtype=np.int64)
    nodes = np.zeros(1, dtype=np.int64)
    keys = [b""]
    out: dict[int, str] = {}
    for _ in range(4):  # a UTF-8 character has at most 4 bytes
        if not len(nodes):
            break
        child = (nodes ^ offset(units[nodes]))[:, None] ^ labels[None, :]
        inside = child < len(units)
        hit = inside & ((units[np.where(inside, child, 0)] & ((1 << 31) | 0xFF)) == labels[None, :])
        parent, label = np.nonzero(hit)
        nodes = child[parent, label]
        keys = [keys[p] + bytes((int(labels[lab]),)) for p, lab in zip(parent.tolist(), label.tolist(), strict=True)]
        has_leaf = ((units[nodes] >> 8) & 1).astype(bool)
        keep = []
        for i, key in enumerate(keys):
            first = key[0]
            char_len = 1 if first < 0x80 else 2 if first < 0xE0 else 3 if first < 0xF0 else 4
            if len(key) < char_len:
                keep.append(i)
            elif len(key) == char_len and has_leaf[i]:
                value = int(units[nodes[i] ^ offset(units[nodes[i]])] & 0x7FFFFFFF)
                out[ord(key.decode("utf-8"))] = pool[value : pool.index(b"\0", value)].decode("utf-8")
        nodes = nodes[keep]
        keys = [keys[i] for i in keep]
    return out
