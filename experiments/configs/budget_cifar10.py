"""Paper A Figure 4's budget and images, scored by denoising: ours vs DDPM on the same CIFAR-10
32x32 images for the same budget.

``python -m experiments.budget --config=experiments/configs/budget_cifar10.py --workdir=runs/budget_cifar10``

The budget is the paper's 4155.17 s (method.md 7.1: ours 0.8991 vs DDPM 0.8517 average SSIM);
the images are the first three dogs of the training split (Paper A does not say which or how
many; Paper B's multi-image runs use three dogs). Settings as ``denoise_cifar10.py`` (the
papers'). Needs the prepared tfds ``cifar10`` (``--config.data.kwargs.data_dir``: its data
directory).

The task is denoising (``task = "denoise"``, as ``budget_demo.py``): Paper A captions Figures 4/5
"images generated after an identical training time budget", but with the papers' constant-g SDE
ours' prior at t = 1 is not the data's marginal and generation from noise lands on grey blurs
(``budget_generate.py`` generates, with Paper B's VE SDE; its docstring has the figures).
"""

from experiments.configs import budget_demo, denoise_cifar10


def get_config():
    c = denoise_cifar10.get_config()
    b = budget_demo.get_config()
    c.data.index = None
    c.data.kwargs = {"split": "train", "class_filter": "dog", "indices": [0, 1, 2],
                     "data_dir": ""}  # the tfds data directory; "": tfds's default
    c.budget_seconds = 4155.17
    c.task = b.task
    c.samples_per_image = b.samples_per_image
    c.final_denoise = b.final_denoise
    c.common.eval_every = 0
    c.ours.train.num_steps = 10**9
    c.ddpm.train.num_steps = 10**9
    c.ours.train.per_image_offset = False  # as budget_demo.py (no image index for either method)
    c.ddpm.sampler.extra_methods = ()  # as budget_demo.py (one DDPM sampler per budget run)
    return c
