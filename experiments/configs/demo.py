"""Demo pre-computation: a handful of built-in 32x32 photographs (offline, scikit-image).

``python -m experiments.precompute --config=experiments/configs/demo.py --workdir=runs/demo_pre``

Settings are Paper B's ``cifar1`` ones (method.md section 8: VE SDE sigma = 5, N = 20, dh = 1,
eps = 1e-3) with Paper B's sweeps to a relative change of 1e-6, float64, and the fastest
strategy of our end-to-end benchmark ("fast": BiCGStab on the red-black Schur complement,
docs/bench_precompute_cpu.md). Top-level keys choose the images, the chunking and the store;
the ``precompute`` block holds :class:`krylovjax.precompute.PrecomputeConfig` fields
(``chunk_size``: "auto", "none" or an integer as a string).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Images: krylovjax.data.load_images(dataset, ...).
    c.dataset = "builtin"          # "builtin", "cifar10", "celeb_a", or your own images:
                                   # "files:<directory, glob pattern or file>" (PNG, JPEG, ...)
                                   # or "array:<file.npy or .npz>" (krylovjax.data.load_files /
                                   # load_array)
    c.num_images = 8               # tfds and your own images: the first ones; 0 = all
    c.image_size = 32              # every image is centre-cropped to a square and resized
    c.split = "train"              # tfds only
    c.class_filter = ""            # tfds only: cifar10 class name, celeb_a attribute; "" = all
    c.data_dir = ""                # tfds data directory; "" = tfds's default
    c.data_seed = 0                # built-in crops

    c.dtype = "float64"            # computation dtype (float64 turns jax_enable_x64 on)
    c.store_dtype = "float32"      # dtype of the stored arrays
    c.chunk_images = 8             # images per chunk: unit of work, resumption, host ownership
    c.embed_component = "sum"      # Paper B's scalar score (d/dx + d/dy)
    c.seed = 0                     # PRNG seed (paper_a_kde initial density only)

    p = c.precompute = ml_collections.ConfigDict()
    p.sde = "ve"
    p.sde_kwargs = ml_collections.ConfigDict({"sigma": 5.0})
    p.num_steps = 20
    p.eps = 1e-3
    p.paper_b_time_grid = False
    p.h = 1.0
    p.scheme = "fitted"            # exponentially fitted: an M-matrix at any score (BUILD_NOTES)
    p.boundary = "zero"
    p.initial = "paper_b_kde"
    p.score_method = "central"
    p.score_boundary = "zero"
    p.outer = "sweeps"
    p.outer_tol = 1e-6
    p.max_sweeps = 30
    p.divergence_patience = 5      # stop images whose sweeps wander (docs/bench_precompute_cpu.md)
    p.max_fixed_point = 5
    p.lag_init = "initial"         # or "march" (first sweep lags the score one step: ~1 sweep fewer)
    p.strategy = "fast"            # fastest end to end (docs/bench_precompute_cpu.md)
    p.tol = 1e-10
    p.restart = 20
    p.max_restarts = 50
    p.basis_size = 8
    p.chunk_size = "auto"          # systems per solver chunk: "auto" (CPU cache-sized, whole
                                   # batch on GPU/TPU), "none" or an integer like "4"
    # None: the strategy's own seed projection ("minres" unless its preset names one, e.g.
    # "seed_hessenberg" for cross_matrix_block); or "minres" / "seed_hessenberg".
    p.projection = ml_collections.config_dict.placeholder(str)
    p.seed_image = 0
    p.warm_start = True
    p.shard = False                # split each chunk's systems over all local devices
    return c
