"""Write ``tests/assets/tiny_c4``: a tiny prepared TFDS ``c4/en:3.1.0`` so the real TFDS reading path runs offline.

The files are what ``tfds`` itself writes (``dataset_info.json``, ``features.json``, TFRecord shards), with C4's five
text features, so ``tfds.builder("c4/en:3.1.0", data_dir="tests/assets/tiny_c4")`` loads them through TFDS's own C4
builder exactly as it loads the real dataset from a GCS bucket. The documents are seeded, made-up English (with a few
non-ASCII characters, very short and very long documents); the output is checked in, so this script only needs to run
again to change the asset::

    python tests/assets/make_tiny_c4.py
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

OUT = Path(__file__).resolve().parent / "tiny_c4"
NUM_DOCS = {"train": 60, "validation": 12}
NUM_SHARDS = 2  # more than one file per split, so reads that start inside the split cross file boundaries

_WORDS = (
    "the a of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so no will more can out other into some time "
    "only new very after first also most over did many before must through back years where much your way well down "
    "should because each just those people how too little state good make world still own see men work long get "
    "here between both life being under never day same another know while last might us great old year off come "
    "since against go came right used take three garden river coffee recipe software market weather music school "
    "café naïve résumé city history water light house paper number program"
).split()
_OPENERS = ("“", "", "", "", "‘")
_CLOSERS = {"“": "”", "‘": "’", "": ""}


def _sentence(rng: np.random.Generator) -> str:
    words = [str(w) for w in rng.choice(_WORDS, size=int(rng.integers(4, 18)))]
    if rng.random() < 0.2:
        words.insert(int(rng.integers(0, len(words))), str(int(rng.integers(1, 2030))))
    opener = _OPENERS[int(rng.integers(0, len(_OPENERS)))]
    text = " ".join(words)
    return opener + text[0].upper() + text[1:] + rng.choice([".", ".", ".", "?", "!"]) + _CLOSERS[opener]


def _document(rng: np.random.Generator, index: int) -> str:
    if index % 17 == 3:
        return "Hi."  # a document shorter than any chunk
    num_paragraphs = 8 if index % 13 == 5 else int(rng.integers(1, 4))  # a few long ones span several chunks
    paragraphs = [" ".join(_sentence(rng) for _ in range(int(rng.integers(1, 6)))) for _ in range(num_paragraphs)]
    return "\n".join(paragraphs)


def _examples(split: str):
    rng = np.random.default_rng(1234 if split == "train" else 4321)
    for i in range(NUM_DOCS[split]):
        yield (
            f"{split}-{i}",
            {
                "text": _document(rng, i),
                "url": f"https://example.com/{split}/{i}",
                "content-type": "text/plain",
                "content-length": "0",
                "timestamp": f"2019-04-{1 + i % 28:02d}T12:00:00Z",
            },
        )


class C4(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Same name, config, version and features as TFDS's ``c4/en:3.1.0``."""

    VERSION = tfds.core.Version("3.1.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="en", description="tiny made-up stand-in for C4 en")]

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        names = ("text", "url", "content-type", "content-length", "timestamp")
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({k: text for k in names}))

    def _split_generators(self, dl_manager):
        return {split: _examples(split) for split in NUM_DOCS}

    def _generate_examples(self, examples):
        yield from examples


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        C4(config="en", data_dir=tmp).download_and_prepare(
            download_config=tfds.download.DownloadConfig(num_shards=NUM_SHARDS)
        )
        shutil.rmtree(OUT, ignore_errors=True)
        shutil.copytree(Path(tmp) / "c4", OUT / "c4", ignore=shutil.ignore_patterns("*.lock", "*.tmp*"))
    for path in sorted(OUT.rglob("*")):
        if path.is_file():
            print(path.relative_to(OUT), path.stat().st_size)


if __name__ == "__main__":
    main()
