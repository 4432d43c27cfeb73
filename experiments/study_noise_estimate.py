r"""Study: estimating a photo's noise level, Donoho's Haar estimate against patch PCA.

``experiments.restore --noise_std=auto`` uses :func:`experiments.restore.estimate_noise`
(the median absolute finest diagonal Haar coefficient / 0.6745, per channel, averaged), which
texture biases upwards. The alternative studied here is the patch-PCA estimate of Chen, Zhu and
Heng (ICCV 2015, "An efficient statistical method for image noise level estimation"): the
covariance of all overlapping ``d x d`` patches (all channels in one vector), its eigenvalues
sorted downwards, and the noise variance taken as the mean of the smallest ones from the first
index where that mean is no larger than their median (the signal's few large eigenvalues pull the
mean above the median). It is divided by its own value on pure unit noise of the same shape (a
fixed seed), which removes the Marchenko-Pastur bias of a small image's few patches; ``d`` is the
largest in 3..8 with at most 0.03 patch dimensions per patch.

The program adds Gaussian noise of standard deviation ``s`` to the built-in photos, with a
correlation ``rho`` between the colour channels (``sqrt(1 - rho) z_c + sqrt(rho) z_common``:
each channel's std is still ``s``; camera noise after demosaicing is correlated so), and prints the
range over the photos of each estimate divided by ``s``. Prints a table; ``--json_out`` writes the
rows with the machine.

Usage::

    python -m experiments.study_noise_estimate --sizes=32,64,128 --json_out=runs/noise.json
"""

from __future__ import annotations

from absl import app, flags

FLAGS = flags.FLAGS
if __name__ == "__main__":
    flags.DEFINE_list("sizes", ["32", "64", "128"], "Image sizes (square).")
    flags.DEFINE_list("noise_std", ["0.02", "0.05", "0.1", "0.2"], "Noise standard deviations s.")
    flags.DEFINE_list("rho", ["0", "0.5", "1"], "Correlations of the noise between colour channels.")
    flags.DEFINE_integer("seed", 0, "Seed of the noise.")
    flags.DEFINE_string("json_out", None, "Write the rows and the machine as JSON here.")


def patch_size(channels: int, height: int, width: int, ratio: float = 0.03) -> int:
    """The largest patch side ``d`` in 3..8 with ``channels d^2`` dimensions per patch at most
    ``ratio`` times the number of patches (3 when none is)."""
    fits = [d for d in range(3, 9) if channels * d * d <= ratio * (height - d + 1) * (width - d + 1)]
    return max(fits, default=3)


def _chen_variance(images, d: int):
    """Chen et al.'s noise variance of each image ``[B, C, H, W]`` from its ``d x d`` patches."""
    import numpy as np
    from numpy.lib.stride_tricks import sliding_window_view

    out = []
    for img in np.asarray(images, np.float64):
        patches = sliding_window_view(img, (d, d), axis=(1, 2)).transpose(1, 2, 0, 3, 4)
        patches = patches.reshape(-1, img.shape[0] * d * d)
        patches = patches - patches.mean(0)
        desc = np.clip(np.linalg.eigvalsh(patches.T @ patches / len(patches)), 0.0, None)[::-1]
        var = desc[-1]
        for i in range(len(desc)):
            tail = desc[i:]
            if np.sum(tail > tail.mean()) >= np.sum(tail < tail.mean()):  # mean <= median
                var = tail.mean()
                break
        out.append(var)
    return np.asarray(out)


def pca_estimate(images):
    """Each image's noise standard deviation ``[B]`` by Chen et al.'s patch PCA, calibrated on
    pure unit noise of the same shape (seed 12345, four draws)."""
    import numpy as np

    x = np.asarray(images, np.float64)
    c, h, w = x.shape[1:]
    d = patch_size(c, h, w)
    unit = _chen_variance(np.random.default_rng(12345).standard_normal((4, c, h, w)), d).mean()
    return np.sqrt(_chen_variance(x, d) / unit)


def correlated_noise(shape, rho: float, rng):
    """Unit Gaussian noise ``shape`` = ``[B, C, H, W]`` with correlation ``rho`` between channels."""
    import numpy as np

    z = rng.standard_normal(shape)
    common = rng.standard_normal((shape[0], 1) + tuple(shape[2:]))
    return np.sqrt(1.0 - rho) * z + np.sqrt(rho) * common


def measure(size: int, noise_std: float, rho: float, rng) -> list[dict]:
    """Rows (gray and colour photos) of the estimates' ranges over the built-in photos, / s."""
    import numpy as np

    from experiments.restore import estimate_noise
    from krylovjax import data

    rows = []
    for kind, names, channels in (("colour", data.builtin_names(rgb_only=True), 3),
                                  ("gray", data.builtin_names(), 1)):
        if channels == 1 and rho != 0.0:
            continue  # one channel: nothing to correlate
        clean = np.stack([data.builtin_image(n, size, channels=channels) for n in names])
        noisy = clean + noise_std * correlated_noise(clean.shape, rho, rng)
        row = {"size": size, "noise_std": noise_std, "rho": rho, "photos": kind, "count": len(names)}
        for name, fn in (("haar", estimate_noise), ("pca", pca_estimate)):
            ratio = fn(noisy) / noise_std
            row[f"{name}_min"], row[f"{name}_max"] = float(ratio.min()), float(ratio.max())
            row[f"{name}_worst"] = float(np.max(np.abs(np.log(ratio))))
        rows.append(row)
    return rows


def _numbers(name: str, ok, expected: str) -> list[float]:
    """The list flag ``--<name>`` as floats, each ``ok``, or ``UsageError`` naming it."""
    from krylovjax import experiment_utils as eu

    values = FLAGS[name].value
    out = []
    for v in values:
        try:
            x = float(v)
        except ValueError:
            x = float("nan")
        eu.check_flag(ok(x), name, expected, ",".join(values))
        out.append(x)
    eu.check_flag(bool(out), name, expected, "")
    return out


def main(argv):
    import numpy as np

    from krylovjax import experiment_utils as eu

    eu.check_no_args(argv)
    sizes = eu.int_list_flag("sizes", FLAGS.sizes, 16)
    stds = _numbers("noise_std", lambda v: 0 < v < 1, "comma-separated numbers in (0, 1)")
    rhos = _numbers("rho", lambda v: 0 <= v <= 1, "comma-separated numbers in [0, 1]")
    rng = np.random.default_rng(FLAGS.seed)
    rows = []
    print("| size | s | rho | photos | Haar / s | PCA / s |")
    print("|---|---|---|---|---|---|")
    for n in sizes:
        for s in stds:
            for rho in rhos:
                for r in measure(n, s, rho, rng):
                    rows.append(r)
                    print(f"| {n} | {s:g} | {rho:g} | {r['photos']} ({r['count']}) | "
                          f"{r['haar_min']:.2f}-{r['haar_max']:.2f} | {r['pca_min']:.2f}-{r['pca_max']:.2f} |",
                          flush=True)
    if FLAGS.json_out:
        eu.write_json(FLAGS.json_out, {"machine": eu.benchmark_machine(), "rows": rows})


if __name__ == "__main__":
    from krylovjax.experiment_utils import one_line_usage_errors

    app.run(one_line_usage_errors(main))
