"""Tests for krylovjax.data: built-in photos, tfds pipelines (mocked, no TF), validation."""
import os
import re
import subprocess
import sys
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data as skd

from krylovjax import data as D


# ----------------------------------------------------------------------------- builtin


def _block_mean(img, out):
    H, W, C = img.shape
    return img.reshape(out, H // out, out, W // out, C).mean(axis=(1, 3)).transpose(2, 0, 1)


def test_builtin_image_is_the_real_photo():
    x = D.builtin_image("astronaut", 32)
    assert x.shape == (3, 32, 32) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.1
    ref = _block_mean(skd.astronaut() / 255.0, 32)  # independent downsampling
    assert np.abs(x - ref).mean() < 0.05
    assert np.abs(x - ref.transpose(0, 2, 1)).mean() > 0.15  # orientation matters
    # Non-square photo: the centred square crop is used (coffee is 400 x 600).
    c = D.builtin_image("coffee", 40)
    ref_c = _block_mean(skd.coffee()[:, 100:500] / 255.0, 40)
    assert np.abs(c - ref_c).mean() < 0.05
    assert np.abs(c - _block_mean(skd.coffee()[:, :400] / 255.0, 40)).mean() > 0.05


def test_builtin_image_deterministic_copy_and_channels():
    a = D.builtin_image("cat", 16)
    b = D.builtin_image("chelsea", 16)
    np.testing.assert_array_equal(a, b)
    a[:] = 0.0  # returned arrays are copies: the cache is not affected
    assert D.builtin_image("chelsea", 16).std() > 0.05
    gray = D.builtin_image("camera", 16)
    assert gray.shape == (1, 16, 16)
    g3 = D.builtin_image("camera", 16, channels=3)
    np.testing.assert_array_equal(g3, np.repeat(gray, 3, axis=0))
    lum = D.builtin_image("astronaut", 16, channels=1)
    rgb = D.builtin_image("astronaut", 16)
    np.testing.assert_allclose(lum[0], np.tensordot([0.2125, 0.7154, 0.0721], rgb, axes=1), atol=2e-6)
    rect = D.builtin_image("motorcycle", (24, 40))
    assert rect.shape == (3, 24, 40) and rect.std() > 0.05
    assert set(D.builtin_names(rgb_only=True)) >= {"astronaut", "coffee", "chelsea", "rocket", "motorcycle", "immunohistochemistry"}


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(name="lena", size=32), "name must be one of"),
        (dict(name="astronaut", size=3), "size must be >= 4"),
        (dict(name="astronaut", size=(32,)), "size must be an int"),
        (dict(name="astronaut", size=32, channels=2), "channels"),
    ],
)
def test_builtin_image_bad_input(kw, match):
    with pytest.raises(ValueError, match=match):
        D.builtin_image(**kw)


def test_builtin_dataset_deterministic_crops():
    n_photos = len(D.builtin_names(rgb_only=True))
    x = D.builtin_dataset(16, n_photos + 6, seed=3)
    assert x.shape == (n_photos + 6, 3, 16, 16) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    for i, name in enumerate(D.builtin_names(rgb_only=True)):
        np.testing.assert_array_equal(x[i], D.builtin_image(name, 16, channels=3))
    crops = x[n_photos:]
    assert crops.reshape(6, -1).std(axis=1).min() >= 0.03
    # Crops are not the whole photos and not copies of each other.
    dists = np.abs(crops[:, None] - crops[None]).mean(axis=(2, 3, 4)) + np.eye(6)
    assert dists.min() > 1e-3
    np.testing.assert_array_equal(x, D.builtin_dataset(16, n_photos + 6, seed=3))
    with pytest.raises(ValueError, match=r"min_std must be in \[0, 0.5\]"):
        D.builtin_dataset(16, n_photos + 1, min_std=2.0)  # no crop of [0, 1] data has a std of 2
    with pytest.raises(ValueError, match="min_std must be"):
        D.builtin_dataset(16, n_photos + 1, min_std=float("nan"))
    np.testing.assert_array_equal(x[: n_photos + 2], D.builtin_dataset(16, n_photos + 2, seed=3))  # prefix-stable
    other = D.builtin_dataset(16, n_photos + 6, seed=4)
    assert np.abs(other[n_photos:] - crops).mean() > 1e-2
    assert D.builtin_dataset(16, 2, crops=False).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="crops=False"):
        D.builtin_dataset(16, n_photos + 1, crops=False)
    with pytest.raises(ValueError, match="num_images"):
        D.builtin_dataset(16, 0)


def test_builtin_dataset_gives_up_after_100_flat_crops(monkeypatch):
    n_photos = len(D.builtin_names(rgb_only=True))
    calls = []

    def flat(img, hw):  # every crop comes out flat: std 0
        calls.append(hw)
        return np.full(tuple(hw) + img.shape[2:], 0.5, np.float32)

    monkeypatch.setattr(D, "_resize", flat)
    monkeypatch.setattr(D, "_photo", lambda name: np.zeros((40, 50, 3), np.float32))
    monkeypatch.setattr(D, "builtin_image", lambda name, size, channels: np.zeros((channels, *size)))
    with pytest.raises(ValueError, match=f"min_std: none of 100 crops drawn for image {n_photos} has a std >= 0.03"):
        D.builtin_dataset(8, n_photos + 1)
    assert len(calls) == 100


# ----------------------------------------------------------------------------- tfds


@pytest.fixture
def mocked_tfds():
    """tfds.testing.mock_data with the code policy (no metadata files, no TF).

    USE_CODE builds random examples from the dataset's feature spec and serves
    them through the array_record data-source path, which needs no TensorFlow.
    The mocked builders still report ``is_prepared() == False`` (their data dir
    is fake), so the test also patches ``is_prepared`` -- otherwise our
    fail-fast check would (correctly) refuse them.
    """
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE), mock.patch.object(
        tfds.core.DatasetBuilder, "is_prepared", return_value=True
    ):
        yield tfds


def _raw(tfds, name, split="train"):
    ds = tfds.data_source(name, split=split, download=False)
    return [ds[i] for i in range(len(ds))]


def test_cifar10_class_filter_and_indices(mocked_tfds):
    raw = _raw(mocked_tfds, "cifar10")
    dogs = [r for r in raw if int(r["label"]) == 5]
    assert len(dogs) >= 2
    x = D.load_tfds("cifar10", "train", class_filter="dog")
    assert x.shape == (len(dogs), 3, 32, 32) and x.dtype == np.float32
    np.testing.assert_allclose(x, np.stack([r["image"].transpose(2, 0, 1) / 255.0 for r in dogs]), atol=1e-7)
    np.testing.assert_array_equal(D.load_tfds("cifar10", "train", class_filter=5), x)
    np.testing.assert_array_equal(D.load_tfds("cifar10", "train", class_filter="dog", num_images=2), x[:2])
    np.testing.assert_array_equal(D.load_tfds("cifar10", "train", class_filter=[5], indices=[1, 0]), x[[1, 0]])
    both = D.load_tfds("cifar10", "train", class_filter=["dog", 3])
    assert both.shape[0] == sum(int(r["label"]) in (3, 5) for r in raw)
    y = D.load_tfds("cifar10", "test", indices=[3, 7])
    raw_test = _raw(mocked_tfds, "cifar10", "test")
    np.testing.assert_allclose(y[1], raw_test[7]["image"].transpose(2, 0, 1) / 255.0, atol=1e-7)
    assert "tensorflow" not in sys.modules


def test_cifar10_resize(mocked_tfds):
    raw = _raw(mocked_tfds, "cifar10")
    x = D.load_tfds("cifar10", "train", size=16, num_images=3)
    assert x.shape == (3, 3, 16, 16)
    up = D.load_tfds("cifar10", "train", size=64, num_images=1)
    # Upsampling by 2 with bilinear interpolation keeps the image mean and range.
    img = raw[0]["image"].transpose(2, 0, 1) / 255.0
    np.testing.assert_allclose(up[0].mean(axis=(1, 2)), img.mean(axis=(1, 2)), atol=0.02)
    # Downsampling with antialiasing: noise-like mock images lose most of their variance.
    assert x[0].std() < 0.6 * img.std()


def test_celeb_a_centre_crop_and_attribute_filter(mocked_tfds):
    raw = _raw(mocked_tfds, "celeb_a", "test")
    x = D.load_tfds("celeb_a", "test", size=140, num_images=2)
    # 218 x 178 -> centred 140 x 140 crop at rows 39:179, cols 19:159 (no resize at 140).
    ref = np.stack([r["image"][39:179, 19:159].transpose(2, 0, 1) / 255.0 for r in raw[:2]])
    np.testing.assert_allclose(x, ref, atol=1e-7)
    x64 = D.load_tfds("celeb_a", "test", num_images=2)
    assert x64.shape == (2, 3, 64, 64)
    x128 = D.load_tfds("celeb_a", "test", size=128, num_images=1)
    assert x128.shape == (1, 3, 128, 128)
    smiling = [r for r in raw if bool(r["attributes"]["Smiling"])]
    s = D.load_tfds("celeb_a", "test", size=140, class_filter="Smiling")
    assert s.shape[0] == len(smiling)
    np.testing.assert_allclose(s[0], smiling[0]["image"][39:179, 19:159].transpose(2, 0, 1) / 255.0, atol=1e-7)


@pytest.mark.parametrize("name", ["cifar10", "celeb_a"])
def test_unprepared_dataset_fails_fast(tmp_path, name):
    start = time.perf_counter()
    with pytest.raises(D.DatasetNotPreparedError) as info:
        D.load_tfds(name, "train", data_dir=str(tmp_path))
    assert time.perf_counter() - start < 5.0
    msg = str(info.value)
    assert f"tfds build {name}" in msg and f"--data_dir={tmp_path}" in msg and "array_record" in msg
    assert isinstance(info.value, FileNotFoundError)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing was downloaded or written
    # the data directory itself, not the builder's versioned folder inside it, and how to install
    # what `tfds build` needs and where each entry point takes the directory (a walkthrough,
    # 2026-12-07, found `tfds build` failing without TensorFlow and a --data_dir flag that no
    # binary has)
    assert f"not prepared in the data directory {str(tmp_path)!r} (looked for '{tmp_path / name}{os.sep}" in msg
    assert "pip install tensorflow importlib_resources" in msg and "the experiment binaries' --data_dir flag" not in msg
    assert "--config.data.kwargs.data_dir" in msg and "--config.data_dir" in msg and "TFDS_DATA_DIR" in msg


def test_tfds_data_dir_expands_the_home_and_takes_empty_for_the_default(tmp_path, monkeypatch):
    """tfds would take "~/x" as a folder named "~" in the working directory; the configs' "" is
    tfds's default directory, as None."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(D.DatasetNotPreparedError, match=f"data directory {re.escape(repr(str(tmp_path / 'home' / 'tfds')))}"):
        D.load_tfds("cifar10", data_dir="~/tfds")
    msgs = []
    for default in ("", None):
        with pytest.raises(D.DatasetNotPreparedError) as err:
            D.load_tfds("cifar10", data_dir=default)
        msgs.append(str(err.value))
    assert msgs[0] == msgs[1] and "data directory '/'" not in msgs[0] and "data directory ''" not in msgs[0]
    assert not (tmp_path / "~").exists()
    with pytest.raises(ValueError, match=r"^data_dir: expected a directory path \(or None for tfds's default\), got 3"):
        D.load_tfds("cifar10", data_dir=3)


@pytest.mark.parametrize(
    "args,kw,match",
    [
        (("mnist",), {}, "name must be one of"),
        (("cifar10", "validation"), {}, "split must name one of"),
        (("celeb_a", "dev"), {}, "split must name one of"),
        (("cifar10", ""), {}, "split must be a non-empty"),
        (("cifar10",), dict(indices=[0], num_images=1), "mutually exclusive"),
        (("cifar10",), dict(num_images=0), "num_images"),
        (("cifar10",), dict(indices=[-1]), "indices"),
        (("cifar10",), dict(size=2), "size"),
    ],
)
def test_load_tfds_bad_arguments(args, kw, match):
    with pytest.raises(ValueError, match=match):
        D.load_tfds(*args, **kw)


def test_load_tfds_bad_selection(mocked_tfds):
    with pytest.raises(ValueError, match="class_filter"):
        D.load_tfds("cifar10", class_filter="unicorn")
    with pytest.raises(ValueError, match="class_filter index"):
        D.load_tfds("cifar10", class_filter=10)
    with pytest.raises(ValueError, match="indices must be <"):
        D.load_tfds("cifar10", indices=[40])
    with pytest.raises(ValueError, match="matching records"):
        D.load_tfds("cifar10", class_filter="dog", indices=[39])


def test_select_converts_each_wanted_record_as_it_is_read():
    """``load_tfds`` converts records as they are read (a whole CelebA split is never held as
    full-size records), and with a filter and indices only the wanted matches."""
    records = [{"image": np.full((2, 2), i), "label": i % 3} for i in range(30)]
    calls = []

    def convert(ex):
        calls.append(int(ex["image"][0, 0]))
        return int(ex["image"][0, 0])

    keep = lambda ex: ex["label"] == 0  # noqa: E731 - records 0, 3, 6, ...
    assert D._select(D._IterSource(iter(records)), keep, [4, 1], None, convert) == [12, 3]
    assert calls == [3, 12]  # in reading order; matches 0, 2, 3 were only counted
    calls.clear()
    assert D._select(records, None, None, 4, convert) == [0, 1, 2, 3] and calls == [0, 1, 2, 3]
    calls.clear()
    assert D._select(D._IterSource(iter(records)), keep, None, 3, convert) == [0, 3, 6] and calls == [0, 3, 6]


def test_load_images_dispatch(mocked_tfds):
    x = D.load_images("builtin", size=16, num_images=3)
    np.testing.assert_array_equal(x, D.builtin_dataset(16, 3))
    y = D.load_images("builtin:camera", size=16)
    assert y.shape == (1, 3, 16, 16)
    z = D.load_images("cifar10", split="train", class_filter="dog", num_images=1)
    assert z.shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="source must be"):
        D.load_images("imagenet")


@pytest.mark.parametrize("source, kw, match", [
    ("builtin:chelsea", {"num_images": 1}, r"^num_images: source 'builtin:chelsea' takes the keyword arguments size, "
                                           r"channels \(builtin_image\), got num_images$"),
    ("builtin", {"image_size": 16}, r"^image_size: source 'builtin' takes the keyword arguments size, num_images, seed"),
    ("cifar10", {"sise": 16}, r"^sise: source 'cifar10' takes the keyword arguments split, data_dir, size"),
    ("files:/nowhere", {"key": "x"}, r"^key: source 'files:/nowhere' takes .*\(load_files\), got key$"),
    ("array:/nowhere.npz", {"crops": True}, r"^crops: source 'array:/nowhere.npz' takes the keyword arguments key, "
                                            r"layout"),
])
def test_load_images_names_a_keyword_its_loader_does_not_take(source, kw, match):
    """A keyword the source's loader does not take is named with the ones it does (it was a
    TypeError of builtin_image, a function the caller never called; an audit, 2026-12-07)."""
    with pytest.raises(ValueError, match=match):
        D.load_images(source, **kw)


def test_importing_krylovjax_does_not_import_tfds():
    code = (
        "import sys, krylovjax, krylovjax.data, krylovjax.initial, krylovjax.sde, "
        "krylovjax.scores, krylovjax.transport; "
        "bad = [m for m in ('tensorflow_datasets', 'tensorflow') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "images,match",
    [
        ([[[[0.5]]]], "must be an array"),
        (np.zeros((3, 8, 8)), "rank 4"),
        (np.zeros((0, 3, 8, 8)), "at least one image"),
        (np.zeros((1, 2, 8, 8)), r"C in \{1, 3\}"),
        (np.zeros((1, 4, 8, 8)), r"C in \{1, 3\}"),
        (np.zeros((1, 3, 3, 8)), "H, W >= 4"),
        (np.zeros((1, 3, 8, 2)), "H, W >= 4"),
        (np.full((1, 3, 8, 8), np.nan), "finite"),
        (np.full((1, 3, 8, 8), np.inf), "finite"),
        (np.full((1, 3, 8, 8), -0.01), r"\[0, 1\]"),
        (np.full((1, 1, 8, 8), 1.01), r"\[0, 1\]"),
    ],
)
def test_validate_images_failures(images, match):
    with pytest.raises(ValueError, match=match) as info:
        D.validate_images(images, name="batch")
    if hasattr(images, "shape"):
        assert "batch" in str(info.value)


def test_validate_images_dtype_and_success():
    for bad in (np.zeros((1, 3, 8, 8), np.uint8), jnp.zeros((1, 3, 8, 8), jnp.int32)):
        with pytest.raises(TypeError, match="floating"):
            D.validate_images(bad)
        with pytest.raises(ValueError, match="images must have a floating dtype"):
            D.validate_images(bad)
    ok = np.random.default_rng(0).uniform(size=(2, 1, 4, 5)).astype(np.float32)
    assert D.validate_images(ok) is ok
    j = jnp.asarray(ok, jnp.float64)
    assert D.validate_images(j) is j


def test_validate_images_under_jit():
    """Inside jit only shapes and dtypes can be checked; values are skipped."""
    f = jax.jit(lambda x: D.validate_images(x) * 2)
    out = f(jnp.full((1, 1, 4, 4), jnp.nan))
    assert out.shape == (1, 1, 4, 4)
    with pytest.raises(ValueError, match="rank 4"):
        f(jnp.zeros((1, 4, 4)))


def test_validate_images_hints_at_channels_last_and_integer_pixels():
    """(A walkthrough.) A channels-last array and 8/16-bit pixels are refused with the fix."""
    rgb = np.random.default_rng(0).uniform(size=(2, 16, 16, 3))
    with pytest.raises(ValueError, match=r"got C=16 \(shape \(2, 16, 16, 3\)\); it looks channels-last "
                                         r"\[B, H, W, C\], and the library takes \[B, C, H, W\]: x.transpose\(0, 3, 1, 2\)$"):
        D.validate_images(rgb)
    D.validate_images(rgb.transpose(0, 3, 1, 2))
    with pytest.raises(ValueError, match=r"got C=2 \(shape \(1, 2, 8, 8\)\)$"):  # no hint where none fits
        D.validate_images(np.zeros((1, 2, 8, 8)))
    for dtype, scale in ((np.uint8, 255), (np.uint16, 65535)):
        with pytest.raises(D.ImageDTypeError, match=f"got {np.dtype(dtype).name}; .*-bit pixels become \\[0, 1\\] "
                                                    f"with x.astype\\(np.float32\\) / {scale}$"):
            D.validate_images((rgb.transpose(0, 3, 1, 2) * scale).astype(dtype))


@pytest.mark.parametrize("dtype", [np.float16, jnp.bfloat16, np.longdouble])
def test_validate_images_refuses_other_floats(dtype):
    """Only float32/float64 pass (float16 used to pass and crash later inside LAPACK)."""
    bad = np.full((1, 1, 8, 8), 0.5).astype(dtype)
    with pytest.raises(D.ImageDTypeError, match=r"images must have a floating dtype \(float32/float64\), got "
                       + np.dtype(dtype).name):
        D.validate_images(bad)
    with pytest.raises(TypeError, match="float32/float64"):
        D.validate_images(jnp.asarray(bad) if dtype is not np.longdouble else bad)
    for ok in (np.float32, np.float64):
        x = np.full((1, 1, 8, 8), 0.5).astype(ok)
        assert D.validate_images(x) is x
    x = np.full((1, 1, 8, 8), 0.5).astype(np.dtype(">f8"))  # the other byte order: a native copy
    np.testing.assert_array_equal(D.validate_images(x), x)


def test_images_in_the_other_byte_order_are_taken_as_their_values():
    """A review (2026-12-07): a big-endian float64 batch (``>f8``, as FITS files give) passed the
    checks and then failed inside ``jax.device_put`` ("Dtype >f8 is not a valid JAX array type"),
    naming no argument. ``validate_images`` returns a native-order copy of the same values, and
    the pre-computation takes it."""
    from krylovjax import initial

    x = np.random.default_rng(2).random((1, 1, 6, 6))
    swapped = x.astype(x.dtype.newbyteorder())
    out = D.validate_images(swapped)
    assert out.dtype.isnative and out.dtype == np.float64
    np.testing.assert_array_equal(out, x)
    np.testing.assert_array_equal(np.asarray(initial.initial_log_density(jnp.asarray(x))),
                                  np.asarray(initial.initial_log_density(swapped)))
    assert D.validate_images(x) is x  # a native array is returned itself
