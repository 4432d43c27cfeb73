"""A tiny run of the Colab notebook for a CPU (``KRYLOVJAX_NB_CONFIG=tiny``; its test).

Four 16x16 built-in photographs (or, with ``KRYLOVJAX_NB_DATASET=cifar10``, the first four
CIFAR-10 training images), 4 FP time levels and at most 3 sweeps, a one-level U-Net with 8
channels trained for 6 steps, and Paper A's 5-step damped reverse SDE as the denoiser (it
compiles faster than the adaptive ODE). Same structure as ``colab_full``; the numbers are a
smoke test, not a result.
"""

import ml_collections

from experiments.configs import colab_full


def get_config() -> ml_collections.ConfigDict:
    c = colab_full.get_config()
    c.dataset = "builtin"
    c.class_filter = ""
    c.num_images = 4
    c.image_size = 16
    c.chunk_images = 4

    p = c.precompute
    p.num_steps = 4
    p.max_sweeps = 3

    t = c.train
    t.model_overrides = ml_collections.ConfigDict(
        {"ch": 8, "ch_mult": (1,), "attn_resolutions": (), "dropout": 0.0, "dtype": "float32"})
    t.warmup_steps = 2
    t.batch_size = 4
    t.num_steps = 6
    t.budget_seconds = None
    t.eval_every = 3
    t.log_every = 3
    t.checkpoint_every = 6
    t.progress = False

    c.num_frames = 3
    c.denoise.num_images = 4
    c.ours.sampler.kind = "paper_a"
    c.ours.sampler.num_steps = 5
    return c
