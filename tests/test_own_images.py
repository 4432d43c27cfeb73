"""Your own images: ``krylovjax.data.load_files`` (image files through Pillow), ``load_array``
(``.npy``/``.npz``) and their ``load_images`` sources ``files:<path>`` / ``array:<path>``.

The references are the arrays the tests write: a PNG holds its pixels exactly, so what is read
back must be them / 255 (or / 65535); resizing is checked against a centre crop computed here
and ``skimage.transform.resize``."""
import json
import os
import warnings

import numpy as np
import pytest
from PIL import Image
from skimage.transform import resize as sk_resize
from test_cli_audit import _run

from _fs import snapshot

from krylovjax import data as D


def _rgb(rng, h, w):
    return (rng.random((h, w, 3)) * 255).astype(np.uint8)


def _save(path, arr, **kw):
    Image.fromarray(arr).save(path, **kw)
    return path


# ----------------------------------------------------------------------------- image files


@pytest.mark.filterwarnings("ignore:.*file\\(s\\) left out")  # notes.txt: checked once below
def test_files_read_exactly_in_natural_order(tmp_path):
    """A directory's image files, sorted with numbers compared as numbers; other files, hidden
    files and subdirectories are left out; the pixels are the PNGs' / 255 exactly."""
    rng = np.random.default_rng(0)
    arrs = {n: _rgb(rng, 6, 9) for n in ("img10.png", "img2.png", "img1.PNG")}
    for n, a in arrs.items():
        _save(tmp_path / n, a)
    (tmp_path / "notes.txt").write_text("not an image")
    _save(tmp_path / ".hidden.png", _rgb(rng, 6, 9))
    os.mkdir(tmp_path / "sub")
    _save(tmp_path / "sub" / "img0.png", _rgb(rng, 6, 9))
    order = ["img1.PNG", "img2.png", "img10.png"]
    assert D.image_paths(str(tmp_path)) == [str(tmp_path / n) for n in order]
    with pytest.warns(UserWarning, match=r"1 file\(s\) left out.*: notes\.txt;"):  # named, not skipped silently
        x = D.load_files(str(tmp_path))
    assert x.shape == (3, 3, 6, 9) and x.dtype == np.float32
    want = np.stack([arrs[n] for n in order]).transpose(0, 3, 1, 2) / 255.0
    np.testing.assert_allclose(x, want, rtol=0, atol=1e-7)
    # the same through load_images, with a selection
    y = D.load_images(f"files:{tmp_path}", indices=[2, 0])
    np.testing.assert_array_equal(y, x[[2, 0]])
    np.testing.assert_array_equal(D.load_images(f"files:{tmp_path}", num_images=2), x[:2])
    # num_images is an upper bound (as for tfds): all three
    assert D.load_files(str(tmp_path), num_images=50).shape[0] == 3


def test_files_glob_single_file_and_subdirectory_hint(tmp_path):
    rng = np.random.default_rng(1)
    os.makedirs(tmp_path / "a" / "b")
    p1 = _save(tmp_path / "a" / "x.png", _rgb(rng, 5, 5))
    p2 = _save(tmp_path / "a" / "b" / "y.png", _rgb(rng, 5, 5))
    assert D.image_paths(str(tmp_path / "**" / "*.png")) == [str(p2), str(p1)]  # by path: a/b/ < a/x
    assert D.image_paths(str(p2)) == [str(p2)]
    assert D.load_files(str(p2)).shape == (1, 3, 5, 5)
    with pytest.raises(FileNotFoundError, match=r"holds no image file.*subdirectories \(a\).*\*\*"):
        D.image_paths(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no file matches the pattern"):
        D.image_paths(str(tmp_path / "*.jpg"))
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        D.load_images(f"files:{tmp_path / 'nothing'}")
    with pytest.raises(ValueError, match="names no path"):
        D.load_images("files:")
    # a directory whose name holds glob characters is read as itself
    odd = tmp_path / "photos [2024]"
    os.makedirs(odd)
    p3 = _save(odd / "z.png", _rgb(rng, 5, 5))
    assert D.image_paths(str(odd)) == [str(p3)]


def test_files_resize_is_a_centre_crop_then_antialiased_resize(tmp_path):
    rng = np.random.default_rng(2)
    a = _rgb(rng, 20, 30)
    _save(tmp_path / "wide.png", a)
    x = D.load_files(str(tmp_path), size=8)
    crop = a[:, 5:25] / 255.0  # the centred 20 x 20 square
    want = sk_resize(crop, (8, 8, 3), order=1, mode="reflect", anti_aliasing=True)
    np.testing.assert_allclose(x[0], want.transpose(2, 0, 1), atol=1e-6)
    y = D.load_files(str(tmp_path), size=(10, 5))  # taller than wide: the centred 20 x 10
    want = sk_resize(a[:, 10:20] / 255.0, (10, 5, 3), order=1, mode="reflect", anti_aliasing=True)
    np.testing.assert_allclose(y[0], want.transpose(2, 0, 1), atol=1e-6)


def test_files_channels(tmp_path):
    """All grayscale -> one channel; a grayscale file among colour ones is replicated; colour to
    one channel is ITU-R 601 luminance."""
    rng = np.random.default_rng(3)
    g = (rng.random((6, 6)) * 255).astype(np.uint8)
    c = _rgb(rng, 6, 6)
    gdir, mdir = tmp_path / "g", tmp_path / "m"
    os.makedirs(gdir)
    os.makedirs(mdir)
    _save(gdir / "g.png", g)
    _save(mdir / "a.png", g)
    _save(mdir / "b.png", c)
    x = D.load_files(str(gdir))
    assert x.shape == (1, 1, 6, 6)
    np.testing.assert_allclose(x[0, 0], g / 255.0, atol=1e-7)
    m = D.load_files(str(mdir))
    assert m.shape == (2, 3, 6, 6)
    np.testing.assert_allclose(m[0], np.repeat(g[None] / 255.0, 3, axis=0), atol=1e-7)
    one = D.load_files(str(mdir), channels=1)
    lum = (c / 255.0) @ np.array([0.2125, 0.7154, 0.0721])
    np.testing.assert_allclose(one[1, 0], lum, atol=1e-6)
    with pytest.raises(ValueError, match="channels must be None, 1 or 3"):
        D.load_files(str(mdir), channels=2)


def test_files_pixel_formats(tmp_path):
    """16-bit grayscale / 65535, 1-bit as 0/1, a palette as its colours, an opaque alpha dropped,
    CMYK converted, a float TIFF as it is, the EXIF orientation applied."""
    rng = np.random.default_rng(4)
    g16 = (rng.random((5, 7)) * 65535).astype(np.uint16)
    _save(tmp_path / "g16.png", g16)
    np.testing.assert_allclose(D.load_files(str(tmp_path / "g16.png"))[0, 0], g16 / 65535.0, atol=1e-7)

    bits = rng.random((5, 7)) > 0.5
    Image.fromarray(bits).convert("1").save(tmp_path / "bits.png")
    np.testing.assert_array_equal(D.load_files(str(tmp_path / "bits.png"))[0, 0], bits.astype(np.float32))

    rgb = _rgb(rng, 5, 7)
    pal = Image.fromarray(rgb).quantize(colors=16)
    pal.save(tmp_path / "pal.png")
    want = np.asarray(pal.convert("RGB")) / 255.0
    np.testing.assert_allclose(D.load_files(str(tmp_path / "pal.png"))[0], want.transpose(2, 0, 1), atol=1e-7)

    rgba = np.concatenate([rgb, np.full((5, 7, 1), 255, np.uint8)], axis=2)
    _save(tmp_path / "opaque.png", rgba)
    np.testing.assert_allclose(D.load_files(str(tmp_path / "opaque.png"))[0], rgb.transpose(2, 0, 1) / 255.0,
                               atol=1e-7)

    cmyk = Image.fromarray(rgb).convert("CMYK")
    cmyk.save(tmp_path / "cmyk.tif")
    want = np.asarray(cmyk.convert("RGB")) / 255.0
    np.testing.assert_allclose(D.load_files(str(tmp_path / "cmyk.tif"))[0], want.transpose(2, 0, 1), atol=1e-7)

    f = rng.random((5, 7)).astype(np.float32)
    Image.fromarray(f).save(tmp_path / "f.tif")  # float32: mode F
    np.testing.assert_array_equal(D.load_files(str(tmp_path / "f.tif"))[0, 0], f)

    # EXIF orientation 6: the stored 8 x 16 pixels are shown rotated 90 degrees clockwise
    grad = np.tile(np.linspace(0, 255, 16).astype(np.uint8), (8, 1))
    img = Image.fromarray(np.stack([grad] * 3, axis=2))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    x = D.load_files(str(tmp_path / "phone.jpg"))
    assert x.shape == (1, 3, 16, 8)
    np.testing.assert_allclose(x[0, 0], np.rot90(grad, -1) / 255.0, atol=0.03)


def test_files_refused_with_the_file_named(tmp_path):
    rng = np.random.default_rng(5)
    rgb = _rgb(rng, 5, 7)
    rgba = np.concatenate([rgb, np.full((5, 7, 1), 255, np.uint8)], axis=2)
    rgba[0, 0, 3] = 10
    _save(tmp_path / "clear.png", rgba)
    with pytest.raises(ValueError, match=r"clear\.png' has transparent pixels \(1 with alpha below its maximum\)"):
        D.load_files(str(tmp_path / "clear.png"))

    frames = [Image.fromarray(_rgb(rng, 5, 5)) for _ in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with pytest.raises(ValueError, match=r"anim\.gif' holds 3 frames"):
        D.load_files(str(tmp_path / "anim.gif"))

    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match=r"broken\.png' could not be read as an image"):
        D.load_files(str(tmp_path / "broken.png"))
    data = (tmp_path / "d")
    os.makedirs(data)
    _save(data / "ok.png", rgb)
    buf = (tmp_path / "x.png")
    _save(buf, _rgb(rng, 32, 32))
    (data / "truncated.png").write_bytes(buf.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"truncated\.png' could not be read"):
        D.load_files(str(data), size=4)

    f = np.full((5, 5), 2.0, np.float32)
    Image.fromarray(f).save(tmp_path / "hot.tif")  # float32: mode F
    with pytest.raises(ValueError, match=r"hot\.tif': floating-point pixels must be finite and in \[0, 1\]"):
        D.load_files(str(tmp_path / "hot.tif"))

    sizes = tmp_path / "sizes"
    os.makedirs(sizes)
    _save(sizes / "a.png", _rgb(rng, 5, 7))
    _save(sizes / "b.png", _rgb(rng, 6, 7))
    with pytest.raises(ValueError, match=r"a\.png' is 5x7 and .*b\.png' is 6x7.*pass size"):
        D.load_files(str(sizes))
    assert D.load_files(str(sizes), size=4).shape == (2, 3, 4, 4)
    tiny = tmp_path / "tiny"
    os.makedirs(tiny)
    _save(tiny / "t.png", _rgb(rng, 3, 3))
    with pytest.raises(ValueError, match="H, W >= 4"):
        D.load_files(str(tiny))


def test_files_read_on_threads_keep_their_order_and_the_first_error(tmp_path, monkeypatch):
    """Files are decoded and resized on several threads: the images come back in the files'
    order, and of two unreadable files the first in that order is named."""
    rng = np.random.default_rng(12)
    monkeypatch.setattr(D.os, "cpu_count", lambda: 4)
    arrs = [_rgb(rng, 12, 12) for _ in range(24)]
    for i, a in enumerate(arrs):
        _save(tmp_path / f"f{i}.png", a)
    x = D.load_files(str(tmp_path), size=6)
    for i in (0, 7, 23):
        np.testing.assert_array_equal(x[i], D.load_files(str(tmp_path / f"f{i}.png"), size=6)[0])
    for i in (5, 17):
        (tmp_path / f"f{i}.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"f5\.png' could not be read"):
        D.load_files(str(tmp_path), size=6, channels=3)  # channels given: no header pass first


# Pillow reads these (and the endings listed before them); a directory left them out silently
NEW_ENDINGS = {".jfif": "JPEG", ".jpe": "JPEG", ".tga": "TGA", ".dib": "DIB", ".jp2": "JPEG2000",
               ".j2k": "JPEG2000", ".pcx": "PCX", ".sgi": "SGI", ".qoi": "QOI", ".avif": "AVIF"}


def test_files_not_taken_as_they_are_are_named(tmp_path):
    """(A walkthrough: 20x20, 58x48 and 74x64 photos and a gray one became 32x32 colour without a
    word.) One warning names the files centre-cropped, enlarged and converted."""
    rng = np.random.default_rng(3)
    for name, (h, w) in {"a_small.png": (20, 20), "b_wide.png": (48, 58), "c_big.png": (64, 74),
                         "d_square.png": (40, 40)}.items():
        _save(tmp_path / name, _rgb(rng, h, w))
    _save(tmp_path / "e_gray.png", (rng.random((32, 32)) * 255).astype(np.uint8))
    with pytest.warns(UserWarning) as caught:
        x = D.load_files(str(tmp_path), size=32)
    assert x.shape == (5, 3, 32, 32)
    assert [str(w.message) for w in caught] == [
        f"{str(tmp_path)!r}: of 5 images, 2 centre-cropped to the 32x32 aspect (b_wide.png, c_big.png); 1 smaller "
        "than 32x32 and enlarged (a_small.png); 1 converted to 3 channels (gray read as R = G = B: e_gray.png)"]
    with warnings.catch_warnings():  # square colour files at least the size: nothing to say
        warnings.simplefilter("error")
        D.load_files(str(tmp_path / "d_square.png"), size=32)
        D.load_files(str(tmp_path / "c_big.png"), size=None)


def test_directory_reads_every_pillow_image_ending_and_names_the_files_it_leaves_out(tmp_path):
    """A directory's .jfif, .tga, ... files were left out (a .jfif named directly loaded fine);
    now they are read, and the non-hidden files it still leaves out are named in one warning."""
    rng = np.random.default_rng(13)
    a = _rgb(rng, 8, 8)
    for i, (ext, fmt) in enumerate(NEW_ENDINGS.items()):
        Image.fromarray(a).save(tmp_path / f"im{i}{ext.upper() if i % 2 else ext}", format=fmt)
    Image.fromarray(rng.random((8, 8)).astype(np.float32)).save(tmp_path / "f.pfm")
    assert {".jfif", ".jpe", ".tga", ".pfm"} <= set(D.IMAGE_EXTENSIONS)
    assert not {".pdf", ".eps", ".ps", ".h5", ".fits", ".ico", ".psd", ".apng"} & set(D.IMAGE_EXTENSIONS)
    n = len(NEW_ENDINGS) + 1
    assert len(D.image_paths(str(tmp_path))) == n
    for name in ("notes.txt", "data.csv", "scan.heic"):
        (tmp_path / name).write_text("x")
    (tmp_path / ".DS_Store").write_text("x")
    os.mkdir(tmp_path / "sub")
    _save(tmp_path / "sub" / "deeper.png", a)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = D.load_files(str(tmp_path), size=4)
        assert D.load_images(f"files:{tmp_path}", num_images=1, channels=3).shape == (1, 3, 8, 8)
    assert x.shape == (n, 3, 4, 4)
    fitted = [str(w.message) for w in caught if "converted" in str(w.message)]
    msgs = [str(w.message) for w in caught if "left out" in str(w.message)]
    assert len(msgs) == 2 and msgs[0] == msgs[1], msgs  # one per load
    # the gray f.pfm among colour images: said (thirty-third session), once per load
    assert fitted == [f"{str(tmp_path)!r}: of {n} images, 1 converted to 3 channels (gray read as R = G = B: f.pfm)",
                      f"{str(tmp_path)!r}: of 1 images, 1 converted to 3 channels (gray read as R = G = B: f.pfm)"]
    assert len(caught) == 4
    assert msgs[0] == (f"{str(tmp_path)!r}: 3 file(s) left out, their names not ending in an image extension "
                       f"(krylovjax.data.IMAGE_EXTENSIONS): data.csv, notes.txt, scan.heic; a glob pattern such "
                       f"as {str(tmp_path / '*')!r} reads files of any ending")
    for name in range(4):
        (tmp_path / f"z{name}.txt").write_text("x")
    with pytest.warns(UserWarning, match=r": 7 file\(s\) left out.*: data\.csv, notes\.txt, scan\.heic, z0\.txt, "
                                         r"z1\.txt, \.\.\.;"):
        D.load_files(str(tmp_path), indices=[0])
    # a pattern or one file warns about nothing, and image_paths (the binaries' file lists) neither
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        D.load_files(str(tmp_path / "im0.jfif"))
        D.load_files(str(tmp_path / "im*"))
        D.image_paths(str(tmp_path))


@pytest.mark.parametrize("kw, match", [
    ({"indices": [3]}, r"indices must be < 2 \(the 2 files of"),
    ({"indices": [0], "num_images": 1}, "mutually exclusive"),
    ({"num_images": 0}, "num_images must be an int >= 1"),
    ({"indices": [-1]}, "non-negative ints"),
    ({"indices": [0.5]}, "non-negative ints"),
    ({"size": 2}, ">= 4"),
])
def test_files_bad_selection(tmp_path, kw, match):
    rng = np.random.default_rng(6)
    for n in ("a.png", "b.png"):
        _save(tmp_path / n, _rgb(rng, 5, 5))
    with pytest.raises(ValueError, match=match):
        D.load_files(str(tmp_path), **kw)


# ----------------------------------------------------------------------------- arrays


@pytest.mark.parametrize("layout, make", [
    ("NHWC", lambda a: a),
    ("NCHW", lambda a: a.transpose(0, 3, 1, 2)),
])
def test_array_layouts_found_and_exact(tmp_path, layout, make):
    rng = np.random.default_rng(7)
    a = (rng.random((4, 6, 5, 3)) * 255).astype(np.uint8)  # NHWC
    np.save(tmp_path / "x.npy", make(a))
    want = a.transpose(0, 3, 1, 2) / 255.0
    for lay in ("auto", layout):
        np.testing.assert_allclose(D.load_array(str(tmp_path / "x.npy"), layout=lay), want, atol=1e-7)
    np.testing.assert_allclose(D.load_images(f"array:{tmp_path / 'x.npy'}", indices=[3, 1]), want[[3, 1]],
                               atol=1e-7)


def test_array_single_images_gray_batches_and_dtypes(tmp_path):
    rng = np.random.default_rng(8)
    hwc = rng.random((6, 7, 3))
    np.save(tmp_path / "hwc.npy", hwc)
    np.testing.assert_allclose(D.load_array(str(tmp_path / "hwc.npy")), hwc.transpose(2, 0, 1)[None], atol=1e-7)
    nhw = (rng.random((5, 6, 7)) * 65535).astype(np.uint16)
    np.save(tmp_path / "nhw.npy", nhw)
    np.testing.assert_allclose(D.load_array(str(tmp_path / "nhw.npy")), nhw[:, None] / 65535.0, atol=1e-7)
    hw = rng.random((6, 7)) > 0.5
    np.save(tmp_path / "hw.npy", hw)
    np.testing.assert_array_equal(D.load_array(str(tmp_path / "hw.npy")), hw[None, None].astype(np.float32))
    f16 = rng.random((2, 1, 6, 6)).astype(np.float16)
    np.save(tmp_path / "f16.npy", f16)
    np.testing.assert_array_equal(D.load_array(str(tmp_path / "f16.npy")), f16.astype(np.float32))
    # channels and size, as load_files
    x = D.load_array(str(tmp_path / "hwc.npy"), channels=1, size=4)
    lum = hwc @ np.array([0.2125, 0.7154, 0.0721])
    want = sk_resize(lum[:, :6], (4, 4), order=1, mode="reflect", anti_aliasing=True)  # centred 6 x 6 of 6 x 7
    np.testing.assert_allclose(x[0, 0], want, atol=1e-6)


def test_array_three_by_h_by_w_is_refused_with_both_readings(tmp_path):
    """(3, H, W) was taken for one RGB image: it may as well be three grayscale images."""
    a = (np.random.default_rng(15).random((3, 20, 21)) * 255).astype(np.uint8)
    path = str(tmp_path / "gray3.npy")
    np.save(path, a)
    with pytest.raises(ValueError) as err:
        D.load_array(path)
    assert str(err.value) == (
        f"layout: cannot tell the layout of the shape (3, 20, 21) of {path!r}: 3 grayscale images of 20x21 "
        f"(NHW) or one 3-channel image of 20x21 (CHW); pass layout='NHW' or layout='CHW' (or the source "
        f"'array:{path},layout=NHW')")
    with pytest.raises(ValueError, match="3 grayscale images"):
        D.load_images(f"array:{path}")
    np.testing.assert_allclose(D.load_array(path, layout="NHW"), a[:, None] / 255.0, atol=1e-7)
    np.testing.assert_allclose(D.load_array(path, layout="CHW"), a[None] / 255.0, atol=1e-7)
    np.testing.assert_allclose(D.load_images(f"array:{path},layout=NHW"), a[:, None] / 255.0, atol=1e-7)
    np.testing.assert_allclose(D.load_images(f"array:{path},layout=CHW"), a[None] / 255.0, atol=1e-7)
    # the rank-3 shapes that tell their layout still do
    for shape, want in (((1, 20, 21), lambda x: x[None]),                    # CHW or NHW: the same image
                        ((20, 21, 3), lambda x: x.transpose(2, 0, 1)[None]),  # HWC
                        ((20, 21, 1), lambda x: x.transpose(2, 0, 1)[None]),  # HWC
                        ((5, 20, 21), lambda x: x[:, None]),                 # NHW
                        ((20, 21, 22), lambda x: x[:, None])):               # NHW
        x = (np.random.default_rng(14).random(shape) * 255).astype(np.uint8)
        np.save(tmp_path / "x.npy", x)
        np.testing.assert_allclose(D.load_array(str(tmp_path / "x.npy")), want(x) / 255.0, atol=1e-7)


def test_array_source_options(tmp_path):
    """``array:<path>,key=<name>,layout=<LAYOUT>``: the options the binaries had no way to pass."""
    rng = np.random.default_rng(16)
    a, b = rng.random((2, 3, 5, 5)), rng.random((3, 5, 6))
    path = str(tmp_path / "two.npz")
    np.savez(path, a=a, b=b)
    with pytest.raises(ValueError) as err:
        D.load_images(f"array:{path}")
    assert str(err.value) == (f"key: {path!r} holds the arrays ['a', 'b']; name the one to load, e.g. pass key='a' "
                              f"(or the source 'array:{path},key=a')")
    np.testing.assert_allclose(D.load_images(f"array:{path},key=a"), a, atol=1e-7)
    for src in (f"array:{path},key=b,layout=NHW", f"array:{path}, layout=NHW ,key=b"):
        np.testing.assert_allclose(D.load_images(src), b[:, None], atol=1e-7)
    np.testing.assert_allclose(D.load_images(f"array:{path},layout=CHW", key="b"), b[None], atol=1e-7)
    np.testing.assert_allclose(D.load_images(f"array:{path},key=b,layout=NHW", indices=[2], size=4),
                               D.load_array(path, key="b", layout="NHW", indices=[2], size=4), atol=0)
    # through a binary's config: denoise/budget's config.data.source
    import ml_collections

    from experiments import denoise

    cfg = ml_collections.ConfigDict({"source": f"array:{path},layout=NHW,key=b", "size": None, "index": 1,
                                     "kwargs": {}})
    np.testing.assert_allclose(denoise.load_clean(cfg), b[1][None, None], atol=1e-7)
    # a path that exists as given is itself, commas and '=' included
    odd = tmp_path / "run,key=b"
    os.makedirs(odd)
    np.save(odd / "x,layout=NHW.npy", b)
    with pytest.raises(ValueError, match="3 grayscale images"):  # the file itself: no option taken off
        D.load_images(f"array:{odd / 'x,layout=NHW.npy'}")
    np.testing.assert_allclose(D.load_images(f"array:{odd / 'x,layout=NHW.npy'},layout=NHW"), b[:, None], atol=1e-7)
    with pytest.raises(ValueError) as err:
        D.load_images(f"array:{path},kee=a")
    assert str(err.value) == (f"source: 'array:{path},kee=a' ends in an unknown option 'kee'; the options are key, "
                              f"layout ('array:<path>,key=<name>,layout=<LAYOUT>'), and no file '{path},kee=a' exists")
    with pytest.raises(ValueError) as err:
        D.load_images(f"array:{path},key=b", key="a")
    assert str(err.value) == (f"source: 'array:{path},key=b' gives key, which is also passed as the keyword "
                              f"argument key='a'; give it once")
    with pytest.raises(ValueError, match="gives layout, which is also passed as the keyword argument layout='auto'"):
        D.load_images(f"array:{path},key=b,layout=NHW", layout="auto")
    with pytest.raises(ValueError, match="gives the option key twice"):
        D.load_images(f"array:{path},key=a,key=b")
    with pytest.raises(ValueError, match="gives the option layout no value"):
        D.load_images(f"array:{path},layout=")
    with pytest.raises(ValueError, match="layout must be 'auto' or one of"):
        D.load_images(f"array:{path},key=b,layout=nhw")
    with pytest.raises(ValueError, match="names no path"):
        D.load_images("array:,key=a")
    with pytest.raises(FileNotFoundError, match=r"none\.npz': no such file"):
        D.load_images(f"array:{tmp_path / 'none.npz'},key=a")


def test_array_npz_keys(tmp_path):
    rng = np.random.default_rng(9)
    a, b = rng.random((2, 3, 5, 5)), rng.random((1, 5, 5, 1))
    np.savez(tmp_path / "one.npz", a)
    np.testing.assert_allclose(D.load_array(str(tmp_path / "one.npz")), a, atol=1e-7)
    np.savez(tmp_path / "named.npz", images=a, labels=np.arange(2))
    np.testing.assert_allclose(D.load_array(str(tmp_path / "named.npz")), a, atol=1e-7)
    np.savez(tmp_path / "two.npz", a=a, b=b)
    with pytest.raises(ValueError, match=r"key: .* holds the arrays \['a', 'b'\]; name the one"):
        D.load_array(str(tmp_path / "two.npz"))
    np.testing.assert_allclose(D.load_array(str(tmp_path / "two.npz"), key="b"), b.transpose(0, 3, 1, 2),
                               atol=1e-7)
    with pytest.raises(ValueError, match="key must be one of"):
        D.load_array(str(tmp_path / "two.npz"), key="c")
    np.save(tmp_path / "a.npy", a)
    with pytest.raises(ValueError, match="only a .npz file holds named arrays"):
        D.load_array(str(tmp_path / "a.npy"), key="a")


@pytest.mark.parametrize("arr, kw, err, match", [
    (np.zeros((2, 3, 5, 3)), {}, ValueError, "both axes could be channels"),
    (np.zeros((2, 5, 5, 5)), {}, ValueError, "no axis of length 1 or 3"),
    (np.zeros((2, 5, 5, 3)), {"layout": "NCHW"}, ValueError, r"5 channels in layout NCHW; expected 1 or 3"),
    (np.zeros((2, 5, 5, 3)), {"layout": "HWC"}, ValueError, "'HWC' is for rank-3 arrays"),
    (np.zeros((2, 5, 5, 3)), {"layout": "nhwc"}, ValueError, "layout must be 'auto' or one of"),
    (np.zeros((5,)), {}, ValueError, "expected rank 2 to 4"),
    (np.zeros((2, 5, 5, 3), np.int64), {}, D.ImageDTypeError, r"int64 values.*astype\(np.uint8\)"),
    (np.zeros((2, 5, 5, 3), np.complex64), {}, D.ImageDTypeError, "complex64 values"),
    (np.full((2, 5, 5, 3), -0.5), {}, ValueError, r"\[-0.5, -0.5\].*\(data in \[-1, 1\]: save \(x \+ 1\) / 2\)$"),
    # a dark float image on a 0-255 scale (a review: the clip hint would have destroyed it)
    (np.concatenate([np.zeros((2, 5, 4, 3)), np.full((2, 5, 1, 3), 254.0)], axis=2), {}, ValueError,
     r"\[0, 254\]; floating-point images must lie in \[0, 1\] \(data on a 0-255 scale: save x / 255\)$"),
    # bright [-1, 1] data with few negatives: both readings named (a review: clipping it alone would ruin it)
    (np.concatenate([np.full((2, 5, 4, 3), 0.5), np.full((2, 5, 1, 3), -0.2)], axis=2), {}, ValueError,
     r"\(data in \[-1, 1\]: save \(x \+ 1\) / 2; 20.0% of the values are outside it: noisy images on the \[0, 1\] "
     r"scale\? save np.clip\(x, 0, 1\)\)$"),
    (np.full((2, 5, 5, 3), 300.0), {}, ValueError, r"must lie in \[0, 1\]$"),
    # noisy images on the [0, 1] scale whose noise left it (a walkthrough found no hint)
    (np.concatenate([np.full((2, 5, 4, 3), 0.5), np.full((2, 5, 1, 3), 1.2)], axis=2), {}, ValueError,
     r"\[0.5, 1.2\]; floating-point images must lie in \[0, 1\] \(20.0% of the values are outside it: noisy images "
     r"on the \[0, 1\] scale\? save np.clip\(x, 0, 1\)\)$"),
    (np.full((2, 5, 5, 3), np.nan), {}, ValueError, "4?.*NaN/inf"),
    (np.zeros((2, 5, 5, 3)), {"indices": [2]}, ValueError, r"indices must be < 2 \(the 2 images"),
    (np.zeros((2, 3, 2, 2)), {}, ValueError, "H, W >= 4"),
    # no pixels: said so (numpy's "zero-size array to reduction operation minimum" came; a walkthrough)
    (np.zeros((0, 3, 16, 16), np.float32), {}, ValueError,
     r"holds no pixels: shape \(0, 3, 16, 16\) in layout NCHW; expected at least one image"),
    (np.zeros((0, 16, 16, 3), np.uint8), {}, ValueError, "holds no pixels"),
])
def test_array_refused(tmp_path, arr, kw, err, match):
    np.save(tmp_path / "x.npy", arr)
    with pytest.raises(err, match=match):
        D.load_array(str(tmp_path / "x.npy"), **kw)


def test_array_files_numpy_cannot_read(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="holds Python objects"):
        D.load_array(str(tmp_path / "obj.npy"))
    np.savez(tmp_path / "obj.npz", images=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="holds Python objects"):
        D.load_array(str(tmp_path / "obj.npz"))
    (tmp_path / "junk.npy").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a .npy or .npz file numpy can read"):
        D.load_array(str(tmp_path / "junk.npy"))
    np.save(tmp_path / "whole.npy", np.zeros((10, 3, 8, 8)))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "whole.npy").read_bytes()[:300])
    with pytest.raises(ValueError, match="not a .npy or .npz file numpy can read: ValueError: mmap length"):
        D.load_array(str(tmp_path / "cut.npy"))
    (tmp_path / "cut.npz").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(ValueError, match="not a .npy or .npz file numpy can read: BadZipFile"):
        D.load_array(str(tmp_path / "cut.npz"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        D.load_images(f"array:{tmp_path / 'none.npy'}")


def test_array_reads_only_the_selected_images(tmp_path, monkeypatch):
    """A .npy is memory-mapped: picking two images of a large array copies those two only."""
    big = np.zeros((64, 3, 8, 8), np.uint8)
    big[5] = 255
    np.save(tmp_path / "big.npy", big)
    seen = []
    real = np.asarray

    def spy(a, *args, **kw):
        seen.append(getattr(a, "nbytes", 0))
        return real(a, *args, **kw)

    monkeypatch.setattr(D.np, "asarray", spy)
    x = D.load_array(str(tmp_path / "big.npy"), indices=[5, 6])
    monkeypatch.undo()
    assert x[0].min() == 1.0 and x[1].max() == 0.0
    assert max(seen) <= 2 * 3 * 8 * 8 * 4, seen  # nothing of the size of the whole array


def test_load_images_names_the_new_sources():
    with pytest.raises(ValueError, match=r"'files:<path>' or 'array:<path>', got 'nosuch'"):
        D.load_images("nosuch")


# ----------------------------------------------------------------------------- the binaries


def _precompute(workdir, dataset, *extra):
    return _run("experiments.precompute", "--config=experiments/configs/demo.py", f"--workdir={workdir}",
                "--noprogress", f"--config.dataset={dataset}", "--config.num_images=0", "--config.image_size=8",
                "--config.chunk_images=2", "--config.precompute.num_steps=2", *extra, timeout=300)


def test_precompute_binary_on_files_and_on_the_same_array(tmp_path):
    """``--config.dataset=files:<dir>`` (num_images 0: all) pre-computes the folder's images: the
    same trajectories as the same pixels given as ``array:<file.npy>``. The DDPM baseline trains
    on the store's images (``train --config.method=ddpm --store=...``). Changing one file
    afterwards is refused on resume (the store's inputs hash), with one line."""
    from krylovjax.training import TrainConfig, prepare_data, trajectories_from_store

    rng = np.random.default_rng(10)
    pics = tmp_path / "pics"
    os.makedirs(pics)
    arrs = [_rgb(rng, 10, 12) for _ in range(3)]
    for i, a in enumerate(arrs):
        _save(pics / f"p{i}.png", a)
    np.save(tmp_path / "pics.npy", np.stack(arrs))
    runs = {}
    for name, source in (("files", f"files:{pics}"), ("array", f"array:{tmp_path / 'pics.npy'}")):
        out = _precompute(tmp_path / name, source)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "3 of 3" in out.stdout
        runs[name] = np.asarray(trajectories_from_store(str(tmp_path / name / "store")).x)
        with open(tmp_path / name / "precompute_summary.json") as f:
            files = json.load(f)["files"]
        assert files == ([str(pics / f"p{i}.png") for i in range(3)] if name == "files" else None)
    assert runs["files"].shape == (3, 2, 3, 8, 8)  # [B, N levels, C, H, W]
    np.testing.assert_allclose(runs["files"][:, 0], D.load_files(str(pics), size=8), atol=1e-7)
    assert np.abs(runs["files"][:, -1] - runs["files"][:, 0]).max() > 1e-3  # the embedding moved them
    np.testing.assert_array_equal(runs["files"], runs["array"])
    # the DDPM baseline trains on the same store's images: its first level
    store = str(tmp_path / "files" / "store")
    ddpm = TrainConfig(method="ddpm")
    from_store, info = prepare_data(ddpm, store)
    from_images, info_images = prepare_data(ddpm, runs["files"][:, 0])
    np.testing.assert_array_equal(from_store["images"], from_images["images"])
    assert info == info_images and info["num_images"] == 3
    out = _run("experiments.train", "--config=experiments/configs/train_tiny.py", "--config.method=ddpm",
               f"--store={store}", f"--workdir={tmp_path / 'ddpm'}", "--config.num_steps=2", "--config.batch_size=4",
               "--config.model_overrides.ch=8", "--config.model_overrides.ch_mult=(1,)",
               "--config.model_overrides.attn_resolutions=()", "--config.progress=False", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "ddpm" / "result.json") as f:
        assert json.load(f)["step"] == 2
    # a model the store's images do not fit: one line before any work (a traceback from
    # training.train, after reading the store, until the thirtieth session)
    out = _run("experiments.train", "--config=experiments/configs/train_tiny.py", f"--store={store}",
               f"--workdir={tmp_path / 'ours'}", "--config.model_overrides.ch_mult=(1,2,2,2,2)", timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1] == (
        "error: data: images of size 8 x 8 do not fit the model: image_size: expected a multiple of "
        "2**(len(ch_mult)-1) = 16 (ch_mult=(1, 2, 2, 2, 2)), got 8")
    assert not (tmp_path / "ours").exists()
    _save(pics / "p1.png", _rgb(rng, 10, 12))
    out = _precompute(tmp_path / "files", f"files:{pics}")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("error: path: ") and "inputs_hash differs" in out.stderr
    assert "Traceback" not in out.stderr
    # --fresh (a user review: only denoise and budget had it): the old run moves to <workdir>.prev,
    # once the command is found good (a refused one moves nothing)
    before = snapshot(tmp_path / "files")
    out = _precompute(tmp_path / "files", f"files:{pics}", "--fresh", "--config.precompute.tol=-1")
    assert out.returncode == 1 and "error: precompute: tol" in out.stderr, out.stderr[-3000:]
    assert snapshot(tmp_path / "files") == before and not (tmp_path / "files.prev").exists()
    out = _precompute(tmp_path / "files", f"files:{pics}", "--fresh")
    assert out.returncode == 0, out.stderr[-3000:]
    np.testing.assert_array_equal(np.asarray(trajectories_from_store(str(tmp_path / "files.prev" / "store")).x),
                                  runs["files"])
    again = np.asarray(trajectories_from_store(store).x)
    np.testing.assert_allclose(again[:, 0], D.load_files(str(pics), size=8), atol=1e-7)
    np.testing.assert_array_equal(again[[0, 2]], runs["files"][[0, 2]])  # the unchanged photos
    assert np.abs(again[1] - runs["files"][1]).max() > 1e-3


def test_precompute_binary_takes_the_array_options_in_the_source(tmp_path):
    """The binary has no key/layout flag: the source string carries them; its refusal of an
    ambiguous (3, H, W) array says so, in one line."""
    from krylovjax.training import trajectories_from_store

    a = (np.random.default_rng(17).random((3, 10, 10)) * 255).astype(np.uint8)
    path = str(tmp_path / "gray3.npy")
    np.save(path, a)
    out = _precompute(tmp_path / "w", f"array:{path}")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: dataset 'array:{path}': layout: cannot tell the layout of the shape (3, 10, 10) of {path!r}: 3 "
        f"grayscale images of 10x10 (NHW) or one 3-channel image of 10x10 (CHW); pass layout='NHW' or "
        f"layout='CHW' (or the source 'array:{path},layout=NHW')")
    out = _precompute(tmp_path / "w", f"array:{path},layout=NHW")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "3 of 3" in out.stdout
    x = np.asarray(trajectories_from_store(str(tmp_path / "w" / "store")).x)
    assert x.shape == (3, 2, 1, 8, 8)
    np.testing.assert_allclose(x[:, 0], D.load_array(path, layout="NHW", size=8), atol=1e-7)


@pytest.mark.parametrize("dataset, extra, message", [
    ("files:{tmp}/none", [], "error: dataset 'files:{tmp}/none': '{tmp}/none': no such file or directory"),
    ("files:{tmp}", ["--config.class_filter=dog"],
     "error: dataset 'files:{tmp}': class_filter is for tfds datasets only; got class_filter='dog'"),
    ("array:{tmp}/x.npy", ["--config.data_dir=/d"],
     "error: dataset 'array:{tmp}/x.npy': data_dir is for tfds datasets only; got data_dir='/d'"),
])
def test_precompute_binary_refuses_bad_own_images_in_one_line(tmp_path, dataset, extra, message):
    out = _precompute(tmp_path / "w", dataset.format(tmp=tmp_path), *extra)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == message.format(tmp=tmp_path)
    assert not os.path.exists(tmp_path / "w" / "store")


def test_denoise_clean_image_from_files(tmp_path):
    """``config.data`` of denoise/budget: ``source="files:<dir>"`` with ``index`` picks one file."""
    import ml_collections

    from experiments import denoise

    rng = np.random.default_rng(11)
    arrs = [_rgb(rng, 16, 16) for _ in range(2)]
    for i, a in enumerate(arrs):
        _save(tmp_path / f"c{i}.png", a)
    cfg = ml_collections.ConfigDict({"source": f"files:{tmp_path}", "size": 16, "index": 1, "kwargs": {}})
    x = denoise.load_clean(cfg)
    np.testing.assert_allclose(x, arrs[1].transpose(2, 0, 1)[None] / 255.0, atol=1e-7)


def test_denoise_and_budget_data_config_all_images_named_files_and_keyed_errors(tmp_path):
    """``config.data`` of denoise/budget (a user review): ``kwargs.num_images = 0`` reads all the
    files (it was refused, while precompute's 0 means all), the results name the files read
    (``clean_files``, with ``index``), and a bad source or value names the config key it comes
    from (the messages named none)."""
    import ml_collections

    from experiments import denoise

    rng = np.random.default_rng(12)
    for i in range(4):
        _save(tmp_path / f"p{i}.png", _rgb(rng, 16, 16))

    def cfg(**kw):
        base = {"source": f"files:{tmp_path}", "size": 16, "index": None, "kwargs": {}}
        base.update(kw)
        return ml_collections.ConfigDict(base)

    assert denoise.load_clean(cfg(kwargs={"num_images": 0})).shape[0] == 4
    assert denoise.load_clean(cfg(kwargs={"num_images": 3})).shape[0] == 3
    assert denoise.clean_files(cfg(kwargs={"num_images": 3})) == [str(tmp_path / f"p{i}.png") for i in range(3)]
    assert denoise.clean_files(cfg(index=[2, 0])) == [str(tmp_path / "p2.png"), str(tmp_path / "p0.png")]
    assert denoise.clean_files(cfg(source="builtin:chelsea")) is None
    with pytest.raises(FileNotFoundError, match=r"^data.source 'files:/nonexistent/x': '/nonexistent/x': no such"):
        denoise.load_clean(cfg(source="files:/nonexistent/x"))
    with pytest.raises(ValueError, match=r"^data.size: size must be"):
        denoise.load_clean(cfg(size=3))
    with pytest.raises(ValueError, match=r"^data.kwargs.num_images: num_images must be"):
        denoise.load_clean(cfg(kwargs={"num_images": -1}))


def test_generate_reference_from_files_all_of_them_and_missing_named(tmp_path):
    """``generate --reference=files:<dir>``: ``reference_count=0`` compares with every file (it
    took the first 3 whatever the folder held); a missing folder names ``reference``."""
    from test_coverage_experiments import _FakeModel

    from experiments import generate
    from krylovjax import training

    rng = np.random.default_rng(13)
    for i in range(4):
        _save(tmp_path / f"r{i}.png", _rgb(rng, 16, 16))
    tc = training.TrainConfig(method="ddpm", per_image_offset=False, ddpm_num_steps=4)
    model = _FakeModel(lambda x, i: 0.0 * x, tc, 3, 16)
    wd = tmp_path / "train"
    (wd / "checkpoints").mkdir(parents=True)
    import unittest.mock as mock

    with mock.patch.object(training, "load_score_fn", lambda workdir, step=None, compute_dtype=None: model):
        res = generate.run(str(wd), str(tmp_path / "g"), num_samples=2, num_frames=2, num_steps=2, sampler="ddim",
                           reference=f"files:{tmp_path}", reference_count=0)
        assert len(res["summary"]["samples_per_reference"]) == 4
        with pytest.raises(FileNotFoundError, match=r"^reference: 'files:/nonexistent/x': '/nonexistent/x': no such"):
            generate.run(str(wd), str(tmp_path / "g2"), reference="files:/nonexistent/x", num_frames=2)
        with pytest.raises(ValueError, match=r"reference_count: 0 \(all\) is for files, arrays and tfds"):
            generate.run(str(wd), str(tmp_path / "g3"), reference="builtin", reference_count=0, num_frames=2)
    assert not (tmp_path / "g2").exists() and not (tmp_path / "g3").exists()


def test_a_run_over_changed_files_is_another_run(tmp_path):
    """denoise/budget claim their work directory with the loaded images' sha256 when the images
    come from files: the same config over changed files is refused there, naming the key; the
    built-in sources (fixed by the config) are claimed with the config alone, as before."""
    from experiments import denoise
    from experiments.configs import budget_demo
    from krylovjax import experiment_utils as eu

    cfg = budget_demo.get_config()
    clean = np.full((2, 3, 8, 8), 0.5, np.float32)
    assert denoise.claim_record(cfg, clean) is cfg
    cfg.data.source = f"files:{tmp_path}/pics"
    rec = denoise.claim_record(cfg, clean)
    assert "images_sha256" not in cfg.data and len(rec.data.images_sha256) == 64
    assert denoise.claim_record(cfg, clean.copy()).data.images_sha256 == rec.data.images_sha256
    changed = clean.copy()
    changed[1, 2, 3, 4] = 0.25
    wd = tmp_path / "run"
    assert eu.claim_workdir(wd, "budget", rec)
    assert not eu.claim_workdir(wd, "budget", denoise.claim_record(cfg, clean))  # the same run: resumes
    with pytest.raises(eu.WorkdirConflictError, match=r"differs at: data\.images_sha256"):
        eu.claim_workdir(wd, "budget", denoise.claim_record(cfg, changed))
    cfg.data.source = f"array:{tmp_path}/pics.npy"
    assert "images_sha256" in denoise.claim_record(cfg, clean).data
