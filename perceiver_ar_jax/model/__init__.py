"""The model stage: `CausalLanguageModel` (causal_lm.py, top to bottom as the paper), its config, layers, masks,
positions and attention."""

from perceiver_ar_jax.model.causal_lm import CausalLanguageModel, abstract_params, output_params
from perceiver_ar_jax.model.config import CausalLanguageModelConfig

__all__ = ["CausalLanguageModel", "CausalLanguageModelConfig", "abstract_params", "output_params"]
