"""A tokenizer directory as transformers writes one for XLNet, and XLNet's special tokens.

The directory holds ``spiece.model`` plus ``tokenizer_config.json`` / ``special_tokens_map.json`` (special tokens,
clean-up flag); :func:`read_pretrained` turns it into :class:`Tokenizer` arguments and :func:`write_pretrained` writes
what transformers' ``save_pretrained`` would, so transformers' ``XLNetTokenizer`` reads it back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

SPIECE_MODEL = "spiece.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"

#: XLNet's special tokens by role, as ``XLNetTokenizerFast`` defines them (all are pieces of the model).
XLNET_SPECIAL_TOKENS: dict[str, str] = {
    "unk_token": "<unk>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "cls_token": "<cls>",
    "sep_token": "<sep>",
    "pad_token": "<pad>",
    "mask_token": "<mask>",
}
XLNET_ADDITIONAL_SPECIAL_TOKENS: tuple[str, ...] = ("<eop>", "<eod>")

_VERY_LARGE_INTEGER = int(1e30)  # transformers' "no limit" model_max_length


def xlnet_special_tokens_map() -> dict[str, Any]:
    """XLNet's roles -> special tokens, as a (fresh) ``special_tokens_map``."""
    return {**XLNET_SPECIAL_TOKENS, "additional_special_tokens": list(XLNET_ADDITIONAL_SPECIAL_TOKENS)}


def token_content(value: Any) -> str | None:
    """A special token as stored by transformers: a string or ``{"content": ..., "lstrip": ...}``."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def read_pretrained(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Keyword arguments of :class:`Tokenizer` from ``directory/spiece.model`` (or the ``.model`` file itself).

    Special tokens come from ``tokenizer_config.json`` / ``special_tokens_map.json`` when present, else XLNet's
    defaults. ``tokenizer.json`` is not read: its pipeline is the one :class:`Tokenizer` builds.
    """
    path = Path(directory)
    model_file = path if path.is_file() else path / SPIECE_MODEL
    if not model_file.is_file():
        raise FileNotFoundError(f"SentencePiece model not found: {model_file} (expected a {SPIECE_MODEL} there)")
    folder = model_file.parent
    config: dict[str, Any] = {}
    for name in (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP):  # special_tokens_map.json wins, as in transformers
        file = folder / name
        if file.is_file():
            config.update(json.loads(file.read_text(encoding="utf-8")))
    if config.get("do_lower_case") or config.get("keep_accents") or config.get("remove_space") is False:
        raise ValueError(
            f"{folder}: do_lower_case/keep_accents/remove_space differ from XLNet's defaults; not supported"
        )
    roles = xlnet_special_tokens_map()
    for role in (*XLNET_SPECIAL_TOKENS, "additional_special_tokens"):
        if config.get(role) is not None:
            roles[role] = config[role]
    added = None
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, dict) and decoder:
        added = [entry["content"] for _, entry in sorted(decoder.items(), key=lambda kv: int(kv[0]))]
    return {
        "model_proto": model_file.read_bytes(),
        "special_tokens_map": roles,
        "added_tokens": added,
        "clean_up_tokenization_spaces": config.get("clean_up_tokenization_spaces", True),
    }


def write_pretrained(
    directory: str | os.PathLike[str],
    model_proto: bytes,
    special_tokens_map: dict[str, Any],
    added_tokens: dict[str, int],
    clean_up_tokenization_spaces: bool,
) -> None:
    """Write ``spiece.model``, ``tokenizer_config.json`` and ``special_tokens_map.json`` to ``directory``.

    The configs follow what transformers' ``save_pretrained`` writes for XLNet (``tokenizer_class: XLNetTokenizer``,
    left padding). ``added_tokens`` maps each added (special) token to its id.
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SPIECE_MODEL).write_bytes(model_proto)
    mask = token_content(special_tokens_map.get("mask_token"))
    special_map: dict[str, Any] = {}
    for role, value in sorted(special_tokens_map.items()):
        if role == "additional_special_tokens":
            special_map[role] = [token_content(v) for v in value]
        elif role == "mask_token" and mask is not None:
            # XLNet's <mask> swallows the space on its left (no effect on ids here, whitespace is dropped anyway).
            special_map[role] = {
                "content": mask,
                "lstrip": True,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
            }
        else:
            special_map[role] = token_content(value)
    config: dict[str, Any] = {
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "lstrip": t == mask,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for t, i in sorted(added_tokens.items(), key=lambda kv: kv[1])
        },
        **{role: (mask if role == "mask_token" else value) for role, value in special_map.items()},
        "clean_up_tokenization_spaces": clean_up_tokenization_spaces,
        "do_lower_case": False,
        "keep_accents": False,
        "model_max_length": _VERY_LARGE_INTEGER,
        "padding_side": "left",
        "remove_space": True,
        "tokenizer_class": "XLNetTokenizer",
    }
    (folder / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", "utf-8")
    (folder / SPECIAL_TOKENS_MAP).write_text(json.dumps(special_map, indent=2, ensure_ascii=False) + "\n", "utf-8")
