"""Paper A Figure 5's budget, scored by denoising (as ``budget_cifar10.py``): ours vs DDPM on the
same CelebA 64x64 images for the same budget.

``python -m experiments.budget --config=experiments/configs/budget_celeba64.py --workdir=runs/budget_celeba64``

The budget is the paper's 6388.59 s (method.md 7.1: ours 0.6302 vs DDPM 0.4446 average SSIM);
the images are the first three of the test split. Settings as ``denoise_celeba64.py``.
Needs the prepared tfds ``celeb_a`` (``--config.data.kwargs.data_dir``: its data directory).
"""

from experiments.configs import budget_cifar10, denoise_celeba64


def get_config():
    c = denoise_celeba64.get_config()
    b = budget_cifar10.get_config()
    c.data.index = None
    c.data.kwargs = {"split": "test", "indices": [0, 1, 2], "data_dir": ""}  # data_dir "": tfds's default
    c.budget_seconds = 6388.59
    for k in ("task", "samples_per_image", "final_denoise"):
        c[k] = b[k]
    c.common.eval_every = 0
    c.ours.train.num_steps = 10**9
    c.ddpm.train.num_steps = 10**9
    c.ours.train.per_image_offset = False  # as budget_demo.py (no image index for either method)
    c.ddpm.sampler.extra_methods = ()  # as budget_demo.py (one DDPM sampler per budget run)
    return c
