"""Decode-time weight formats: the model's parameters with every weight matrix in bfloat16 or int8 (per-column
scales), and on CPU packed for the kernel that reads them at the memory bandwidth (`backend.prepare_weight`).

    params = prepare_weights(params, "int8")       # once; then generate / model.apply as usual (no gradients)

Decoding reads every weight once per token, so its speed is bytes read: bfloat16 halves them, int8 quarters them.
Embeddings, norms and biases stay as they are; the tied output projection gets its own prepared copy
(`output_projection`), and the token embedding keeps its float32 table for lookups.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from perceiver_ar_jax import backend

# A projection kernel contracts its first axis with the input (in_shape + features), except the attention's output
# projection, whose kernel is (heads, head_dim, channels): see the `in_axes` of the model's `Linear` layers.
IN_AXES = {"o_proj": 2}


def prepare_weights(params: Mapping[str, Any], weights: str) -> dict[str, Any]:
    """A copy of `params` (the model's "params" collection) with its weight matrices in the form `weights`
    ("float32", "bfloat16" or "int8"). Already prepared parameters are returned as they are."""
    if weights not in backend.WEIGHT_FORMATS:
        raise ValueError(f"weights={weights!r} out of valid range: must be one of {backend.WEIGHT_FORMATS}")
    if is_prepared(params):
        return dict(params)
    return _prepare(params, weights=weights)


@functools.partial(jax.jit, static_argnames="weights")
def _prepare(params: Mapping[str, Any], weights: str) -> dict[str, Any]:
    # one compiled program for the whole tree: fast, and kept by the persistent compilation cache
    prepared = _prepare_tree(params, weights)
    prepared["output_projection"] = backend.prepare_weight(params["token_embedding"]["embedding"].T, weights)
    return prepared


def abstract_prepared(abstract: Mapping[str, Any], weights: str) -> dict[str, Any]:
    """`prepare_weights` of parameter shapes (jax.ShapeDtypeStruct leaves): what decoding will be compiled for."""
    return jax.eval_shape(functools.partial(_prepare, weights=weights), abstract)


def is_prepared(params: Mapping[str, Any]) -> bool:
    return "output_projection" in params


def _prepare_tree(tree: Mapping[str, Any], weights: str, name: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out[key] = _prepare_tree(value, weights, key)
        else:
            out[key] = value
    if "kernel" in out and name != "":
        kernel = jnp.asarray(out.pop("kernel"))
        in_axes = IN_AXES.get(name, 1)
        k = math.prod(kernel.shape[:in_axes])
        out.update(backend.prepare_weight(kernel.reshape(k, -1), weights))
    return out
