"""Images in, as ``[B, C, H, W]`` float32 arrays in [0, 1].

Four sources:

* built-in, offline photographs from ``skimage.data`` (:func:`builtin_image`,
  :func:`builtin_dataset`), resized with antialiasing, plus deterministic random
  crops for a larger CIFAR-like set;
* TensorFlow Datasets ``cifar10`` and ``celeb_a`` through ``tfds.data_source``
  (array_record files, no TensorFlow needed; :func:`load_tfds`), with
  ``tfds.load`` as the fallback when TensorFlow is installed;
* your own image files (PNG, JPEG, ...; a directory, a glob pattern or one
  file), read with Pillow (:func:`load_files`);
* your own array in a ``.npy``/``.npz`` file (:func:`load_array`).

:func:`load_images` dispatches on a source string (``"builtin"``,
``"builtin:<name>"``, ``"cifar10"``, ``"celeb_a"``, ``"files:<path>"``,
``"array:<path>"``, ``"array:<path>,key=<name>,layout=<LAYOUT>"``): the experiment binaries'
``dataset`` / ``data.source``.

:func:`validate_images` is the one input check everybody uses.

Host-side code: everything returns numpy arrays.  ``tensorflow_datasets`` is
imported lazily inside the functions that need it, so ``import krylovjax``
never imports TF or tfds.  Nothing here ever downloads: an unprepared tfds
dataset fails at once with instructions.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import inspect
import os
import re
import warnings
from typing import Any, Callable, Sequence

import numpy as np

from krylovjax._checks import channels_last_hint, is_concrete, is_float32_or_64

__all__ = [
    "ImageDTypeError",
    "DatasetNotPreparedError",
    "validate_images",
    "builtin_names",
    "builtin_image",
    "builtin_dataset",
    "load_tfds",
    "load_files",
    "load_array",
    "load_images",
    "image_paths",
    "file_info",
    "selected_paths",
    "IMAGE_EXTENSIONS",
    "ARRAY_LAYOUTS",
    "SOURCE_OPTIONS",
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
      ``images`` itself, or for a NumPy array in the other byte order (``>f8`` on a
      little-endian machine, from a FITS file say) a native-order copy of the same values:
      JAX takes only native byte order (it failed later, in ``device_put``, naming no argument).
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
        raise ValueError(f"{name} must have C in {{1, 3}} channels [B, C, H, W], got C={C} (shape {shape})"
                         + channels_last_hint(shape))
    if H < 4 or W < 4:
        raise ValueError(f"{name} must have H, W >= 4 [B, C, H, W], got H={H}, W={W}")
    if not is_float32_or_64(images.dtype):
        hint = ("; 8-bit pixels become [0, 1] with x.astype(np.float32) / 255" if np.dtype(images.dtype) == np.uint8
                else "; 16-bit pixels become [0, 1] with x.astype(np.float32) / 65535"
                if np.dtype(images.dtype) == np.uint16 else "")
        raise ImageDTypeError(f"{name} must have a floating dtype (float32/float64), got {images.dtype}{hint}")
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
    if isinstance(images, np.ndarray) and not images.dtype.isnative:
        return images.astype(images.dtype.newbyteorder("="))
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


def _check_channels(channels: Any) -> None:
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be None, 1 or 3, got {channels!r}")


def _warn_fitting(path, files: Sequence[str], shapes: Sequence[tuple], hw, channels: int) -> None:
    """One warning naming the files that were not taken as they are: centre-cropped to another
    aspect, enlarged, or converted to ``channels`` (a walkthrough: a folder of 20x20 to 74x64
    photos and a gray one was read at 32x32 colour without a word)."""
    def names(idx):
        shown = ", ".join(os.path.basename(files[i]) for i in idx[:3])
        return shown + (f" and {len(idx) - 3} more" if len(idx) > 3 else "")

    notes = []
    if hw is not None:
        cropped = [i for i, (h, w, _) in enumerate(shapes) if h * hw[1] != w * hw[0]]
        enlarged = [i for i, (h, w, _) in enumerate(shapes) if h < hw[0] or w < hw[1]]
        if cropped:
            notes.append(f"{len(cropped)} centre-cropped to the {hw[0]}x{hw[1]} aspect ({names(cropped)})")
        if enlarged:
            notes.append(f"{len(enlarged)} smaller than {hw[0]}x{hw[1]} and enlarged ({names(enlarged)})")
    converted = [i for i, (_, _, c) in enumerate(shapes) if c != channels]
    if converted:
        how = "gray read as R = G = B" if channels == 3 else "colour read as its luminance"
        notes.append(f"{len(converted)} converted to {channels} channel{'s' if channels != 1 else ''} "
                     f"({how}: {names(converted)})")
    if notes:
        warnings.warn(f"{os.fspath(path)!r}: of {len(files)} images, " + "; ".join(notes), stacklevel=3)


def _fit(img: np.ndarray, hw: tuple[int, int] | None, channels: int | None) -> np.ndarray:
    """``[H, W, c]`` -> its largest centred crop of ``hw``'s aspect, in ``channels``, resized to
    ``hw`` (just the channels when ``hw`` is None): every source's images (built-in, tfds,
    files, arrays)."""
    if hw is None:
        return _set_channels(img, channels)
    return _resize(_set_channels(_center_crop_to_aspect(img, hw), channels), hw)


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
    out = _fit(_photo(name), hw, channels).transpose(2, 0, 1)
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
    _check_channels(channels)
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


def _prepare_hint(name: str, root: str) -> str:
    """How to prepare ``name`` in the tfds data directory ``root``, and where to pass it."""
    return (
        f"Prepare it once on a machine with network access (tfds build needs TensorFlow: "
        f"pip install tensorflow importlib_resources, or krylovjax's extra: pip install -e '.[tf]'), e.g.\n"
        f"    tfds build {name} --data_dir={root} --file_format=array_record\n"
        f"(array_record files can be read without TensorFlow through tfds.data_source), then give "
        f"that data directory: load_tfds/load_images(data_dir=...); experiments.precompute "
        f"--config.data_dir=...; experiments.denoise and experiments.budget --config.data.kwargs.data_dir=...; "
        f"the Colab notebook KRYLOVJAX_NB_DATA_DIR; or the TFDS_DATA_DIR environment variable (the only way for "
        f"experiments.restore's --input/--clean and experiments.generate's --reference)."
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


def _data_dir_root(builder, data_dir: str | None) -> str:
    """The data directory that holds ``builder``'s dataset (not its versioned subfolder)."""
    return str(getattr(builder, "data_dir_root", None) or data_dir or os.environ.get("TFDS_DATA_DIR")
               or os.path.expanduser("~/tensorflow_datasets"))


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
      data_dir: the tfds data directory (``None`` or ``""``: tfds's default, ``$TFDS_DATA_DIR``
        or ~/tensorflow_datasets); a leading ``~`` is expanded.
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
    indices, num_images = _check_selection(indices, num_images)
    if data_dir is not None and not isinstance(data_dir, (str, os.PathLike)):
        raise ValueError(f"data_dir: expected a directory path (or None for tfds's default), got {data_dir!r}")
    # "" is the configs' "tfds's default"; tfds itself would take "~/x" as a folder named "~"
    data_dir = os.path.expanduser(os.fspath(data_dir)) if data_dir else None

    tfds = _import_tfds()
    try:
        builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
    except Exception as err:  # e.g. a registered name unknown to this tfds version
        raise ValueError(f"could not create the tfds builder for {name!r}: {err}") from err
    if not builder.is_prepared():
        root = _data_dir_root(builder, data_dir)
        raise DatasetNotPreparedError(
            f"tfds dataset {name!r} is not prepared in the data directory {root!r} (looked for "
            f"{builder.data_dir!r}; nothing is downloaded automatically). " + _prepare_hint(name, root)
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

    def convert(ex) -> np.ndarray:  # each record as it is read: memory for the output only
        img = _to_float01(ex["image"])
        if img.ndim == 2:
            img = img[:, :, None]
        if name == "celeb_a":
            img = _celeba_crop(img)
        return _fit(img, hw, 3).transpose(2, 0, 1)

    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False, try_gcs=False)
        out = _select(source, keep, indices, num_images, convert)
    except NotImplementedError as err:  # prepared in a non random-access format
        if not _tf_available():
            raise DatasetNotPreparedError(
                f"tfds dataset {name!r} in {builder.data_dir!r} is not in array_record format and "
                f"TensorFlow is not installed, so it cannot be read. Rebuild it with "
                f"--file_format=array_record. " + _prepare_hint(name, _data_dir_root(builder, data_dir))
            ) from err
        ds = tfds.load(name, split=split, data_dir=data_dir, download=False, try_gcs=False)
        out = _select(_IterSource(tfds.as_numpy(ds)), keep, indices, num_images, convert)
    if not out:
        raise ValueError(f"no images selected from {name}[{split}] with class_filter={class_filter!r}")
    return np.stack(out).astype(np.float32)


class _IterSource:
    """Sequential reader giving the same interface _select uses (tfds.load path)."""

    def __init__(self, iterable):
        self._it = iter(iterable)

    def __iter__(self):
        return self._it


def _select(source, keep, indices, num_images, convert=lambda ex: ex) -> list:
    """Apply filter, then indices / num_images, reading as few records as possible; returns
    ``convert`` of each selected record, applied as it is read (no record is kept)."""
    random_access = hasattr(source, "__getitem__") and hasattr(source, "__len__")
    if keep is None and random_access:
        return [convert(source[i]) for i in _pick(len(source), indices, num_images, "the split's size")]
    it = (source[i] for i in range(len(source))) if random_access else iter(source)
    if indices is not None:
        need, wanted = max(indices) + 1, indices
    else:
        need, wanted = num_images, None
    matched, wanted_set = [], None if wanted is None else set(wanted)
    for ex in it:
        if keep is None or keep(ex):  # the matches that are not wanted are counted, not converted
            matched.append(convert(ex) if wanted_set is None or len(matched) in wanted_set else None)
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
# your own images: image files (Pillow) and numpy arrays

#: the file name endings :func:`load_files` reads from a directory (any case): Pillow's still-image
#: formats (``PIL.Image.registered_extensions()``), less the ones that are not plain images or are
#: ambiguous (icons, layered PSD, animated APNG/FLI, MPO pairs, PDF/EPS, FITS/HDF5, raw ``.rgb``)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".dib", ".gif", ".tif", ".tiff",
                    ".webp", ".avif", ".ppm", ".pgm", ".pbm", ".pnm", ".pfm", ".tga", ".jp2", ".j2k",
                    ".pcx", ".sgi", ".qoi")
# Pillow modes read as one channel (the rest are colour, or converted to RGB(A) first)
_GRAY_MODES = ("1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N")


def _check_selection(indices: Any, num_images: Any) -> tuple[list[int] | None, int | None]:
    """``(indices, num_images)`` checked: at most one of them, ints, non-negative / >= 1."""
    if indices is not None and num_images is not None:
        raise ValueError("indices and num_images are mutually exclusive; pass one of them")
    if num_images is not None and (
        isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images < 1
    ):
        raise ValueError(f"num_images must be an int >= 1, got {num_images!r}")
    if indices is not None:
        raw = np.asarray(indices).reshape(-1)
        if raw.size == 0 or raw.dtype.kind not in "iu" or raw.min() < 0:
            raise ValueError(f"indices must be a non-empty list of non-negative ints, got {indices!r}")
        indices = [int(i) for i in raw]
    return indices, (None if num_images is None else int(num_images))


def _pick(n: int, indices: list[int] | None, num_images: int | None, what: str) -> list[int]:
    """Positions to read out of ``n``: ``indices`` (each < n), else the first ``num_images`` (at
    most n), else all."""
    if indices is not None:
        bad = [i for i in indices if i >= n]
        if bad:
            raise ValueError(f"indices must be < {n} ({what}), got {bad}")
        return list(indices)
    return list(range(n if num_images is None else min(num_images, n)))


def _map_images(fn, items: Sequence[Any]) -> list:
    """``[fn(x) for x in items]`` on up to ``os.cpu_count()`` threads (at most 16), in order:
    Pillow's decoding and scipy's filters release the GIL. On an error the items not started are
    cancelled and the first failing item's error (in order) is raised."""
    from concurrent.futures import ThreadPoolExecutor

    workers = min(len(items), os.cpu_count() or 1, 16)
    if workers <= 1:
        return [fn(x) for x in items]
    ex = ThreadPoolExecutor(workers, thread_name_prefix="krylovjax-images")
    try:
        return list(ex.map(fn, items))
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def _natural_key(path: str) -> tuple:
    """Sort key comparing the digits in a name as numbers (img2 before img10), then the name."""
    parts = re.split(r"(\d+)", path)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), path


def image_paths(path: str) -> list[str]:
    """The image files :func:`load_files` reads for ``path``, in its order.

    ``path`` (``~`` expanded) is one of:

    * a directory: its files ending in :data:`IMAGE_EXTENSIONS` (any case), not hidden files
      (a leading ``.``), not its subdirectories: their files are read only with a ``**``
      pattern (``photos/**/*.png``); :func:`load_files` warns about the other files it leaves
      out;
    * a glob pattern (``*``, ``?``, ``[...]``; ``**`` descends into subdirectories), e.g.
      ``photos/**/*.jpg``: every matching file, whatever its ending (a path that exists, such as
      a directory ``photos [2024]``, is taken as itself);
    * one file.

    Sorted by name with the digits in names compared as numbers (``img2.png`` before
    ``img10.png``). Raises FileNotFoundError when nothing is there.
    """
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(f"path must name a directory, a glob pattern or an image file, got {path!r}")
    spec = os.fspath(path)
    full = os.path.expanduser(spec)
    if not os.path.exists(full) and any(c in full for c in "*?["):  # an existing "photos [2024]" is a path
        found = [p for p in glob.glob(full, recursive=True) if os.path.isfile(p)]
        if not found:
            raise FileNotFoundError(f"no file matches the pattern {spec!r}")
    elif os.path.isdir(full):
        found = [os.path.join(full, n) for n in _directory_files(full)[0]]
        if not found:
            subdirs = [n for n in os.listdir(full) if os.path.isdir(os.path.join(full, n))]
            hint = (f"; it has subdirectories ({', '.join(sorted(subdirs)[:3])}{', ...' if len(subdirs) > 3 else ''}):"
                    f" a pattern like {os.path.join(spec, '**', '*.png')!r} reads their files") if subdirs else ""
            raise FileNotFoundError(f"directory {spec!r} holds no image file (names ending in "
                                    f"{', '.join(IMAGE_EXTENSIONS)}){hint}")
    elif os.path.isfile(full):
        found = [full]
    else:
        raise FileNotFoundError(f"{spec!r}: no such file or directory")
    return sorted(found, key=_natural_key)


def _directory_files(directory: str) -> tuple[list[str], list[str]]:
    """The names of ``directory``'s non-hidden files: those ending in :data:`IMAGE_EXTENSIONS`
    (any case), which :func:`image_paths` reads, and the others, which it leaves out; each in
    its order."""
    names = sorted((n for n in os.listdir(directory)
                    if not n.startswith(".") and os.path.isfile(os.path.join(directory, n))), key=_natural_key)
    images = [n for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    return images, [n for n in names if not n.lower().endswith(IMAGE_EXTENSIONS)]


def selected_paths(path: str, indices: Sequence[int] | None = None, num_images: int | None = None) -> list[str]:
    """The files :func:`load_files` reads for these arguments, in order: :func:`image_paths`, then
    ``indices`` (positions in it) or its first ``num_images`` (all of them when fewer)."""
    paths = image_paths(path)
    indices, num_images = _check_selection(indices, num_images)
    return [paths[i] for i in _pick(len(paths), indices, num_images, f"the {len(paths)} files of {path!r}")]


def _header_gray(im) -> bool:
    """Whether an opened Pillow image's pixels are one channel (its header; nothing decoded)."""
    from krylovjax import _deep_images

    return im.mode in _GRAY_MODES or _deep_images.stored_gray(im)


def _open_header(path: str, read: Callable):
    """``read(im)`` of the file opened with Pillow, or ValueError naming the file if it is no image."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return read(im)
    except Exception as err:  # Pillow raises several types for a file that is no image
        raise ValueError(f"{path!r} could not be read as an image: {type(err).__name__}: {err}") from err


def _gray_mode(path: str) -> bool:
    """Whether the file's pixels are one channel (from its header; nothing is decoded: unlike
    :func:`file_info`, whose EXIF lookup makes Pillow decode a PNG, so load_files stays at one
    decoding per file)."""
    return _open_header(path, _header_gray)


# EXIF orientation (tag 0x0112) -> the numpy form of what ImageOps.exif_transpose does to [H, W, c]
_ORIENT = {
    2: lambda a: a[:, ::-1],                       # FLIP_LEFT_RIGHT
    3: lambda a: a[::-1, ::-1],                    # ROTATE_180
    4: lambda a: a[::-1],                          # FLIP_TOP_BOTTOM
    5: lambda a: a.swapaxes(0, 1),                 # TRANSPOSE
    6: lambda a: np.rot90(a, -1),                  # ROTATE_270 (counter-clockwise)
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),     # TRANSVERSE
    8: lambda a: np.rot90(a, 1),                   # ROTATE_90
}


def _check_opaque(path: str, transparent: np.ndarray) -> None:
    if transparent.any():
        raise ValueError(f"{path!r} has transparent pixels ({int(transparent.sum())} with alpha below its maximum); "
                         "flatten it onto a background first: a transparent pixel has no intensity")


def _read_image_file(path: str) -> np.ndarray:
    """One image file -> float32 ``[H, W, c]`` in [0, 1], c in {1, 3}.

    The EXIF orientation is applied (phone photos). Palette, CMYK and YCbCr images become RGB;
    16-bit grayscale is scaled by 65535, and 16-bit colour PNG, PPM and TIFF (uncompressed, or deflate in strips)
    files, which Pillow reads at 8 bits, are read at their full depth
    (:mod:`krylovjax._deep_images`; other 16-bit colour files are read at 8 bits with a
    warning). An alpha channel that is fully opaque is dropped; transparency is refused, since
    a transparent pixel has no intensity. An animation or multi-page file is refused.
    """
    from PIL import Image, ImageOps

    from krylovjax import _deep_images

    try:
        with Image.open(path) as src:
            frames = int(getattr(src, "n_frames", 1))
            deep = _deep_images.read_deep(path, src) if frames == 1 else None
            im = None if deep is not None or frames != 1 else ImageOps.exif_transpose(src)  # a decoded copy
    except Exception as err:  # UnidentifiedImageError, OSError (truncated), SyntaxError, ...
        raise ValueError(f"{path!r} could not be read as an image: {type(err).__name__}: {err}") from err
    if deep is not None:
        img, has_alpha, orientation = deep
        img = np.ascontiguousarray(_ORIENT.get(orientation, lambda a: a)(img))
        if has_alpha:
            img, alpha = img[..., :-1], img[..., -1]
            _check_opaque(path, alpha < 1.0)
        return img
    if im is None:
        raise ValueError(f"{path!r} holds {frames} frames (an animation or a multi-page file); "
                         "save the frame you want as an image of its own")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode in ("PA", "RGBa", "La"):
        im = im.convert("RGBA" if im.mode != "La" else "LA")
    elif im.mode not in ("1", "L", "LA", "RGB", "RGBA", "I", "F") and not im.mode.startswith("I;16"):
        im = im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX
    mode, arr = im.mode, np.asarray(im)
    if mode in ("LA", "RGBA"):
        arr, alpha = arr[..., :-1], arr[..., -1]
        _check_opaque(path, alpha < 255)
    if mode == "I":  # 32-bit integer pixels: 16-bit PNGs on some Pillow versions
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 65535:
            raise ValueError(f"{path!r}: 32-bit integer pixels in [{lo}, {hi}] are outside the 16-bit "
                             "range [0, 65535]; save it as 8- or 16-bit")
        img = arr.astype(np.float32) / 65535.0
    elif mode == "F":
        img = arr.astype(np.float32)
        if not np.isfinite(img).all() or img.min() < 0.0 or img.max() > 1.0:
            raise ValueError(f"{path!r}: floating-point pixels must be finite and in [0, 1], got values "
                             f"in [{np.nanmin(img):.6g}, {np.nanmax(img):.6g}]")
    else:  # "1" (bool), "L"/"RGB" (uint8), "I;16*" (uint16)
        img = _to_float01(arr.astype(arr.dtype.newbyteorder("=")))
    if img.ndim == 2:
        img = img[:, :, None]
    return img


def file_info(path: str) -> dict:
    """What an image file's header says: ``{"size": (width, height)}`` as it
    is read (after its EXIF orientation) and ``"gray"``, whether its pixels are one channel (read
    as R = G = B where colour is asked for). ValueError naming the file if it is no image. Pillow
    decodes a PNG to look for its EXIF chunk, so this costs a reading of the file."""

    def read(im):
        w, h = im.size
        try:
            turned = int(im.getexif().get(0x0112, 1)) in (5, 6, 7, 8)  # a quarter turn: w and h swap
        except Exception:  # a damaged file: said by the reading itself, which checks it
            turned = False
        return {"size": (int(h), int(w)) if turned else (int(w), int(h)), "gray": bool(_header_gray(im))}

    return _open_header(path, read)


def load_files(
    path: str,
    *,
    size: Any = None,
    channels: int | None = None,
    indices: Sequence[int] | None = None,
    num_images: int | None = None,
) -> np.ndarray:
    """Your own image files as numpy ``[B, C, H, W]`` float32 in [0, 1].

    Files are read with Pillow (PNG, JPEG, BMP, GIF, TIFF, WebP, PPM/PGM, ...), each decoded,
    cropped and resized on its own, on up to ``os.cpu_count()`` threads (at most 16): with
    ``size``, a folder of large photos needs memory for the output and one photo per thread.

    Args:
      path: a directory, a glob pattern or one file; which files and in which order:
        :func:`image_paths` (a directory's subdirectories are read only with a ``**`` pattern;
        its non-hidden files of other endings are left out with a warning naming them).
      size: output size, an int or (H, W); each image's largest centred crop with that aspect
        ratio is resized with an antialiasing filter (as the built-in photos). None keeps the
        files' own size, which must then be the same for all.
      channels: 1 or 3; None gives 1 when every file is grayscale, else 3. Grayscale is
        replicated to 3; colour becomes luminance (ITU-R 601) for 1.
      indices: positions in the sorted file list to read.
      num_images: read the first ``num_images`` files (all of them when fewer).
        ``indices`` and ``num_images`` are mutually exclusive; with neither all files are read.

    Pixels: 8-bit /255, 16-bit /65535 (16-bit PNG, PGM/PPM and TIFF, uncompressed or deflate in
    strips, at their full depth, colour too; other 16-bit colour files (LZW TIFF, deflate tiles,
    SGI) at 8 bits, with a warning naming the file and why), 1-bit as 0/1,
    floating-point TIFFs as they are (they must lie in [0, 1]); EXIF orientation applied; a fully
    opaque alpha channel dropped.
    Refused with a ValueError naming the file: a file that is no image, transparency, an
    animation or multi-page file, and (with ``size=None``) files of different sizes.
    """
    chosen = selected_paths(path, indices, num_images)
    full = os.path.expanduser(os.fspath(path))
    skipped = _directory_files(full)[1] if os.path.isdir(full) else []
    if skipped:
        shown = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        warnings.warn(f"{os.fspath(path)!r}: {len(skipped)} file(s) left out, their names not ending in an image "
                      f"extension (krylovjax.data.IMAGE_EXTENSIONS): {shown}; a glob pattern such as "
                      f"{os.path.join(os.fspath(path), '*')!r} reads files of any ending", stacklevel=2)
    hw = None if size is None else _check_size(size)
    _check_channels(channels)
    if channels is None:
        channels = 1 if all(_gray_mode(p) for p in chosen) else 3

    def read(p):
        img = _read_image_file(p)
        return _fit(img, hw, channels), img.shape

    fitted = _map_images(read, chosen)
    imgs = [f for f, _ in fitted]
    _warn_fitting(path, chosen, [shape for _, shape in fitted], hw, channels)
    for p, img in zip(chosen, imgs):
        if img.shape[:2] != imgs[0].shape[:2]:
            raise ValueError(f"size: None keeps the files' own size, but {chosen[0]!r} is {imgs[0].shape[0]}x"
                             f"{imgs[0].shape[1]} and {p!r} is {img.shape[0]}x{img.shape[1]} (H x W); pass size "
                             "to resize them all")
    return validate_images(np.stack(imgs).transpose(0, 3, 1, 2), name=f"the images of {path!r}")


#: array layouts :func:`load_array` takes (N images, C channels, H x W pixels)
ARRAY_LAYOUTS = ("NCHW", "NHWC", "CHW", "HWC", "NHW", "HW")


def _how_to_pass(option: str, values: Sequence[str], path: str) -> str:
    """How to pass ``option`` both ways: the keyword of :func:`load_array` and the source string."""
    kw = " or ".join(f"{option}={v!r}" for v in values)
    return f"pass {kw} (or the source 'array:{path},{option}={values[0]}')"


def _array_layout(shape: tuple[int, ...], layout: str, path: str) -> str:
    """The layout of an array of ``shape``: ``layout`` checked, or inferred for "auto".

    Rank 3 under "auto", with ``(a, b, c)`` the shape: c in {1, 3} and a not: HWC; neither: NHW
    (grayscale images); a == 1 and c not: CHW (one grayscale image, which NHW reads the same);
    a == 3 and c not: refused (three grayscale images NHW, or one 3-channel image CHW); both a
    and c in {1, 3}: refused. Rank 4: NCHW or NHWC by the axis of length 1 or 3, refused when
    both or neither are. Rank 2: HW."""
    if layout != "auto":
        if layout not in ARRAY_LAYOUTS:
            raise ValueError(f"layout must be 'auto' or one of {ARRAY_LAYOUTS}, got {layout!r}")
        if len(layout) != len(shape):
            raise ValueError(f"layout: {layout!r} is for rank-{len(layout)} arrays; {path!r} holds shape {shape}")
        return layout
    ch = (1, 3)
    if len(shape) == 2:
        return "HW"
    if len(shape) in (3, 4):
        first, last = shape[len(shape) - 3], shape[-1]  # the candidates for the channel axis
        cands = [lay for lay, ok in ((("NCHW" if len(shape) == 4 else "CHW"), first in ch),
                                     (("NHWC" if len(shape) == 4 else "HWC"), last in ch)) if ok]
        if len(shape) == 3 and not cands:
            return "NHW"
        if len(shape) == 3 and cands == ["CHW"] and first == 3:  # CHW or NHW: both read the array
            raise ValueError(
                f"layout: cannot tell the layout of the shape {shape} of {path!r}: 3 grayscale images of "
                f"{shape[1]}x{shape[2]} (NHW) or one 3-channel image of {shape[1]}x{shape[2]} (CHW); "
                + _how_to_pass("layout", ("NHW", "CHW"), path))
        if len(cands) == 1:
            return cands[0]
        why = "both axes could be channels" if cands else "no axis of length 1 or 3 for the channels"
        lays = tuple(x for x in ARRAY_LAYOUTS if len(x) == len(shape))
        raise ValueError(f"layout: cannot tell the layout of the shape {shape} of {path!r} ({why}); "
                         + _how_to_pass("layout", lays, path))
    raise ValueError(f"{path!r} holds an array of shape {shape}; expected rank 2 to 4 (layouts {ARRAY_LAYOUTS})")


def load_array(
    path: str,
    *,
    key: str | None = None,
    layout: str = "auto",
    size: Any = None,
    channels: int | None = None,
    indices: Sequence[int] | None = None,
    num_images: int | None = None,
) -> np.ndarray:
    """Images from a ``.npy`` or ``.npz`` file as numpy ``[B, C, H, W]`` float32 in [0, 1].

    A ``.npy`` file is memory-mapped, so only the selected images are read.

    Args:
      path: the file (``~`` expanded).
      key: the array of a ``.npz`` file; None takes its only array, or the one named
        ``images`` (else refused, with the names to pass).
      layout: ``"auto"`` or one of :data:`ARRAY_LAYOUTS`. "auto" takes the axis of length 1 or
        3 for the channels (first or last of the image axes; NCHW / NHWC, CHW / HWC), a rank-3
        array with neither as a batch of grayscale images (NHW), and a rank-2 array as one
        grayscale image. Refused, with the layouts to pass: an array where both or neither could
        be the channels, and a rank-3 array ``(3, H, W)`` (three grayscale images NHW, or one
        3-channel image CHW; ``(1, H, W)`` is one grayscale image either way).
      ``key`` and ``layout`` can also be given in a :func:`load_images` source string:
      ``"array:<path>,key=<name>,layout=<LAYOUT>"``.
      size: as :func:`load_files` (None keeps the array's size).
      channels: 1 or 3, as :func:`load_files`; None keeps the array's.
      indices / num_images: as :func:`load_files`, along the images' axis.

    Values: uint8 /255, uint16 /65535, bool as 0/1, float16/32/64 as they are (they must be
    finite and in [0, 1]; data in [-1, 1] is refused with the rescaling to apply). Other
    dtypes and pickled object arrays are refused.
    """
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(f"path must name a .npy or .npz file, got {path!r}")
    spec = os.fspath(path)
    full = os.path.expanduser(spec)
    if not os.path.isfile(full):
        raise FileNotFoundError(f"{spec!r}: no such file")
    if not isinstance(layout, str):
        raise ValueError(f"layout must be 'auto' or one of {ARRAY_LAYOUTS}, got {layout!r}")
    hw = None if size is None else _check_size(size)
    _check_channels(channels)
    indices, num_images = _check_selection(indices, num_images)
    pickled = f"{spec!r} holds Python objects (a pickled array), which are not loaded; save a numeric array"
    with open(full, "rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY" and not magic.startswith(b"PK"):  # numpy takes anything else for a pickle
        raise ValueError(f"{spec!r} is not a .npy or .npz file numpy can read (it starts with {magic!r})")

    def unreadable(err: Exception) -> ValueError:
        if isinstance(err, ValueError) and ("pickle" in str(err) or "Python objects" in str(err)):
            return ValueError(pickled)
        return ValueError(f"{spec!r} is not a .npy or .npz file numpy can read: {type(err).__name__}: {err}")

    try:
        obj = np.load(full, mmap_mode="r", allow_pickle=False)
    except Exception as err:  # ValueError (pickled, truncated), OSError, EOFError, BadZipFile, ...
        raise unreadable(err) from err
    if isinstance(obj, np.lib.npyio.NpzFile):
        with obj:
            names = list(obj.files)
            if key is None:
                if len(names) != 1 and "images" not in names:
                    raise ValueError(f"key: {spec!r} holds the arrays {names}; name the one to load, e.g. "
                                     + _how_to_pass("key", names[:1], spec))
                key = names[0] if len(names) == 1 else "images"
            elif key not in names:
                raise ValueError(f"key must be one of the arrays of {spec!r}, {names}, got {key!r}")
            try:
                arr = obj[key]
            except Exception as err:
                raise unreadable(err) from err
    elif key is not None:
        raise ValueError(f"key: only a .npz file holds named arrays; {spec!r} is a .npy file")
    else:
        arr = obj
    lay = _array_layout(tuple(arr.shape), layout, spec)
    kind = arr.dtype.kind
    if not (kind == "b" or arr.dtype in (np.uint8, np.uint16) or arr.dtype in (np.float16, np.float32, np.float64)):
        hint = " (cast it with .astype(np.uint8) if its values are 0..255)" if kind in "iu" else ""
        raise ImageDTypeError(f"{spec!r} holds {arr.dtype} values; expected uint8, uint16, bool or "
                              f"float16/32/64 in [0, 1]{hint}")
    if "N" not in lay:
        arr, lay = arr[None], "N" + lay
    if "C" not in lay:
        arr, lay = arr[..., None], lay + "C"
    n = arr.shape[0]
    if arr.size == 0:  # (numpy's "zero-size array to reduction operation minimum" came instead)
        raise ValueError(f"{spec!r} holds no pixels: shape {tuple(arr.shape)} in layout {lay}; expected at least "
                         "one image of at least one pixel")
    sel = _pick(n, indices, num_images, f"the {n} images of {spec!r}")
    arr = np.asarray(arr[sel]).transpose([lay.index(a) for a in "NHWC"])
    if arr.shape[3] not in (1, 3):
        raise ValueError(f"{spec!r}: {arr.shape[3]} channels in layout {lay}; expected 1 or 3")
    if kind == "f":
        img = arr.astype(np.float32)
        finite = np.isfinite(img)
        if not finite.all():
            raise ValueError(f"{spec!r} holds {int((~finite).sum())} NaN/inf value(s)")
        lo, hi = float(img.min()), float(img.max())
        if lo < 0.0 or hi > 1.0:
            outside = float(np.mean((img < 0.0) | (img > 1.0)))
            clip = (f"{outside:.1%} of the values are outside it: noisy images on the [0, 1] scale? save "
                    "np.clip(x, 0, 1)")
            if lo >= -1.0 and hi <= 1.0:
                fix = " (data in [-1, 1]: save (x + 1) / 2" + (f"; {clip}" if outside <= 0.25 else "") + ")"
            elif lo >= 0.0 and 2.0 < hi <= 255.0:
                fix = " (data on a 0-255 scale: save x / 255)"
            else:  # noise on the [0, 1] scale leaves it by little
                fix = f" ({clip})" if outside <= 0.25 and lo >= -1.0 and hi <= 2.0 else ""
            raise ValueError(f"{spec!r} holds values in [{lo:.6g}, {hi:.6g}]; floating-point images must lie in "
                             f"[0, 1]{fix}")
    else:
        img = _to_float01(arr)
    out = _map_images(lambda im: _fit(im, hw, channels), list(img))
    return validate_images(np.stack(out).transpose(0, 3, 1, 2).astype(np.float32), name=f"the images of {spec!r}")


# --------------------------------------------------------------------------
# dispatch


#: the options an ``array:`` source string may end with: ``array:<path>,key=<name>,layout=<LAYOUT>``
SOURCE_OPTIONS = ("key", "layout")


def _source_options(source: str, path: str) -> tuple[str, dict[str, str]]:
    """An ``array:`` source's ``path`` without its trailing ``,name=value`` options, and them.

    A path that exists as given (commas included) is taken as itself; so is what is left once an
    option is taken off and it exists."""
    opts: dict[str, str] = {}
    while "," in path and not os.path.exists(os.path.expanduser(path)):
        head, tail = path.rsplit(",", 1)
        m = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*=(.*)", tail)
        if m is None:
            break
        name, value = m.group(1), m.group(2).strip()
        if name not in SOURCE_OPTIONS:
            raise ValueError(f"source: {source!r} ends in an unknown option {name!r}; the options are "
                             f"{', '.join(SOURCE_OPTIONS)} ('array:<path>,key=<name>,layout=<LAYOUT>'), and "
                             f"no file {path!r} exists")
        if name in opts:
            raise ValueError(f"source: {source!r} gives the option {name} twice")
        if not value:
            raise ValueError(f"source: {source!r} gives the option {name} no value")
        opts[name] = value
        path = head
    return path, opts


def _check_kwargs(source: str, fn: Callable, kwargs: dict, first: str) -> None:
    """A keyword argument ``fn`` (the loader behind ``source``) does not take, named with the ones
    it does, instead of the TypeError of a function the caller never called."""
    takes = [n for n, p in inspect.signature(fn).parameters.items()
             if n != first and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [k for k in kwargs if k not in takes]
    if unknown:
        raise ValueError(f"{unknown[0]}: source {source!r} takes the keyword arguments {', '.join(takes)} "
                         f"({fn.__name__}), got {', '.join(unknown)}")


def load_images(source: str, **kwargs: Any) -> np.ndarray:
    """One entry point for configs: returns ``[B, C, H, W]`` float32 in [0, 1].

    ``source``:
      * ``"builtin"``: :func:`builtin_dataset` (kwargs size=32, num_images=8,
        seed, crops, ...);
      * ``"builtin:<name>"``: one photo ``[1, 3, H, W]`` via
        :func:`builtin_image` (kwargs size=32, channels=3);
      * ``"cifar10"`` / ``"celeb_a"``: :func:`load_tfds` (kwargs split,
        data_dir, size, class_filter, indices, num_images);
      * ``"files:<path>"``: your image files, a directory, a glob pattern or one
        file (:func:`load_files`; kwargs size, channels, indices, num_images);
      * ``"array:<path>"``: your ``.npy``/``.npz`` array (:func:`load_array`;
        kwargs key, layout, size, channels, indices, num_images). ``key`` and ``layout`` can
        also end the source string, so that every binary taking a source passes them:
        ``"array:<path>,key=<name>"``, ``"array:<path>,layout=NHW"``,
        ``"array:<path>,key=<name>,layout=<LAYOUT>"`` (either or both, in any order; only these
        two names; a path that exists as given, commas included, is taken as itself). An option
        given both in the string and as a keyword argument is refused.
    The result passes :func:`validate_images`.
    """
    expected = f"'builtin', 'builtin:<name>', {', '.join(repr(n) for n in TFDS_DATASETS)}, 'files:<path>' or 'array:<path>'"
    if not isinstance(source, str):
        raise ValueError(f"source must be a string ({expected}), got {source!r}")
    if source == "builtin":
        _check_kwargs(source, builtin_dataset, kwargs, "")
        kw = {"size": 32, "num_images": 8}
        kw.update(kwargs)
        images = builtin_dataset(**kw)
    elif source.startswith("builtin:"):
        _check_kwargs(source, builtin_image, kwargs, "name")
        kw = {"size": 32, "channels": 3}
        kw.update(kwargs)
        images = builtin_image(source.split(":", 1)[1], **kw)[None]
    elif source in TFDS_DATASETS:
        _check_kwargs(source, load_tfds, kwargs, "name")
        images = load_tfds(source, **kwargs)
    elif source.startswith(("files:", "array:")):
        kind, path = source.split(":", 1)
        if not path:
            raise ValueError(f"source: {source!r} names no path; expected {kind}:<path>")
        _check_kwargs(source, load_files if kind == "files" else load_array, kwargs, "path")
        if kind == "files":
            images = load_files(path, **kwargs)
        else:
            path, opts = _source_options(source, path)
            if not path:
                raise ValueError(f"source: {source!r} names no path; expected array:<path>")
            both = [k for k in opts if k in kwargs]
            if both:
                raise ValueError(f"source: {source!r} gives {both[0]}, which is also passed as the keyword "
                                 f"argument {both[0]}={kwargs[both[0]]!r}; give it once")
            images = load_array(path, **opts, **kwargs)
    else:
        raise ValueError(f"source must be {expected}, got {source!r}")
    return validate_images(images)
