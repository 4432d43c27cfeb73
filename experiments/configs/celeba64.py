"""CelebA at 64x64 with Paper B's ``celeb3_unconditional`` settings (method.md section 8).

VE SDE sigma = 2, N = 10 FP steps, dh = 1, eps = 1e-3, outer (sweep) tolerance 2e-8, 3 images
(``celeb1``: 1 image, tolerance 1e-6). CelebA is centre-cropped to 140 x 140 and resized
(krylovjax.data.load_tfds). Needs the tfds ``celeb_a`` dataset prepared offline; without it the
binary stops at once with the ``tfds build`` command to run.
"""

from experiments.configs import demo


def get_config():
    c = demo.get_config()
    c.dataset = "celeb_a"
    c.num_images = 3
    c.image_size = 64
    c.chunk_images = 16
    c.precompute.sde_kwargs = {"sigma": 2.0}
    c.precompute.num_steps = 10
    c.precompute.outer_tol = 2e-8
    c.precompute.tol = 1e-10
    return c
