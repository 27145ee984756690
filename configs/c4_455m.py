"""The released perceiver-io 455M Perceiver AR on C4, trained exactly as its train_fsdp.sh (8 A100s, Lightning FSDP).

    python train.py --config=configs/c4_455m.py --workdir=gs://BUCKET/runs/c4-455m \
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets --config.tokenizer_dir=PATH/xlnet-base-cased

1280 channels, 10 heads, 20 self-attention layers after the hybrid layer, 1024 tokens of which 512 latents, the
32,000-token XLNet vocabulary: 453,950,720 parameters. Global batch 256, AdamW 3e-4 with 1000 warmup steps and a
cosine decay to 0.1 x, gradients clipped to norm 1, 50,000 steps in bfloat16, no dropout, validation every 500 steps
on 20 batches.
"""

from perceiver_ar_jax.training.config import base_config


def get_config():
    config = base_config()

    # --- model (perceiver-io's --model.* flags of train_fsdp.sh) ---
    # XLNet SentencePiece vocabulary (xlnet-base-cased)
    config.model.vocab_size = 32000
    # sequence length: 512 prefix + 512 latents
    config.model.max_seq_len = 1024
    config.model.max_latents = 512
    config.model.num_channels = 1280
    config.model.num_heads = 10
    # heads computed at once by the dense attention (a memory knob; the maths is the same)
    config.model.max_heads_parallel = 2
    config.model.num_self_attention_layers = 20
    # no prefix (cross-attention) dropout and no other dropout
    config.model.cross_attention_dropout = 0.0
    config.model.post_attention_dropout = 0.0
    config.model.residual_dropout = 0.0
    # LayerNorm before the tied output projection, no output bias, rotary positions only (no absolute embedding)
    config.model.output_norm = True
    config.model.output_bias = False
    config.model.abs_pos_emb = False
    config.model.init_scale = 0.02
    # train_fsdp.sh checkpoints every layer's activations; here: recompute all but matmul outputs
    config.model.activation_checkpointing = True
    config.model.remat_policy = "dots_with_no_batch_dims_saveable"
    # bfloat16 compute, float32 parameters and optimizer state (--trainer.precision=bf16)
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"

    # --- data: C4 (c4/en) from TFDS; set data.data_dir to the bucket holding tensorflow_datasets ---
    config.data.source = "tfds"
    config.data.tfds_name = "c4/en"
    config.data.tfds_version = "3.1.0"
    config.data.train_split = "train"
    config.data.eval_split = "validation"
    # chunk lengths drawn uniformly from [min_seq_len, max_seq_len], left-padded to max_seq_len
    config.data.min_seq_len = 512

    # --- optimisation (train_fsdp.sh) ---
    # global batch of 256 sequences
    config.batch_size = 256
    config.grad_accum_steps = 1
    config.num_train_steps = 50_000
    # AdamW, lr 3e-4 (torch defaults otherwise: betas 0.9/0.999, eps 1e-8, weight decay 0.01)
    config.learning_rate = 3e-4
    config.weight_decay = 0.01
    # CosineWithWarmupLR(warmup_steps=1000, min_fraction=0.1)
    config.warmup_steps = 1000
    config.lr_min_fraction = 0.1
    # max_grad_norm=1.0
    config.max_grad_norm = 1.0
    config.z_loss_weight = 0.0

    # --- evaluation and checkpoints (val_check_interval=500, limit_val_batches=20, log_every_n_steps=20) ---
    config.eval_every_steps = 500
    config.num_eval_batches = 20
    # eval_batch_size is left unset: evaluation follows batch_size (256 here, as Lightning's validation loader;
    # a batch_size lowered to fit one host lowers it too)
    config.log_every_steps = 20
    config.checkpoint_every_steps = 1000
    config.sample_every_steps = 500
    return config
