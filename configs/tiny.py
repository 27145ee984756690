"""A tiny Perceiver AR that learns something in a couple of minutes on a laptop CPU (the offline demo's config).

    python -m perceiver_ar_jax.demo            # trains its own tokenizer on pydoc_data.topics and runs this
    python train.py --config=configs/tiny.py --workdir=/tmp/tiny \
        --config.data.text_paths=my_corpus.txt --config.tokenizer_dir=MY_TOKENIZER

256-token sequences (128 prefix + 128 latents), 128 channels, 1 hybrid + 3 self-attention layers.
"""

from perceiver_ar_jax.training.config import base_config


def get_config():
    config = base_config()

    # --- model ---
    # the demo trains a 1024-piece SentencePiece vocabulary
    config.model.vocab_size = 1024
    config.model.max_seq_len = 256
    config.model.max_latents = 128
    config.model.num_channels = 128
    config.model.num_heads = 4
    config.model.num_self_attention_layers = 3
    # rotary embedding in every self-attention layer, no absolute position table (as the 455M model)
    config.model.num_self_attention_rotary_layers = -1
    config.model.abs_pos_emb = False
    config.model.output_norm = True
    config.model.output_bias = False
    # drop a quarter of the prefix positions while training (a little regularisation for a small corpus)
    config.model.cross_attention_dropout = 0.25
    # float32 on CPU: small matmuls gain little from bfloat16 there
    config.model.dtype = "float32"

    # --- data: local text files (set data.text_paths; the demo points it at its corpus) ---
    config.data.source = "text"
    config.data.min_seq_len = 128

    # --- optimisation ---
    config.batch_size = 16
    config.num_train_steps = 400
    config.learning_rate = 1e-3
    config.warmup_steps = 40
    config.lr_min_fraction = 0.1
    config.weight_decay = 0.01
    config.max_grad_norm = 1.0

    # --- evaluation, logging, checkpoints ---
    config.log_every_steps = 20
    config.eval_every_steps = 100
    config.num_eval_batches = 4
    config.checkpoint_every_steps = 100
    config.keep_checkpoints = 2
    config.sample_every_steps = 200
    config.sample_prompt = "The return statement"
    config.sample_max_new_tokens = 40

    # --- one CPU device ---
    config.mesh.ici_parallelism = (1, -1, 1)
    return config
