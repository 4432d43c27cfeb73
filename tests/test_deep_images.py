"""Image files at more than 8 bits per colour sample (``krylovjax._deep_images`` through
``krylovjax.data.load_files``): 16-bit colour PNG, PPM and TIFF, which Pillow reads at 8 bits.

The files are written here by small encoders that follow the formats' specifications (PNG
filters and Adam7 interlacing, TIFF strips, PackBits). The encoders are checked against an
independent decoder, Pillow: its 8-bit reading of each file must be the high bytes of the
pixels written. The full-depth reading must then give the pixels written exactly.
"""
import itertools
import struct
import warnings
import zlib

import numpy as np
import pytest
import tifffile  # the test extra (and a dependency of scikit-image): an independent TIFF writer and reader
from PIL import Image, ImageOps

from krylovjax import _deep_images as deep
from krylovjax import data as D

ADAM7 = ((0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2), (1, 0, 2, 1))


# ----------------------------------------------------------------------------- encoders


def _paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def _filter_rows(img, filters):
    """uint16 [h, w, c] -> PNG scanlines, row y filtered with ``filters[y % len]`` (spec 9.2),
    one byte at a time."""
    h, w, c = img.shape
    bpp = 2 * c
    raw = img.astype(">u2").view(np.uint8).reshape(h, w * bpp).astype(int)
    out = bytearray()
    for y in range(h):
        f = filters[y % len(filters)]
        out.append(f)
        for x in range(w * bpp):
            a = raw[y, x - bpp] if x >= bpp else 0
            b = raw[y - 1, x] if y > 0 else 0
            c_ = raw[y - 1, x - bpp] if y > 0 and x >= bpp else 0
            out.append((raw[y, x] - (0, a, b, (a + b) // 2, _paeth(a, b, c_))[f]) % 256)
    return bytes(out)


def _chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png16(img, filters=(0, 1, 2, 3, 4), interlace=False, extra=()):
    """A 16-bit PNG of uint16 [h, w, c]: c = 3 RGB, 2 gray + alpha, 4 RGBA."""
    h, w, c = img.shape
    if interlace:
        data = b"".join(_filter_rows(img[r::dr, s::ds], filters) for r, s, dr, ds in ADAM7
                        if img[r::dr, s::ds].size)
    else:
        data = _filter_rows(img, filters)
    ihdr = struct.pack(">IIBBBBB", w, h, 16, {3: 2, 2: 4, 4: 6}[c], 0, 0, int(interlace))
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + b"".join(extra)
            + _chunk(b"IDAT", zlib.compress(data)) + _chunk(b"IEND", b""))


def _exif_chunk(orientation):
    ex = Image.Exif()
    ex[0x0112] = orientation
    raw = ex.tobytes()
    return _chunk(b"eXIf", raw[6:] if raw.startswith(b"Exif\x00\x00") else raw)


def tiff16(img, endian="<", strips=1, compression=1, predictor=1, extrasamples=2):
    """A baseline TIFF of uint16 [h, w, c] (c = 3, or 4 with an unassociated alpha), chunky, in
    ``strips`` strips; compression 1 (none), 8 (deflate) or 32773 (PackBits)."""
    h, w, c = img.shape
    rows = -(-h // strips)
    blocks = []
    for i in range(0, h, rows):
        part = img[i:i + rows].astype(np.int64)
        if predictor == 2:  # horizontal differencing
            part = np.concatenate([part[:, :1], np.diff(part, axis=1)], axis=1) % 65536
        raw = part.astype(endian + "u2").tobytes()
        if compression == 8:
            raw = zlib.compress(raw)
        elif compression == 32773:  # PackBits, all literal runs of at most 128 bytes, row by row
            row_bytes = w * c * 2
            runs = [raw[j:min(j + 128, r + row_bytes)] for r in range(0, len(raw), row_bytes)
                    for j in range(r, r + row_bytes, 128)]
            raw = b"".join(bytes([len(run) - 1]) + run for run in runs)
        blocks.append(raw)
    tags = {256: (4, [w]), 257: (4, [h]), 258: (3, [16] * c), 259: (3, [compression]), 262: (3, [2]),
            273: (4, None), 277: (3, [c]), 278: (4, [rows]), 279: (4, [len(b) for b in blocks]),
            284: (3, [1]), 317: (3, [predictor])}
    if c == 4 and extrasamples is not None:
        tags[338] = (3, [extrasamples])
    n = len(tags)
    pos = 8 + 2 + 12 * n + 4
    extra, offsets = b"", {}
    for tag, (typ, vals) in sorted(tags.items()):
        if vals is not None and len(vals) * (2 if typ == 3 else 4) > 4:
            offsets[tag] = pos + len(extra)
            extra += struct.pack(endian + ("%dH" if typ == 3 else "%dI") % len(vals), *vals)
    strip_table = pos + len(extra) if len(blocks) > 1 else None
    data_start = pos + len(extra) + (4 * len(blocks) if len(blocks) > 1 else 0)
    starts = list(np.cumsum([0] + [len(b) for b in blocks[:-1]]) + data_start)
    if strip_table is not None:
        offsets[273] = strip_table
        extra += struct.pack(endian + "%dI" % len(starts), *starts)
    entries = b""
    for tag, (typ, vals) in sorted(tags.items()):
        vals = starts if tag == 273 else vals
        if tag in offsets:
            entries += struct.pack(endian + "HHII", tag, typ, len(vals), offsets[tag])
        elif typ == 3:
            entries += struct.pack(endian + "HHI", tag, typ, len(vals)) + struct.pack(
                endian + "%dH" % len(vals), *vals).ljust(4, b"\0")
        else:
            entries += struct.pack(endian + "HHII", tag, typ, 1, vals[0])
    head = (b"II*\x00" if endian == "<" else b"MM\x00*") + struct.pack(endian + "I", 8)
    return head + struct.pack(endian + "H", n) + entries + b"\0\0\0\0" + extra + b"".join(blocks)


def _write(path, data):
    path.write_bytes(data)
    return str(path)


def _pillow8(path):
    """Pillow's own 8-bit reading, [H, W, c]."""
    with Image.open(path) as im:
        return np.asarray(im)


def _read(path):
    """load_files' [H, W, c] float32."""
    return D.load_files(path)[0].transpose(1, 2, 0)


# ----------------------------------------------------------------------------- PNG


@pytest.mark.parametrize("channels", [3, 2, 4])
@pytest.mark.parametrize("interlace", [False, True])
def test_png16_decoded_exactly(tmp_path, channels, interlace):
    """Every filter type in every row position, odd sizes (with Adam7, sizes whose first passes
    are empty): the decoder gives the pixels written, and Pillow's 8-bit reading of the same
    bytes is their high byte (gray + alpha: Pillow's RGBA, the gray replicated)."""
    rng = np.random.default_rng(channels + 10 * interlace)
    for h, w in ((1, 1), (5, 7), (9, 13), (3, 1)):
        img = rng.integers(0, 65536, (h, w, channels)).astype(np.uint16)
        img[0, 0] = 65535  # extremes, so a sign or carry slip shows
        img[-1, -1] = 0
        for filters in ((0, 1, 2, 3, 4), (4, 3, 2, 1), (2, 0, 1), tuple(rng.integers(0, 5, 6))):
            data = png16(img, filters, interlace)
            np.testing.assert_array_equal(deep.decode_png16(data), img)
            path = _write(tmp_path / "x.png", data)
            high = img >> 8
            if channels == 2:
                high = np.concatenate([high[..., :1]] * 3 + [high[..., 1:]], axis=2)
            np.testing.assert_array_equal(_pillow8(path), high)


def test_unfilter_against_bytewise_reference():
    """The decoder (anti-diagonals, or rows without Average/Paeth) against a byte-at-a-time loop
    (the specification's order) on random filtered bytes and filter types."""
    rng = np.random.default_rng(3)
    for (h, w, bpp), top in itertools.product(((7, 11, 6), (12, 3, 8), (1, 9, 4), (9, 1, 6)), (5, 3)):
        # top 3: None, Sub and Up only, the row-at-a-time path
        filt = rng.integers(0, 256, (h, w, bpp)).astype(np.uint8)
        types = rng.integers(0, top, h).astype(np.uint8)
        ref = np.zeros((h, w * bpp), int)
        flat = filt.reshape(h, w * bpp).astype(int)
        for y in range(h):
            for x in range(w * bpp):
                a = ref[y, x - bpp] if x >= bpp else 0
                b = ref[y - 1, x] if y > 0 else 0
                c = ref[y - 1, x - bpp] if y > 0 and x >= bpp else 0
                ref[y, x] = (flat[y, x] + (0, a, b, (a + b) // 2, _paeth(a, b, c))[types[y]]) % 256
        np.testing.assert_array_equal(deep.unfilter(filt, types), ref.reshape(h, w, bpp))
    with pytest.raises(ValueError, match="scanline 1 has filter type 7; PNG defines 0-4"):
        deep.unfilter(np.zeros((3, 2, 6), np.uint8), np.array([0, 7, 9], np.uint8))


def test_load_files_reads_16bit_colour_png_at_full_depth(tmp_path):
    rng = np.random.default_rng(4)
    img = rng.integers(0, 65536, (6, 8, 3)).astype(np.uint16)
    path = _write(tmp_path / "rgb16.png", png16(img))
    x = _read(path)
    assert x.dtype == np.float32 and x.shape == (6, 8, 3)
    np.testing.assert_array_equal(x, (img / 65535.0).astype(np.float32))
    # what Pillow alone gives differs by up to a 255th
    assert np.abs(x - _pillow8(path) / 255.0).max() > 1e-3

    # an opaque 16-bit alpha is dropped; one pixel below 65535 is transparency, refused
    rgba = np.concatenate([img, np.full((6, 8, 1), 65535, np.uint16)], axis=2)
    np.testing.assert_array_equal(_read(_write(tmp_path / "rgba16.png", png16(rgba))), x)
    rgba[2, 3, 3] = 65534
    clear = _write(tmp_path / "clear16.png", png16(rgba))
    with pytest.raises(ValueError, match=r"clear16\.png' has transparent pixels \(1 with alpha below its maximum\)"):
        D.load_files(clear)

    # gray + alpha is one channel (Pillow opens it as RGBA): channels=None infers 1
    la = np.stack([img[..., 0], np.full((6, 8), 65535, np.uint16)], axis=2)
    la_path = _write(tmp_path / "la16.png", png16(la))
    y = D.load_files(la_path)
    assert y.shape == (1, 1, 6, 8)
    np.testing.assert_array_equal(y[0, 0], (img[..., 0] / 65535.0).astype(np.float32))
    # and with an 8-bit RGB file beside it, the folder is read as colour, the gray replicated
    (tmp_path / "mix").mkdir()
    _write(tmp_path / "mix" / "a_la16.png", png16(la))
    Image.fromarray((img >> 8).astype(np.uint8)).save(tmp_path / "mix" / "b_rgb8.png")
    both = D.load_files(str(tmp_path / "mix"))
    assert both.shape == (2, 3, 6, 8)
    np.testing.assert_array_equal(both[0], np.repeat(y[0], 3, axis=0))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_as_pillow(tmp_path, orientation):
    """The numpy orientations used for full-depth files equal ImageOps.exif_transpose: on an
    8-bit array directly, and on a 16-bit PNG with an eXIf chunk, whose full-depth reading must
    be Pillow's oriented 8-bit reading in its high byte."""
    rng = np.random.default_rng(orientation)
    a8 = rng.integers(0, 256, (4, 6, 3)).astype(np.uint8)
    im = Image.fromarray(a8)
    ex = im.getexif()
    ex[0x0112] = orientation
    im.save(tmp_path / "o.png", exif=ex)
    with Image.open(tmp_path / "o.png") as src:
        want = np.asarray(ImageOps.exif_transpose(src))
    got = D._ORIENT.get(orientation, lambda a: a)(a8)
    np.testing.assert_array_equal(got, want)
    # file_info's size is that of the oriented image (a quarter turn swaps width and height)
    assert D.file_info(str(tmp_path / "o.png")) == {"size": (want.shape[1], want.shape[0]), "gray": False}

    img = rng.integers(0, 65536, (4, 6, 3)).astype(np.uint16)
    path = _write(tmp_path / "o16.png", png16(img, extra=[_exif_chunk(orientation)]))
    x = _read(path)
    with Image.open(path) as src:
        oriented8 = np.asarray(ImageOps.exif_transpose(src))
    assert x.shape == oriented8.shape
    np.testing.assert_array_equal(np.round(x * 65535).astype(np.int64) >> 8, oriented8)


def test_png16_corrupt_or_cut_short_is_refused_with_the_file_named(tmp_path):
    img = np.random.default_rng(5).integers(0, 65536, (8, 8, 3)).astype(np.uint16)
    data = bytearray(png16(img))
    idat = data.index(b"IDAT")
    bad = bytearray(data)
    bad[idat + 10] ^= 0xFF
    path = _write(tmp_path / "bad.png", bytes(bad))
    with pytest.raises(ValueError, match=r"bad\.png' could not be read as an image: .*IDAT chunk fails its CRC"):
        D.load_files(path)
    cut = _write(tmp_path / "cut.png", bytes(data[:idat + 40]))
    with pytest.raises(ValueError, match=r"cut\.png' could not be read as an image: .*cut short"):
        D.load_files(cut)
    with pytest.raises(ValueError, match="not a PNG file"):
        deep.decode_png16(b"GIF89a" + bytes(20))
    # image data longer than the pixels need: the rest is ignored, as libpng (and Pillow) do
    h, w = img.shape[:2]
    rows = b"".join(b"\x00" + img[y].astype(">u2").tobytes() for y in range(h)) + bytes(7)
    extra = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
             + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b""))
    np.testing.assert_array_equal(deep.decode_png16(extra), img)
    np.testing.assert_array_equal(_pillow8(_write(tmp_path / "extra.png", extra)), img >> 8)


# ----------------------------------------------------------------------------- PPM


def test_ppm_above_8_bits_at_full_depth(tmp_path):
    rng = np.random.default_rng(6)
    for maxval in (65535, 1000, 300):
        img = rng.integers(0, maxval + 1, (4, 5, 3))
        img[0, 0, 0] = maxval
        want = (img / maxval).astype(np.float32)
        binary = _write(tmp_path / f"b{maxval}.ppm", b"P6\n5 4\n%d\n" % maxval + img.astype(">u2").tobytes())
        np.testing.assert_array_equal(_read(binary), want)
        rows = b"\n".join(b" ".join(b"%d" % v for v in row.ravel()) for row in img)
        plain = _write(tmp_path / f"p{maxval}.ppm", b"P3\n# a comment\n5 4\n%d\n" % maxval + rows + b" # end\n")
        np.testing.assert_array_equal(_read(plain), want)
        # Pillow's 8-bit reading is these values rounded to 255ths
        np.testing.assert_allclose(_pillow8(binary) / 255.0, want, atol=0.5 / 255 + 1e-6)
    vals = np.zeros(4 * 4 * 3, int)
    vals[4] = 1001
    over = _write(tmp_path / "over.ppm", b"P6\n4 4\n1000\n" + vals.astype(">u2").tobytes())
    with pytest.raises(ValueError, match=r"over\.ppm' could not be read.*sample 1001 exceeds the file's maxval 1000"):
        D.load_files(over)


# ----------------------------------------------------------------------------- TIFF


@pytest.mark.parametrize("endian", ["<", ">"])
@pytest.mark.parametrize("compression,predictor", [(1, 1), (8, 1), (8, 2)])
def test_tiff16_colour_at_full_depth(tmp_path, endian, compression, predictor):
    rng = np.random.default_rng(7)
    for c in (3, 4):
        img = rng.integers(0, 65536, (7, 5, c)).astype(np.uint16)
        if c == 4:
            img[..., 3] = 65535
        path = _write(tmp_path / "x.tif", tiff16(img, endian, strips=3, compression=compression,
                                                 predictor=predictor))
        np.testing.assert_array_equal(_pillow8(path), img >> 8)  # the encoder, checked by Pillow
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            np.testing.assert_array_equal(_read(path), (img[..., :3] / 65535.0).astype(np.float32))


def test_tiff16_in_another_compression_is_read_at_8_bits_with_a_warning(tmp_path):
    img = np.random.default_rng(8).integers(0, 65536, (4, 6, 3)).astype(np.uint16)
    path = _write(tmp_path / "packbits.tif", tiff16(img, compression=32773))
    np.testing.assert_array_equal(_pillow8(path), img >> 8)
    with pytest.warns(UserWarning, match=r"packbits\.tif' is stored at 16 bits per sample, but its compression "
                                         r"\(32773\) is not deflate: it is left to Pillow, which reads 8 bits"):
        x = _read(path)
    np.testing.assert_array_equal(x, ((img >> 8) / 255.0).astype(np.float32))


@pytest.mark.parametrize("shape", [(20, 40), (32, 20), (20, 32), (17, 5)])
@pytest.mark.parametrize("compression", [None, "zlib"])
def test_tifffile_tiles_and_padding_samples(tmp_path, shape, compression):
    """TIFFs written by tifffile (an independent writer, and reader): tiles that reach past the
    right or bottom edge (Pillow gives their rows a stride), and an RGB with an unspecified extra
    sample (padding: dropped, not taken for transparency). Uncompressed tiles and deflate strips
    are read at full depth; deflate tiles are read at 8 bits with a warning saying why."""
    rng = np.random.default_rng(shape[0] * shape[1])
    img = rng.integers(0, 65536, shape + (3,)).astype(np.uint16)
    tiled = str(tmp_path / "tiled.tif")
    tifffile.imwrite(tiled, img, tile=(16, 16), photometric="rgb", compression=compression)
    np.testing.assert_array_equal(tifffile.imread(tiled), img)
    if compression is None:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            np.testing.assert_array_equal(_read(tiled), (img / 65535.0).astype(np.float32))
    else:
        with pytest.warns(UserWarning, match=r"but it is stored in tiles: it is left to Pillow, which reads 8 bits"):
            x = _read(tiled)
        np.testing.assert_array_equal(x, ((img >> 8) / 255.0).astype(np.float32))
    padded = np.concatenate([img, np.zeros(shape + (1,), np.uint16)], axis=2)  # the extra sample: 0
    path = str(tmp_path / "rgbx.tif")
    tifffile.imwrite(path, padded, photometric="rgb", extrasamples=["unspecified"], compression=compression)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(_read(path), (img / 65535.0).astype(np.float32))


def test_tiff_planes_and_sgi16_warn_with_the_reason(tmp_path):
    img = np.random.default_rng(21).integers(0, 65536, (6, 8, 3)).astype(np.uint16)
    path = str(tmp_path / "planar.tif")
    tifffile.imwrite(path, img, photometric="rgb", planarconfig="separate")
    with pytest.warns(UserWarning, match=r"planar\.tif' is stored at 16 bits per sample, but its channels are "
                                         r"stored as separate planes: it is left to Pillow"):
        with pytest.raises(ValueError, match=r"planar\.tif' could not be read as an image"):  # nor can Pillow
            D.load_files(path)
    # SGI, 16 bits per sample, uncompressed (the format's 512-byte header, then the planes bottom-up)
    head = struct.pack(">hbbHHHHii4s80sI", 474, 0, 2, 3, 8, 6, 3, 0, 65535, b"", b"", 0).ljust(512, b"\0")
    sgi = _write(tmp_path / "x16.sgi", head + b"".join(img[::-1, :, c].astype(">u2").tobytes() for c in range(3)))
    with pytest.warns(UserWarning, match=r"x16\.sgi' is stored at 16 bits per sample, but SGI files are read "
                                         r"only through Pillow"):
        x = _read(sgi)
    np.testing.assert_array_equal(np.round(x * 255).astype(int), img >> 8)  # Pillow's 8 bits, as warned


@pytest.mark.parametrize("compression", [1, 8])
def test_tiff_rgba_without_extrasamples_reads_alike_compressed_or_not(tmp_path, compression):
    """(A review.) With no ExtraSamples tag Pillow takes the 4th sample for alpha: the uncompressed
    path did, the deflate path took it for padding. Both follow Pillow's mode now."""
    img = np.random.default_rng(23).integers(0, 65536, (6, 5, 4)).astype(np.uint16)
    img[..., 3] = 65535
    path = _write(tmp_path / "a.tif", tiff16(img, compression=compression, extrasamples=None))
    with Image.open(path) as im:
        assert im.mode == "RGBA"
    np.testing.assert_array_equal(_read(path), (img[..., :3] / 65535.0).astype(np.float32))
    img[0, 0, 3] = 1000
    path = _write(tmp_path / "b.tif", tiff16(img, compression=compression, extrasamples=None))
    with pytest.raises(ValueError, match=r"b\.tif' has transparent pixels \(1 with alpha below"):
        D.load_files(path)


def test_a_565_bmp_is_not_warned_about(tmp_path):
    """(A review.) A BMP of 16-bit 5-6-5 pixels (Pillow's raw mode "BGR;16") is read at its full
    depth by Pillow; the warning about 16-bit samples matched its raw mode's name."""
    w, h = 4, 4
    px = np.array([[0xF800, 0x07E0, 0x001F, 0xFFFF]] * h, "<u2")
    info = (struct.pack("<IiiHHIIiiII", 40, w, h, 1, 16, 3, px.nbytes, 2835, 2835, 0, 0)
            + struct.pack("<III", 0xF800, 0x07E0, 0x001F))
    off = 14 + len(info)
    path = _write(tmp_path / "565.bmp", b"BM" + struct.pack("<IHHI", off + px.nbytes, 0, 0, off) + info + px.tobytes())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = _read(path)
    np.testing.assert_array_equal(np.round(x[0] * 255), [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]])


def test_8bit_files_are_not_touched(tmp_path):
    """8-bit PNG/TIFF/PPM and 16-bit gray PNG: read_deep leaves them to Pillow (None)."""
    rng = np.random.default_rng(9)
    a8 = rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)
    g16 = rng.integers(0, 65536, (4, 4)).astype(np.uint16)
    for name, save in (("a.png", lambda p: Image.fromarray(a8).save(p)),
                       ("a.tif", lambda p: Image.fromarray(a8).save(p)),
                       ("a.ppm", lambda p: Image.fromarray(a8).save(p)),
                       ("g.png", lambda p: Image.fromarray(g16).save(p))):
        save(tmp_path / name)
        with Image.open(tmp_path / name) as src:
            assert deep.read_deep(str(tmp_path / name), src) is None, name
    np.testing.assert_array_equal(_read(str(tmp_path / "g.png"))[..., 0], (g16 / 65535.0).astype(np.float32))
