"""Paper A Table 1, row 1: one CIFAR-10 32x32 image, targets SSIM 0.95 and 0.99 (method.md 7.1).

``python -m experiments.denoise --config=experiments/configs/denoise_cifar10.py --workdir=runs/denoise_cifar10``

Needs the prepared tfds ``cifar10`` (array_record); without it the binary stops at once with
:mod:`krylovjax.data`'s instructions (nothing is downloaded). The image is the first dog of the
training split (Paper B uses the dog class; Paper A does not say which image).

The papers' settings (method.md 6 and 8): the papers' U-Net (ch 128, [1, 2, 2, 2], attention at
16, dropout 0.1) for both methods; ours as Paper A's script: constant g = 0.5, lambda = 0.1,
N = 100 FP steps with the time-step-wise fixed point (at most 5 iterations, tol 1e-6), Adam
1e-3, the damped 50-step reverse SDE (the demo's variant, lambda(t) = g sqrt(t) with the
probability flow, is ``--config.ours.train.sde_kwargs.std=None --config.ours.sampler.kind=flow
--config.ours.sampler.t_end=0.001``); DDPM as Ho et al. / Paper B's baseline: T = 1000, linear
betas 1e-4..0.02, lr 2e-4 with 5000 warm-up steps, EMA 0.9999, gradient clipping 1. Sized for an
accelerator (float32: Krylov tol 1e-6, BUILD_NOTES float32 study).
"""

from experiments.configs import denoise_demo


def get_config():
    c = denoise_demo.get_config()
    c.data.source = "cifar10"
    c.data.size = 32
    c.data.index = 0
    c.data.kwargs = {"split": "train", "class_filter": "dog", "indices": [0],
                     "data_dir": ""}  # the tfds data directory; "": tfds's default
    c.targets = (0.95, 0.99)
    c.common.model = "paper"
    c.common.model_overrides = {"dropout": 0.1, "dtype": "float32"}  # dtype: "bfloat16" compute on TPUs
    c.ours.train.batch_size = c.ddpm.train.batch_size = 16
    c.common.eval_every = 100
    c.common.log_every = 100
    c.ours.train.lr = 1e-3
    c.ours.train.scale_by_sigma = False  # Paper B's unscaled network output (the demo scales it)
    c.ours.train.sde_kwargs.std = 0.1  # Paper A's literal setting (the demo uses g sqrt(t))
    c.ours.sampler.kind = "paper_a"
    c.ours.sampler.t_start = 1.0
    c.ours.sampler.t_end = 0.0
    c.ours.sampler.num_steps = 50
    c.ours.sampler.noise_scale = 0.1
    c.ours.train.warmup_steps = 0
    c.ours.train.num_steps = 20000
    c.ours.precompute.num_steps = 100
    c.ours.precompute.outer = "timestep"
    c.ours.precompute.max_fixed_point = 5
    c.ours.precompute.outer_tol = 1e-6
    c.ours.precompute.tol = 1e-6
    c.ddpm.train.lr = 2e-4
    c.ddpm.train.warmup_steps = 5000
    c.ddpm.train.ema_decay = 0.9999
    c.ddpm.train.num_steps = 100000
    c.ddpm.train.ddpm_beta_end = 0.02
    return c
