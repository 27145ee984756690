"""The fields of a training config, their defaults and their one validation (`check_config`).

configs/*.py start from `base_config()` and override. Every field is read by the training loop. `batch_size` is
the GLOBAL batch (sequences per optimizer step, summed over all processes, devices and gradient-accumulation
microbatches). Step counts are optimizer updates; an "every" field of 0 means never.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
from ml_collections import config_dict

from perceiver_ar_jax.data.config import check_data_config, data_config_defaults
from perceiver_ar_jax.errors import ConfigError, check
from perceiver_ar_jax.model import CausalLanguageModelConfig
from perceiver_ar_jax.training.loss import DEFAULT_CHUNK_TOKENS
from perceiver_ar_jax.training.partitioning import DEFAULT_LOGICAL_AXIS_RULES, MESH_AXES


def base_config() -> ml_collections.ConfigDict:
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
    # rows (batch x latent positions, per device) whose logits the cross-entropy computes at once, in train and
    # eval steps, so that (batch, latents, vocab) float32 logits never exist at once (training/loss.py); 0 = all
    config.loss_chunk_tokens = DEFAULT_CHUNK_TOKENS
    # before the first step, stop (exit status 4, naming the batch size that fits) when the estimated memory of the
    # train or eval step is over the device's free memory (training/memory.py); False = run anyway
    config.check_memory = True

    # --- evaluation, logging, samples ---
    # print a progress line and write train scalars every this many steps
    config.log_every_steps = 50
    # validation loss / perplexity / bits per token every this many steps ...
    config.eval_every_steps = 500
    # ... on the first this many batches of the eval split (the same batches every time)
    config.num_eval_batches = 20
    # global batch size of evaluation; None or 0 = follow training: batch_size / grad_accum_steps, the rows of one
    # training forward pass (a batch lowered to fit a host makes evaluation fit too; `eval_batch_size_of`)
    config.eval_batch_size = config_dict.placeholder(int)
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


# ----------------------------------------------------------------------------------------------------------------
def model_config_from(config: ml_collections.ConfigDict) -> CausalLanguageModelConfig:
    """The `model` section as the model's config; an out-of-range value names its flag (config.model.X)."""
    try:
        return CausalLanguageModelConfig.from_dict(config.model.to_dict(), strict=True)
    except ConfigError as e:
        raise e.within("model") from None


def check_config(config: ml_collections.ConfigDict, num_batch_shards: int | None = None,
                 process_count: int = 1) -> CausalLanguageModelConfig:
    """Validate every section of a training config; return the model config. Raises ConfigError (a ValueError)
    naming the first field that is out of range, as the flag that sets it (`config.model.num_heads=...`).

    num_batch_shards: devices the batch is split over (data x fsdp of the mesh), once the mesh is known.
    """
    model_config = model_config_from(config)
    check_data_config(config.data)
    check_optimizer_config(config)

    def need(ok: bool, field: str, allowed: str) -> None:
        check(ok, field, _get(config, field), allowed)

    for field in ("num_train_steps", "grad_accum_steps", "num_eval_batches", "batch_size", "keep_checkpoints"):
        need(_is_int(_get(config, field)) and _get(config, field) >= 1, field, "an integer >= 1")
    eval_batch_size = config.get("eval_batch_size")
    need(eval_batch_size is None or (_is_int(eval_batch_size) and eval_batch_size >= 0), "eval_batch_size",
         "an integer >= 1, or None or 0 (= batch_size / grad_accum_steps)")
    need(_is_int(config.get("loss_chunk_tokens", 0)) and config.get("loss_chunk_tokens", 0) >= 0,
         "loss_chunk_tokens", "an integer >= 0 (0 = all logits at once)")
    need(isinstance(config.get("check_memory", True), bool), "check_memory", "True or False")
    for field in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps", "sample_every_steps"):
        need(_is_int(_get(config, field)) and _get(config, field) >= 0, field, "an integer >= 0 (0 = never)")
    need(config.z_loss_weight >= 0, "z_loss_weight", ">= 0 (0 = off)")
    need(config.peak_flops_per_device >= 0, "peak_flops_per_device", ">= 0 (0 = look the device kind up)")
    need(config.data.max_seq_len == model_config.max_seq_len, "data.max_seq_len",
         f"equal to model.max_seq_len ({model_config.max_seq_len})")
    min_seq_len = config.data.max_seq_len if config.data.min_seq_len is None else config.data.min_seq_len
    need(model_config.max_latents <= min_seq_len, "data.min_seq_len",
         f"in [model.max_latents ({model_config.max_latents}), data.max_seq_len ({config.data.max_seq_len})] "
         "or None (= data.max_seq_len)")
    for field in ("mesh.ici_parallelism", "mesh.dcn_parallelism"):
        sizes = _get(config, field)
        need(isinstance(sizes, (tuple, list)) and len(sizes) == len(MESH_AXES)
             and all(_is_int(s) and (s >= 1 or s == -1) for s in sizes) and list(sizes).count(-1) <= 1, field,
             f"{len(MESH_AXES)} sizes for {MESH_AXES}, each >= 1 or one -1 (= the devices left)")
    need(config.distributed.initialize in ("auto", "yes", "no"), "distributed.initialize", "'auto', 'yes' or 'no'")
    if num_batch_shards is not None:
        for field, microbatches in (("batch_size", config.grad_accum_steps), ("eval_batch_size", 1)):
            size = config.batch_size if field == "batch_size" else eval_batch_size_of(config)
            accum = f" x grad_accum_steps ({microbatches})" if microbatches > 1 else ""
            need(size % (process_count * microbatches * num_batch_shards) == 0, field,
                 f"a multiple of processes ({process_count}){accum} x the data-parallel devices "
                 f"(data x fsdp = {num_batch_shards})")
    return model_config


def eval_batch_size_of(config: ml_collections.ConfigDict) -> int:
    """The global batch of evaluation: eval_batch_size when set (> 0), else the training microbatch
    batch_size / grad_accum_steps (a forward pass of that many rows fits, since training's does)."""
    size = config.get("eval_batch_size")
    return size if size else config.batch_size // config.grad_accum_steps


def loss_chunk_tokens_of(config: ml_collections.ConfigDict) -> int:
    """loss_chunk_tokens, with the default for a config written before the field existed."""
    return config.get("loss_chunk_tokens", DEFAULT_CHUNK_TOKENS)


def check_optimizer_config(config: ml_collections.ConfigDict) -> None:
    """The optimisation fields (learning rate, schedule, AdamW, clipping)."""

    def need(ok: bool, field: str, allowed: str) -> None:
        check(ok, field, config[field], allowed)

    need(config.learning_rate > 0, "learning_rate", "> 0")
    need(_is_int(config.warmup_steps) and config.warmup_steps >= 0, "warmup_steps", "an integer >= 0")
    need(0.0 <= config.lr_min_fraction <= 1.0, "lr_min_fraction", "in [0, 1]")
    need(config.max_grad_norm >= 0, "max_grad_norm", ">= 0 (0 = no clipping)")
    need(config.weight_decay >= 0, "weight_decay", ">= 0")
    for field in ("adam_b1", "adam_b2"):
        need(0.0 <= config[field] < 1.0, field, "in [0, 1)")
    need(config.adam_eps > 0, "adam_eps", "> 0")


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
    for name in dotted.split("."):
        config = config[name]
    return config


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
