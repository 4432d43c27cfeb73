"""Images in, as ``[B, C, H, W]`` float32 arrays in [0, 1].

Two sources:

* built-in, offline photographs from ``skimage.data`` (:func:`builtin_image`,
  :func:`builtin_dataset`), resized with antialiasing, plus deterministic random
  crops for a larger CIFAR-like set;
* TensorFlow Datasets ``cifar10`` and ``celeb_a`` through ``tfds.data_source``
  (array_record files, no TensorFlow needed; :func:`load_tfds`), with
  ``tfds.load`` as the fallback when TensorFlow is installed.

:func:`validate_images` is the one input check everybody uses.

Host-side code: everything returns numpy arrays.  ``tensorflow_datasets`` is
imported lazily inside the functions that need it, so ``import krylovjax``
never imports TF or tfds.  Nothing here ever downloads: an unprepared tfds
dataset fails at once with instructions.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from typing import Any, Sequence

import numpy as np

from krylovjax._checks import is_concrete, is_float32_or_64

__all__ = [
    "ImageDTypeError",
    "DatasetNotPreparedError",
    "validate_images",
    "builtin_names",
    "builtin_image",
    "builtin_dataset",
    "load_tfds",
    "load_images",
    "TFDS_DATASETS",
    "CIFAR10_CLASSES",
]


class ImageDTypeError(TypeError, ValueError):
    """Wrong dtype for an image array.

    A ``TypeError`` (the project's rule for dtypes) that is also a
    ``ValueError``, so ``except ValueError`` around :func:`validate_images`
    catches every failure.
    """


class DatasetNotPreparedError(FileNotFoundError):
    """A tfds dataset is not on disk; the message says how to prepare it."""


# --------------------------------------------------------------------------
# validation


def validate_images(images: Any, name: str = "images") -> Any:
    """Check an image batch and return it unchanged.

    Requirements, each failure raising with a message naming ``name``:

    * an array (numpy or JAX) of rank 4, ``[B, C, H, W]`` with B >= 1;
    * C in {1, 3};
    * H, W >= 4;
    * dtype float32 or float64 (else :class:`ImageDTypeError`, a TypeError and
      ValueError): integers, float16, bfloat16 and long double are refused (the
      solvers' LAPACK calls support only float32/float64);
    * all values finite (no NaN/inf) and within [0, 1] (ValueError).

    The value checks (finite, range) are skipped for JAX tracers, i.e. inside
    ``jit``; the shape and dtype checks always run.

    Returns:
      ``images`` itself.
    """
    if not hasattr(images, "shape") or not hasattr(images, "dtype"):
        raise ValueError(
            f"{name} must be an array of shape [B, C, H, W], got {type(images).__name__}"
        )
    shape = tuple(images.shape)
    if len(shape) != 4:
        raise ValueError(f"{name} must have rank 4 [B, C, H, W], got shape {shape}")
    B, C, H, W = shape
    if B < 1:
        raise ValueError(f"{name} must hold at least one image (B >= 1), got shape {shape}")
    if C not in (1, 3):
        raise ValueError(f"{name} must have C in {{1, 3}} channels [B, C, H, W], got C={C} (shape {shape})")
    if H < 4 or W < 4:
        raise ValueError(f"{name} must have H, W >= 4 [B, C, H, W], got H={H}, W={W}")
    if not is_float32_or_64(images.dtype):
        raise ImageDTypeError(f"{name} must have a floating dtype (float32/float64), got {images.dtype}")
    if not is_concrete(images):
        return images
    arr = np.asarray(images)
    finite = np.isfinite(arr)
    if not finite.all():
        nbad = int((~finite).sum())
        raise ValueError(f"{name} must be finite, found {nbad} NaN/inf value(s)")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got values in [{lo:.6g}, {hi:.6g}]")
    return images


# --------------------------------------------------------------------------
# resizing helpers (host side)


def _check_size(size: Any, name: str = "size") -> tuple[int, int]:
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        hw = (int(size), int(size))
    elif isinstance(size, (tuple, list)) and len(size) == 2 and all(
        isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in size
    ):
        hw = (int(size[0]), int(size[1]))
    else:
        raise ValueError(f"{name} must be an int or a pair (H, W) of ints, got {size!r}")
    if min(hw) < 4:
        raise ValueError(f"{name} must be >= 4 in both dimensions, got {size!r}")
    return hw


def _center_crop_to_aspect(img: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Largest centred crop of ``img`` [H, W, C] with aspect ratio out_h : out_w."""
    H, W = img.shape[:2]
    oh, ow = out_hw
    if H * ow > W * oh:  # too tall
        ch, cw = max(1, round(W * oh / ow)), W
    else:
        ch, cw = H, max(1, round(H * ow / oh))
    top, left = (H - ch) // 2, (W - cw) // 2
    return img[top : top + ch, left : left + cw]


def _resize(img: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Antialiased bilinear resize of [H, W, C] float in [0, 1] to out_hw."""
    if img.shape[:2] == tuple(out_hw):
        return img.astype(np.float32, copy=True)
    from skimage.transform import resize

    out = resize(
        img.astype(np.float64),
        out_hw + img.shape[2:],
        order=1,
        mode="reflect",
        anti_aliasing=img.shape[0] > out_hw[0] or img.shape[1] > out_hw[1],
        preserve_range=True,
    )
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _to_float01(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype == bool:
        return img.astype(np.float32)
    if np.issubdtype(img.dtype, np.integer):
        return (img.astype(np.float32) / float(np.iinfo(img.dtype).max)).astype(np.float32)
    return np.clip(img.astype(np.float32), 0.0, 1.0)


# --------------------------------------------------------------------------
# built-in photographs (skimage.data, shipped with scikit-image: no download)

# name -> (skimage.data function, is_rgb).  All files are bundled in the
# scikit-image wheel (no pooch download).
_BUILTIN: dict[str, tuple[str, bool]] = {
    "astronaut": ("astronaut", True),
    "coffee": ("coffee", True),
    "chelsea": ("chelsea", True),
    "rocket": ("rocket", True),
    "motorcycle": ("stereo_motorcycle", True),
    "immunohistochemistry": ("immunohistochemistry", True),
    "hubble_deep_field": ("hubble_deep_field", True),
    "retina": ("retina", True),
    "camera": ("camera", False),
    "moon": ("moon", False),
    "coins": ("coins", False),
    "grass": ("grass", False),
    "gravel": ("gravel", False),
    "brick": ("brick", False),
}
_ALIASES = {"cat": "chelsea", "motorcycle_left": "motorcycle", "ihc": "immunohistochemistry"}
# The RGB photographs, in the order builtin_dataset uses them.
_RGB_PHOTOS = tuple(n for n, (_, rgb) in _BUILTIN.items() if rgb)


def builtin_names(*, rgb_only: bool = False) -> tuple[str, ...]:
    """Names accepted by :func:`builtin_image` (aliases cat, motorcycle_left, ihc too)."""
    if rgb_only:
        return _RGB_PHOTOS
    return tuple(_BUILTIN)


def _canonical(name: str) -> str:
    key = str(name).lower()
    key = _ALIASES.get(key, key)
    if key not in _BUILTIN:
        raise ValueError(f"name must be one of {builtin_names()} (or {sorted(_ALIASES)}), got {name!r}")
    return key


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    """Full-resolution photo as read-only float32 [H, W, C] in [0, 1] (cached)."""
    import skimage.data

    fn, rgb = _BUILTIN[name]
    img = getattr(skimage.data, fn)()
    if isinstance(img, tuple):  # stereo_motorcycle -> (left, right, disparity)
        img = img[0]
    img = _to_float01(img)
    if img.ndim == 2:
        img = img[:, :, None]
    img = img[:, :, :3] if rgb else img[:, :, :1]
    img.setflags(write=False)
    return img


def _set_channels(img: np.ndarray, channels: int | None) -> np.ndarray:
    """[H, W, c] -> [H, W, channels] (gray replicated; RGB -> luminance for 1)."""
    if channels is None or img.shape[2] == channels:
        return img
    if channels == 3:
        return np.repeat(img, 3, axis=2)
    # ITU-R 601 luma, as skimage.color.rgb2gray.
    w = np.array([0.2125, 0.7154, 0.0721], dtype=np.float32)
    return (img @ w)[:, :, None].astype(np.float32)


@functools.lru_cache(maxsize=256)
def _builtin_resized(name: str, hw: tuple[int, int], channels: int | None) -> np.ndarray:
    img = _center_crop_to_aspect(_photo(name), hw)
    out = _resize(_set_channels(img, channels), hw).transpose(2, 0, 1)
    out.setflags(write=False)
    return out


def builtin_image(name: str, size: Any = 64, *, channels: int | None = None) -> np.ndarray:
    """A real photograph from ``skimage.data`` as ``[C, H, W]`` float32 in [0, 1].

    The largest centred crop with the target aspect ratio is resized with an
    antialiased bilinear filter (``skimage.transform.resize``).

    Args:
      name: one of :func:`builtin_names` (RGB: astronaut, coffee, chelsea/cat,
        rocket, motorcycle (left stereo view), immunohistochemistry,
        hubble_deep_field, retina; grayscale: camera, moon, coins, grass,
        gravel, brick).
      size: int (square) or (H, W), each >= 4.
      channels: None keeps the photo's own (3 or 1); 3 replicates grayscale;
        1 converts RGB to luminance.

    Returns:
      numpy ``[C, H, W]`` float32 (a fresh, writable copy).
    """
    key = _canonical(name)
    hw = _check_size(size)
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be None, 1 or 3, got {channels!r}")
    return np.array(_builtin_resized(key, hw, channels))


def builtin_dataset(
    size: Any,
    num_images: int,
    *,
    seed: int = 0,
    crops: bool = True,
    min_crop: float = 0.25,
    min_std: float = 0.03,
) -> np.ndarray:
    """An offline CIFAR-like set ``[B, 3, H, W]`` float32 in [0, 1].

    The first images are the RGB photographs in :func:`builtin_names`
    (``rgb_only=True``) order, resized whole (centre-cropped to the aspect).
    If ``num_images`` exceeds their number, the rest are deterministic random
    crops: for crop i a generator seeded by ``(seed, i)`` picks a photo
    uniformly, a square side ``u * min(H, W)`` with u ~ U[min_crop, 1], and a
    uniform position; crops whose resized std is below ``min_std`` (e.g. the
    black corners of ``retina``) are redrawn from the same generator.  So a
    given (size, seed) gives the same images, and a larger ``num_images`` only
    appends.

    Args:
      size: int or (H, W), >= 4 (32, 64, 128 are the usual ones).
      num_images: B >= 1.
      seed: crop seed.
      crops: if False, ``num_images`` may not exceed the number of photos.
      min_crop: smallest crop side as a fraction of the photo's short side, in (0, 1].
      min_std: minimum std of an accepted crop, in [0, 0.5] (ValueError when 100 draws find none).
    """
    hw = _check_size(size)
    if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images < 1:
        raise ValueError(f"num_images must be an int >= 1, got {num_images!r}")
    if not 0.0 < float(min_crop) <= 1.0:
        raise ValueError(f"min_crop must be in (0, 1], got {min_crop!r}")
    if not 0.0 <= float(min_std) <= 0.5:  # NaN fails too
        raise ValueError(f"min_std must be in [0, 0.5] (no image in [0, 1] has a larger std), got {min_std!r}")
    n_photos = len(_RGB_PHOTOS)
    if not crops and num_images > n_photos:
        raise ValueError(
            f"num_images must be <= {n_photos} (the built-in photos) when crops=False, got {num_images}"
        )
    out = [builtin_image(n, hw, channels=3) for n in _RGB_PHOTOS[: min(num_images, n_photos)]]
    oh, ow = hw
    for i in range(num_images - len(out)):
        rng = np.random.default_rng([int(seed), i])
        for _attempt in range(100):
            photo = _photo(_RGB_PHOTOS[rng.integers(n_photos)])
            H, W = photo.shape[:2]
            side = max(4, int(round(rng.uniform(min_crop, 1.0) * min(H, W))))
            ch = side if oh >= ow else max(1, round(side * oh / ow))
            cw = side if ow >= oh else max(1, round(side * ow / oh))
            top = int(rng.integers(0, H - ch + 1))
            left = int(rng.integers(0, W - cw + 1))
            crop = _resize(photo[top : top + ch, left : left + cw], hw).transpose(2, 0, 1)
            if crop.std() >= min_std:
                break
        else:
            raise ValueError(f"min_std: none of 100 crops drawn for image {len(out)} has a std >= {min_std!r}")
        out.append(crop)
    return np.stack(out).astype(np.float32)


# --------------------------------------------------------------------------
# TensorFlow Datasets

#: datasets load_tfds knows: name -> (splits, native [H, W])
TFDS_DATASETS: dict[str, dict[str, Any]] = {
    "cifar10": {"splits": ("train", "test"), "shape": (32, 32)},
    "celeb_a": {"splits": ("train", "validation", "test"), "shape": (218, 178)},
}
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
#: CelebA centre crop (score_sde / NCSN convention: 140 x 140 around the face).
CELEBA_CROP = 140


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:  # pragma: no cover - installed in this project
        raise ImportError(
            "tensorflow-datasets is needed for load_tfds: pip install tensorflow-datasets array_record"
        ) from err
    return tfds


def _prepare_hint(name: str, data_dir: str | None) -> str:
    dd = data_dir or "~/tensorflow_datasets"
    return (
        f"Prepare it once on a machine with network access, e.g.\n"
        f"    tfds build {name} --data_dir={dd} --file_format=array_record\n"
        f"(array_record files can be read without TensorFlow through tfds.data_source), "
        f"then pass data_dir={dd!r} (the experiment binaries' --data_dir flag)."
    )


def _check_split(name: str, split: str) -> None:
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a non-empty string like 'train' or 'test[:10%]', got {split!r}")
    known = TFDS_DATASETS[name]["splits"]
    for part in split.split("+"):
        base = re.match(r"\s*([A-Za-z_]\w*)", part)
        if base is None or base.group(1) not in known:
            raise ValueError(f"split must name one of {known} for {name} (slicing allowed), got {split!r}")


def _celeba_crop(img: np.ndarray) -> np.ndarray:
    H, W = img.shape[:2]
    c = min(CELEBA_CROP, H, W)
    top, left = (H - c) // 2, (W - c) // 2
    return img[top : top + c, left : left + c]


def _class_predicate(name: str, class_filter: Any, label_names: Sequence[str] | None):
    """A function example -> bool, or None for no filter."""
    if class_filter is None:
        return None
    items = list(class_filter) if isinstance(class_filter, (list, tuple, set, frozenset)) else [class_filter]
    if not items:
        raise ValueError("class_filter must not be empty")
    if name == "cifar10":
        names = list(label_names or CIFAR10_CLASSES)
        wanted = set()
        for c in items:
            if isinstance(c, (int, np.integer)) and not isinstance(c, bool):
                if not 0 <= int(c) < len(names):
                    raise ValueError(f"class_filter index must be in [0, {len(names)}), got {c}")
                wanted.add(int(c))
            elif isinstance(c, str) and c.lower() in names:
                wanted.add(names.index(c.lower()))
            else:
                raise ValueError(f"class_filter must be class indices or names from {tuple(names)}, got {c!r}")
        return lambda ex: int(ex["label"]) in wanted
    if name == "celeb_a":
        attrs = [str(a) for a in items]
        return lambda ex: all(bool(ex["attributes"][a]) for a in attrs)
    raise ValueError(f"class_filter is not supported for {name}")  # pragma: no cover


def _tf_available() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def load_tfds(
    name: str,
    split: str = "train",
    *,
    data_dir: str | None = None,
    size: Any = None,
    class_filter: Any = None,
    indices: Sequence[int] | None = None,
    num_images: int | None = None,
) -> np.ndarray:
    """Images from a prepared TFDS dataset as numpy ``[B, 3, H, W]`` float32 in [0, 1].

    Reads through ``tfds.data_source`` (random access to array_record files; no
    TensorFlow).  If the dataset was prepared in another format (tfrecord) it
    uses ``tfds.load`` when TensorFlow is importable, else explains how to
    rebuild.  It never downloads: the builder's ``is_prepared()`` is checked
    first and an unprepared dataset raises :class:`DatasetNotPreparedError`
    at once with the ``tfds build`` command to run.

    Selection, in order: ``class_filter`` keeps matching records (in dataset
    order); then ``indices`` picks positions *within the filtered sequence*
    (e.g. class_filter="dog", indices=[0, 7] = the 1st and 8th dog), or
    ``num_images`` keeps the first ones; with neither, the whole (filtered)
    split is read.  ``indices`` and ``num_images`` are mutually exclusive.

    Args:
      name: "cifar10" or "celeb_a".
      split: "train", "test" (and "validation" for celeb_a); tfds slicing
        such as "train[:1000]" is allowed.
      data_dir: the tfds data directory (default: tfds's, ~/tensorflow_datasets).
      size: output size (int or (H, W)); None keeps 32 x 32 for cifar10 and
        gives 64 x 64 for celeb_a.  celeb_a is first centre-cropped to 140 x 140
        (the score_sde / NCSN convention), then resized with antialiasing.
      class_filter: cifar10: class index or name, or a list (5 or "dog" = dog,
        as in Paper B); celeb_a: attribute name(s) that must all be true
        (e.g. "Smiling").
      indices: positions to take (see above).
      num_images: how many to take.

    Returns:
      numpy ``[B, 3, H, W]`` float32 in [0, 1].
    """
    if name not in TFDS_DATASETS:
        raise ValueError(f"name must be one of {tuple(TFDS_DATASETS)}, got {name!r}")
    _check_split(name, split)
    if size is None:
        hw = TFDS_DATASETS[name]["shape"] if name == "cifar10" else (64, 64)
    else:
        hw = _check_size(size)
    if indices is not None and num_images is not None:
        raise ValueError("indices and num_images are mutually exclusive; pass one of them")
    if num_images is not None and (
        isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images < 1
    ):
        raise ValueError(f"num_images must be an int >= 1, got {num_images!r}")
    if indices is not None:
        indices = [int(i) for i in np.asarray(indices).reshape(-1)]
        if not indices or min(indices) < 0:
            raise ValueError(f"indices must be a non-empty list of non-negative ints, got {indices!r}")

    tfds = _import_tfds()
    try:
        builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
    except Exception as err:  # e.g. a registered name unknown to this tfds version
        raise ValueError(f"could not create the tfds builder for {name!r}: {err}") from err
    if not builder.is_prepared():
        raise DatasetNotPreparedError(
            f"tfds dataset {name!r} is not prepared in data_dir={builder.data_dir!r} "
            f"(nothing is downloaded automatically). " + _prepare_hint(name, data_dir)
        )
    label_names = None
    if name == "cifar10":
        try:
            label_names = [str(n) for n in builder.info.features["label"].names]
        except Exception:  # pragma: no cover - info always has it
            label_names = None
        if label_names is not None and (len(label_names) != 10 or all(n.isdigit() for n in label_names)):
            # Builders created from code (no metadata on disk) name classes '0'..'9'.
            label_names = None
    keep = _class_predicate(name, class_filter, label_names)

    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False, try_gcs=False)
        records = _select(source, keep, indices, num_images)
    except NotImplementedError as err:  # prepared in a non random-access format
        if not _tf_available():
            raise DatasetNotPreparedError(
                f"tfds dataset {name!r} in {builder.data_dir!r} is not in array_record format and "
                f"TensorFlow is not installed, so it cannot be read. Rebuild it with "
                f"--file_format=array_record. " + _prepare_hint(name, data_dir)
            ) from err
        ds = tfds.load(name, split=split, data_dir=data_dir, download=False, try_gcs=False)
        records = _select(_IterSource(tfds.as_numpy(ds)), keep, indices, num_images)

    out = []
    for ex in records:
        img = _to_float01(ex["image"])
        if img.ndim == 2:
            img = img[:, :, None]
        if img.shape[2] == 1:
            img = np.repeat(img, 3, axis=2)
        if name == "celeb_a":
            img = _celeba_crop(img)
        out.append(_resize(_center_crop_to_aspect(img, hw), hw).transpose(2, 0, 1))
    if not out:
        raise ValueError(f"no images selected from {name}[{split}] with class_filter={class_filter!r}")
    return np.stack(out).astype(np.float32)


class _IterSource:
    """Sequential reader giving the same interface _select uses (tfds.load path)."""

    def __init__(self, iterable):
        self._it = iter(iterable)

    def __iter__(self):
        return self._it


def _select(source, keep, indices, num_images) -> list:
    """Apply filter, then indices / num_images, reading as few records as possible."""
    random_access = hasattr(source, "__getitem__") and hasattr(source, "__len__")
    if keep is None and random_access:
        n = len(source)
        if indices is not None:
            bad = [i for i in indices if i >= n]
            if bad:
                raise ValueError(f"indices must be < {n} (the split's size), got {bad}")
            return [source[i] for i in indices]
        count = n if num_images is None else min(num_images, n)
        return [source[i] for i in range(count)]
    it = (source[i] for i in range(len(source))) if random_access else iter(source)
    if indices is not None:
        need, wanted = max(indices) + 1, indices
    else:
        need, wanted = num_images, None
    matched = []
    for ex in it:
        if keep is None or keep(ex):
            matched.append(ex)
            if need is not None and len(matched) >= need:
                break
    if wanted is not None:
        if need > len(matched):
            raise ValueError(
                f"indices must be < {len(matched)} (the number of matching records), got max {need - 1}"
            )
        return [matched[i] for i in wanted]
    return matched


# --------------------------------------------------------------------------
# dispatch


def load_images(source: str, **kwargs: Any) -> np.ndarray:
    """One entry point for configs: returns ``[B, C, H, W]`` float32 in [0, 1].

    ``source``:
      * ``"builtin"``: :func:`builtin_dataset` (kwargs size=32, num_images=8,
        seed, crops, ...);
      * ``"builtin:<name>"``: one photo ``[1, 3, H, W]`` via
        :func:`builtin_image` (kwargs size=32, channels=3);
      * ``"cifar10"`` / ``"celeb_a"``: :func:`load_tfds` (kwargs split,
        data_dir, size, class_filter, indices, num_images).
    The result passes :func:`validate_images`.
    """
    if not isinstance(source, str):
        raise ValueError(f"source must be a string ('builtin', 'builtin:<name>', 'cifar10', 'celeb_a'), got {source!r}")
    if source == "builtin":
        kw = {"size": 32, "num_images": 8}
        kw.update(kwargs)
        images = builtin_dataset(**kw)
    elif source.startswith("builtin:"):
        kw = {"size": 32, "channels": 3}
        kw.update(kwargs)
        images = builtin_image(source.split(":", 1)[1], **kw)[None]
    elif source in TFDS_DATASETS:
        images = load_tfds(source, **kwargs)
    else:
        raise ValueError(
            f"source must be 'builtin', 'builtin:<name>' or one of {tuple(TFDS_DATASETS)}, got {source!r}"
        )
    return validate_images(images)
