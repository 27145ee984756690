"""The model gives perceiver-io 0.11's logits from the same weights, for every config option.

Goldens: ../shared/fixtures/public (the public fixture, in three checkpoint formats) and tests/assets/reference
(one small model per group of config options, made with the real library by tools/make_reference_fixtures.py).
"""

import json

import jax
import numpy as np
import pytest

from perceiver_ar_jax.convert import load_torch_checkpoint
from perceiver_ar_jax.model import CausalLanguageModel
from tests.conftest import REFERENCE_ASSETS

TOLERANCE = 1e-4  # max |logit difference| in float32


def compiled(model):
    """model.apply under jax.jit, as every user runs it (op-by-op execution of a whole model is far slower)."""
    return jax.jit(model.apply, static_argnames="prefix_len")

PUBLIC_CASES = [  # (case, tokens key, prefix_len, pad mask key)
    ("p0", "tokens", 0, None),
    ("p16", "tokens", 16, None),
    ("p48", "tokens", 48, None),
    ("pad_p48", "pad_tokens", 48, "pad_mask"),
    ("pad_p0_edge", "pad_tokens", 0, "pad_mask"),
]


@pytest.mark.parametrize("checkpoint", ["hf-safetensors", "hf-bin", "lightning.ckpt"])
def test_public_fixture_logits_match_in_every_checkpoint_format(public_fixture, checkpoint):
    if checkpoint != "hf-safetensors":
        pytest.importorskip("torch", reason="pickle checkpoints need the torch extra")
    config, params = load_torch_checkpoint(public_fixture / checkpoint)
    # float32 products at full precision ("auto" -> "highest"): what keeps 1e-4 on TPU (one bf16 pass by default)
    # and GPU (TF32) as on CPU
    assert config.matmul_precision == "auto" and config.precision == "highest"
    apply = compiled(CausalLanguageModel(config))
    golden = np.load(public_fixture / "forward_cases.npz")
    for case, tokens, prefix_len, pad_mask in PUBLIC_CASES:
        logits = apply({"params": params}, golden[tokens], prefix_len=prefix_len,
                             pad_mask=None if pad_mask is None else golden[pad_mask])
        expected = golden["logits_" + case]
        assert logits.shape == expected.shape, case
        assert np.isfinite(logits).all(), case
        np.testing.assert_allclose(logits, expected, rtol=0, atol=TOLERANCE, err_msg=case)


@pytest.mark.parametrize("name", sorted(p.name for p in REFERENCE_ASSETS.iterdir()))
def test_logits_match_reference_for_config_options(name):
    directory = REFERENCE_ASSETS / name
    config, params = load_torch_checkpoint(directory)
    expected_config = json.loads((directory / "config.json").read_text())["model_config"]
    assert {k: getattr(config, k) for k in expected_config} == expected_config
    apply = compiled(CausalLanguageModel(config.replace(matmul_precision="highest")))
    golden = np.load(directory / "cases.npz")
    for case in json.loads((directory / "cases.json").read_text())["cases"]:
        pad_mask = golden[case["name"] + "_pad_mask"] if case["has_pad_mask"] else None
        logits = apply({"params": params}, golden[case["name"] + "_input_ids"], prefix_len=case["prefix_len"],
                             pad_mask=pad_mask)
        np.testing.assert_allclose(logits, golden[case["name"] + "_logits"], rtol=0, atol=TOLERANCE,
                                   err_msg=f"{name}/{case['name']}")


def test_max_heads_parallel_does_not_change_results(public_fixture):
    config, params = load_torch_checkpoint(public_fixture / "hf-safetensors")
    golden = np.load(public_fixture / "forward_cases.npz")
    results = []
    for heads in (None, 1, 3, 4):
        apply = compiled(CausalLanguageModel(config.replace(max_heads_parallel=heads)))
        results.append(np.asarray(apply({"params": params}, golden["pad_tokens"], prefix_len=48,
                                              pad_mask=golden["pad_mask"])))
    for other in results[1:]:
        np.testing.assert_allclose(other, results[0], rtol=0, atol=TOLERANCE)
