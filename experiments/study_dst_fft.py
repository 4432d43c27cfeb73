r"""Study: the shared-diffusion preconditioner as dense transform products against an FFT.

:func:`krylovjax.preconditioners.shared_diffusion_inverse` applies ``(I + k L)^{-1}`` with the
orthogonal DST-I matrices as two batched matrix products each way. The alternative is an FFT-based
DST-I (odd extension of length ``2 (n + 1)``, ``jnp.fft.rfft``), O(n^2 log n) per field instead
of O(n^3). This program times both, jitted, on the same random fields (zero boundary), in
alternating rounds, and checks that they agree. Prints a table; ``--json_out`` writes the rows
with the machine.

Usage::

    python -m experiments.study_dst_fft --sizes=32,64,128 --batch=48 --json_out=runs/dst.json
"""

from __future__ import annotations

import time

from absl import app, flags

FLAGS = flags.FLAGS
if __name__ == "__main__":
    flags.DEFINE_list("sizes", ["32", "64", "128"], "Grid sizes (square).")
    flags.DEFINE_integer("batch", 48, "Fields per application.")
    flags.DEFINE_integer("rounds", 7, "Alternating timing rounds (the median is reported).")
    flags.DEFINE_float("k", 0.7, "Diffusion weight k of I + k L.")
    flags.DEFINE_string("json_out", None, "Write the rows and the machine as JSON here.")


def dst1(x, axis):
    """Unnormalised DST-I along ``axis``: ``y_k = sum_j x_j sin(pi (j+1)(k+1) / (n+1))``."""
    import jax.numpy as jnp

    x = jnp.moveaxis(x, axis, -1)
    n = x.shape[-1]
    z = jnp.zeros(x.shape[:-1] + (1,), x.dtype)
    ext = jnp.concatenate([z, x, z, -x[..., ::-1]], -1)
    return jnp.moveaxis(-jnp.fft.rfft(ext, axis=-1).imag[..., 1:n + 1] / 2, -1, axis)


def fft_inverse(k, n):
    """``(I + k L)^{-1}`` on ``[*batch, n, n]`` fields with zero ghosts, by FFT-based DST-I."""
    import jax.numpy as jnp

    from krylovjax.preconditioners import _eigenbasis

    _, lam = _eigenbasis(n, "zero")
    denom = 1.0 + k * jnp.asarray(lam[:, None] + lam[None, :])
    scale = (2.0 / (n + 1)) ** 2

    def apply(x):
        xt = dst1(dst1(x, -1), -2) / denom
        return dst1(dst1(xt, -1), -2) * scale

    return apply


def measure(n, batch, rounds, k):
    import jax
    import numpy as np

    from krylovjax.preconditioners import shared_diffusion_inverse

    x = jax.numpy.asarray(np.random.default_rng(0).standard_normal((batch, n, n)))
    fns = {"matmul": jax.jit(shared_diffusion_inverse(k, (n, n), dtype=x.dtype)),
           "fft": jax.jit(fft_inverse(k, n))}
    ref = fns["matmul"](x)
    diff = float(jax.numpy.max(jax.numpy.abs(ref - fns["fft"](x))) / jax.numpy.max(jax.numpy.abs(ref)))
    reps = max(3, 2000 // n)
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            f(x).block_until_ready()
            t0 = time.perf_counter()
            for _ in range(reps):
                y = f(x)
            y.block_until_ready()
            times[name].append((time.perf_counter() - t0) / reps / batch * 1e6)
    mm, ff = (float(np.median(times[name])) for name in ("matmul", "fft"))
    return {"size": n, "batch": batch, "matmul_us_per_system": mm, "fft_us_per_system": ff,
            "fft_over_matmul": ff / mm, "max_rel_diff": diff, "dtype": str(x.dtype)}


def main(argv):
    import jax

    from krylovjax import experiment_utils as eu

    eu.check_no_args(argv)
    sizes = eu.int_list_flag("sizes", FLAGS.sizes, 2)
    for name in ("batch", "rounds"):
        eu.check_flag(FLAGS[name].value >= 1, name, "an integer >= 1", FLAGS[name].value)
    eu.check_flag(FLAGS.k > 0, "k", "a number > 0", FLAGS.k)
    batch, rounds = FLAGS.batch, FLAGS.rounds
    jax.config.update("jax_enable_x64", True)
    rows = []
    print("| size | matmul us/system | FFT us/system | FFT / matmul | max rel diff |")
    print("|---|---|---|---|---|")
    for n in sizes:
        r = measure(n, batch, rounds, FLAGS.k)
        rows.append(r)
        print(f"| {n} | {r['matmul_us_per_system']:.2f} | {r['fft_us_per_system']:.2f} | "
              f"{r['fft_over_matmul']:.2f} | {r['max_rel_diff']:.1e} |", flush=True)
    if FLAGS.json_out:
        eu.write_json(FLAGS.json_out, {"machine": eu.benchmark_machine(), "rows": rows})


if __name__ == "__main__":
    from krylovjax.experiment_utils import one_line_usage_errors

    app.run(one_line_usage_errors(main))
