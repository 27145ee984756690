"""Input pipeline: packing and padding as perceiver-io's C4 module does it, local corpora, TFDS (the checked-in tiny
prepared C4 and tfds.testing.mock_data), per-process shares, determinism and exact resumption."""

import json
from collections import Counter
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import pytest

from perceiver_ar_jax.data import (
    TextSource,
    TfdsSource,
    data_config_defaults,
    hold_out,
    load_text_documents,
    make_dataset,
)
from perceiver_ar_jax.tokenizer import Tokenizer
from tests.conftest import PUBLIC_FIXTURE, require

TINY_C4 = Path(__file__).resolve().parent / "assets" / "tiny_c4"
# 24 short documents of different lengths (~30-260 tokens with the fixture's 512-piece vocabulary).
DOCS = [text[: 80 + 23 * i] for i, (_, text) in enumerate(sorted(topics.items())[:24])]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_pretrained(require(PUBLIC_FIXTURE / "hf-safetensors"))


def text_config(**overrides):
    config = data_config_defaults()
    config.source = "text"
    config.min_seq_len = 16
    config.max_seq_len = 48
    config.shuffle_buffer_size = 100
    config.update(overrides)
    return config


def tfds_config(**overrides):
    config = data_config_defaults()
    config.data_dir = str(TINY_C4)
    config.min_seq_len = 16
    config.max_seq_len = 48
    config.shuffle_buffer_size = 7  # windows of 7 documents: reads start inside windows and files
    config.update(overrides)
    return config


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def chunks_of(batches):
    """The packed chunks (input tokens + the last label) of every row, checking labels are the inputs shifted by one."""
    chunks = []
    for batch in batches:
        for ids, labels, pad in zip(batch["input_ids"], batch["labels"], batch["pad_mask"], strict=True):
            chunk = np.append(ids[~pad], labels[-1])
            np.testing.assert_array_equal(labels[~pad], chunk[1:])
            chunks.append(chunk)
    return chunks


def expected_stream(tokenizer, docs):
    return np.concatenate([np.array(tokenizer.encode(doc) + [tokenizer.eos_id]) for doc in docs])


def documents_in(stream, eos_id):
    """Split a token stream after every EOS: the documents it holds (the unfinished tail dropped)."""
    ends = np.flatnonzero(stream == eos_id)
    return [tuple(part) for part in np.split(stream[: ends[-1] + 1], ends[:-1] + 1)] if len(ends) else []


def assert_same_batches(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a.keys() == e.keys()
        for key in e:
            np.testing.assert_array_equal(a[key], e[key], err_msg=key)


def tiny_c4_texts(split):
    """Texts of a split of the tiny C4, read straight from its TFRecord files (not through TFDS's reader)."""
    import tensorflow as tf

    files = sorted((TINY_C4 / "c4" / "en" / "3.1.0").glob(f"c4-{split}.tfrecord-*"))
    texts = []
    for record in tf.data.TFRecordDataset([str(f) for f in files]).as_numpy_iterator():
        texts.append(tf.train.Example.FromString(record).features.feature["text"].bytes_list.value[0].decode())
    return texts


# ------------------------------------------------------------------------------------------- packing and padding


def test_batches_are_left_padded_with_chunk_lengths_in_min_max(tokenizer):
    batches = take(make_dataset(text_config(), tokenizer, split="train", batch_size=4, texts=DOCS), 30)
    lengths = []
    for batch in batches:
        assert batch["input_ids"].shape == batch["labels"].shape == batch["pad_mask"].shape == (4, 48)
        assert batch["input_ids"].dtype == batch["labels"].dtype == np.int32 and batch["pad_mask"].dtype == bool
        num_pads = batch["pad_mask"].sum(axis=1)
        lengths.extend((48 - num_pads).tolist())
        # padding on the left only: True up to the first token, False after
        np.testing.assert_array_equal(batch["pad_mask"], np.arange(48)[None, :] < num_pads[:, None])
        assert np.all(batch["input_ids"][batch["pad_mask"]] == tokenizer.pad_id)
        assert np.all(batch["labels"][batch["pad_mask"]] == tokenizer.pad_id)
    assert min(lengths) >= 16 and max(lengths) <= 48
    assert len(set(lengths)) > 10  # drawn, not fixed: 120 draws from 33 values
    assert min(lengths) < 24 and max(lengths) > 40


def test_stream_is_documents_each_followed_by_eos_without_gaps(tokenizer):
    # shuffle_buffer_size=0: documents in corpus order, so the packed stream is known exactly
    config = text_config(shuffle_buffer_size=0)
    stream = np.concatenate(
        chunks_of(take(make_dataset(config, tokenizer, split="train", batch_size=3, texts=DOCS), 20))
    )
    expected = expected_stream(tokenizer, hold_out(DOCS, config.eval_fraction)[0] * 3)
    assert len(stream) < len(expected)  # stays within the repeated corpus
    np.testing.assert_array_equal(stream, expected[: len(stream)])


def test_train_split_of_given_texts_excludes_held_out_documents(tokenizer):
    config = text_config(shuffle_buffer_size=0, eval_fraction=0.25)
    train_docs, held_out = hold_out(DOCS, 0.25)
    assert len(held_out) == 6 and len(train_docs) == 18 and not set(held_out) & set(train_docs)
    train = np.concatenate(chunks_of(take(make_dataset(config, tokenizer, split="train", batch_size=2, texts=DOCS), 8)))
    np.testing.assert_array_equal(train, expected_stream(tokenizer, train_docs)[: len(train)])
    val = np.concatenate(
        chunks_of(take(make_dataset(config, tokenizer, split="validation", batch_size=2, texts=DOCS), 2))
    )
    np.testing.assert_array_equal(val, expected_stream(tokenizer, held_out * 2)[: len(val)])


def test_shuffled_epochs_hold_every_document_once_in_new_orders(tokenizer):
    docs = hold_out(DOCS, 0.05)[0]
    encoded = [tuple(tokenizer.encode(doc) + [tokenizer.eos_id]) for doc in docs]
    assert all(tokenizer.eos_id not in doc[:-1] for doc in encoded)
    total = sum(map(len, encoded))
    iterator = make_dataset(text_config(), tokenizer, split="train", batch_size=4, texts=DOCS)
    stream = np.concatenate(chunks_of(take(iterator, (3 * total) // (4 * 16) + 1)))  # >= 3 epochs of tokens
    seen = documents_in(stream, tokenizer.eos_id)
    epochs = [seen[i * len(docs) : (i + 1) * len(docs)] for i in range(3)]
    for epoch in epochs:
        assert Counter(epoch) == Counter(encoded)
    orders = [[encoded.index(doc) for doc in epoch] for epoch in epochs]
    assert orders[0] != list(range(len(docs))) and orders[0] != orders[1] != orders[2]


def test_validation_batches_are_full_length_and_the_same_every_time(tokenizer):
    config = text_config(eval_fraction=0.25)
    first = take(make_dataset(config, tokenizer, split="validation", batch_size=2, texts=DOCS, seed=1), 6)
    again = take(make_dataset(config, tokenizer, split="validation", batch_size=2, texts=DOCS, seed=7), 6)
    assert_same_batches(again, first)
    assert not any(batch["pad_mask"].any() for batch in first)


def test_validation_without_repeat_stops_after_one_pass(tokenizer):
    config = text_config(eval_fraction=0.25)
    held_out = hold_out(DOCS, 0.25)[1]
    batches = list(make_dataset(config, tokenizer, split="validation", batch_size=2, texts=DOCS, repeat=False))
    total = len(expected_stream(tokenizer, held_out))
    assert len(batches) == total // (2 * 49)  # full 49-token chunks, the incomplete last batch dropped


# ------------------------------------------------------------------------------------------- determinism, resume


def test_same_seed_gives_same_batches_and_another_seed_others(tokenizer):
    def run(seed):
        return take(make_dataset(text_config(), tokenizer, split="train", batch_size=4, texts=DOCS, seed=seed), 5)

    assert_same_batches(run(3), run(3))
    assert not np.array_equal(run(3)[0]["input_ids"], run(4)[0]["input_ids"])


@pytest.mark.parametrize("prefetch", [0, 3])
@pytest.mark.parametrize("consumed", [1, 7, 45])  # inside the first document, later, in the second epoch
def test_restored_iterator_continues_with_the_uninterrupted_batches(tokenizer, prefetch, consumed):
    config = text_config(prefetch_batches=prefetch)
    uninterrupted = make_dataset(config, tokenizer, split="train", batch_size=3, texts=DOCS, seed=5)
    expected = take(uninterrupted, consumed + 6)[consumed:]

    interrupted = make_dataset(config, tokenizer, split="train", batch_size=3, texts=DOCS, seed=5)
    take(interrupted, consumed)
    state = json.loads(json.dumps(interrupted.get_state()))  # what a checkpoint stores
    interrupted.close()
    restored = make_dataset(config, tokenizer, split="train", batch_size=3, texts=DOCS, seed=5)
    restored.set_state(state)
    assert_same_batches(take(restored, 6), expected)
    assert restored.get_state() == uninterrupted.get_state()


def test_set_state_rewinds_an_iterator_that_ran_ahead(tokenizer):
    iterator = make_dataset(text_config(), tokenizer, split="train", batch_size=2, texts=DOCS)
    take(iterator, 4)
    state = iterator.get_state()
    expected = take(iterator, 3)
    take(iterator, 10)
    iterator.set_state(state)
    assert_same_batches(take(iterator, 3), expected)


def test_state_of_another_seed_or_process_is_refused(tokenizer):
    state = make_dataset(text_config(), tokenizer, split="train", batch_size=2, texts=DOCS, seed=1).get_state()
    with pytest.raises(ValueError, match="seed=1 .* seed=2"):
        make_dataset(text_config(), tokenizer, split="train", batch_size=2, texts=DOCS, seed=2).set_state(state)
    other = make_dataset(text_config(), tokenizer, split="train", batch_size=2, texts=DOCS, seed=1, process_count=2)
    with pytest.raises(ValueError, match="process_count"):
        other.set_state(state)
    with pytest.raises(ValueError, match="'doc' must be an integer >= 0"):
        other.set_state({**other.get_state(), "doc": -1})


def test_state_from_a_changed_corpus_is_reported(tokenizer):
    iterator = make_dataset(text_config(), tokenizer, split="train", batch_size=2, texts=DOCS)
    take(iterator, 3)
    state = iterator.get_state()
    shorter = make_dataset(text_config(), tokenizer, split="train", batch_size=2, texts=[d[:20] for d in DOCS])
    shorter.set_state(state)
    with pytest.raises(ValueError, match="does not match the data"):
        next(shorter)


# ------------------------------------------------------------------------------------------- processes


def test_process_shares_of_a_text_corpus_are_disjoint_and_cover_it():
    shares = [list(TextSource(DOCS, p, 3).read(0)) for p in range(3)]
    assert sum(shares, []) == DOCS
    assert [len(list(TextSource(DOCS, 1, 3).read(start))) for start in (0, 5, 8, 9)] == [8, 3, 0, 0]


def test_each_process_packs_only_its_own_documents(tokenizer):
    config = text_config(eval_fraction=0.1)
    train_docs = hold_out(DOCS, 0.1)[0]
    half = len(train_docs) // 2
    for process, share in enumerate([train_docs[:half], train_docs[half:]]):
        iterator = make_dataset(
            config, tokenizer, split="train", batch_size=2, texts=DOCS, process_count=2, process_index=process
        )
        own = [tuple(tokenizer.encode(doc) + [tokenizer.eos_id]) for doc in share]
        # enough batches for the stream to pass every document of the share whole (rows hold >= min_seq_len + 1
        # tokens each); the help texts, and so the token counts, differ between Python versions
        num_batches = -(-2 * sum(map(len, own)) // (2 * (config.min_seq_len + 1)))
        seen = documents_in(np.concatenate(chunks_of(take(iterator, num_batches))), tokenizer.eos_id)
        assert set(seen) == set(own)


# ------------------------------------------------------------------------------------------- local files


def test_text_files_and_directories_become_documents(tmp_path):
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    (tmp_path / "corpus" / "b.txt").write_text("second file\n\n\nthird part", encoding="utf-8")
    (tmp_path / "corpus" / "a.txt").write_text("first file", encoding="utf-8")
    (tmp_path / "corpus" / "sub" / "c.txt").write_text("  \n", encoding="utf-8")  # blank: no document
    (tmp_path / "corpus" / "notes.md").write_text("not a .txt file", encoding="utf-8")
    (tmp_path / "extra.text").write_text("named explicitly", encoding="utf-8")
    paths = [tmp_path / "corpus", tmp_path / "extra.text"]
    assert load_text_documents(paths) == ["first file", "second file\n\n\nthird part", "named explicitly"]
    assert load_text_documents(paths, "\n\n\n") == ["first file", "second file", "third part", "named explicitly"]
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_text_documents([tmp_path / "missing.txt"])


def test_text_paths_config_feeds_training_and_eval_text_paths_validation(tokenizer, tmp_path):
    for i, doc in enumerate(DOCS[:10]):
        (tmp_path / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "held.txt").write_text(DOCS[20], encoding="utf-8")
    config = text_config(
        shuffle_buffer_size=0,
        text_paths=tuple(str(tmp_path / f"doc{i:02d}.txt") for i in range(10)),
        eval_text_paths=(str(tmp_path / "val"),),
    )
    train = np.concatenate(chunks_of(take(make_dataset(config, tokenizer, split="train", batch_size=2), 5)))
    np.testing.assert_array_equal(train, expected_stream(tokenizer, DOCS[:10])[: len(train)])
    val = np.concatenate(chunks_of(take(make_dataset(config, tokenizer, split="validation", batch_size=1), 3)))
    np.testing.assert_array_equal(val, expected_stream(tokenizer, [DOCS[20]] * 5)[: len(val)])


# ------------------------------------------------------------------------------------------- TFDS


def test_tfds_c4_validation_packs_the_split_in_file_order(tokenizer):
    iterator = make_dataset(tfds_config(), tokenizer, split="validation", batch_size=2, repeat=False)
    stream = np.concatenate(chunks_of(list(iterator)))
    texts = tiny_c4_texts("validation")
    assert len(texts) == 12
    expected = expected_stream(tokenizer, texts)
    assert len(expected) - len(stream) < 2 * 49  # all but the incomplete last batch
    np.testing.assert_array_equal(stream, expected[: len(stream)])


def test_tfds_c4_training_shuffles_windows_and_resumes_exactly(tokenizer):
    config = tfds_config(prefetch_batches=2)
    texts = tiny_c4_texts("train")
    encoded = [tuple(tokenizer.encode(text) + [tokenizer.eos_id]) for text in texts]
    num_batches = sum(map(len, encoded)) // (8 * 16) + 1  # enough for one epoch and then some
    batches = take(make_dataset(config, tokenizer, split="train", batch_size=8, seed=2), num_batches)
    seen = documents_in(np.concatenate(chunks_of(batches)), tokenizer.eos_id)
    assert len(seen) > 60 and Counter(seen[:60]) == Counter(encoded)  # the first epoch: every document once
    assert seen[:60] != encoded
    for window in range(0, 60, 7):  # shuffled within windows of 7 documents of the file order
        end = min(window + 7, 60)
        assert Counter(seen[window:end]) == Counter(encoded[window:end])

    for consumed in (3, 17):  # restore inside a window; after a file boundary
        iterator = make_dataset(config, tokenizer, split="train", batch_size=8, seed=2)
        take(iterator, consumed)
        state = json.loads(json.dumps(iterator.get_state()))
        iterator.close()
        restored = make_dataset(config, tokenizer, split="train", batch_size=8, seed=2)
        restored.set_state(state)
        assert_same_batches(take(restored, 5), batches[consumed : consumed + 5])


def test_tfds_process_shares_are_disjoint_and_cover_the_split_slice():
    texts = tiny_c4_texts("train")
    shares = [list(TfdsSource("c4/en", "3.1.0", str(TINY_C4), "train[10:50]", p, 2).read(0)) for p in range(2)]
    assert shares == [texts[10:30], texts[30:50]]
    assert list(TfdsSource("c4/en", "3.1.0", str(TINY_C4), "train", 1, 2).read(25)) == texts[55:]


def test_tfds_under_mock_data_yields_batches_of_the_mocked_text(tokenizer):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=9, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=str(TINY_C4)):
        iterator = make_dataset(tfds_config(data_dir=None, prefetch_batches=0), tokenizer, split="train", batch_size=2)
        batches = take(iterator, 4)
    chunks = chunks_of(batches)
    text = tokenizer.decode(np.concatenate(chunks))
    assert set(text) <= set(" abcdefghij</s>")  # the mock writes random strings of these letters
    assert tokenizer.eos_id in np.concatenate(chunks)


def test_missing_tfds_dataset_and_bad_split_are_reported(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="not prepared"):
        make_dataset(tfds_config(data_dir=str(tmp_path)), tokenizer, split="train", batch_size=2)
    with pytest.raises(ValueError, match="'test'"):
        make_dataset(tfds_config(), tokenizer, split="test", batch_size=2)


# ------------------------------------------------------------------------------------------- config checks


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(min_seq_len=49), r"config\.data\.min_seq_len=49 is out of range: must be in \[1, 48\]"),
        (dict(min_seq_len=0), r"config\.data\.min_seq_len=0 is out of range: must be in \[1, 48\]"),
        (dict(source="hf"), r"config\.data\.source='hf' is out of range: must be one of"),
        (dict(eval_fraction=1.5), r"config\.data\.eval_fraction=1\.5 is out of range: must be in \(0, 1\)"),
    ],
)
def test_out_of_range_config_values_are_named(tokenizer, overrides, message):
    with pytest.raises(ValueError, match=message):
        split = "validation" if "eval_fraction" in overrides else "train"
        make_dataset(text_config(**overrides), tokenizer, split=split, batch_size=2, texts=DOCS)


def test_bad_arguments_are_named(tokenizer):
    with pytest.raises(ValueError, match="split must be"):
        make_dataset(text_config(), tokenizer, split="test", batch_size=2, texts=DOCS)
    with pytest.raises(ValueError, match=r"process_index must be in \[0, 1\]"):
        make_dataset(
            text_config(), tokenizer, split="train", batch_size=2, texts=DOCS, process_index=2, process_count=2
        )
    with pytest.raises(ValueError, match="text_paths is empty"):
        make_dataset(text_config(), tokenizer, split="train", batch_size=2)
    with pytest.raises(ValueError, match="too few for process"):
        make_dataset(text_config(), tokenizer, split="train", batch_size=2, texts=DOCS[:5], process_count=8)
