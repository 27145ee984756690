"""The "bench" model of ../shared/reference/bench_torch.py, the one every script here times against perceiver-io."""

BENCH_MODEL = dict(vocab_size=32000, num_channels=512, num_heads=8, num_self_attention_layers=6, max_seq_len=1024,
                   max_latents=256, abs_pos_emb=False, output_norm=True, output_bias=False,
                   cross_attention_dropout=0.0)
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # command-line name -> compute (and, sampling, param) dtype
