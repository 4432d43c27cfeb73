"""Paper A Table 1, row 2: one CelebA 64x64 image, targets SSIM 0.95 and 0.99 (method.md 7.1).

``python -m experiments.denoise --config=experiments/configs/denoise_celeba64.py --workdir=runs/denoise_celeba64``

Needs the prepared tfds ``celeb_a`` (array_record; the binary stops at once without it). The
image is the first of the test split, centre-cropped to 140x140 and resized (score_sde's
convention, :func:`krylovjax.data.load_tfds`). Settings as ``denoise_cifar10.py`` (the papers'),
with the CelebA DDPM schedule (betas to 0.002, method.md 6).
"""

from experiments.configs import denoise_cifar10


def get_config():
    c = denoise_cifar10.get_config()
    c.data.source = "celeb_a"
    c.data.size = 64
    c.data.index = 0
    c.data.kwargs = {"split": "test", "indices": [0], "data_dir": ""}  # data_dir "": tfds's default
    c.targets = (0.95, 0.99)
    c.ddpm.train.ddpm_beta_end = 0.002
    return c
