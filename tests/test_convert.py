"""Checkpoint conversion: formats, round trips, the CLI, and one clear error for each kind of bad input."""

import json
import os
import pickle
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from perceiver_ar_jax.checkpoints import load_model, save_model
from perceiver_ar_jax.convert import export_torch_checkpoint, load_torch_checkpoint, main
from perceiver_ar_jax.convert.safetensors_io import SafetensorsReader, write_safetensors
from perceiver_ar_jax.errors import CheckpointError
from tests.conftest import REFERENCE_PYTHON, REPO, require

PREFIX = "backend_model."


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def copy_hf_dir(src, dst, tensors=None, drop=(), model_config_changes=None):
    """Copy an HF model directory, optionally replacing/dropping tensors or changing model_config fields."""
    shutil.copytree(src, dst)
    if tensors is not None or drop:
        reader = SafetensorsReader(src / "model.safetensors")
        state = {k: np.array(reader.get(k)) for k in reader.keys() if k not in drop}
        state.update(tensors or {})
        write_safetensors(dst / "model.safetensors", [(k, v.shape, v.dtype) for k, v in state.items()], state.get,
                          metadata={"format": "pt"})
    if model_config_changes:
        config = json.loads((dst / "config.json").read_text())
        config["model_config"].update(model_config_changes)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def assert_refused(public_fixture, dst, message, **changes):
    """Loading a copy (at dst) of the fixture with `changes` (copy_hf_dir's arguments) fails with `message`."""
    bad = copy_hf_dir(public_fixture / "hf-safetensors", dst, **changes)
    with pytest.raises(CheckpointError, match=message) as e:
        load_torch_checkpoint(bad)
    return e.value


@pytest.fixture(scope="module")
def fixture_model(public_fixture):
    return load_torch_checkpoint(public_fixture / "hf-safetensors")


# ---------------------------------------------------------------------------------------------------------------
def test_all_formats_give_identical_params(public_fixture, fixture_model):
    pytest.importorskip("torch")
    for source in ("hf-bin", "lightning.ckpt"):
        config, params = load_torch_checkpoint(public_fixture / source)
        assert config == fixture_model[0]
        assert_trees_equal(params, fixture_model[1])


def test_export_then_reload_is_exact(tmp_path, public_fixture, fixture_model):
    config, params = fixture_model
    export_torch_checkpoint(config, params, tmp_path / "hf", tokenizer_dir=public_fixture / "hf-safetensors")
    reloaded_config, reloaded = load_torch_checkpoint(tmp_path / "hf")
    assert reloaded_config == config
    assert_trees_equal(reloaded, params)
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    original = json.loads((public_fixture / "hf-safetensors" / "config.json").read_text())
    assert exported["model_config"] == original["model_config"]
    assert exported["tokenizer_class"] == "XLNetTokenizerFast"
    for name in ("spiece.model", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
        assert (tmp_path / "hf" / name).read_bytes() == (public_fixture / "hf-safetensors" / name).read_bytes()
    # the safetensors package reads our file and finds the same tensors as in perceiver-io's own
    from safetensors.numpy import load_file

    theirs = load_file(public_fixture / "hf-safetensors" / "model.safetensors")
    ours = load_file(tmp_path / "hf" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in theirs:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_our_model_directory_round_trip_is_exact(tmp_path, public_fixture, fixture_model):
    config, params = fixture_model
    save_model(tmp_path / "model", config, params, tokenizer_dir=public_fixture / "hf-safetensors")
    loaded_config, loaded = load_model(tmp_path / "model")
    assert loaded_config == config
    assert_trees_equal(loaded, params)
    assert (tmp_path / "model" / "spiece.model").exists()


def test_cli_converts_both_ways(tmp_path, public_fixture, fixture_model):
    assert main([str(public_fixture / "hf-safetensors"), str(tmp_path / "jax")]) == 0
    assert main(["--to-pytorch", str(tmp_path / "jax"), str(tmp_path / "torch")]) == 0
    config, params = load_torch_checkpoint(tmp_path / "torch")
    assert config == fixture_model[0]
    assert_trees_equal(params, fixture_model[1])
    assert (tmp_path / "torch" / "spiece.model").exists()


def test_cli_refuses_to_overwrite_and_keeps_what_was_there(tmp_path, public_fixture, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "precious.txt").write_text("keep me")
    assert main([str(public_fixture / "hf-safetensors"), str(dst)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (dst / "precious.txt").read_text() == "keep me"


def test_failed_conversion_leaves_existing_destination_untouched(tmp_path, public_fixture):
    dst = tmp_path / "out"
    assert main([str(public_fixture / "hf-safetensors"), str(dst)]) == 0
    before = sorted(p.name for p in dst.iterdir())
    bad = copy_hf_dir(public_fixture / "hf-safetensors", tmp_path / "bad", drop=[PREFIX + "out_norm.bias"])
    assert main([str(bad), str(dst), "--overwrite"]) == 2
    assert sorted(p.name for p in dst.iterdir()) == before
    load_model(dst)  # still loads
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no leftovers


def test_sharded_safetensors_directory(tmp_path, public_fixture, fixture_model):
    src = public_fixture / "hf-safetensors"
    dst = tmp_path / "sharded"
    dst.mkdir()
    shutil.copy(src / "config.json", dst)
    reader = SafetensorsReader(src / "model.safetensors")
    keys = reader.keys()
    weight_map = {}
    for i, shard_keys in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        write_safetensors(dst / name, [(k, reader.shape(k), np.float32) for k in shard_keys], reader.get)
        weight_map.update({k: name for k in shard_keys})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config, params = load_torch_checkpoint(dst)
    assert_trees_equal(params, fixture_model[1])


def test_bfloat16_checkpoint_loads(tmp_path, public_fixture, fixture_model):
    import ml_dtypes

    reader = SafetensorsReader(public_fixture / "hf-safetensors" / "model.safetensors")
    half = {k: np.asarray(reader.get(k)).astype(ml_dtypes.bfloat16) for k in reader.keys()}
    src = copy_hf_dir(public_fixture / "hf-safetensors", tmp_path / "bf16", tensors=half)
    config, params = load_torch_checkpoint(src)
    leaf = params["cross_attention_layer"]["mlp"]["fc1"]["kernel"]
    assert leaf.dtype == np.float32
    np.testing.assert_array_equal(leaf, fixture_model[1]["cross_attention_layer"]["mlp"]["fc1"]["kernel"]
                                  .astype(ml_dtypes.bfloat16).astype(np.float32))


# ------------------------------------------------------------------------------------------------- bad input
def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nowhere"):
        load_torch_checkpoint(tmp_path / "nowhere")


def test_directory_without_weights(tmp_path, public_fixture):
    d = tmp_path / "noweights"
    d.mkdir()
    shutil.copy(public_fixture / "hf-safetensors" / "config.json", d)
    with pytest.raises(CheckpointError, match="has no weights: expected one of model.safetensors"):
        load_torch_checkpoint(d)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="it has no config.json"):
        load_torch_checkpoint(empty)


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path, public_fixture):
    key = "cross_attention.1.module.1.weight"
    assert_refused(public_fixture, tmp_path / "bad",
                   rf"tensor {key} has shape \(200, 64\), but the config .* needs \(256, 64\)",
                   tensors={PREFIX + key: np.zeros((200, 64), np.float32)})


def test_checkpoint_of_another_shape_is_refused(tmp_path, public_fixture):
    assert_refused(public_fixture, tmp_path / "bad",
                   r"input_adapter.txt_embedding.weight has shape \(512, 64\).*\(512, 128\)",
                   model_config_changes={"num_channels": 128})
    error = assert_refused(public_fixture, tmp_path / "fewer",
                           r"unused tensors: .*self_attention\.2\.0\.module\.norm\.weight",
                           model_config_changes={"num_self_attention_layers": 2})
    assert "self_attention.1." not in str(error)


def test_unknown_and_missing_keys_are_named(tmp_path, public_fixture):
    assert_refused(public_fixture, tmp_path / "extra", "unused tensors: mystery.weight",
                   tensors={PREFIX + "mystery.weight": np.zeros(3, np.float32)})
    assert_refused(public_fixture, tmp_path / "missing",
                   r"missing tensors: self_attention\.1\.0\.module\.attention\.k_proj",
                   drop=[PREFIX + "self_attention.1.0.module.attention.k_proj.weight"])


def test_config_value_out_of_range(tmp_path, public_fixture):
    assert_refused(public_fixture, tmp_path / "bad",
                   r"invalid model config: config.num_channels=64 .* divisible by num_heads",
                   model_config_changes={"num_heads": 3})


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hyper_parameters": {}, "payload": _RunsCode()}, path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="refused to load .*evil.ckpt"):
        load_torch_checkpoint(path)
    assert not (tmp_path / "pwned").exists()
    raw = tmp_path / "raw.bin"  # a plain pickle, not torch's zip format
    raw.write_bytes(pickle.dumps({"payload": _RunsCode()}))
    with pytest.raises(CheckpointError, match="refused to load|cannot read"):
        load_torch_checkpoint(raw)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_corrupted_checkpoint(tmp_path, public_fixture, name):
    if name.endswith(".bin"):
        pytest.importorskip("torch")
    src = public_fixture / ("hf-safetensors" if name.endswith(".safetensors") else "hf-bin")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    data = (bad / name).read_bytes()
    (bad / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted|corrupted or not a PyTorch checkpoint"):
        load_torch_checkpoint(bad)
    (bad / name).write_bytes(b"\x00" * 5)
    with pytest.raises(CheckpointError, match="not a safetensors file|corrupted"):
        load_torch_checkpoint(bad)


def test_corrupted_model_directory(tmp_path, fixture_model):
    save_model(tmp_path / "model", *fixture_model)
    for path in (tmp_path / "model" / "params").rglob("*"):
        if path.is_file() and path.stat().st_size > 1000:
            path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot restore the parameters"):
        load_model(tmp_path / "model")
    with pytest.raises(CheckpointError, match="not a perceiver-ar-jax model directory"):
        load_model(tmp_path)


# ------------------------------------------------------------------------------------- perceiver-io itself
@pytest.mark.reference
def test_perceiver_io_loads_our_export_and_gives_the_same_logits(tmp_path, public_fixture, fixture_model):
    require(REFERENCE_PYTHON)
    config, params = fixture_model
    export_torch_checkpoint(config, params, tmp_path / "hf")
    golden = np.load(public_fixture / "forward_cases.npz")
    script = f"""
import numpy as np, torch, warnings
warnings.filterwarnings("ignore")
from perceiver.model.text.clm import PerceiverCausalLanguageModel
g = np.load({str(public_fixture / "forward_cases.npz")!r})
for name, path in (("ours", {str(tmp_path / "hf")!r}), ("theirs", {str(public_fixture / "hf-safetensors")!r})):
    model = PerceiverCausalLanguageModel.from_pretrained(path).eval()
    with torch.no_grad():
        out = model.backend_model(torch.tensor(g["pad_tokens"]), prefix_len=48, pad_mask=torch.tensor(g["pad_mask"]))
    np.save({str(tmp_path)!r} + "/" + name + ".npy", out.logits.numpy())
"""
    subprocess.run([str(REFERENCE_PYTHON), "-c", script], check=True, cwd=REPO, capture_output=True)
    # perceiver-io gives bit-identical logits from our export and from its own checkpoint
    np.testing.assert_array_equal(np.load(tmp_path / "ours.npy"), np.load(tmp_path / "theirs.npy"))
    np.testing.assert_allclose(np.load(tmp_path / "ours.npy"), golden["logits_pad_p48"], rtol=0, atol=1e-4)


def test_convert_module_runs_as_a_script(tmp_path, public_fixture):
    result = subprocess.run([sys.executable, "-m", "perceiver_ar_jax.convert", str(tmp_path / "missing"),
                             str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: checkpoint not found")
    assert "Traceback" not in result.stderr
