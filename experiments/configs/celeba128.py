"""CelebA at 128x128 (Paper A's largest size, method.md 7.1).

Paper A's settings for its multi-image Krylov runs are unknown (method.md 11.6); we use Paper
B's CelebA ones (section 8): VE SDE sigma = 2, N = 10 FP steps, dh = 1, eps = 1e-3, outer
tolerance 2e-8, 3 images. Needs the tfds ``celeb_a`` dataset prepared offline; without it the
binary stops at once with the ``tfds build`` command to run.
"""

from experiments.configs import celeba64


def get_config():
    c = celeba64.get_config()
    c.image_size = 128
    c.chunk_images = 8
    return c
