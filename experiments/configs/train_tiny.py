"""Tiny training run for CPU demos and tests: 2 built-in 32x32 photos, the "tiny" U-Net.

``python -m experiments.train --config=experiments/configs/train_tiny.py --workdir=runs/tiny
--data=builtin`` pre-computes the scores of the photos (method.md 3.4), embeds them (4.1) and
trains on them (4.2-4.3); ``--config.method=ddpm`` trains the DDPM baseline on the photos.
Top-level keys are :class:`krylovjax.training.TrainConfig` fields; ``data`` and ``precompute``
steer the built-in data path of the binary.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "ours"
    c.model = "tiny"
    # dtype: the U-Net's compute dtype; "bfloat16" on TPUs and recent GPUs (the parameters, the
    # optimiser, the EMA and the loss stay float32).
    c.model_overrides = ml_collections.ConfigDict(
        {"ch": 32, "ch_mult": (1, 2), "attn_resolutions": (16,), "dropout": 0.0, "dtype": "float32"})
    c.lr = 1e-3
    c.warmup_steps = 10
    c.grad_clip = 1.0
    c.ema_decay = 0.999
    c.batch_size = 8
    c.num_steps = 200
    c.seed = 0
    c.checkpoint_every = 100
    c.max_to_keep = 3
    c.log_every = 10
    c.eval_every = 0
    c.budget_seconds = ml_collections.FieldReference(None, field_type=float)
    c.target_metric = "ssim"
    c.sde = "ve"
    c.sde_kwargs = ml_collections.ConfigDict({"sigma": 5.0})
    c.loss_reduction = "sum"
    c.time_jitter = 0.5
    c.per_image_offset = True
    c.ddpm_num_steps = 1000
    c.ddpm_beta_start = 1e-4
    c.ddpm_beta_end = 0.02
    c.progress = True
    c.steps_per_call = 0  # updates per dispatched program (TrainConfig.steps_per_call); 0: 1 on CPU, up to 25 elsewhere

    c.data = ml_collections.ConfigDict()
    c.data.image_size = 32
    c.data.num_images = 2
    c.data.seed = 0

    # krylovjax.precompute.PrecomputeConfig fields for --data=builtin (sde comes from above).
    c.precompute = ml_collections.ConfigDict()
    c.precompute.num_steps = 10
    c.precompute.tol = 1e-5  # float32 (x64 off): 1e-10 is below round-off
    c.precompute.outer_tol = 1e-4
    c.precompute.max_sweeps = 10
    c.precompute.strategy = "cross_matrix_precond"
    return c
