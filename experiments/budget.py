r"""Fixed wall-clock budget: ours vs DDPM on the same images (Paper A Figures 4/5, method.md 7.1).

Usage::

    python -m experiments.budget --config=experiments/configs/budget_demo.py --workdir=runs/budget \
        [--config.budget_seconds=120] [--config.task=generate] [--overwrite | --fresh]

Both methods get the same budget of ``budget_seconds`` wall-clock seconds of work on the same
images ``[B, C, H, W]`` (``config.data``) and the same U-Net (``config.common``):

* ours spends it on the pre-computation, the embedding and training: its training budget is
  ``budget_seconds - precompute - embed`` (run times; JIT compile excluded for every stage, as
  in ``experiments.denoise``);
* DDPM trains for ``budget_seconds``.

Training time is :func:`krylovjax.training.train`'s (optimiser steps only). Then every model is
evaluated on its final weights (EMA):

* ``task="denoise"``: each image's noisy copy ``clamp(x + std z, 0, 1)`` is denoised with the
  samplers of ``experiments.denoise``; score = SSIM of each output to its own source. With
  ``noise.draws = D > 1`` each image gets ``D`` noisy copies (noise seeds ``noise.seed + d``) and
  the score is the mean over all of them, with its standard error, each image's mean and how
  many outputs are most similar to their own image (from a conditional start an output can land
  on another image; one draw per image cannot tell a method that does so once in ten from one
  that never does);
* ``task="generate"``: each method draws ``samples_per_image`` samples per source from its prior
  with ``experiments.generate``'s default sampler (ours: the probability-flow ODE, ended with
  Tweedie's denoising step unless ``final_denoise=False``, or Paper A's damped SDE for a constant
  perturbation; DDPM: ``ddpm.sampler.method``, the ancestral chain or
  DDIM with all ``T`` steps), with a fixed key
  (``eval_seed``). Ours trained with per-image time intervals (method.md 4.3) draws each sample
  for a given source and is scored against it; otherwise (DDPM always: it has no image
  identity) a sample is scored against the source it is most similar to (SSIM). The score is
  the mean over all samples, with its standard error, how many sources are some sample's
  nearest and how many samples are nearest each source (``grid.png`` shows the first
  ``GRID_PANELS``).

With ``common.eval_every = k > 0`` the same evaluation also runs every ``k`` updates (its time
excluded from the budget, like the final one), so one run gives the quality at every budget up
to ``budget_seconds``: the ``curve`` of each method in ``results.json`` (seconds of budget used,
SSIM, PSNR), a table in ``results.md`` and ``quality_curve.png``.

The table reports the average SSIM (and PSNR) over the images / samples. Outputs in
``--workdir``: ``results.md``, ``results.json``, ``grid.png`` (sources, inputs, ours, DDPM side
by side), ``quality_curve.png`` (with ``eval_every > 0``), and the two training runs ``ours/``,
``ddpm/`` (a killed run resumes from their checkpoints; ours' pre-computation is redone).
``--fresh`` moves an existing work directory to ``<workdir>.prev`` first; a second run in a work
directory that a run holds is refused at once (:mod:`krylovjax.workdir_lock`).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Budget config (experiments/configs/budget_*.py).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory (results, figures, the two training runs).")
    flags.DEFINE_bool("overwrite", False, "Redo the run of the same config in --workdir from the start: its "
                      "results and training runs (finished or not) are deleted first. Another config is always "
                      "refused; without the flag an unfinished run resumes.")
    flags.DEFINE_bool("fresh", False, "Start afresh: move an existing --workdir to <workdir>.prev first (an older "
                      "<workdir>.prev is deleted if it is an earlier run of this binary, "
                      "refused if it is anything else), whatever its config; refused while another run holds either.")
    flags.mark_flags_as_required(["config", "workdir"])

TASKS = ("denoise", "generate")
RESULT_FILES = ("results.md", "results.json", "grid.png", "quality_curve.png")
GRID_PANELS = 12  # grid.png shows the inputs of the first draws, whole draws, up to this many panels
# Keys added after run directories were made without them (with denoise.LEGACY_CONFIG): the
# generate task's sampler without Tweedie's last step.
LEGACY_CONFIG = {"final_denoise": False}


def denoise_inputs(cfg, clean) -> tuple[Any, Any, Any]:
    """The denoise task's inputs: ``(noisy, ddpm_in, src)``.

    ``noisy [D B, C, H, W]`` holds ``D = noise.draws`` noisy copies of each of the ``B`` images,
    draw by draw: input ``i`` is a copy of image ``src[i] = i mod B``, and draw ``d`` is
    :func:`experiments.denoise.noisy_input` with ``draw=d`` (noise seed ``noise.seed + d``, so
    ``D = 1`` gives the inputs of before the option). ``ddpm_in`` is DDPM's array for each draw
    (:func:`experiments.denoise.ddpm_input`), ``noisy`` itself unless ``ddpm.sampler.start =
    "prior_mix"``.
    """
    import numpy as np

    from experiments import denoise

    D, B = denoise.noise_draws(cfg), clean.shape[0]
    noisy = [denoise.noisy_input(cfg, clean, draw=d) for d in range(D)]
    given = [denoise.ddpm_input(cfg, clean, x, draw=d) for d, x in enumerate(noisy)]
    own = given[0] is not noisy[0]
    noisy = np.concatenate(noisy)
    ddpm_in = np.concatenate(given) if own else noisy
    return noisy, ddpm_in, np.tile(np.arange(B), D)


def input_stats(out, clean, src, ssim_per_input) -> dict:
    """Statistics over the inputs of the denoise task (:func:`denoise_inputs`).

    Args:
      out: the outputs ``[N, C, H, W]`` in [0, 1].
      clean: the ``B`` images ``[B, C, H, W]``.
      src: ``[N]``, the image each input is a copy of.
      ssim_per_input: ``[N]``, each output's SSIM to its own image.

    Returns:
      ``ssim_se`` (standard error of the mean SSIM over the ``N`` inputs; None for ``N = 1``),
      ``ssim_per_source`` (each image's mean over its copies; None for an image without one),
      ``nearest_source`` (``[N]``: the image each output is most similar to, SSIM) and
      ``nearest_own_source`` (how many outputs are most similar to their own image).
    """
    import numpy as np

    from experiments import generate
    from krylovjax import experiment_utils as eu

    s = np.asarray(ssim_per_input, np.float64)
    src = np.asarray(src)
    nearest = generate.nearest_reference(out, clean)[0]
    return {"ssim_se": eu.standard_error(s),
            "ssim_per_source": [float(s[src == b].mean()) if (src == b).any() else None for b in range(clean.shape[0])],
            "nearest_source": nearest.tolist(), "nearest_own_source": int((nearest == src).sum())}


def _with_input_stats(eval_fn, clean, src, last: dict):
    """``eval_fn`` (:func:`experiments.denoise.make_eval_fn` with ``last``) whose metrics also hold
    :func:`input_stats`' ``nearest_own_source`` and ``ssim_se`` (for more than one input) of each
    evaluation (the quality curve's); ``last["input_stats"]`` receives the latest evaluation's
    :func:`input_stats` (the final model's, as ``last`` itself)."""

    def with_stats(fn, step):
        res = eval_fn(fn, step)
        st = last["input_stats"] = input_stats(last["out"], clean, src, last["metrics"]["ssim_per_image"])
        return {**res, "nearest_own_source": st["nearest_own_source"],
                **({"ssim_se": st["ssim_se"]} if st["ssim_se"] is not None else {})}

    return with_stats


def check_budget_config(cfg) -> float:
    """The shared checks of :func:`experiments.denoise.check_config` plus the budget's own.

    Returns:
      ``budget_seconds`` as a float.
    """
    from experiments import denoise
    from krylovjax import experiment_utils as eu

    budget = eu.check_positive_seconds(cfg.get("budget_seconds"), "budget_seconds")
    if cfg.get("task") not in TASKS:
        raise ValueError(f"task: expected one of {TASKS}, got {cfg.get('task')!r}")
    if cfg.get("task") == "generate" and denoise.noise_draws(cfg) != 1:
        raise ValueError(f"noise.draws: the generate task has no noisy inputs (it draws samples_per_image samples "
                         f"per image), so expected 1, got {denoise.noise_draws(cfg)}")
    if cfg.get("task") == "generate":  # the denoise task's settings that generation does not use
        unused = {"normalise": (denoise.normalise(cfg), "clip"), "noise.signal_scale": (denoise.signal_scale(cfg), 1.0),
                  "ddpm.sampler.start": (denoise.ddpm_start(cfg), "matched"),
                  "ddpm.sampler.variance": (cfg.ddpm.sampler.get("variance", "large"), "large"),
                  "ddpm.sampler.clip_x0": (cfg.ddpm.sampler.get("clip_x0", True), True)}
        for key, (value, default) in unused.items():
            if value != default:
                raise ValueError(f"{key}: the generate task does not use it (generation clips its samples, DDPM "
                                 f"draws with the large variance and a clipped x0 prediction), so expected "
                                 f"{default!r}, got {value!r}")
    n = cfg.get("samples_per_image", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"samples_per_image: expected an int >= 1, got {n!r}")
    if cfg.get("task") == "denoise" and n != 1:
        raise ValueError(f"samples_per_image: the denoise task draws no samples (noise.draws sets how many noisy "
                         f"copies of each image it denoises), so expected 1, got {n}")
    if not isinstance(cfg.get("final_denoise", True), bool):
        raise ValueError(f"final_denoise: expected a bool, got {cfg.get('final_denoise')!r}")
    for m in ("ours", "ddpm"):
        if cfg[m].train.get("budget_seconds") is not None:
            raise ValueError(f"{m}.train.budget_seconds: set by budget_seconds (leave it None)")
    denoise.check_config(cfg)
    if tuple(cfg.ddpm.sampler.get("extra_methods", ())):
        raise ValueError("ddpm.sampler.extra_methods: the budget run reports one DDPM sampler; leave it () "
                         "and pick the sampler with ddpm.sampler.method (e.g. --config.ddpm.sampler.method=ddim)")
    return budget


def generator(cfg, tc, method: str, num_images: int, shape) -> tuple[Any, Any]:
    """``(gen, idx)``: ``gen(fn, return_trajectory=False) -> (samples [M, C, H, W] in [0, 1],
    frames, network_evals)`` draws ``M = num_images * samples_per_image`` samples with
    ``experiments.generate``'s default sampler (DDPM: ``ddpm.sampler.method``; DDIM with all ``T``
    steps) and a fixed key (``eval_seed``), compiled once for
    every evaluation of a training run (:func:`experiments.denoise._compiled_once`); ``idx [M]``
    is the source of each sample for ours trained with per-image time intervals, else None
    (the nearest source counts)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from experiments import denoise, generate

    per = int(cfg.samples_per_image)
    M = num_images * per
    idx = np.repeat(np.arange(num_images), per) if method == "ours" and tc.per_image_offset else None
    key = jax.random.PRNGKey(int(cfg.eval_seed))
    shape = (M,) + tuple(shape)
    sampler = cfg.ddpm.sampler.method if method == "ddpm" else "auto"
    # DDIM: all T steps, deterministic (Paper B's DDIM row); the other samplers: their defaults
    steps = {"num_steps": 0} if sampler == "ddim" else {}
    fd = bool(cfg.get("final_denoise", True))

    def draw(fn, return_trajectory):
        del return_trajectory  # two frames (prior, sample) are cheap
        # one adaptive step size for the batch ("batch"), as the recorded figures were made
        return generate.sample_arrays(fn, tc, shape, key, idx=None if idx is None else jnp.asarray(idx),
                                      sampler=sampler, num_frames=2, final_denoise=fd, step_control="batch", **steps)

    return denoise._compiled_once(draw), idx


def make_generate_eval_fn(gen, clean, idx, last: dict | None = None):
    """The ``eval_fn(fn, step) -> dict`` of the generate task: SSIM (windowed, global) and PSNR
    of each sample to its source (``idx``) or, without ``idx``, to the source it is most similar
    to by SSIM, ``sources_covered``, how many distinct sources are some sample's most similar
    one (the nearest-source SSIM alone does not see samples that all copy one source), and, for
    more than one sample, ``ssim_se``, the standard error of the mean SSIM; ``last`` receives the
    latest ``step``, ``out``, ``pairs`` (the source each sample is scored against), ``nearest``
    (each sample's most similar source), ``network_evals`` and ``metrics`` (as
    :func:`experiments.denoise.make_eval_fn`, plus ``sources_covered``, ``samples_per_source``
    (how many samples are most similar to each source) and ``ssim_se`` (None for one sample))."""
    import numpy as np

    from experiments import denoise, generate
    from krylovjax import experiment_utils as eu

    def eval_fn(fn, step):
        out, _, nfe = gen(fn)
        out = np.asarray(out)
        nearest, _, counts = generate.nearest_reference(out, clean)
        pairs = clean[idx] if idx is not None else clean[nearest]
        m = denoise.image_metrics(out, pairs)
        m.update(sources_covered=int((counts > 0).sum()), ssim_se=eu.standard_error(m["ssim_per_image"]),
                 samples_per_source=counts.tolist())
        logging.info("step %d: generated samples' SSIM %.4f (PSNR %.2f dB; %d of %d sources nearest to a sample; "
                     "%d network evaluations)", step, m["ssim"], m["psnr"], m["sources_covered"], clean.shape[0], nfe)
        if last is not None:
            last.update(step=int(step), out=out, pairs=pairs, nearest=nearest, network_evals=nfe, metrics=m)
        return {**{k: m[k] for k in ("ssim", "global_ssim", "ssim_uniform", "psnr", "sources_covered")},
                **({"ssim_se": m["ssim_se"]} if m["ssim_se"] is not None else {})}

    return eval_fn


def run(cfg, workdir: str, *, overwrite: bool = False, fresh: bool = False) -> dict:
    """Run the budget experiment of ``cfg`` in ``workdir``; returns the results (also written)."""
    from experiments import denoise
    from krylovjax import experiment_utils as eu

    if fresh:  # --fresh from inside the run (--workdir=.) moves the process's directory with it
        workdir = eu.fresh_path(workdir)
    with eu.checking_arguments():  # a bad value ends the binary with its message alone
        budget = check_budget_config(cfg)
        methods = tuple(cfg.methods)
        tcs = {m: denoise.train_config(cfg, m) for m in methods}
        if "ours" in tcs:
            denoise.precompute_config(cfg, tcs["ours"])
            if cfg.task == "denoise":
                denoise.check_ours_sampler_with_sde(cfg, tcs["ours"])
        if "ddpm" in tcs:
            if cfg.task == "denoise":
                denoise.check_ddpm_range(cfg, tcs["ddpm"])
            else:
                from experiments import generate

                generate.check_generates(tcs["ddpm"])
        clean = denoise.load_clean(cfg.data)
        denoise.check_scored_size(clean)
        denoise.check_fits(tcs, clean, clean.shape[0])

    # a failure while the fresh claim is all the directory holds withdraws it (eu.run_claimed)
    return eu.run_claimed(workdir, "budget", denoise.claim_record(cfg, clean),
                          lambda: _run_claimed(cfg, workdir, overwrite, budget, tcs, clean),
                          legacy={**denoise.LEGACY_CONFIG, **LEGACY_CONFIG}, fresh=fresh,
                          may_change=denoise.MAY_CHANGE, keep=denoise.images_kept(cfg))


def _run_claimed(cfg, workdir: str, overwrite: bool, budget: float, tcs: dict, clean) -> dict:
    """:func:`run` in its claimed work directory."""
    import numpy as np

    from experiments import denoise
    from krylovjax import experiment_utils as eu
    from krylovjax import training

    methods, B = tuple(tcs), clean.shape[0]
    if os.path.exists(os.path.join(workdir, "results.json")) and not overwrite:
        raise eu.WorkdirConflictError(
            f"workdir: {workdir!r} already holds the finished results of this config; pass --overwrite "
            "to redo them or use another --workdir (nothing was changed)")
    if overwrite:
        for m in denoise.METHODS:
            shutil.rmtree(os.path.join(workdir, m), ignore_errors=True)
        for f in RESULT_FILES:
            if os.path.exists(os.path.join(workdir, f)):
                os.remove(os.path.join(workdir, f))

    # noise.draws copies of each image; ddpm_in is noisy itself unless ddpm.sampler.start = "prior_mix"
    noisy, ddpm_in, idx = denoise_inputs(cfg, clean)
    ref = clean[idx]  # each input's own image
    own_start = cfg.task == "denoise" and ddpm_in is not noisy
    results: dict[str, Any] = {}
    outputs: dict[str, np.ndarray] = {}
    for m in methods:
        tc = tcs[m]
        prep = {"precompute_seconds": 0.0, "embed_seconds": 0.0, "compile_seconds": 0.0}
        sub = os.path.join(workdir, m)
        if m == "ours":
            data, prep = denoise.prepare_ours(cfg, tc, clean)
            prep = _first_prep(sub, prep)
        else:
            data = clean
        spent = prep["precompute_seconds"] + prep["embed_seconds"]
        left = budget - spent
        if left <= 0:
            with eu.checking_arguments():  # the binary's one line (it was a traceback)
                raise ValueError(f"budget_seconds: {budget:g} s does not cover ours' pre-computation and "
                                 f"embedding ({spent:.2f} s); give a larger budget")
        if m == "ours":
            _first_prep(sub, prep, write=True)
        mesh = denoise.batch_mesh(tc.batch_size)
        last: dict = {}
        if cfg.task == "denoise":
            if m == "ours":
                den = denoise.ours_denoiser(cfg, tc, noisy, idx=idx if tc.per_image_offset else None)
            else:
                den = denoise.ddpm_denoiser(cfg, tc, ddpm_in)
            # each evaluation also records the s.e. and the outputs nearest their own image
            eval_fn = _with_input_stats(denoise.make_eval_fn(den, ref, m, last), clean, idx, last)
        else:
            gen, sidx = generator(cfg, tc, m, B, clean.shape[1:])
            eval_fn = make_generate_eval_fn(gen, clean, sidx, last)
        # common.eval_every = 0: train() calls the callback once, on the final model; > 0: also
        # every eval_every updates (the quality curve). Evaluation time is excluded from the budget.
        res = training.train(tc.replace(budget_seconds=left), data, sub, eval_fn=eval_fn, mesh=mesh)
        out, nfe, mm = last["out"], last["network_evals"], last["metrics"]
        curve = [{"step": e["step"], "seconds": spent + e["train_seconds"], "ssim": e["ssim"], "psnr": e["psnr"],
                  **({"ssim_uniform": e["ssim_uniform"]} if "ssim_uniform" in e else {}),
                  **{k: int(e[k]) for k in ("sources_covered", "nearest_own_source") if k in e},
                  **({"ssim_se": e["ssim_se"]} if "ssim_se" in e else {})}
                 for e in eu.read_metrics(sub, "eval")]
        outputs[m] = out
        results[m] = {
            "train_config": tc.to_dict(), "stop_reason": res.stop_reason, "steps": res.step,
            "train_seconds": res.train_seconds, "train_budget_seconds": left,
            "precompute_seconds": prep["precompute_seconds"], "embed_seconds": prep["embed_seconds"],
            "used_seconds": spent + res.train_seconds,
            "compile_seconds": res.compile_seconds + prep["compile_seconds"],
            "seconds_per_step": res.train_seconds / max(res.step, 1), "network_evals": nfe, **mm,
            "steps_per_call": res.steps_per_call, "curve": curve,
            "resumed_from": res.resumed_from,  # the checkpoint step a rerun took up, as denoise's results say
        }
        if "nearest" in last:
            results[m]["nearest_source"] = last["nearest"].tolist()
        if cfg.task == "denoise":
            results[m].update(last["input_stats"])
        logging.info("[%s] %d steps in %.1f s (+ %.1f s pre-computation): mean SSIM %.4f", m, res.step,
                     res.train_seconds, spent, mm["ssim"])
    out = {
        "experiment": "budget", "task": cfg.task, "budget_seconds": budget,
        "machine": eu.machine_info(),
        "compute_dtype": eu.compute_dtypes(tcs),
        "images": {"source": cfg.data.source, "shape": list(clean.shape), "files": denoise.clean_files(cfg.data)},
        "noise": ({"std": cfg.noise.std, "seed": cfg.noise.seed, "signal_scale": denoise.signal_scale(cfg),
                   "draws": denoise.noise_draws(cfg)} if cfg.task == "denoise" else None),
        "noisy": denoise.image_metrics(noisy, ref, in_range=False) if cfg.task == "denoise" else None,
        "ddpm_start": denoise.ddpm_start(cfg) if cfg.task == "denoise" else None,
        "ddpm_input": denoise.image_metrics(np.clip(ddpm_in, 0.0, 1.0), ref) if own_start else None,
        "budget_convention": (
            "the same wall-clock budget of work for both: ours = pre-computation + embedding + training run "
            "time, DDPM = training run time (optimiser steps; JIT compile and the evaluations excluded)"),
        "methods": results,
        "config": eu._plain(cfg),
    }
    _write(out, workdir, clean, noisy, outputs,
           ddpm_in=ddpm_in if own_start else None)
    return out


PREP_FILE = "budget_prep.json"  # in ours/: the first run's pre-computation and embedding seconds


def _first_prep(sub: str, prep: dict, write: bool = False) -> dict:
    """The pre-computation and embedding times that ours' budget is charged with: those of the
    first run in ``sub`` (``ours/``). A resumed run redoes the pre-computation (it is not stored)
    in another time; charging that one would move ours' training budget, and a finished ours could
    train on. ``write=True`` records ``prep``'s times if none are recorded yet."""
    from krylovjax import experiment_utils as eu

    path = os.path.join(sub, PREP_FILE)
    keys = ("precompute_seconds", "embed_seconds")
    if os.path.exists(path):
        with open(path) as f:
            first = json.load(f)
        return {**prep, **{k: float(first[k]) for k in keys}}
    if write:
        os.makedirs(sub, exist_ok=True)
        eu.write_json(path, {k: prep[k] for k in keys})
    return prep


def _write(out: dict, workdir: str, clean, noisy, outputs: dict, ddpm_in=None) -> None:
    import numpy as np

    from krylovjax import experiment_utils as eu

    gen = out["task"] == "generate"
    draws = (out.get("noise") or {}).get("draws", 1)
    B = out["images"]["shape"][0]
    rows = []
    for m, r in out["methods"].items():
        n = len(r["ssim_per_image"])
        per = r["ssim_per_source" if draws > 1 else "ssim_per_image"]
        rows.append([m, eu.format_seconds(out["budget_seconds"]),
                     eu.format_seconds(r["precompute_seconds"] + r["embed_seconds"], 2) if m == "ours" else "-",
                     eu.format_seconds(r["train_seconds"]), r["steps"], f"{r['ssim']:.4f}"]
                    + ([_fmt_se(r.get("ssim_se"))] if draws > 1 or gen else [])
                    + ([f"{r['nearest_own_source']} of {n}"] if draws > 1 else [])
                    + [_fmt_values(per), f"{r['psnr']:.2f}"]
                    + ([f"{r['sources_covered']} of {B}", ", ".join(map(str, r["samples_per_source"]))] if gen else []))
    what = "denoised noisy copies" if out["task"] == "denoise" else "generated samples"
    text = [f"# Fixed budget: {out['images']['shape'][0]} images {out['images']['shape'][2]}x"
            f"{out['images']['shape'][3]} ({out['images']['source']}), {what}\n\n",
            f"Budget: {out['budget_convention']}.\n\n"]
    if out["images"].get("files"):
        text.append("Images: " + ", ".join(f"{k} = {os.path.basename(f)}" for k, f in enumerate(out["images"]["files"]))
                    + ".\n\n")
    if draws > 1:
        text.append(f"Inputs: {draws} noisy copies of each image (noise seeds {out['noise']['seed']} to "
                    f"{out['noise']['seed'] + draws - 1}); the scores are means over all of them, with the standard "
                    "error of the mean (s.e.), and an output counts as its own image's when that image is the one "
                    "it is most similar to (SSIM).\n\n")
    if out["noisy"]:
        text.append(f"Noisy inputs: mean SSIM {out['noisy']['ssim']:.4f}.\n\n")
    if out.get("ddpm_input"):
        text.append("DDPM starts its whole chain from Paper B's recipe at its own prior's scale "
                    "(`ddpm.sampler.start = prior_mix`), not from the noisy inputs: mean SSIM "
                    f"{out['ddpm_input']['ssim']:.4f} (clipped to [0, 1]).\n\n")
    if gen:
        text.append("Each sample is scored against its own source if the model draws it for one (ours with "
                    "per-image time intervals), else against the source most similar to it (SSIM).\n\n")
    text.append(eu.markdown_table(["method", "budget", "pre-compute", "training", "steps", "mean SSIM"]
                                  + (["s.e."] if draws > 1 or gen else [])
                                  + (["own image nearest"] if draws > 1 else [])
                                  + [("SSIM per sample" if gen else "SSIM per image")
                                     + (f" (mean of {draws} copies)" if draws > 1 else ""), "mean PSNR (dB)"]
                                  + (["sources nearest to a sample", "samples nearest each source"] if gen else []),
                                  rows))
    curves = {m: r["curve"] for m, r in out["methods"].items() if len(r.get("curve", ())) > 1}
    if curves:
        text.append("\nQuality during training (the evaluations every `common.eval_every` updates; seconds of "
                    "the budget used, ours incl. pre-computation):\n\n")
        points = [c for cur in curves.values() for c in cur]
        se = all("ssim_se" in c for c in points)
        own = draws > 1 and all("nearest_own_source" in c for c in points)
        crow = [[m, c["step"], eu.format_seconds(c["seconds"]), f"{c['ssim']:.4f}"]
                + ([f"{c['ssim_se']:.4f}"] if se else [])
                + ([f"{c['nearest_own_source']} of {len(noisy)}"] if own else [])
                + [f"{c['psnr']:.2f}"] + ([c.get("sources_covered")] if gen else [])
                for m, cur in curves.items() for c in cur]
        text.append(eu.markdown_table(["method", "step", "budget used", "mean SSIM"]
                                      + (["s.e."] if se else []) + (["own image nearest"] if own else [])
                                      + ["mean PSNR (dB)"] + (["sources nearest to a sample"] if gen else []), crow))
    mi = out["machine"]
    text.append(f"\nMachine: {mi['processor']}, {mi['cpu_count']} CPUs, backend {mi['backend']}, jax {mi['jax']}, "
                f"x64 {mi['x64']}, {eu.compute_dtype_note(out.get('compute_dtype'))}, load average {mi['load_average']}; {mi['date']}.\n")
    eu.write_text(os.path.join(workdir, "results.md"), "".join(text))

    names = [m for m in ("ours", "ddpm") if m in outputs]
    label = {"ours": "ours", "ddpm": "DDPM"}
    if gen:  # the sources, then up to GRID_PANELS samples of each method
        k, total, unit = GRID_PANELS, max((len(outputs[m]) for m in names), default=0), "samples"
        rows_img, row_labels = [list(clean)], ["source"]
    else:  # whole draws, up to GRID_PANELS panels (at least one draw), each under its source
        k, total, unit = B * max(1, min(draws, GRID_PANELS // B)), B * draws, "inputs"
        rows_img, row_labels = [list(np.concatenate([clean] * (k // B))), list(noisy[:k])], ["source", "noisy"]
    if ddpm_in is not None:  # ddpm.sampler.start = "prior_mix": DDPM's own start
        rows_img.append(list(np.clip(ddpm_in[:k], 0.0, 1.0)))
        row_labels.append("DDPM's start")
    for m in names:
        rows_img.append(list(np.asarray(outputs[m])[:k]))
        row_labels.append(f"{label[m]}\nSSIM {out['methods'][m]['ssim']:.3f}")
    shown = f"; the first {k} of {total} {unit}" if k < total else ""
    eu.image_grid(os.path.join(workdir, "grid.png"), rows_img, row_labels=row_labels,
                  title=f"Same budget ({out['budget_seconds']:g} s): {what}{shown}")
    if curves:
        eu.plot_curves(os.path.join(workdir, "quality_curve.png"),
                       {label[m]: ([c["seconds"] for c in cur], [c["ssim"] for c in cur]) for m, cur in curves.items()},
                       xlabel="budget used (s; ours incl. pre-computation)", ylabel="mean SSIM",
                       title=f"Quality during training: {what}")
    # Last: results.json marks the run finished (a run killed while drawing redoes the figures).
    eu.write_json(os.path.join(workdir, "results.json"), out)


def _fmt_se(se) -> str:
    return "-" if se is None else f"{se:.4f}"


def _fmt_values(values, most: int = GRID_PANELS) -> str:
    """``values`` as a comma-separated list, or their range and median when there are more than
    ``most``."""
    import numpy as np

    if len(values) > most:
        v = np.asarray(values, np.float64)
        return f"{len(values)} values: min {v.min():.3f}, median {np.median(v):.3f}, max {v.max():.3f}"
    return ", ".join(f"{x:.3f}" for x in values)


def main(argv):
    from experiments import denoise
    from krylovjax import experiment_utils as eu

    eu.check_no_args(argv)
    eu.check_config_kind(FLAGS.config, "budget")
    eu.check_dir_arg(FLAGS.workdir, "workdir")
    if FLAGS.fresh:  # (as run does: the results printed at the end are the new run's)
        FLAGS.workdir = eu.fresh_path(FLAGS.workdir)
    eu.quiet_orbax_logs()
    eu.sigterm_as_interrupt()  # kill / timeout / schedulers: checkpoint like Ctrl-C, then exit non-zero
    with eu.exit_on_run_errors(out_of_memory=denoise.OUT_OF_MEMORY):
        run(FLAGS.config, FLAGS.workdir, overwrite=FLAGS.overwrite, fresh=FLAGS.fresh)
    eu.print_outputs(FLAGS.workdir, "results.md", RESULT_FILES)  # quality_curve.png only with eval_every > 0


if __name__ == "__main__":
    from krylovjax.experiment_utils import one_line_usage_errors, parse_flags

    app.run(one_line_usage_errors(main), flags_parser=parse_flags)
