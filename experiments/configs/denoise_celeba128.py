"""Paper A Table 1, row 3: one CelebA 128x128 image, target SSIM 0.90 (method.md 7.1).

``python -m experiments.denoise --config=experiments/configs/denoise_celeba128.py --workdir=runs/denoise_celeba128``

As ``denoise_celeba64.py`` at 128x128 (needs the prepared tfds ``celeb_a``).
"""

from experiments.configs import denoise_celeba64


def get_config():
    c = denoise_celeba64.get_config()
    c.data.size = 128
    c.targets = (0.90,)
    c.ours.train.batch_size = c.ddpm.train.batch_size = 8
    return c
