r"""Reading your own images: ``files:`` (PNG, JPEG through Pillow) and ``array:`` (``.npy``).

Writes ``--num_images`` photographs (the built-in set of :func:`krylovjax.data.builtin_dataset`
at ``--source_size``: the RGB photos, then random crops of them) as PNG files, JPEG files
(quality 90) and one uint8 NHWC ``.npy`` array into a temporary directory, then times
:func:`krylovjax.data.load_images` on each at ``--size`` (centre crop and antialiased resize per
image, as the pre-computation binary's ``--config.dataset=files:<dir>`` does), the fastest of
``--repeats`` runs. The files were just written, so they come from the page cache: the times are
decoding and resizing, not the disk. Also checked: the three sources give the same images to
the JPEG's loss (the PNG and the array are bit-identical).

Usage::

    python -m experiments.bench_load_images --num_images=1000 --source_size=256 --size=32 \
        --json_out=runs/load_images.json
"""

from __future__ import annotations

import os
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_images", 200, "Images written and read per format.")
flags.DEFINE_integer("source_size", 256, "Side of the written images (pixels).")
flags.DEFINE_integer("size", 32, "Side the images are read at (centre crop and resize).")
flags.DEFINE_integer("repeats", 3, "Timed reads per source; the fastest counts.")
flags.DEFINE_string("json_out", None, "Write the rows and the machine here.")


def write_sources(directory: str, num_images: int, source_size: int) -> dict[str, str]:
    """The built-in photos at ``source_size`` as PNG and JPEG files and a uint8 ``.npy``; returns
    ``{source name: load_images source}``."""
    import numpy as np
    from PIL import Image

    from krylovjax.data import builtin_dataset

    pixels = (builtin_dataset(source_size, num_images) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
    sources = {}
    for fmt, ext, kw in (("png", "png", {}), ("jpeg", "jpg", {"quality": 90})):
        sub = os.path.join(directory, fmt)
        os.makedirs(sub)
        for i, img in enumerate(pixels):
            Image.fromarray(img).save(os.path.join(sub, f"img{i}.{ext}"), **kw)
        sources[fmt] = f"files:{sub}"
    np.save(os.path.join(directory, "images.npy"), pixels)
    sources["npy"] = f"array:{os.path.join(directory, 'images.npy')}"
    return sources


def _disk_mb(source: str) -> float:
    path = source.split(":", 1)[1]
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)) / 1e6
    return os.path.getsize(path) / 1e6


def measure(num_images: int, source_size: int, size: int, repeats: int) -> list[dict]:
    """One row per source: the fastest of ``repeats`` reads, and the largest difference of its
    images from the PNG files' (0 for the array, the JPEG's loss for the JPEG files)."""
    import numpy as np

    from krylovjax.data import load_images

    rows, ref = [], None
    with tempfile.TemporaryDirectory() as d:
        for name, source in write_sources(d, num_images, source_size).items():
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                images = load_images(source, size=size)
                times.append(time.perf_counter() - t0)
            ref = images if ref is None else ref
            s = min(times)
            rows.append({"source": name, "images": num_images, "source_size": source_size, "size": size,
                         "seconds": s, "seconds_runs": times, "images_per_second": num_images / s,
                         "disk_mb": _disk_mb(source), "max_abs_diff_vs_png": float(np.abs(images - ref).max())})
            print(f"| {name} | {num_images} | {source_size} -> {size} | {s:.3f} | {num_images / s:.0f} | "
                  f"{rows[-1]['disk_mb']:.1f} | {rows[-1]['max_abs_diff_vs_png']:.3g} |", flush=True)
    return rows


def main(argv):
    from krylovjax import experiment_utils as eu

    eu.check_no_args(argv)
    for name, lo in (("num_images", 1), ("source_size", 4), ("size", 4), ("repeats", 1)):
        eu.check_flag(FLAGS[name].value >= lo, name, f"an integer >= {lo}", FLAGS[name].value)
    print("| source | images | pixels | seconds | images / s | MB on disk | max abs diff vs PNG |")
    print("|---|---|---|---|---|---|---|")
    rows = measure(FLAGS.num_images, FLAGS.source_size, FLAGS.size, FLAGS.repeats)
    if FLAGS.json_out:
        eu.write_json(FLAGS.json_out, {"machine": eu.benchmark_machine(), "rows": rows})
        print(f"wrote {FLAGS.json_out}")


if __name__ == "__main__":
    from krylovjax.experiment_utils import one_line_usage_errors, parse_flags

    app.run(one_line_usage_errors(main), flags_parser=parse_flags)
