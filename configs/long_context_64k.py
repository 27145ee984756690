"""Long-context Perceiver AR on C4: the 455M architecture with a 65,536-token context and 1024 latents.

    python train.py --config=configs/long_context_64k.py --workdir=DIR --config.data.data_dir=... \
        --config.tokenizer_dir=...

Built on configs/c4_8k.py (the 455M model, 1024 latents, half the prefix dropped while training); only the
context, the attention execution and the batch layout change. Only the hybrid layer sees the 64,512-token
prefix: with the blockwise path it costs ~4 P C^2 + 4 L P C FLOPs per sequence and keeps O(P C) activations
(docs/long_context.md has the formulas and a TPU v5p plan). On a pod, the logical-axis rule ("context", "tensor")
in front of `mesh.logical_axis_rules` splits the prefix of each sequence over the tensor axis (sized by
`mesh.ici_parallelism`); by default the logical axis `context` maps to no mesh axis and every device holds whole
sequences.
"""

from configs import c4_8k


def get_config():
    config = c4_8k.get_config()

    # 64,512 prefix tokens + 1024 latents; the data pipeline draws chunk lengths from [min_seq_len, max_seq_len]
    config.model.max_seq_len = 65536
    config.model.max_latents = 1024
    config.data.min_seq_len = 8192
    # keep half the prefix positions while training (Perceiver AR paper); 32,256 prefix keys per sequence
    config.model.cross_attention_dropout = 0.5
    # "auto": the Pallas splash kernel on TPU; elsewhere the blockwise path, which also normalises and projects
    # the prefix block by block (never materialising its keys and values)
    config.model.attention_impl = "auto"
    # key block of the blockwise/splash attention: 1024 keys x 1024 latents x heads scores per block in flight
    config.model.attention_block_size = 1024
    # context parallelism: on a pod use mesh.ici_parallelism = (1, N / c, c) and mesh.logical_axis_rules =
    # (("context", "tensor"),) + DEFAULT_LOGICAL_AXIS_RULES: c devices share each sequence's prefix (and the latent
    # layers' heads / MLP), N / c shard the batch and the parameters. The default rules map `context` to no axis.

    # 32 sequences x 65,536 tokens = 2.1M tokens and 32,768 latent (loss) positions per step
    config.batch_size = 32
    return config
