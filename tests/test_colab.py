"""The Colab notebook ``experiments/colab.ipynb`` and its helpers ``experiments/notebook.py``.

Fast tests: the notebook file is valid nbformat with no stored outputs, its install cell is a
no-op where krylovjax imports (and otherwise pip-installs the repository), and every bad setting
(a platform the machine lacks, a device count that does not divide the images to shard, a
dataset that is not on disk) stops it at once with a message naming the setting to change: through
the helpers in-process, and through the executed notebook itself (headless, nbclient).

Slow test: the whole notebook executed headless on the CPU (4 devices) with the tiny config on a
``tfds.testing.mock_data`` CIFAR-10 (the cifar10 code path itself), then run again on the same work
directory (resumption). The SSIMs it reports are recomputed independently with scikit-image.
"""

from __future__ import annotations

import base64
import json
import math
import os
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "experiments", "colab.ipynb")
REPO_URL = "https://github.com/krylovjax/krylovjax"
ENV_VARS = ("KRYLOVJAX_NB_CONFIG", "KRYLOVJAX_NB_DATASET", "KRYLOVJAX_NB_NUM_IMAGES",
            "KRYLOVJAX_NB_DATA_DIR", "KRYLOVJAX_NB_DOWNLOAD", "KRYLOVJAX_NB_PLATFORM",
            "KRYLOVJAX_NB_DEVICES", "KRYLOVJAX_NB_WORKDIR")

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

nbformat = pytest.importorskip("nbformat")


def _read():
    return nbformat.read(NOTEBOOK, as_version=4)


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def _cell(nb, cell_id):
    return next(c for c in nb.cells if c.get("id") == cell_id)


# ----------------------------------------------------------------------------------------------
# The notebook file
# ----------------------------------------------------------------------------------------------


def test_notebook_is_valid_and_has_no_stored_outputs():
    nb = _read()
    nbformat.validate(nb)  # raises on invalid JSON structure
    assert nb.nbformat == 4 and nb.metadata.kernelspec.name == "python3"
    cells = _code_cells(nb)
    assert len(cells) >= 6
    for c in cells:
        assert c.outputs == [], f"cell {c.id} has stored outputs"
        assert c.execution_count is None, f"cell {c.id} has an execution count"
    # Every setting is read from the environment in the first code cell.
    first = cells[0].source
    for var in ENV_VARS:
        assert f'os.environ.get("{var}"' in first, var
    # The first code cell only reads settings: it imports nothing but os (JAX starts later).
    imports = [ln.strip() for ln in first.splitlines() if ln.strip().startswith(("import ", "from "))]
    assert imports == ["import os"]


def _run_cells(sources, cwd, run_mock):
    """Execute notebook cell sources in a fresh namespace with ``subprocess.run`` mocked."""
    import subprocess
    from unittest import mock

    ns: dict = {}
    old_cwd, old_path = os.getcwd(), list(sys.path)
    try:
        os.chdir(cwd)
        with mock.patch.object(subprocess, "run", side_effect=run_mock) as run:
            for src in sources:
                exec(compile(src, "<cell>", "exec"), ns)  # noqa: S102 - the notebook's own cells
    finally:
        os.chdir(old_cwd)
        sys.path[:] = old_path
    return ns, run


def test_install_cell_is_a_no_op_where_krylovjax_imports():
    nb = _read()
    src = [_cell(nb, "settings").source, _cell(nb, "install").source]

    def no_subprocess(*a, **k):
        raise AssertionError(f"the install cell ran a command: {a}")

    ns, run = _run_cells(src, ROOT, no_subprocess)
    assert run.call_count == 0
    import experiments.notebook as helpers

    assert ns["nb"] is helpers and ns["root"] == ROOT


def test_install_cell_pip_installs_the_repository_when_krylovjax_is_missing(tmp_path, monkeypatch):
    """Outside a checkout, with ``import krylovjax`` failing: one pip install of the repository,
    then one shallow clone for the experiment helpers (commands recorded, not run)."""
    nb = _read()
    src = [_cell(nb, "settings").source, _cell(nb, "install").source]
    import krylovjax

    calls = []

    def record(cmd, **kw):
        calls.append(list(cmd))
        if cmd[1:3] == ["-m", "pip"]:  # the "installation" makes krylovjax importable again
            sys.modules["krylovjax"] = krylovjax
        return None

    monkeypatch.setitem(sys.modules, "krylovjax", None)  # import krylovjax -> ImportError
    _run_cells(src, str(tmp_path), record)
    assert calls[0] == [sys.executable, "-m", "pip", "install", "-q", f"git+{REPO_URL}"]
    assert calls[1] == ["git", "clone", "-q", "--depth=1", REPO_URL, str(tmp_path / "krylovjax_src")]
    assert len(calls) == 2


# ----------------------------------------------------------------------------------------------
# Bad input through the helpers
# ----------------------------------------------------------------------------------------------


@pytest.fixture()
def helpers():
    import jax

    jax.devices()  # backends started: select_platform must not touch the global configuration
    from experiments import notebook

    return notebook


def test_select_platform_reports_what_is_there_and_refuses_what_is_not(helpers):
    import jax

    info = helpers.select_platform("auto")
    assert info.platform == jax.default_backend() == "cpu"
    assert info.num_devices == len(jax.local_devices()) == 4
    assert "CPU" in info.summary() and "4 device" in info.summary()
    assert helpers.select_platform("CPU", "all") == info
    assert helpers.select_platform("cpu", "4") == info
    with pytest.raises(ValueError, match=r"KRYLOVJAX_NB_PLATFORM=tpu: this runtime has no TPU.*cpu \(4 devices\)"
                                         r".*KRYLOVJAX_NB_PLATFORM=auto"):
        helpers.select_platform("tpu")
    with pytest.raises(ValueError, match=r"KRYLOVJAX_NB_PLATFORM: expected one of .*'quantum'"):
        helpers.select_platform("quantum")
    with pytest.raises(ValueError, match=r"KRYLOVJAX_NB_DEVICES=3: JAX runs on 4 cpu device.*restart"):
        helpers.select_platform("cpu", "3")
    for bad in ("0", "-2", "two"):
        with pytest.raises(ValueError, match="KRYLOVJAX_NB_DEVICES: expected an integer >= 1"):
            helpers.select_platform("auto", bad)
    assert jax.default_backend() == "cpu" and len(jax.devices()) == 4  # nothing changed


def test_check_sharding_needs_devices_that_divide_every_chunk_and_batch(helpers):
    cfg = helpers.get_config("tiny")
    assert (cfg.num_images, cfg.chunk_images, cfg.train.batch_size) == (4, 4, 4)
    for d in (1, 2, 4):
        helpers.check_sharding(cfg, d)
    # 3 devices divide neither the 4 images nor the training batch of 4: the advice works for every
    # batch at once (a walkthrough was sent from one refusal to the next, 2026-12-07), and each
    # piece of it, taken at its word, passes.
    def advice(cfg, d, platform=None):
        with pytest.raises(ValueError) as err:
            helpers.check_sharding(cfg, d, platform=platform)
        return str(err.value)

    msg = advice(cfg, 3)
    assert msg.endswith("the 3 devices do not divide the batch of 4 images to shard (num_images=4 in chunks of "
                        "chunk_images=4) nor the training batch of 4 (train.batch_size); set KRYLOVJAX_NB_DEVICES=2 "
                        "or add cfg.train.batch_size = 6 below cfg = nb.get_config(...) with "
                        "KRYLOVJAX_NB_NUM_IMAGES=3"), msg
    helpers.check_sharding(cfg, 2)
    taken = helpers.get_config("tiny", num_images="3")
    taken.train.batch_size = 6
    helpers.check_sharding(taken, 3)
    # on a TPU the device count is not a setting: only the config's numbers are offered
    assert advice(cfg, 3, "tpu").endswith("; add cfg.train.batch_size = 6 below cfg = nb.get_config(...) with "
                                          "KRYLOVJAX_NB_NUM_IMAGES=3")
    # 6 images in chunks of 4: the last chunk holds 2, which 4 devices do not divide.
    cfg6 = helpers.get_config("tiny", num_images="6")
    helpers.check_sharding(cfg6, 2)
    assert advice(cfg6, 4).endswith("the 4 devices do not divide the batch of 2 images to shard (num_images=6 in "
                                    "chunks of chunk_images=4); set KRYLOVJAX_NB_DEVICES=2 or set KRYLOVJAX_NB_NUM_IMAGES=8")
    helpers.check_sharding(helpers.get_config("tiny", num_images="8"), 4)
    full = helpers.get_config("full", num_images="63")  # chunks of 64: 63 at once
    assert advice(full, 4).endswith("; set KRYLOVJAX_NB_DEVICES=1 or set KRYLOVJAX_NB_NUM_IMAGES=64")
    full100 = helpers.get_config("full", num_images="100")  # chunks of 64 and 36
    helpers.check_sharding(full100, 4)
    assert advice(full100, 8).endswith("; set KRYLOVJAX_NB_DEVICES=4 or set KRYLOVJAX_NB_NUM_IMAGES=104")
    helpers.check_sharding(helpers.get_config("full", num_images="104"), 8)
    # 96 images for 3 devices: the batch of 64 and the chunks of 64 and 32 all need changing
    full96 = helpers.get_config("full", num_images="96")
    assert advice(full96, 3).endswith("; set KRYLOVJAX_NB_DEVICES=2 or add cfg.train.batch_size = 66 and "
                                      "cfg.chunk_images = 66 below cfg = nb.get_config(...)")
    full96.train.batch_size, full96.chunk_images = 66, 66
    helpers.check_sharding(full96, 3)
    cfg.train.batch_size = 6
    assert advice(cfg, 4).endswith("the 4 devices do not divide the training batch of 6 (train.batch_size); set "
                                   "KRYLOVJAX_NB_DEVICES=2 or add cfg.train.batch_size = 8 below cfg = nb.get_config(...)")
    with pytest.raises(ValueError, match="num_devices"):
        helpers.check_sharding(cfg, 0)


def test_get_config_overrides_and_bad_settings(helpers):
    full = helpers.get_config()
    assert full.dataset == "cifar10" and full.precompute.shard is True
    assert full.precompute.strategy == "cross_matrix_precond"
    cfg = helpers.get_config(" Tiny ", dataset="cifar10", num_images="2", data_dir="~/tfds")
    assert (cfg.dataset, cfg.num_images, cfg.denoise.num_images) == ("cifar10", 2, 2)
    assert cfg.data_dir == os.path.expanduser("~/tfds")
    with pytest.raises(ValueError, match=r"KRYLOVJAX_NB_CONFIG: expected one of \('full', 'tiny'\), got 'big'"):
        helpers.get_config("big")
    with pytest.raises(ValueError, match=r"KRYLOVJAX_NB_DATASET: expected one of \('builtin', 'cifar10'\), "
                                         r"'files:<path>' or 'array:<path>'"):
        helpers.get_config("tiny", dataset="mnist")
    for bad in ("0", "x", "-1"):
        with pytest.raises(ValueError, match="KRYLOVJAX_NB_NUM_IMAGES: expected an integer >= 1"):
            helpers.get_config("tiny", num_images=bad)
    assert helpers.get_config("tiny").train.model_overrides.dtype == "float32"
    bf16 = helpers.get_config("tiny", dtype=" BFloat16 ")  # KRYLOVJAX_NB_DTYPE
    assert bf16.train.model_overrides.dtype == "bfloat16"
    assert dict(helpers.train_config(bf16).model_overrides)["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match=r"KRYLOVJAX_NB_DTYPE: expected one of \('float32', 'bfloat16'\)"):
        helpers.get_config("tiny", dtype="float16")
    tc = helpers.train_config(cfg)
    assert tc.method == "ours" and tc.sde == cfg.precompute.sde
    assert dict(tc.sde_kwargs) == {"g": 0.5, "std": None}


@pytest.fixture()
def no_download(monkeypatch):
    """Any tfds download fails the test (it would hang here: no network)."""
    tfds = pytest.importorskip("tensorflow_datasets")

    def fail(*a, **k):
        raise AssertionError("a tfds download was attempted")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail)
    return tfds


def test_unprepared_cifar10_fails_at_once_without_downloading(helpers, no_download, tmp_path):
    cfg = helpers.get_config("tiny", dataset="cifar10", data_dir=str(tmp_path))
    assert "no download" in helpers.prepare_dataset(cfg, "auto")  # not in Colab: never downloads
    assert "no download" in helpers.prepare_dataset(cfg, "no")
    start = time.perf_counter()
    with pytest.raises(ValueError) as err:
        helpers.load_images(cfg)
    assert time.perf_counter() - start < 30
    msg = str(err.value)
    assert "KRYLOVJAX_NB_DATASET=cifar10: the dataset is not on disk" in msg
    assert "tfds build cifar10" in msg and "KRYLOVJAX_NB_DATA_DIR" in msg
    assert "KRYLOVJAX_NB_DATASET=builtin" in msg and "KRYLOVJAX_NB_DOWNLOAD=yes" in msg
    assert not (tmp_path / "cifar10").exists()  # nothing was prepared there
    with pytest.raises(ValueError, match=r"KRYLOVJAX_NB_DOWNLOAD: expected one of \('auto', 'yes', 'no'\)"):
        helpers.prepare_dataset(cfg, "maybe")
    builtin = helpers.get_config("tiny")
    assert "nothing to prepare" in helpers.prepare_dataset(builtin, "yes")


def test_builtin_images_and_workdir_claim(helpers, tmp_path):
    from krylovjax.data import builtin_dataset

    cfg = helpers.get_config("tiny")
    images = helpers.load_images(cfg)
    np.testing.assert_array_equal(images, builtin_dataset(16, 4, seed=cfg.data_seed))
    assert images.dtype == np.float32
    wd = str(tmp_path / "run")
    assert helpers.claim_workdir(wd, cfg) is True
    assert helpers.claim_workdir(wd, cfg) is False  # the same config resumes
    other = helpers.get_config("tiny", dataset="cifar10")
    with pytest.raises(ValueError, match="dataset"):
        helpers.claim_workdir(wd, other)
    with pytest.raises(ValueError, match="KRYLOVJAX_NB_WORKDIR"):
        helpers.claim_workdir("  ", cfg)
    # a directory claimed before the configs had model_overrides.dtype resumes (a review: it was
    # refused, "differs at: train.model_overrides.dtype"); a bfloat16 run is another run
    old = helpers.get_config("tiny")
    del old.train.model_overrides["dtype"]
    wd_old = str(tmp_path / "old")
    assert helpers.claim_workdir(wd_old, old) is True
    assert helpers.claim_workdir(wd_old, cfg) is False
    with pytest.raises(ValueError, match=r"model_overrides\.dtype"):
        helpers.claim_workdir(wd_old, helpers.get_config("tiny", dtype="bfloat16"))


def test_workdir_claim_in_the_notebooks_words_and_a_longer_training(helpers, tmp_path):
    """A refusal names the notebook's setting (not the binaries' --workdir), and the training's
    run-control keys may change on resume: a larger budget trains the same run on (a walkthrough
    found any change refused, 2026-12-07). The claim keeps its first values."""
    import json

    cfg = helpers.get_config("tiny")
    wd = tmp_path / "run"
    assert helpers.claim_workdir(str(wd), cfg) is True
    longer = helpers.get_config("tiny")
    longer.train.budget_seconds = 2 * (cfg.train.budget_seconds or 60.0)
    longer.train.num_steps = cfg.train.num_steps + 10
    longer.train.eval_every = cfg.train.eval_every + 1
    assert helpers.claim_workdir(str(wd), longer) is False
    assert json.loads((wd / "experiment.json").read_text())["config"]["train"]["num_steps"] == cfg.train.num_steps
    other = helpers.get_config("tiny")
    other.train.lr = cfg.train.lr * 2  # the model's training itself: another run
    with pytest.raises(ValueError) as err:
        helpers.claim_workdir(str(wd), other)
    msg = str(err.value)
    assert msg.startswith(f"KRYLOVJAX_NB_WORKDIR: {str(wd)!r} holds another run's config (differs at: train.lr)")
    assert "set KRYLOVJAX_NB_WORKDIR to another directory" in msg and "--workdir" not in msg
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match=r"^KRYLOVJAX_NB_WORKDIR: .* set KRYLOVJAX_NB_WORKDIR to an empty or new "
                                         r"directory$"):
        helpers.claim_workdir(str(tmp_path / "full"), cfg)


def test_workdir_note_only_in_colab_and_off_drive(helpers, monkeypatch):
    monkeypatch.setattr(helpers, "in_colab", lambda: False)
    assert helpers.workdir_note("krylovjax_colab") == ""
    monkeypatch.setattr(helpers, "in_colab", lambda: True)
    note = helpers.workdir_note("/content/krylovjax_colab")
    assert "deleted when the runtime is recycled" in note and "drive.mount('/content/drive')" in note
    assert "KRYLOVJAX_NB_WORKDIR=/content/drive/MyDrive/krylovjax_colab" in note
    assert helpers.workdir_note("/content/drive/MyDrive/krylovjax_colab") == ""


def test_a_download_missing_a_module_names_it(helpers, monkeypatch, tmp_path):
    """tfds's download_and_prepare imports importlib_resources, which tfds does not require on
    Python >= 3.9: the walkthrough's ModuleNotFoundError traceback is now one message."""
    tfds = pytest.importorskip("tensorflow_datasets")

    def missing(*a, **k):
        raise ModuleNotFoundError("No module named 'importlib_resources'", name="importlib_resources")

    monkeypatch.setattr(tfds, "data_source", missing)
    cfg = helpers.get_config("tiny", dataset="cifar10", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"^KRYLOVJAX_NB_DOWNLOAD=yes: preparing cifar10 needs the module "
                                         r"'importlib_resources', which is not installed: pip install "
                                         r"importlib_resources"):
        helpers.prepare_dataset(cfg, "yes")


def test_your_own_images_in_the_notebook(helpers, tmp_path):
    """``KRYLOVJAX_NB_DATASET=files:<folder>`` (e.g. photos uploaded to Colab): the path keeps its
    case, the full config's tfds class filter is dropped, nothing is downloaded, and the images
    are the folder's at the config's size."""
    from PIL import Image

    from krylovjax.data import load_files

    folder = tmp_path / "My Photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray((rng.random((20, 24, 3)) * 255).astype(np.uint8)).save(folder / f"p{i}.jpg")
    cfg = helpers.get_config("full", dataset=f" FILES:{folder} ", num_images="4")
    assert (cfg.dataset, cfg.class_filter, cfg.num_images) == (f"files:{folder}", "", 4)
    assert helpers.prepare_dataset(cfg, "yes") == f"your own images (files:{folder}): nothing to prepare"
    images = helpers.load_images(cfg)
    np.testing.assert_array_equal(images, load_files(str(folder), size=32))
    with pytest.raises(ValueError, match=r"KRYLOVJAX_NB_DATASET: 'array:' names no path"):
        helpers.get_config("tiny", dataset="array:")


# ----------------------------------------------------------------------------------------------
# Executing the notebook (nbclient)
# ----------------------------------------------------------------------------------------------

MOCK_CIFAR10 = """\
import tensorflow_datasets as tfds
from unittest import mock
_mock_data = tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE)
_mock_data.__enter__()
_prepared = mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=True)
_prepared.__enter__();"""


def _execute(monkeypatch, env: dict, *, mock_cifar10: bool = False, timeout: int = 600):
    """Run the notebook headless in a fresh kernel (cwd: the repository). Returns (nb, error)."""
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    monkeypatch.setenv("KRYLOVJAX_NB_DOWNLOAD", "no")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    nb = _read()
    if mock_cifar10:  # a cell before the notebook's own: CIFAR-10 served by tfds's mock data
        nb.cells.insert(0, nbformat.v4.new_code_cell(MOCK_CIFAR10, id="test-mock-cifar10"))
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": ROOT}})
    try:
        client.execute()
    except CellExecutionError as err:
        return nb, err
    return nb, None


def _executed_ids(nb):
    return [c.id for c in _code_cells(nb) if c.execution_count is not None]


@pytest.mark.parametrize("env, cell, expected", [
    ({"KRYLOVJAX_NB_PLATFORM": "tpu"}, "platform",
     [r"KRYLOVJAX_NB_PLATFORM=tpu: this runtime has no TPU", r"KRYLOVJAX_NB_PLATFORM=auto"]),
    ({"KRYLOVJAX_NB_DEVICES": "3"}, "platform",
     [r"the 3 devices do not divide the batch of 4 images to shard", "KRYLOVJAX_NB_NUM_IMAGES"]),
    ({"KRYLOVJAX_NB_DATASET": "cifar10"}, "data",
     [r"KRYLOVJAX_NB_DATASET=cifar10: the dataset is not on disk", "tfds build cifar10",
      "KRYLOVJAX_NB_DATASET=builtin"]),
], ids=["platform", "devices", "dataset"])
def test_notebook_stops_at_once_on_bad_settings(monkeypatch, tmp_path, env, cell, expected):
    wd = tmp_path / "wd"
    env = dict(env, KRYLOVJAX_NB_CONFIG="tiny", KRYLOVJAX_NB_WORKDIR=str(wd),
               KRYLOVJAX_NB_DATA_DIR=str(tmp_path / "tfds"))
    start = time.perf_counter()
    nb, err = _execute(monkeypatch, env, timeout=120)
    assert err is not None, "the notebook ran through despite a bad setting"
    assert time.perf_counter() - start < 120
    assert "ValueError" in str(err)
    for pat in expected:
        assert pat in str(err), (pat, str(err)[-2000:])
    ran = _executed_ids(nb)
    assert ran[-1] == cell  # it stopped in the checking cell ...
    assert "precompute" not in ran and not wd.exists()  # ... before any work was done


@pytest.mark.slow
def test_notebook_runs_headless_on_mock_cifar10_and_resumes(monkeypatch, tmp_path):
    wd = tmp_path / "colab"
    env = {"KRYLOVJAX_NB_CONFIG": "tiny", "KRYLOVJAX_NB_DATASET": "cifar10", "KRYLOVJAX_NB_WORKDIR": str(wd)}
    start = time.perf_counter()
    nb, err = _execute(monkeypatch, env, mock_cifar10=True)
    first_seconds = time.perf_counter() - start
    assert err is None, str(err)[-3000:]
    assert first_seconds < 240

    cells = _code_cells(nb)
    assert all(c.execution_count is not None for c in cells)
    assert not [o for c in cells for o in c.outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for c in cells for o in c.outputs if o.output_type == "stream")
    assert "platform CPU: 4 device(s)" in text
    assert "4 cifar10 images of 16x16, chunks of 4 images sharded over 4 cpu device(s)" in text
    assert "trained 6 steps" in text and "| ours (step 6) |" in text
    pngs = [base64.b64decode(o.data["image/png"]) for c in cells for o in c.outputs
            if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(pngs) == 4 and all(p.startswith(b"\x89PNG\r\n\x1a\n") and len(p) > 2000 for p in pngs)

    for f in ("results.json", "denoised.npz", "embedding.png", "denoised.png", "trajectory.png",
              "ssim_curve.png", "experiment.json", "precompute/store", "train/metrics.jsonl"):
        assert (wd / f).exists(), f
    with open(wd / "results.json") as f:
        res = json.load(f)
    assert res["platform"]["platform"] == "cpu" and res["platform"]["num_devices"] == 4
    assert res["dataset"] == {"name": "cifar10", "num_images": 4, "image_size": 16}
    assert res["precompute"]["config"]["shard"] is True
    assert res["precompute"]["config"]["strategy"] == "cross_matrix_precond"
    store = res["precompute"]["store"]
    assert store["images"] == 4 and store["nonconverged"] == 0 and store["systems_solved"] > 0
    assert res["train"]["steps"] == 6 and res["train"]["stop_reason"] == "num_steps"

    # The SSIMs: finite, in range, and equal to scikit-image's on the saved images.
    from skimage.metrics import structural_similarity

    arrays = np.load(wd / "denoised.npz")
    clean, noisy, den = arrays["clean"], arrays["noisy"], arrays["denoised"]
    assert clean.shape == noisy.shape == den.shape == (4, 3, 16, 16)
    assert arrays["frames"].shape == (3, 4, 3, 16, 16)
    for key, imgs in (("noisy", noisy), ("denoised", den)):
        per = res[key]["ssim_per_image"]
        assert len(per) == 4 and all(math.isfinite(s) and -1 <= s <= 1 for s in per)
        ref = [structural_similarity(imgs[i].astype(np.float64), clean[i].astype(np.float64), data_range=1.0,
                                     gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                     channel_axis=0) for i in range(4)]
        np.testing.assert_allclose(per, ref, atol=1e-4)
        assert res[key]["ssim"] == pytest.approx(np.mean(ref), abs=1e-4)
    # Paper A's noisy input clamp(x + 0.506 z, 0, 1), z from numpy's default_rng(0).
    z = np.random.default_rng(0).standard_normal(clean.shape)
    np.testing.assert_allclose(noisy, np.clip(clean.astype(np.float64) + 0.506 * z, 0, 1), atol=1e-6)
    # The store's embedded trajectories start at the images the notebook denoised (x^0 = image).
    from krylovjax import training

    traj = training.trajectories_from_store(str(wd / "precompute" / "store"))
    np.testing.assert_allclose(traj.x[:, 0], clean, atol=1e-6)

    # Running it again on the same work directory resumes: nothing is recomputed or retrained.
    nb2, err2 = _execute(monkeypatch, env, mock_cifar10=True)
    assert err2 is None, str(err2)[-3000:]
    text2 = "".join(o.get("text", "") for c in _code_cells(nb2) for o in c.outputs if o.output_type == "stream")
    assert "resuming the run of this config" in text2 and "| computed now / already done | 0 / 4 |" in text2
    # it says the run had finished (the walkthrough's "trained 6 steps in 0.2 s ... last logged
    # loss -" did not), without orbax's six read-only-manager warnings
    assert "already stood at step 6" in text2 and "nothing trained now" in text2, text2[-3000:]
    assert "read only" not in text2 and "read_only" not in text2, text2[-3000:]
    with open(wd / "results.json") as f:
        res2 = json.load(f)
    assert res2["train"]["resumed_from"] == 6 and res2["train"]["steps"] == 6
    assert res2["denoised"]["ssim_per_image"] == pytest.approx(res["denoised"]["ssim_per_image"], abs=1e-6)
