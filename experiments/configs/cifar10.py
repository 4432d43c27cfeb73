"""CIFAR-10 dogs at 32x32 with Paper B's ``cifar1`` settings (method.md section 8).

VE SDE sigma = 5, N = 20 FP steps, dh = 1, eps = 1e-3, outer (sweep) tolerance 2e-8 (the code's
``solve_tolerance``: relative change of m between sweeps), class "dog" as in Paper B. The
default takes every dog of the training split (5,000); Paper B used 1 (``cifar1``) or 3; set
``--config.num_images``.

Needs the tfds ``cifar10`` dataset prepared offline (array_record); without it the binary stops
at once and prints the ``tfds build`` command to run.
"""

from experiments.configs import demo


def get_config():
    c = demo.get_config()
    c.dataset = "cifar10"
    c.class_filter = "dog"
    c.num_images = 5000
    c.image_size = 32
    c.chunk_images = 64
    c.precompute.sde_kwargs = {"sigma": 5.0}
    c.precompute.num_steps = 20
    c.precompute.outer_tol = 2e-8
    c.precompute.tol = 1e-10
    return c
