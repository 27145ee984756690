"""evaluate.py: a text file scored end to end (figures, JSON, plot) as the Python API scores it, and one `error:`
line with exit status 2 for each kind of bad input."""

import importlib.util
import json

import numpy as np
import pytest

from perceiver_ar_jax import errors
from perceiver_ar_jax.checkpoints import load_model, save_model
from perceiver_ar_jax.evaluation import evaluate
from perceiver_ar_jax.model import CausalLanguageModel, CausalLanguageModelConfig
from perceiver_ar_jax.tokenizer import Tokenizer, train_tokenizer
from tests.conftest import REPO
from tests.test_evaluation import SMALL, noisy_params

TEXT = "The return statement leaves the current function call.\n\nA for loop iterates over a sequence. " * 3


def load_cli():
    spec = importlib.util.spec_from_file_location("evaluate_cli", REPO / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from pydoc_data.topics import topics

    tmp = tmp_path_factory.mktemp("evaluate_cli")
    tokenizer = train_tokenizer([topics[name] for name in sorted(topics)[:20]], tmp / "tokenizer", vocab_size=300,
                                seed=0)
    config = CausalLanguageModelConfig(**{**SMALL, "vocab_size": tokenizer.vocab_size}, abs_pos_emb=False)
    save_model(tmp / "model", config, noisy_params(config), tokenizer_dir=tmp / "tokenizer")
    return tmp / "model"


def run_cli(capsys, *argv):
    status = load_cli().main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_a_text_file_is_scored_as_the_api_scores_it(model_dir, tmp_path, capsys):
    text_file = tmp_path / "doc.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    status, out, err = run_cli(capsys, "--checkpoint", model_dir, "--text_file", text_file, "--stride", "2",
                               "--batch_size", "4", "--output", tmp_path / "out" / "eval.json")
    assert status == 0, err
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())
    config, params = load_model(model_dir)
    tokenizer = Tokenizer.from_pretrained(model_dir)
    api = evaluate(CausalLanguageModel(config), params, [TEXT], tokenizer=tokenizer, stride=2)
    assert saved["tokens"] == api.num_tokens == len(tokenizer.encode(TEXT))
    assert saved["bytes"] == len(TEXT.encode("utf-8"))
    assert saved["loss"] == pytest.approx(api.metrics()["loss"], rel=1e-5)
    assert saved["bits_per_byte"] == pytest.approx(api.loss_sum / np.log(2) / len(TEXT.encode()), rel=1e-5)
    assert (saved["window"], saved["num_latents"], saved["stride"]) == (16, 4, 2)
    assert sum(b["tokens"] for b in saved["context_buckets"]) == api.num_tokens
    assert saved["per_document"][0]["tokens"] == api.num_tokens and saved["text_files"] == [str(text_file)]
    assert (tmp_path / "out" / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"tokens {api.num_tokens:,}" in out and "| context (tokens) | tokens |" in out and "| 9-16 |" in out


def test_a_tfds_split_is_scored_in_file_order(model_dir, tmp_path, capsys):
    """The first documents of tiny C4's validation split (the TFDS path of the training pipeline), as the API
    scores the same texts."""
    import tensorflow as tf

    files = sorted((REPO / "tests" / "assets" / "tiny_c4" / "c4" / "en" / "3.1.0").glob("c4-validation.tfrecord-*"))
    texts = []
    for record in tf.data.TFRecordDataset([str(f) for f in files]).take(3):
        example = tf.train.Example.FromString(record.numpy())
        texts.append(example.features.feature["text"].bytes_list.value[0].decode("utf-8"))
    status, out, err = run_cli(capsys, "--checkpoint", model_dir, "--tfds", "c4/en:3.1.0", "--data_dir",
                               REPO / "tests" / "assets" / "tiny_c4", "--max_documents", "3", "--output",
                               tmp_path / "c4.json")
    assert status == 0, err
    saved = json.loads((tmp_path / "c4.json").read_text())
    config, params = load_model(model_dir)
    api = evaluate(CausalLanguageModel(config), params, texts, tokenizer=Tokenizer.from_pretrained(model_dir))
    assert (saved["documents"], saved["split"], saved["tokens"]) == (3, "validation[:3]", api.num_tokens)
    assert saved["bytes"] == sum(len(t.encode("utf-8")) for t in texts)
    assert saved["loss"] == pytest.approx(api.metrics()["loss"], rel=1e-5)


@pytest.mark.parametrize("case,message", [
    ("missing file", "is neither a file nor a directory"),
    ("empty text", "no text to score"),
    ("stride out of range", r"stride=5 is out of range: must be in [1, 4]"),
    ("latents out of range", r"num_latents=9 is out of range: must be in [1, 4]"),
    ("no checkpoint", "is not a perceiver-ar-jax model directory"),
    ("not a directory", "is not a directory"),
    ("no documents", "give the documents with --text_file or with --tfds"),
])
def test_bad_input_gets_one_error_line(model_dir, tmp_path, capsys, case, message):
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n", encoding="utf-8")
    good = tmp_path / "good.txt"
    good.write_text(TEXT, encoding="utf-8")
    (tmp_path / "not-a-model").mkdir()
    argv = {
        "missing file": ["--checkpoint", model_dir, "--text_file", tmp_path / "missing.txt"],
        "empty text": ["--checkpoint", model_dir, "--text_file", empty],
        "stride out of range": ["--checkpoint", model_dir, "--text_file", good, "--stride", "5"],
        "latents out of range": ["--checkpoint", model_dir, "--text_file", good, "--num_latents", "9"],
        "no checkpoint": ["--checkpoint", tmp_path / "not-a-model", "--text_file", good],
        "not a directory": ["--checkpoint", good, "--text_file", good],
        "no documents": ["--checkpoint", model_dir],
    }[case]
    status, out, err = run_cli(capsys, *argv, "--output", tmp_path / "never.json")
    assert status == errors.EXIT_BAD_INPUT
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "never.json").exists()
