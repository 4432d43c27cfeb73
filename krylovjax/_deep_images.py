"""Colour image files stored at more than 8 bits per sample, read at their full depth.

Pillow (up to 13 at least) has no 16-bit colour mode: it opens a 16-bit RGB(A) or gray+alpha
PNG, a 16-bit colour PPM and a 16-bit colour TIFF as 8-bit RGB(A)/LA, keeping the high byte or
rounding. :func:`read_deep` reads those files itself where the format is simple enough to do
so exactly:

* PNG, every variant of 16-bit colour types 2 (RGB), 4 (gray + alpha) and 6 (RGBA),
  interlaced or not: the zlib stream is inflated and each scanline's filter (None, Sub, Up,
  Average, Paeth; PNG spec section 9) undone;
* binary and plain PPM with ``maxval`` above 255 (big-endian samples, scaled by ``maxval``);
* TIFF, uncompressed (strips or tiles, as Pillow locates them, the right-edge tiles' rows
  padded) or in deflate-compressed strips (with or without the horizontal-differencing
  predictor); chunky samples; an unspecified extra sample is padding and dropped.

Any other file whose header shows more than 8 bits per colour sample (a 16-bit colour TIFF with
LZW compression, in tiles with deflate or in separate planes; a 16-bit SGI file) is read by
Pillow at 8 bits, with a warning naming the file and the reason. JPEG 2000 and AVIF files of more
than 8 bits are decoded by Pillow to 8 bits before their depth can be seen here: no warning.
16-bit grayscale needs none of this: Pillow reads it at full depth (modes ``I;16*`` and ``I``).

Undoing Average and Paeth filters is sequential along a row and down the image, since each
byte depends on its left, upper and upper-left neighbours once they are decoded. Rather than
one Python step per pixel, the pixels are decoded one anti-diagonal ``y + x = k`` at a time: a
pixel's three neighbours lie on the two diagonals before its own, so each of the ``H + W - 1``
steps is one vectorised numpy update of a whole diagonal (any mix of filter types).
"""

from __future__ import annotations

import re
import struct
import warnings
import zlib
from typing import Any

import numpy as np

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {2: 3, 4: 2, 6: 4}  # colour type -> samples per pixel (the 16-bit types handled here)
_PNG_RAWMODES = ("RGB;16B", "LA;16B", "RGBA;16B")  # Pillow's raw modes of those types at 16 bits
# Adam7 passes: (first row, first column, row step, column step)
_ADAM7 = ((0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2), (1, 0, 2, 1))
# Pillow raw modes of 16-bit colour TIFF pixels -> (samples per pixel, numpy dtype)
_TIFF_RAWMODES = {f"{m};16{e}": (len(m), "<u2" if e == "L" else ">u2")
                  for m in ("RGB", "RGBA", "RGBa", "RGBX", "LA") for e in "LB"}


def read_deep(path: str, src: Any) -> tuple[np.ndarray, bool, int] | None:
    """The pixels of an opened Pillow image ``src`` (from file ``path``) that Pillow would read at
    8 bits per sample, at their full depth: ``(float32 [H, W, c] in [0, 1], has_alpha,
    orientation)``, the last channel the alpha when ``has_alpha``, before the EXIF
    ``orientation`` (tag 0x0112, 1 when there is none) is applied. None when the file is not
    stored at more than 8 bits per colour sample (Pillow reads it as it is), or when it is but
    cannot be read here (a warning says it is left to Pillow).

    Raises ValueError for a corrupt file (message without the path; the caller adds it).
    """
    fmt = getattr(src, "format", None)
    if fmt == "PNG":
        if _rawmode(src) not in _PNG_RAWMODES:  # Pillow's unpacking of the header's depth and type
            return None
        with open(path, "rb") as f:
            arr, exif = _decode_png16(f.read())
        # the EXIF chunk as the decoder met it: Pillow's getexif() would decode the pixels again to
        # reach an eXIf chunk after the image data
        return _scale(arr, 65535), arr.shape[2] in (2, 4), _exif_orientation(exif)
    if fmt == "PPM" and src.mode == "RGB" and src.tile:
        tile = src.tile[0]  # an 8-bit binary file is a "raw" tile; maxval in the args of the others
        if tile.codec_name not in ("ppm", "ppm_plain") or not isinstance(tile.args, tuple) or len(tile.args) < 2:
            return None
        maxval = int(tile.args[1])
        if maxval <= 255:
            return None
        with open(path, "rb") as f:
            data = f.read()
        w, h = src.size
        n = h * w * 3
        if tile.codec_name == "ppm":
            raw = data[tile.offset:tile.offset + 2 * n]
            if len(raw) < 2 * n:
                raise ValueError(f"the file is cut short: {len(raw)} of its {2 * n} pixel bytes are there")
            vals = np.frombuffer(raw, ">u2").astype(np.int64)
        else:  # "ppm_plain": decimal numbers separated by white space, comments from '#' to the line end
            text = b"\n".join(line.split(b"#", 1)[0] for line in data[tile.offset:].splitlines())
            vals = np.array([int(t) for t in text.split()[:n]], dtype=np.int64)
            if vals.size < n:
                raise ValueError(f"the file is cut short: {vals.size} of its {n} samples are there")
        if vals.max(initial=0) > maxval:
            raise ValueError(f"a sample {int(vals.max())} exceeds the file's maxval {maxval}")
        return _scale(vals.reshape(h, w, 3), maxval), False, int(src.getexif().get(0x0112, 1))
    if src.mode.startswith("I") or src.mode == "F":
        return None  # gray, which Pillow reads at full depth (I;16*, I, F)
    if fmt == "TIFF":
        bits = _tag(src.tag_v2, 258, 1)
        if max(bits) <= 8:
            return None
        got = _tiff_raw(path, src)
        if isinstance(got, str):
            raw_reason = got
            got = _tiff_deflate(path, src)
            if isinstance(got, str):
                _warn_8_bits(path, f"{max(bits)} bits per sample",
                             got if src.tag_v2.get(259, 1) != 1 else raw_reason)
                return None
        arr, has_alpha = got
        return _scale(arr, 65535), has_alpha, int(src.getexif().get(0x0112, 1))
    codec = src.tile[0].codec_name if src.tile else ""
    # 16-bit samples unpacked to 8 (";16B" big-endian, ";16L", ";16N" native; SGI's own decoder), not
    # a 16-bit pixel of 5-6-5 or 5-5-5 colour ("BGR;16", "BGR;15": full depth as it is)
    if re.search(r";16[BLN]$", _rawmode(src)) or codec == "SGI16":
        _warn_8_bits(path, "16 bits per sample", f"{fmt} files are read only through Pillow")
    return None


def _warn_8_bits(path: str, depth: str, reason: str) -> None:
    warnings.warn(f"{path!r} is stored at {depth}, but {reason}: it is left to Pillow, which reads 8 bits of "
                  "each sample at most; save it as a 16-bit PNG, or as a TIFF uncompressed or with deflate (zlib) "
                  "in strips, to keep the full depth", stacklevel=3)


def _rawmode(src: Any) -> str:
    """The raw mode of an opened image's first tile ("" when there is none)."""
    if not src.tile:
        return ""
    args = src.tile[0].args
    rawmode = args if isinstance(args, str) else (args[0] if args else "")
    return rawmode if isinstance(rawmode, str) else ""


def _exif_orientation(body: bytes | None) -> int:
    """The orientation (tag 0x0112; 1 when there is none) in the body of a PNG's eXIf chunk."""
    if not body:
        return 1
    from PIL import Image

    exif = Image.Exif()
    exif.load(body)
    return int(exif.get(0x0112, 1))


def _tag(tags: Any, key: int, default: Any) -> tuple:
    """A TIFF tag's values as a tuple (Pillow gives a single value bare)."""
    value = tags.get(key, default)
    return value if isinstance(value, tuple) else (value,)


def stored_gray(src: Any) -> bool:
    """Whether an opened Pillow image is a 16-bit gray + alpha PNG, which Pillow opens as RGBA
    (its samples are one gray channel and an alpha)."""
    return getattr(src, "format", None) == "PNG" and _rawmode(src) == "LA;16B"


def _scale(arr: np.ndarray, maxval: int) -> np.ndarray:
    return (arr.astype(np.float64) / maxval).astype(np.float32)


def _alpha_sample(src: Any, c: int) -> bool:
    """Whether the last of a TIFF's ``c`` samples is an alpha, as Pillow reads it (its mode RGBA or
    LA: an ExtraSamples tag of 1 or 2, or none at all) rather than padding (an unspecified extra
    sample, 0: mode RGB). The same rule for every coding, so a file reads alike compressed or not."""
    return c in (2, 4) and src.mode in ("RGBA", "RGBa", "LA", "La")


def _tiff_raw(path: str, src: Any) -> tuple[np.ndarray, bool] | str:
    """A 16-bit colour TIFF's uint16 ``[H, W, c]`` and whether its last sample is an alpha, from
    Pillow's tile list when every tile is an uncompressed ``raw`` block of chunky 16-bit samples,
    top-down (strips, or tiles, whose rows at the right edge are padded to the tile's width); else
    the reason why not."""
    w, h = src.size
    if src.tag_v2.get(284, 1) != 1:
        return "its channels are stored as separate planes"
    out = None
    with open(path, "rb") as f:
        for tile in src.tile:
            args = tuple(tile.args) if isinstance(tile.args, tuple) else (tile.args,)
            if tile.codec_name != "raw":
                return f"its pixels are coded ({tile.codec_name})"
            if not args or args[0] not in _TIFF_RAWMODES:
                return f"its samples are laid out as {args[0] if args else '?'}"
            if len(args) > 2 and args[2] not in (1, None):
                return "its rows are stored bottom-up"
            c, dtype = _TIFF_RAWMODES[args[0]]
            x0, y0, x1, y1 = tile.extents
            tw, th = min(x1, w) - x0, min(y1, h) - y0
            stride = int(args[1]) if len(args) > 1 and args[1] else tw * c * 2  # bytes per stored row
            if stride < tw * c * 2:
                return f"its rows are {stride} bytes, fewer than {tw} pixels need"
            f.seek(tile.offset)
            need = (th - 1) * stride + tw * c * 2
            raw = f.read(need)
            if len(raw) < need:
                raise ValueError(f"the file is cut short: a strip or tile holds {len(raw)} of its {need} bytes")
            if out is None:
                out = np.zeros((h, w, c), np.uint16)
            elif out.shape[2] != c:
                return "its strips or tiles differ in their samples"
            rows = np.frombuffer(raw + bytes(stride * th - need), np.uint8).reshape(th, stride)
            out[y0:y0 + th, x0:x0 + tw] = rows[:, :tw * c * 2].copy().view(dtype).reshape(th, tw, c)
    if out is None:
        return "it has no pixels Pillow locates"
    if c in (2, 4) and not _alpha_sample(src, c):  # an unspecified extra sample: padding, dropped
        return out[..., :-1], False
    return out, c in (2, 4)


def _tiff_deflate(path: str, src: Any) -> tuple[np.ndarray, bool] | str:
    """A 16-bit colour TIFF in deflate-compressed strips (compression 8 or 32946, predictor none
    or horizontal differencing, chunky unsigned samples) -> uint16 ``[H, W, c]`` and whether its
    last sample is an alpha (an unspecified extra sample is padding, dropped); else the reason
    why not."""
    tags = src.tag_v2
    w, h = src.size
    c = int(tags.get(277, 1))
    bits = _tag(tags, 258, 1)
    sample_format = _tag(tags, 339, 1)[0]
    compression = tags.get(259, 1)
    for bad, reason in ((compression not in (8, 32946), f"its compression ({compression}) is not deflate"),
                        (tags.get(284, 1) != 1, "its channels are stored as separate planes"),
                        (322 in tags, "it is stored in tiles"),
                        (tags.get(317, 1) not in (1, 2), f"its predictor is {tags.get(317)}"),
                        (set(bits) != {16} or sample_format != 1, f"its samples are {bits} bits, format "
                                                                  f"{sample_format}"),
                        (tags.get(262) not in (1, 2) or not 2 <= c <= 4, f"its photometric interpretation is "
                                                                        f"{tags.get(262)} with {c} samples")):
        if bad:
            return reason
    offsets, counts = _tag(tags, 273, ()), _tag(tags, 279, ())
    rows_per_strip = min(int(tags.get(278, h)), h)
    with open(path, "rb") as f:
        endian = "<" if f.read(2) == b"II" else ">"
        strips = []
        for i, (offset, count) in enumerate(zip(offsets, counts)):
            rows = min(rows_per_strip, h - i * rows_per_strip)
            if rows <= 0:
                break
            f.seek(offset)
            try:
                block = zlib.decompress(f.read(count))
            except zlib.error as err:
                raise ValueError(f"strip {i} cannot be inflated ({err}): the file is corrupt or cut short") from err
            if len(block) < rows * w * c * 2:
                raise ValueError(f"strip {i} holds {len(block)} bytes, fewer than its {rows} rows need")
            strips.append(np.frombuffer(block, endian + "u2", rows * w * c).reshape(rows, w, c))
    arr = np.concatenate(strips) if strips else np.zeros((0, w, c), np.uint16)
    if arr.shape[0] != h:
        raise ValueError(f"its strips hold {arr.shape[0]} of its {h} rows")
    if tags.get(317, 1) == 2:  # horizontal differencing: each sample minus the one a pixel left, mod 2^16
        arr = np.cumsum(arr, axis=1, dtype=np.uint16)
    arr = arr.astype(np.uint16)
    if c in (2, 4) and not _alpha_sample(src, c):
        return arr[..., :-1], False
    return arr, c in (2, 4)


def decode_png16(data: bytes) -> np.ndarray:
    """A PNG file of bit depth 16 and colour type 2, 4 or 6 -> uint16 ``[H, W, c]`` (c = 3, 2, 4).

    Chunks are checked against their CRC; ancillary chunks (gamma, colour profile, text, EXIF,
    transparency key) are skipped. Raises ValueError for anything else or a corrupt file.
    """
    return _decode_png16(data)[0]


def _decode_png16(data: bytes) -> tuple[np.ndarray, bytes | None]:
    """:func:`decode_png16`, and the body of the file's eXIf chunk (None without one)."""
    if data[:8] != _PNG_SIGNATURE:
        raise ValueError("not a PNG file (its signature is missing)")
    pos, ihdr, idat, exif = 8, None, [], None
    while True:
        if pos + 8 > len(data):
            raise ValueError("the file is cut short (no IEND chunk)")
        length, ctype_ = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        crc = data[pos + 8 + length:pos + 12 + length]
        if len(body) < length or len(crc) < 4:
            raise ValueError(f"the file is cut short (in its {ctype_.decode('latin-1')} chunk)")
        if zlib.crc32(ctype_ + body) != struct.unpack(">I", crc)[0]:
            raise ValueError(f"its {ctype_.decode('latin-1')} chunk fails its CRC check (the file is corrupt)")
        pos += 12 + length
        if ctype_ == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif ctype_ == b"IDAT":
            idat.append(body)
        elif ctype_ == b"eXIf":
            exif = body
        elif ctype_ == b"IEND":
            break
    if ihdr is None or not idat:
        raise ValueError("the file has no IHDR or no IDAT chunk")
    width, height, depth, colour, compression, filtering, interlace = ihdr
    if depth != 16 or colour not in _PNG_CHANNELS or compression != 0 or filtering != 0 or interlace not in (0, 1):
        raise ValueError(f"decode_png16 reads bit depth 16, colour types 2/4/6, interlace 0/1; got depth {depth}, "
                         f"colour type {colour}, compression {compression}, filter {filtering}, interlace {interlace}")
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as err:
        raise ValueError(f"its image data cannot be inflated ({err}): the file is corrupt or cut short") from err
    c = _PNG_CHANNELS[colour]
    bpp = 2 * c
    passes = [(0, 0, 1, 1)] if interlace == 0 else _ADAM7
    out = np.zeros((height, width, c), np.uint16)
    pos = 0
    for r0, c0, dr, dc in passes:
        ph, pw = -(-(height - r0) // dr), -(-(width - c0) // dc)
        if ph <= 0 or pw <= 0:
            continue  # an empty pass has no bytes at all, not even filter bytes
        size = ph * (1 + pw * bpp)
        if pos + size > len(raw):
            raise ValueError(f"its image data holds {len(raw)} bytes, fewer than its {width}x{height} pixels need")
        rows = np.frombuffer(raw, np.uint8, size, pos).reshape(ph, 1 + pw * bpp)
        pos += size
        pixels = unfilter(rows[:, 1:].reshape(ph, pw, bpp), rows[:, 0])
        out[r0::dr, c0::dc] = pixels.view(">u2").reshape(ph, pw, c)
    # bytes after the last scanline are ignored, as libpng does ("extra compressed data")
    return out, exif


def unfilter(filtered: np.ndarray, types: np.ndarray) -> np.ndarray:
    """Undo PNG scanline filters: ``filtered`` uint8 ``[h, w, bpp]`` (each row's bytes after its
    filter-type byte, grouped by pixel), ``types`` uint8 ``[h]`` -> the raw bytes ``[h, w, bpp]``.

    Filter f predicts each byte from a = the byte one pixel left, b = the byte above, c = the
    byte above-left (0 outside the image): 0 none, 1 a, 2 b, 3 floor((a + b) / 2), 4 Paeth's
    choice among a, b, c; the raw byte is (filtered + prediction) mod 256. With Average or Paeth
    rows, decoded one anti-diagonal at a time (see the module's docstring); without, one row at a
    time (each row depends only on itself and the one above).
    """
    h, w, bpp = filtered.shape
    types = np.asarray(types)
    if types.size and int(types.max()) > 4:
        bad = int(np.argmax(types > 4))
        raise ValueError(f"scanline {bad} has filter type {int(types[bad])}; PNG defines 0-4")
    if not np.any(types >= 3):  # None, Sub and Up only: each row is one vectorised step
        out = np.empty((h, w, bpp), np.uint8)
        above = np.zeros((w, bpp), np.uint8)
        for y in range(h):  # uint8 arithmetic wraps mod 256, as the filters do
            t = int(types[y])
            row = filtered[y]
            if t == 1:
                row = np.cumsum(row, axis=0, dtype=np.uint8)  # each byte plus the one a pixel left
            elif t == 2:
                row = row + above
            out[y] = above = row
        return out
    rec = np.zeros((h + 1, w + 1, bpp), np.int16)  # rec[y + 1, x + 1] is pixel (y, x); a zero border
    f = filtered.astype(np.int16)
    for k in range(h + w - 1):
        ys = np.arange(max(0, k - w + 1), min(h, k + 1))
        xs = k - ys
        a = rec[ys + 1, xs]
        b = rec[ys, xs + 1]
        c = rec[ys, xs]
        pa, pb, pc = np.abs(b - c), np.abs(a - c), np.abs(a + b - 2 * c)
        paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
        t = types[ys][:, None]
        pred = np.where(t == 1, a, np.where(t == 2, b, np.where(t == 3, (a + b) >> 1,
                                                             np.where(t == 4, paeth, 0))))
        rec[ys + 1, xs + 1] = (f[ys, xs] + pred) & 0xFF
    return rec[1:, 1:].astype(np.uint8)
