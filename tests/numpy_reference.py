"""An independent float64 numpy implementation of the Perceiver AR forward pass, written from the paper and
perceiver-io's documented behaviour (not from our JAX code), to check options the goldens cannot: which prefix
positions cross-attention dropout keeps, and any config we make up in a test.

Params are in our layout (see perceiver_ar_jax.convert.parameter_table).
"""

import numpy as np
from scipy.special import erf


def layer_norm(x, p, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def rotate(x, angles):
    """x (b, n, h, d); angles (b, n, r): rotate interleaved pairs of the first r channels of each head."""
    r = angles.shape[-1]
    a = angles[:, :, None, :]
    xr = x[..., :r]
    turned = np.empty_like(xr)
    turned[..., 0::2], turned[..., 1::2] = -xr[..., 1::2], xr[..., 0::2]
    return np.concatenate([xr * np.cos(a) + turned * np.sin(a), x[..., r:]], -1)


def attention(p, x_q, x_kv, q_angles, k_angles, allowed):
    q = np.einsum("bnc,chd->bnhd", x_q, p["q_proj"]["kernel"]) / np.sqrt(p["q_proj"]["kernel"].shape[-1])
    k = np.einsum("bnc,chd->bnhd", x_kv, p["k_proj"]["kernel"])
    v = np.einsum("bnc,chd->bnhd", x_kv, p["v_proj"]["kernel"])
    if q_angles is not None:
        q, k = rotate(q, q_angles), rotate(k, k_angles)
    s = np.einsum("bqhd,bkhd->bhqk", q, k)
    s = np.where(allowed, s, -np.finfo(np.float32).max)
    s = np.exp(s - s.max(-1, keepdims=True))
    o = np.einsum("bhqk,bkhd->bqhd", s / s.sum(-1, keepdims=True), v)
    out = np.einsum("bqhd,hdc->bqc", o, p["o_proj"]["kernel"])
    return out + p["o_proj"]["bias"] if "bias" in p["o_proj"] else out


def mlp(p, x):
    h = layer_norm(x, p["norm"]) @ p["fc1"]["kernel"]
    return (0.5 * h * (1 + erf(h / np.sqrt(2)))) @ p["fc2"]["kernel"]


def forward(config, params, ids, prefix_len, pad_mask=None, keep_indices=None):
    """Logits (b, n - prefix_len, vocab). keep_indices (b, keep): the prefix positions cross-attention dropout keeps."""
    params = _to_float64(params)
    b, n = ids.shape
    pads = np.zeros((b, 1), int) if pad_mask is None else pad_mask.sum(1, keepdims=True)
    pad_mask = np.zeros((b, n), bool) if pad_mask is None else pad_mask
    pos = np.maximum(np.arange(n)[None] - pads, 0)
    x = params["token_embedding"]["embedding"][ids]
    if config.abs_pos_emb:
        x = x + params["position_embedding"]["embedding"][pos]
    r = config.num_rotated_channels
    inv_freq = 1.0 / 10000 ** (np.arange(0, r, 2) / r)
    angles = np.repeat(pos[..., None] * inv_freq, 2, axis=-1)

    x_prefix, x_latent = x[:, :prefix_len], x[:, prefix_len:]
    a_prefix, a_latent = angles[:, :prefix_len], angles[:, prefix_len:]
    pad_prefix = pad_mask[:, :prefix_len]
    if keep_indices is not None:
        rows = np.arange(b)[:, None]
        x_prefix, a_prefix, pad_prefix = x_prefix[rows, keep_indices], a_prefix[rows, keep_indices], \
            pad_prefix[rows, keep_indices]
    m, l_ = x_prefix.shape[1], x_latent.shape[1]
    causal = np.arange(m + l_)[None, :] <= np.arange(l_)[:, None] + m
    allowed = causal[None, None] & ~np.concatenate([pad_prefix, pad_mask[:, prefix_len:]], 1)[:, None, None, :]

    ca = params["cross_attention_layer"]
    q_in = layer_norm(x_latent, ca["q_norm"])
    kv_in = np.concatenate([layer_norm(x_prefix, ca["kv_norm"]), q_in], 1)
    x = x_latent + attention(ca["attention"], q_in, kv_in, a_latent, np.concatenate([a_prefix, a_latent], 1), allowed)
    x = x + mlp(ca["mlp"], x)
    causal = (np.arange(l_)[None, :] <= np.arange(l_)[:, None])[None, None]
    for i in range(config.num_self_attention_layers):
        sa = params[f"self_attention_layers_{i}"]
        rotary = i < config.num_rotary_self_attention_layers
        h = layer_norm(x, sa["norm"])
        x = x + attention(sa["attention"], h, h, a_latent if rotary else None, a_latent if rotary else None, causal)
        x = x + mlp(sa["mlp"], x)
    if config.output_norm:
        x = layer_norm(x, params["out_norm"])
    logits = x @ params["token_embedding"]["embedding"].T
    return logits + params["output_bias"] if config.output_bias else logits


def _to_float64(tree):
    if isinstance(tree, dict):
        return {k: _to_float64(v) for k, v in tree.items()}
    return np.asarray(tree, np.float64)
