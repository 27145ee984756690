"""Make small golden fixtures with the real perceiver-io 0.11 for every option of CausalLanguageModelConfig.

Run with the reference venv (../shared/reference/setup-reference.sh):

    /tmp/ref-venv/bin/python tools/make_reference_fixtures.py tests/assets/reference

For each config in CONFIGS: perceiver-io builds the model (seeded), every parameter gets seeded noise so that
logits vary strongly (as the public fixture does), and the script writes a directory `<name>/` laid out as
perceiver-io's `save_pretrained` does (`config.json` with `model_config`, `model.safetensors` with keys prefixed
`backend_model.`), plus `cases.json` (the cases) and `cases.npz` (inputs and logits of
`backend_model(x, prefix_len, pad_mask)` in eval mode). Tests convert each directory and compare logits.
"""

import json
import os
import sys

import numpy as np
import torch
from perceiver.model.text.clm import CausalLanguageModel, CausalLanguageModelConfig
from safetensors.torch import save_file

# Each config flips options away from the public fixture's; together they cover every field that changes the maths.
CONFIGS = {
    # perceiver-io's own defaults for the flags: abs_pos_emb, output_bias, no output_norm
    "abs_pos_bias": dict(vocab_size=97, max_seq_len=40, max_latents=12, num_channels=32, num_heads=4,
                         num_self_attention_layers=2, output_norm=False, output_bias=True, abs_pos_emb=True),
    # rotary in every self-attention layer (-1), one head at a time, odd head count
    "rotary_all_heads3": dict(vocab_size=64, max_seq_len=32, max_latents=8, num_channels=36, num_heads=3,
                              max_heads_parallel=1, num_self_attention_layers=3, num_self_attention_rotary_layers=-1,
                              output_norm=True, output_bias=True, abs_pos_emb=False),
    # no rotary in self-attention, other widening factors, abs_pos_emb with output_norm
    "rotary_none_widening": dict(vocab_size=80, max_seq_len=24, max_latents=10, num_channels=32, num_heads=2,
                                 num_self_attention_layers=2, num_self_attention_rotary_layers=0,
                                 self_attention_widening_factor=2, cross_attention_widening_factor=3,
                                 output_norm=True, output_bias=False, abs_pos_emb=True),
    # 2 of 3 rotary layers, max_heads_parallel between 1 and num_heads
    "rotary_two_of_three": dict(vocab_size=70, max_seq_len=30, max_latents=30, num_channels=40, num_heads=4,
                                max_heads_parallel=3, num_self_attention_layers=3, num_self_attention_rotary_layers=2,
                                output_norm=False, output_bias=False, abs_pos_emb=False),
    # only the hybrid layer, more rotary layers than layers
    "no_self_attention": dict(vocab_size=50, max_seq_len=20, max_latents=6, num_channels=16, num_heads=2,
                              num_self_attention_layers=0, num_self_attention_rotary_layers=4,
                              output_norm=True, output_bias=True, abs_pos_emb=True),
}


def add_noise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if isinstance(module, torch.nn.Embedding):
                    p += 0.3 * torch.randn(p.shape, generator=g)
                elif isinstance(module, torch.nn.Linear) and name == "weight":
                    p += 1.5 / p.shape[1] ** 0.5 * torch.randn(p.shape, generator=g)
                elif isinstance(module, torch.nn.LayerNorm) and name == "weight":
                    p += 0.3 * torch.randn(p.shape, generator=g)
                elif name == "bias" and p.ndim == 1 and p.shape[0] == model.config.vocab_size:
                    p += 0.5 * torch.randn(p.shape, generator=g)
                else:
                    p += 0.2 * torch.randn(p.shape, generator=g)


def cases(config, g):
    n, k = config.max_seq_len, config.max_latents
    max_prefix = n - k
    tokens = torch.randint(1, config.vocab_size, (3, n), generator=g)
    short = tokens[:, : n - 3]  # shorter than max_seq_len
    pad_tokens, pad_mask = tokens.clone(), torch.zeros_like(tokens, dtype=torch.bool)
    for row, pads in ((1, 4), (2, 1)):
        pad_tokens[row] = torch.cat([torch.zeros(pads, dtype=torch.long), tokens[row, : n - pads]])
        pad_mask[row, :pads] = True
    out = [("p0", tokens, 0, None)] if max_prefix > 0 else []
    out += [("p_max", tokens, max_prefix, None), ("short_p1", short, min(1, max_prefix), None),
           ("short_p_max", short, min(max_prefix, short.shape[1] - 1), None),
           ("pad_p_max", pad_tokens, max_prefix, pad_mask)]
    if max_prefix >= 5:
        out.append(("pad_p5", pad_tokens, 5, pad_mask))
    out.append(("pad_p0_edge", pad_tokens, 0, pad_mask))  # pads as latent queries: uniform attention, not NaN
    return out


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    for i, (name, fields) in enumerate(CONFIGS.items()):
        fields = dict(cross_attention_dropout=0.0, **fields)
        torch.manual_seed(2000 + i)
        config = CausalLanguageModelConfig(**fields)
        model = CausalLanguageModel(config).eval()
        add_noise(model, 3000 + i)
        case_dir = os.path.join(out_dir, name)
        os.makedirs(case_dir, exist_ok=True)
        state = {"backend_model." + k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, os.path.join(case_dir, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(case_dir, "config.json"), "w") as f:
            json.dump(dict(architectures=["PerceiverCausalLanguageModel"], is_decoder=True,
                           model_config={**config.__dict__}, model_type="perceiver-ar-causal-language-model"),
                      f, indent=1)
        arrays, described = {}, []
        g = torch.Generator().manual_seed(4000 + i)
        with torch.no_grad():
            for case, x, prefix_len, pad_mask in cases(config, g):
                logits = model(x, prefix_len=prefix_len, pad_mask=pad_mask).logits
                arrays[case + "_input_ids"] = x.numpy()
                if pad_mask is not None:
                    arrays[case + "_pad_mask"] = pad_mask.numpy()
                arrays[case + "_logits"] = logits.numpy()
                described.append(dict(name=case, prefix_len=prefix_len, has_pad_mask=pad_mask is not None,
                                      logits_shape=list(logits.shape), logits_std=float(logits.std())))
        np.savez_compressed(os.path.join(case_dir, "cases.npz"), **arrays)
        with open(os.path.join(case_dir, "cases.json"), "w") as f:
            json.dump(dict(cases=described,
                           made_by="perceiver-io 0.11.0 " + torch.__version__), f, indent=1)
        print(name, sum(p.numel() for p in model.parameters()), "params", [c["name"] for c in described])


if __name__ == "__main__":
    main(sys.argv[1])
