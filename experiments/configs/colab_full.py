"""The Colab notebook's default run (``experiments/colab.ipynb``, ``KRYLOVJAX_NB_CONFIG=full``).

A CIFAR-10 subset (the first 64 dogs of the training split, Paper B's class) at 32x32 on a
Colab accelerator (GPU or TPU; on a CPU its 300 s of training denoise nothing: use ``colab_tiny``
there), float32:

* pre-computation: Paper A's SDE (constant g = 0.5, f = 0) with the exact perturbation
  lambda(t) = g sqrt(t) (``sde_kwargs.std = None``, as ``denoise_demo``), 20 FP time levels,
  Paper B's sweeps, the cross-matrix strategy with the shared-diffusion preconditioner
  (``cross_matrix_precond``: the paper's method, which the notebook shows; on a GPU the plain
  batched ``fast`` strategy is 8-19x quicker per system on an H200, docs/bench_gpu_h200.md), float32 tolerances (BUILD_NOTES float32 study), every chunk of
  ``chunk_images`` images sharded over all devices of the runtime (``shard = True``), stored in
  a resumable :class:`krylovjax.store.ScoreStore`;
* training: our score-embedding loss (method.md 4.2) on the embedded trajectories, a small
  U-Net, stopped after ``train.budget_seconds`` of training time (or ``train.num_steps``);
* denoising: noisy copies ``clamp(x + 0.506 z, 0, 1)`` (Paper A's test input) of the first
  ``denoise.num_images`` images, with the probability-flow ODE from t = 1 (``ours.sampler``, as
  ``denoise_demo``); SSIM to the clean images.

Top-level keys and the ``precompute`` block are those of the precompute binary's configs
(``demo.py``); ``train`` holds :class:`krylovjax.training.TrainConfig` fields (its SDE is the
pre-computation's); ``noise``, ``eval_seed``, ``num_frames`` and ``ours.sampler`` are read by
``experiments.denoise.ours_denoiser``. ``chunk_images``, ``num_images`` and ``train.batch_size``
must be multiples of the device count (the notebook checks it first).
"""

import ml_collections

from experiments.configs import demo


def get_config() -> ml_collections.ConfigDict:
    c = demo.get_config()
    c.dataset = "cifar10"
    c.class_filter = "dog"
    c.num_images = 64
    c.image_size = 32
    c.chunk_images = 64
    c.dtype = "float32"

    p = c.precompute
    p.sde = "constant"
    p.sde_kwargs = ml_collections.ConfigDict(
        {"g": 0.5, "std": ml_collections.FieldReference(None, field_type=float)})
    p.num_steps = 20
    p.tol = 1e-5  # float32: 1e-10 is below round-off (BUILD_NOTES float32 study)
    p.outer_tol = 1e-4
    p.max_sweeps = 10
    p.strategy = "cross_matrix_precond"
    p.shard = True

    t = c.train = ml_collections.ConfigDict()
    t.model = "tiny"
    t.model_overrides = ml_collections.ConfigDict(
        {"ch": 64, "ch_mult": (1, 2, 2), "attn_resolutions": (16,), "dropout": 0.0,
         "dtype": "float32"})  # dtype: the compute dtype, "bfloat16" on TPUs (KRYLOVJAX_NB_DTYPE)
    t.lr = 1e-3
    t.warmup_steps = 100
    t.grad_clip = 1.0
    t.ema_decay = 0.999
    t.batch_size = 64
    t.num_steps = 20000  # step cap; the budget below stops a Colab run first
    t.budget_seconds = ml_collections.FieldReference(300.0, field_type=float)
    t.seed = 0
    t.eval_every = 500
    t.log_every = 100
    t.checkpoint_every = 1000
    t.max_to_keep = 1
    t.time_jitter = 0.5
    t.loss_reduction = "sum"
    t.per_image_offset = False
    t.progress = True  # progress bars (training and pre-computation)
    t.steps_per_call = 0  # updates per dispatched program (TrainConfig.steps_per_call); 0: 25 on a GPU/TPU here

    c.noise = ml_collections.ConfigDict({"std": 0.506, "seed": 0, "clamp": True})
    c.eval_seed = 1
    c.num_frames = 8
    c.denoise = ml_collections.ConfigDict({"num_images": 8})  # the first images of the subset
    c.ours = ml_collections.ConfigDict()
    s = c.ours.sampler = ml_collections.ConfigDict()
    s.kind = "flow"  # "flow", "paper_a" or "denoise" (experiments.denoise.ours_denoiser)
    s.t_start = 1.0
    s.t_end = 1e-3
    s.rtol = 1e-3
    s.atol = 1e-3
    s.num_steps = 50
    s.noise_scale = 0.1
    s.method = "ode"
    s.clip = True
    return c
