"""Fixed-budget comparison (Paper A Figures 4/5, method.md 7.1) on built-in 32x32 photos.

``python -m experiments.budget --config=experiments/configs/budget_demo.py --workdir=runs/budget``

Ours and DDPM train the same U-Net on the same few photos for the same wall-clock budget
(``budget_seconds``; ours spends part of it on the pre-computation and embedding), then each
model denoises a noisy copy of every photo (``task="denoise"``, the Table 1 protocol) or
generates samples (``task="generate"``); the table reports the average SSIM to the source photos.

The method settings are those of the denoise demo (``denoise_demo.py``), the same for both
methods where they share them, except DDPM's learning rate: 1e-3 here, the better one for DDPM
on this budget (the denoise demo's 5e-4 is tuned for one photo at SSIM 0.95). Paper B's
disjoint per-image time intervals for ours (``--config.ours.train.per_image_offset=True``,
method.md 4.3) are off: they give ours the image index, which DDPM does not have, and at this
budget they lowered ours' mean SSIM (0.73 with them, 0.85 without; docs/experiments_cpu.md).
The budget of 60 s was chosen when it was about twice the time ours needed to reach SSIM 0.95
on one photo in the denoise demo (and about half of DDPM's); with ours' output scaled by
1/lambda ours needs 15 s and DDPM (lr 1e-3) 53 s on this 2-core CPU, so the budget lies between
the two methods' times for all three photos together (mean SSIM 0.938 vs 0.780, 0.860 with
DDIM), and it keeps the demo short.
"""

from experiments.configs import denoise_demo


def get_config():
    c = denoise_demo.get_config()
    c.data.source = "builtin"
    c.data.size = 32
    c.data.index = None
    c.data.kwargs = {"num_images": 3}  # astronaut, coffee, chelsea (builtin_dataset order)
    c.budget_seconds = 60.0
    c.task = "denoise"  # or "generate"
    c.samples_per_image = 1  # task="generate": samples per photo (ours) / per photo count (DDPM)
    c.targets = (0.95,)  # unused by the budget run; kept for the shared config checks
    c.common.eval_every = 0
    c.ours.train.num_steps = 10**7  # the budget stops training, not a step count
    c.ddpm.train.num_steps = 10**7
    c.ours.train.per_image_offset = False
    c.ddpm.sampler.extra_methods = ()  # one DDPM sampler per budget run (ddpm.sampler.method)
    # DDPM's learning rate for the budget: 1e-3, not the denoise demo's 5e-4 (tuned for one photo
    # at SSIM 0.95). On this budget 1e-3 is the better of the two for DDPM (mean SSIM 0.780
    # ancestral / 0.860 DDIM, against 0.685 / 0.803 at 5e-4; docs/experiments_cpu.md).
    c.ddpm.train.lr = 1e-3
    # Batch 8 for both methods, as measured; the denoise demo's batch tuning for one photo (ours 1,
    # DDPM 2) was not repeated for this budget on three photos.
    c.ours.train.batch_size = c.ddpm.train.batch_size = 8
    return c
