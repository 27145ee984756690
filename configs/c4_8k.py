"""Long-context Perceiver AR on C4: the 455M architecture with an 8192-token context and 1024 latents.

    python train.py --config=configs/c4_8k.py --workdir=DIR --config.data.data_dir=... --config.tokenizer_dir=...

Only the hybrid layer sees the 7168-token prefix, so a step costs little more than the 1024-token model's; most of
the extra is the (latents x 8192) attention of that one layer, computed blockwise (or by the TPU splash kernel).
"""

from configs import c4_455m


def get_config():
    config = c4_455m.get_config()

    # 7168 prefix tokens + 1024 latents
    config.model.max_seq_len = 8192
    config.model.max_latents = 1024
    # the Perceiver AR paper drops half the prefix positions while training long contexts (cheaper, regularises)
    config.model.cross_attention_dropout = 0.5
    # "auto" picks the splash kernel on TPU and blockwise attention elsewhere for the long hybrid layer
    config.model.attention_impl = "auto"
    config.model.attention_block_size = 1024
    # shorter chunks than 8192 are left-padded; draw lengths from [1024, 8192]
    config.data.min_seq_len = 1024
    # 8x the tokens per sequence: an eighth of the sequences per step keeps the tokens per step
    config.batch_size = 32
    return config
