"""The fields of a training config and their defaults; configs/*.py start from `base_config()` and override.

Every field is read by perceiver_ar_jax.train_lib. `batch_size` is the GLOBAL batch (sequences per optimizer step,
summed over all processes, devices and gradient-accumulation microbatches). Step counts are optimizer updates;
an "every" field of 0 means never.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from perceiver_ar_jax.config import CausalLanguageModelConfig
from perceiver_ar_jax.partitioning import DEFAULT_LOGICAL_AXIS_RULES


def base_config() -> ml_collections.ConfigDict:
    from perceiver_ar_jax.data import data_config_defaults

    config = ml_collections.ConfigDict()

    # --- model: the fields of CausalLanguageModelConfig (perceiver-io names + JAX execution fields) ---
    config.model = ml_collections.ConfigDict(dataclasses.asdict(CausalLanguageModelConfig()))
    # one value for the model's and the input pipeline's max_seq_len: overriding either changes both
    max_seq_len = ml_collections.FieldReference(config.model.max_seq_len)
    config.model.max_seq_len = max_seq_len
    # compute in bfloat16 (matmuls, activations), keep float32 parameters and optimizer state
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"

    # --- data: perceiver_ar_jax.data's config (source, TFDS name/version/data_dir, splits, sequence lengths) ---
    config.data = data_config_defaults()
    config.data.max_seq_len = max_seq_len
    # path of a tokenizer directory (spiece.model, tokenizer_config.json); copied into the workdir
    config.tokenizer_dir = ""

    # --- optimisation ---
    # global batch: sequences per optimizer step over all processes and devices
    config.batch_size = 256
    # microbatches per step (gradient accumulation); each device sees batch_size / (grad_accum_steps x data x fsdp)
    config.grad_accum_steps = 1
    # optimizer updates in the whole run (also the length of the cosine schedule)
    config.num_train_steps = 50_000
    # peak learning rate of AdamW
    config.learning_rate = 3e-4
    # linear warmup from 0 to the peak over this many steps
    config.warmup_steps = 1000
    # the cosine decay ends at lr_min_fraction x learning_rate (perceiver-io's CosineWithWarmupLR min_fraction)
    config.lr_min_fraction = 0.1
    # AdamW betas, eps and decoupled weight decay (torch.optim.AdamW's defaults)
    config.adam_b1 = 0.9
    config.adam_b2 = 0.999
    config.adam_eps = 1e-8
    config.weight_decay = 0.01
    # clip gradients to this global L2 norm before the update; 0 = no clipping
    config.max_grad_norm = 1.0
    # weight of the z-loss (log Z)^2 that keeps the softmax normaliser near 1 (PaLM uses 1e-4); 0 = off
    config.z_loss_weight = 0.0
    # seed of parameter init, dropout and the data order
    config.seed = 0

    # --- evaluation, logging, samples ---
    # print a progress line and write train scalars every this many steps
    config.log_every_steps = 50
    # validation loss / perplexity / bits per token every this many steps ...
    config.eval_every_steps = 500
    # ... on the first this many batches of the eval split (the same batches every time)
    config.num_eval_batches = 20
    # global batch size of evaluation
    config.eval_batch_size = 256
    # write TensorBoard event files into the workdir (process 0)
    config.tensorboard = True
    # sample a continuation of sample_prompt every this many steps (needs the sampler and a tokenizer)
    config.sample_every_steps = 500
    config.sample_prompt = "A man was"
    # tokens to sample, latent positions of the sampler, top-k filter (perceiver-io's validation sample: top_k 10)
    config.sample_max_new_tokens = 64
    config.sample_num_latents = 1
    config.sample_top_k = 10
    # peak FLOP/s of one device for MFU; 0 = look the device kind up (TPU, A100, H100), unknown -> no MFU
    config.peak_flops_per_device = 0.0

    # --- checkpoints ---
    # save a checkpoint every this many steps (and always at the end and on SIGTERM / preemption)
    config.checkpoint_every_steps = 1000
    # how many of the newest checkpoints to keep
    config.keep_checkpoints = 3
    # write checkpoints in the background while training continues
    config.async_checkpointing = True
    # a converted model directory (python -m perceiver_ar_jax.convert) or a training workdir whose parameters
    # start this run (fine-tuning); ignored when the workdir has a checkpoint to resume from
    config.init_from = ""

    # --- device mesh ---
    config.mesh = ml_collections.ConfigDict()
    # (data, fsdp, tensor) sizes within a slice; -1 = all devices left. Default: fully sharded data parallel
    config.mesh.ici_parallelism = (1, -1, 1)
    # (data, fsdp, tensor) sizes across slices (multi-slice TPU); -1 = all slices left
    config.mesh.dcn_parallelism = (-1, 1, 1)
    # logical axis name -> mesh axes; a dimension its mesh axes do not divide stays replicated
    config.mesh.logical_axis_rules = DEFAULT_LOGICAL_AXIS_RULES

    # --- multi-host start-up (jax.distributed) ---
    config.distributed = ml_collections.ConfigDict()
    # "auto": initialise when coordinator_address is set or on a Cloud TPU VM (hosts found in the TPU metadata);
    # "yes": always (JAX detects TPU, SLURM, MPI, k8s clusters); "no": never
    config.distributed.initialize = "auto"
    # explicit cluster (GPU clusters, local multi-process tests): "host:port" of process 0, process count and id
    config.distributed.coordinator_address = ""
    config.distributed.num_processes = 1
    config.distributed.process_id = 0
    # collectives between CPU devices of different processes ("gloo"; "" = JAX's default)
    config.distributed.cpu_collectives = "gloo"
    return config
