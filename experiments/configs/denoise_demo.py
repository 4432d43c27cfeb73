"""Single-image denoising, Paper A Table 1 (method.md 7.1), on a built-in 32x32 photo: the
default of ``make demo``.

``python -m experiments.denoise --config=experiments/configs/denoise_demo.py --workdir=runs/demo``

One clean image (``data``), its noisy version ``clamp(x + 0.506 z, 0, 1)`` (``noise``, Paper A's
test input). "Ours" pre-computes the image's scores with the cross-matrix Krylov solver
(``ours.precompute``, :class:`krylovjax.precompute.PrecomputeConfig` fields), embeds them
(method.md 4.1) and trains the U-Net with the score-embedding loss (4.2); DDPM trains the same
U-Net with epsilon prediction on the clean image. Both are evaluated every ``eval_every`` updates
by denoising the same noisy image and stop at the largest SSIM target (or their step / time
caps); the time to each target is read from the evaluation records.

Layout: ``common`` holds the :class:`krylovjax.training.TrainConfig` fields both methods share
(the U-Net, seed, evaluation cadence: the same network and the same cadence for both);
``ours.train`` / ``ddpm.train`` hold each method's own fields (batch size, learning rate,
warm-up, EMA, SDE, caps). ``ours.sampler`` / ``ddpm.sampler`` pick the denoising sampler.

Settings of "ours": the SDE of Paper A's single-image script (method.md 8, [A-code]), constant
g = 0.5 (f = 0), with these differences.

* The pre-computation is Paper B's formulation, the library's default: each pixel's density
  (``ours.precompute.initial = "paper_b_kde"``) on a grid of spacing 1 (``h``), Paper B's outer
  sweeps, 20 time levels. Paper A's script fits one KDE of the image plane [0, 1]^2, shared by
  the channels (``"paper_a_kde"``), with spacing 1 / (H - 1) = 1/31, a fixed point per time step
  (``outer = "timestep"``), 100 levels, and embeds the x-derivative of the score only. Its
  diffusion number g^2 dt / (2 h^2) is then about 1.2 (6 at this config's 20 levels) instead of
  0.007, and its density is nearly flat by t = 1. Paper A's pre-computation: ``--config.ours.precompute.initial=paper_a_kde
  --config.ours.precompute.h=0.032258 --config.ours.precompute.outer=timestep
  --config.ours.precompute.num_steps=100 --config.ours.embed_component=x``.
* Training and sampling: Paper A trains with a constant perturbation lambda = 0.1 and denoises
  with a damped reverse SDE (50 steps from t = 1, noise 0.1 g sqrt(dt), clamped); on this CPU that
  pair was erratic (SSIM jumping between ~0.5 and ~0.91 from one evaluation to the next, and
  plateaus at 0.91 in 2 of 4 runs; docs/experiments_cpu.md). We train instead with the exact
  perturbation of that SDE, lambda(t) = g sqrt(t) (``sde_kwargs.std = None``), whose range [0.03,
  0.5] is the noise range the test input needs (lambda(1) = 0.5 ~ Paper A's 0.506), and denoise
  with the probability-flow ODE from t = 1 (Paper B's sampler, ``sampler.kind = "flow"``). Paper
  A's literal settings are ``--config.ours.train.sde_kwargs.std=0.1
  --config.ours.sampler.kind=paper_a --config.ours.sampler.t_end=0.0
  --config.ours.train.scale_by_sigma=False``. Ours' network output is scaled by ``1 / lambda(t)``
  (``ours.train.scale_by_sigma``, score_sde's option for VE SDEs such as this one), so the network
  predicts ``-z`` as DDPM's predicts epsilon; Paper B's unscaled output
  (``--config.ours.train.scale_by_sigma=False --config.ours.train.lr=2e-3``) needs 250 steps to
  SSIM 0.95 instead of 125 and 600 to 0.99 instead of 200-225. The learning rates of both methods
  were tuned on this image with the same small sweep (docs/experiments_cpu.md).

Batch sizes (2026-11-27): each method's batch size and learning rate were tuned together on this
2-core CPU with one grid for both (batch 1, 2, 4, 8, 16; learning rates a factor 2 apart until
the best was bracketed; docs/experiments_cpu.md). A step's cost here grows almost in proportion
to the batch (0.017-0.02 s at batch 1, 0.03 s at 2, 0.06 s at 4, 0.11 s at 8), and both methods
reach the target with fewer images seen at smaller batches, so ours trains with batch 1 and
DDPM with batch 2 (at batch 1 DDPM needs 1,575-1,925 steps, slower in time than 800-1,000 at
batch 2). On an accelerator, where the tiny U-Net's step costs about the same at batch 1 and 8,
use larger batches (``--config.ours.train.batch_size=8 --config.ddpm.train.batch_size=8
--config.ddpm.train.lr=5e-4``, the settings before, tuned at batch 8;
``experiments/gpu_benchmarks.sh`` does).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # The clean image: krylovjax.data.load_images(source, **kwargs), image `index` of the result.
    c.data = ml_collections.ConfigDict()
    c.data.source = "builtin:chelsea"
    c.data.size = 32
    c.data.index = 0
    c.data.kwargs = ml_collections.ConfigDict()  # extra load_images kwargs (tfds: split, data_dir, ...)

    # Paper A's noisy test input: clamp(x + std z, 0, 1), z from numpy default_rng(seed); with
    # signal_scale s: clamp(s x + std z, 0, 1) (Paper B's conditional start, budget_conditional*.py).
    c.noise = ml_collections.ConfigDict()
    c.noise.std = 0.506
    c.noise.seed = 0
    c.noise.clamp = True
    c.noise.signal_scale = 1.0
    # draws: how many noisy copies of each image experiments.budget scores (noise seeds seed + d;
    # the denoise binary times one copy and takes only 1).
    c.noise.draws = 1

    # Stop at max(targets); the time to every target is reported.
    c.targets = (0.95,)
    # "ssim" (Gaussian 11x11 window, Wang et al.'s), "global_ssim" (Paper A's early stop) or
    # "ssim_uniform" (scikit-image's default 7x7 window: Paper B's code's); every evaluation records all three.
    c.metric = "ssim"
    c.eval_seed = 1  # PRNG key of the stochastic samplers (the same at every evaluation)
    c.num_frames = 10  # frames of the denoising trajectory figure (Figure 2)
    c.normalise = "clip"  # outputs into [0, 1] before scoring: "clip", or "minmax" per sample (Paper B)
    c.methods = ("ours", "ddpm")

    # TrainConfig fields shared by both methods: the same U-Net, batch, seed and eval cadence.
    c.common = ml_collections.ConfigDict()
    c.common.model = "tiny"
    # dtype: the U-Net's compute dtype; "bfloat16" on TPUs and recent GPUs (the parameters, the
    # optimiser, the EMA and the loss stay float32).
    c.common.model_overrides = ml_collections.ConfigDict(
        {"ch": 32, "ch_mult": (1, 2), "attn_resolutions": (16,), "dropout": 0.0, "dtype": "float32"})
    c.common.seed = 0
    c.common.eval_every = 25
    c.common.log_every = 25
    c.common.checkpoint_every = 100000  # a checkpoint at the stop only
    c.common.max_to_keep = 1
    c.common.grad_clip = 1.0
    c.common.progress = False
    # Updates per dispatched program (TrainConfig.steps_per_call). 0, automatic: 1 on a CPU, where
    # unrolled calls of 5 save 5-16% a step at 3x the compile time; 25 (the evaluation cadence) on
    # an accelerator, where on one H100 a call of 25 took the update from 11.4 to 3.0 ms (ours)
    # and from 12.8 to 2.9 ms (DDPM) at batch 8 (BUILD_NOTES, 2026-11-27).
    c.common.steps_per_call = 0

    c.ours = ml_collections.ConfigDict()
    c.ours.train = ml_collections.ConfigDict()
    c.ours.train.batch_size = 1  # tuned with the lr on this CPU (module docstring)
    c.ours.train.lr = 1e-3  # Paper B's; tuned with scale_by_sigma (2e-3 without) at batch 8 and 1
    c.ours.train.warmup_steps = 10
    c.ours.train.ema_decay = 0.999
    c.ours.train.num_steps = 1500  # step cap
    c.ours.train.budget_seconds = ml_collections.FieldReference(None, field_type=float)  # time cap
    c.ours.train.sde = "constant"
    c.ours.train.sde_kwargs = ml_collections.ConfigDict(
        {"g": 0.5, "std": ml_collections.FieldReference(None, field_type=float)})
    c.ours.train.time_jitter = 0.5
    c.ours.train.loss_reduction = "sum"
    c.ours.train.per_image_offset = False
    c.ours.train.scale_by_sigma = True  # s_theta = net / lambda(t) (TrainConfig.scale_by_sigma)
    # krylovjax.precompute.PrecomputeConfig fields (the SDE comes from ours.train).
    c.ours.precompute = ml_collections.ConfigDict()
    c.ours.precompute.num_steps = 20
    c.ours.precompute.tol = 1e-5  # float32 (x64 off): BUILD_NOTES float32 study
    c.ours.precompute.outer_tol = 1e-4
    c.ours.precompute.max_sweeps = 10
    c.ours.precompute.strategy = "cross_matrix_precond"
    # The formulation (the library's defaults, Paper B's; module docstring): each pixel's own
    # density (Paper A: "paper_a_kde", one KDE of the image plane), grid spacing 1 (Paper A:
    # 1 / (H - 1)), outer sweeps (Paper A: "timestep", a fixed point per time step).
    c.ours.precompute.initial = "paper_b_kde"
    c.ours.precompute.h = 1.0
    c.ours.precompute.outer = "sweeps"
    c.ours.embed_component = "sum"  # krylovjax.transport.embed(component=...)
    # False: the ablation without pre-computed scores (the clean image at every time level: no
    # pre-computation, no embedding; BUILD_NOTES).
    c.ours.embed = True
    # "paper_b" (every level, method.md 4.1) or "paper_a" (Paper A's script: noise_scale * g
    # sqrt(dt) noise per level and a clamp to [0, 1]; experiments.denoise.embed_variant).
    c.ours.embed_variant = "paper_b"
    c.ours.embed_noise_scale = 0.1
    # "flow": probability_flow (Dormand-Prince, rtol/atol) from the noisy image at t_start to t_end;
    # "paper_a": euler_maruyama from t_start to t_end, num_steps, noise_scale, clip (Paper A's);
    # "denoise": krylovjax.sampling.denoise from the time matching noise.std (method "ode"/"sde").
    c.ours.sampler = ml_collections.ConfigDict()
    c.ours.sampler.kind = "flow"
    c.ours.sampler.t_start = 1.0
    c.ours.sampler.t_end = 1e-3
    c.ours.sampler.rtol = 1e-3  # Paper B's tolerances
    c.ours.sampler.atol = 1e-3
    c.ours.sampler.num_steps = 50  # paper_a / denoise-sde
    c.ours.sampler.noise_scale = 0.1  # paper_a / denoise-sde
    c.ours.sampler.method = "ode"  # for kind="denoise"
    c.ours.sampler.clip = True  # paper_a / denoise-sde: clamp to [0, 1] after every step

    c.ddpm = ml_collections.ConfigDict()
    c.ddpm.train = ml_collections.ConfigDict()
    # Tuned on the image with the same sweep as ours (docs/experiments_cpu.md). Batch 8, steps to
    # SSIM 0.95 / 0.99, ancestral and DDIM: 5e-4: 450 / 1450, 350 / 500; 1e-3: 450 / 1225, 375 / 525;
    # 2e-3: 475 / 1775, 500 / 600. Batch 2, steps to 0.95 (ancestral / DDIM): 6.25e-5: 1775 / 1825;
    # 1.25e-4: 1150 / 800; 2.5e-4: 1000 / 950; 5e-4: 1175 / 950; 1e-3: 1350 / 975. Batch 2 at 1.25e-4
    # gives DDPM's fastest row (DDIM, 22.8 s; the ancestral chain's best is 2.5e-4, 28.7 s).
    c.ddpm.train.batch_size = 2  # tuned with the lr on this CPU (module docstring)
    c.ddpm.train.lr = 1.25e-4
    c.ddpm.train.warmup_steps = 10
    c.ddpm.train.ema_decay = 0.999
    c.ddpm.train.num_steps = 6000
    c.ddpm.train.budget_seconds = ml_collections.FieldReference(None, field_type=float)
    c.ddpm.train.ddpm_num_steps = 1000
    c.ddpm.train.ddpm_beta_start = 1e-4
    c.ddpm.train.ddpm_beta_end = 0.02
    # Train on the step indices below this only (None: all 1000, Ho et al.'s); the denoising chain
    # starts at step 260 here, so 261 is the smallest allowed: an ablation (BUILD_NOTES).
    c.ddpm.train.ddpm_max_train_step = ml_collections.FieldReference(None, field_type=int)
    # krylovjax.ddpm.ddpm_denoise from the step matching the noise level (2 * std in [-1, 1]).
    c.ddpm.sampler = ml_collections.ConfigDict()
    c.ddpm.sampler.method = "ancestral"  # or "ddim"
    # "matched": the chain from the step of the noise level; "top": all T steps from 2 noisy - 1;
    # "prior_mix": all T steps from w (2 clean - 1) + (1 - w) z, w = noise.signal_scale < 1
    c.ddpm.sampler.start = "matched"
    # Further samplers of the same DDPM network, evaluated at the same steps, each a table row
    # (Paper B's DDIM row: the deterministic sampler, the counterpart of ours' probability flow).
    c.ddpm.sampler.extra_methods = ("ddim",)
    c.ddpm.sampler.variance = "large"
    c.ddpm.sampler.clip_x0 = True  # Ho et al. clip the predicted x0 to [-1, 1]
    return c
