r"""Training-step throughput: updates per dispatched program (``TrainConfig.steps_per_call``).

The denoise demo's training runs (``ours`` and ``ddpm``, the config's U-Net, batches and
learning rates, real data: the photo's pre-computed trajectories and the photo itself) are
trained for ``--steps`` updates once per ``--steps_per_call`` value, each through
:func:`krylovjax.training.train` in a fresh workdir (logging and checkpoints only at the end, no
evaluation), and the table gives the training time per update (compilation apart, as in the
experiments), the compile time, and the speed-up over one update per call measured in the same
run. The updates themselves are the same for every value, to float32 rounding
(tests/test_training.py); only the time changes.

Usage::

    python -m experiments.bench_train_step --steps=500 --steps_per_call=1,5,25 --json_out=runs/train_step.json
    # an accelerator, batch 8 for both (the demo's batches are tuned for this CPU):
    python -m experiments.bench_train_step --config.ours.train.batch_size=8 --config.ddpm.train.batch_size=8
"""

from __future__ import annotations

import os
import tempfile

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", os.path.join(os.path.dirname(__file__), "configs", "denoise_demo.py"),
                                "A denoise config (its data, common and <method>.train).")
flags.DEFINE_integer("steps", 500, "Timed updates per run (a multiple of every steps_per_call value).")
flags.DEFINE_list("steps_per_call", ["1", "5"], "Updates per call to compare (the first is the baseline).")
flags.DEFINE_list("methods", ["ours", "ddpm"], "Training runs of the config.")
flags.DEFINE_integer("repeats", 3, "Runs per setting; the fastest counts (the first compiles).")
flags.DEFINE_enum("unroll", "auto", ["auto", "true", "false"],
                  "Unroll the multi-step scan (auto: on CPU, TrainConfig.unroll_steps=None).")
flags.DEFINE_string("json_out", None, "Write the rows and the machine here.")


def measure(cfg, methods, steps: int, per_call: list[int], unroll: bool | None, repeats: int = 3,
            on_row=None) -> list[dict]:
    """``repeats`` training runs per (method, steps_per_call); rows with the fastest run's time
    per update and the first run's compile time (the later runs hit the compile cache).
    ``on_row(rows)`` is called with the rows so far after each one."""
    from experiments import denoise
    from krylovjax import training

    images = denoise.load_clean(cfg.data)
    rows = []
    for method in methods:
        tc = denoise.train_config(cfg, method)
        data = denoise.prepare_ours(cfg, tc, images)[0] if method == "ours" else images
        base = None
        mesh = denoise.batch_mesh(tc.batch_size)
        for k in per_call:
            run = tc.replace(num_steps=steps, steps_per_call=k, unroll_steps=unroll, log_every=steps,
                             checkpoint_every=steps, eval_every=0, budget_seconds=None, progress=False)
            times, compile_seconds = [], None
            for _ in range(repeats):
                with tempfile.TemporaryDirectory() as wd:
                    res = training.train(run, data, wd, mesh=mesh)
                times.append(1e3 * res.train_seconds / res.step)
                compile_seconds = res.compile_seconds if compile_seconds is None else compile_seconds
            ms = min(times)
            base = ms if base is None else base
            unrolled = training.resolve_unroll(mesh, unroll) if k > 1 else None
            rows.append({"method": method, "batch_size": tc.batch_size, "steps_per_call": k, "unrolled": unrolled,
                         "steps": steps, "ms_per_step": ms, "ms_per_step_runs": times,
                         "compile_seconds": compile_seconds, "speedup": base / ms})
            print(f"| {method} | {tc.batch_size} | {k}{' unrolled' if unrolled else ''} | {ms:.2f} | "
                  f"{compile_seconds:.1f} | {base / ms:.2f}x |", flush=True)
            if on_row is not None:
                on_row(rows)
    return rows


def main(argv):
    from krylovjax import experiment_utils as eu

    eu.check_no_args(argv)
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    from krylovjax.experiment_utils import benchmark_machine, write_json

    per_call = eu.int_list_flag("steps_per_call", FLAGS.steps_per_call, 1)
    eu.choice_list_flag("methods", FLAGS.methods, ("ours", "ddpm"))
    if FLAGS.steps < 1 or any(FLAGS.steps % k for k in per_call):
        raise app.UsageError(f"--steps: expected a multiple of every --steps_per_call value {per_call}, "
                             f"got {FLAGS.steps}")
    if FLAGS.repeats < 1:
        raise app.UsageError(f"--repeats: expected >= 1, got {FLAGS.repeats}")
    unroll = {"auto": None, "true": True, "false": False}[FLAGS.unroll]
    print("| method | batch | steps per call | ms / update | compile (s) | speed-up vs first |")
    print("|---|---|---|---|---|---|")
    machine = benchmark_machine()

    def write(rows, complete=False):  # after every row: a run cut off by a time cap keeps its rows
        if FLAGS.json_out:
            write_json(FLAGS.json_out, {"machine": machine, "steps": FLAGS.steps, "complete": complete, "rows": rows})

    rows = measure(FLAGS.config, FLAGS.methods, FLAGS.steps, per_call, unroll, FLAGS.repeats, on_row=write)
    if FLAGS.json_out:
        write(rows, complete=True)
        print(f"wrote {FLAGS.json_out}")


if __name__ == "__main__":
    from krylovjax.experiment_utils import one_line_usage_errors, parse_flags

    app.run(one_line_usage_errors(main), flags_parser=parse_flags)
