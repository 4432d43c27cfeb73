"""The U-Net score network: shapes, closed-form parameter counts, time inputs, dropout, jit,
bfloat16 and input validation. Small widths keep it fast on a 2-core CPU."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from krylovjax.models import (
    UNet,
    UNetConfig,
    get_config,
    group_count,
    linear_embedding,
    paper_config,
    param_count,
    sinusoidal_embedding,
    time_input,
    tiny_config,
)


# Compiling is what costs time on a 2-core CPU: the tests build models from numpy draws
# (``_build``: no per-shape initializer compiles), run them through one shared jitted forward, and
# reuse the BASE config wherever they can so that compiled programs are shared.
BASE = dict(image_size=16, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0,
            time_multiplier=2.0)


def _cfg(**kw):
    return UNetConfig(**{**BASE, **kw})


def _build(cfg, seed=0):
    """A concrete UNet with every parameter drawn at random (numpy), so that every path (time
    embedding, attention, the zero-initialised convs) influences the output."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: UNet(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    counter = iter(range(10**6))

    def fill(leaf):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.key(seed * 1000 + next(counter))
        if jnp.issubdtype(leaf.dtype, jnp.integer):
            return jnp.zeros(leaf.shape, leaf.dtype)
        scale = 1.0 / math.sqrt(math.prod(leaf.shape[:-1])) if len(leaf.shape) >= 2 else 0.3
        return jnp.asarray(rng.standard_normal(leaf.shape) * scale, leaf.dtype)

    return nnx.merge(graphdef, jax.tree.map(fill, state))


@nnx.jit(static_argnames="train")
def _fwd(model, x, t, idx=None, train=False):
    return model(x, t, idx, train=train)


def _images(b, c, s, seed=0):
    return jnp.asarray(np.random.default_rng(seed).random((b, c, s, s)), jnp.float32)


# ----------------------------------------------------------------------------- init and shapes
def test_real_init_zero_output_and_initializer_scale():
    # one level keeps the number of initializer compiles (the slow part on CPU) small
    model = UNet(_cfg(image_size=8, ch_mult=(1,), attn_resolutions=()), rngs=nnx.Rngs(0))
    y = _fwd(model, _images(2, 3, 8), jnp.array([0.1, 0.7]))
    assert y.shape == (2, 3, 8, 8) and y.dtype == jnp.float32
    # last conv initialised to exactly zero -> the network outputs exactly zero at init
    assert np.all(np.asarray(model.conv_out.kernel[...]) == 0) and np.all(np.asarray(model.conv_out.bias[...]) == 0)
    np.testing.assert_array_equal(np.asarray(y), 0.0)
    # other kernels: variance scaling (fan_avg, uniform) on [-a, a], a = sqrt(6 / (fan_in + fan_out))
    k = np.asarray(model.up[0].blocks[0].conv0.kernel[...])
    assert k.shape == (3, 3, 16, 8)  # running 8 channels + the 8-channel skip -> 8
    a = math.sqrt(6.0 / (9 * 16 + 9 * 8))
    assert abs(k.std() / (a / math.sqrt(3.0)) - 1) < 0.1
    assert 0.97 < np.abs(k).max() / a <= 1.0
    # the residual branch's second conv and the attention output start at (almost) zero:
    # score_sde's init_scale=0, i.e. variance scaling with scale 1e-10
    k1 = np.asarray(model.mid_block0.conv1.kernel[...])
    assert 0 < np.abs(k1).max() <= math.sqrt(6e-10 / (2 * 9 * 8)) * (1 + 1e-6)
    assert 0 < np.abs(np.asarray(model.mid_attn.out.kernel[...])).max() <= math.sqrt(6e-10 / 16) * (1 + 1e-6)


@pytest.mark.parametrize("time_embedding", ["linear", "fourier"])
@pytest.mark.parametrize("size", [32, 64, 128])
def test_output_shapes(size, time_embedding):
    # tiny widths; levels down to 8x8 so attention (16) and the middle block stay small
    ch_mult = {32: (1, 2, 2), 64: (1, 2, 2, 2), 128: (1, 1, 2, 2, 2)}[size]
    cfg = UNetConfig(image_size=size, ch=8, ch_mult=ch_mult, num_res_blocks=1, attn_resolutions=(16,),
                     time_embedding=time_embedding)
    abstract = nnx.eval_shape(lambda: UNet(cfg, rngs=nnx.Rngs(0)))
    for dtype in (jnp.float32, jnp.float64):
        x = jax.ShapeDtypeStruct((2, 3, size, size), dtype)
        out = nnx.eval_shape(lambda m, x: m(x, jnp.array([0.1, 0.7]), train=False), abstract, x)
        assert out.shape == (2, 3, size, size) and out.dtype == dtype


def test_128_forward_numerics_and_channels():
    cfg = UNetConfig(image_size=128, ch=8, ch_mult=(1, 1, 2, 2, 2), num_res_blocks=1, attn_resolutions=(16,),
                     time_embedding="fourier", in_channels=1, out_channels=2)
    y = _fwd(_build(cfg), _images(2, 1, 128), jnp.array([0.0, 1.0]))
    assert y.shape == (2, 2, 128, 128)
    assert np.all(np.isfinite(np.asarray(y))) and float(jnp.std(y)) > 1e-2


def test_centered_input_is_the_2x_minus_1_map():
    x, t = _images(2, 3, 16), jnp.array([0.2, 0.4])
    y = _fwd(_build(_cfg(), seed=1), x, t)
    y_centred = _fwd(_build(_cfg(centered_input=True), seed=1), 2 * x - 1, t)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_centred), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- parameter counts
def _count(cfg: UNetConfig, ddpm_up_attention: bool = False) -> int:
    """Independent closed-form parameter count of the score_sde "ddpm" U-Net."""
    conv = lambda i, o: 9 * i * o + o  # noqa: E731
    dense = lambda i, o: i * o + o  # noqa: E731
    gn = lambda c: 2 * c  # noqa: E731
    T = 4 * cfg.ch
    res = lambda i, o: gn(i) + conv(i, o) + dense(T, o) + gn(o) + conv(o, o) + (dense(i, o) if i != o else 0)  # noqa: E731
    attn = lambda c: gn(c) + 4 * dense(c, c)  # noqa: E731
    n = dense(cfg.ch, T) + dense(T, T) + conv(cfg.in_channels, cfg.ch)
    widths = [cfg.ch * m for m in cfg.ch_mult]
    skips, cur = [cfg.ch], cfg.ch
    for lvl, w in enumerate(widths):
        r = cfg.image_size >> lvl
        for _ in range(cfg.num_res_blocks):
            n += res(cur, w) + (attn(w) if r in cfg.attn_resolutions else 0)
            cur = w
            skips.append(w)
        if lvl < len(widths) - 1:
            n += conv(w, w)
            skips.append(w)
    n += 2 * res(cur, cur) + attn(cur)
    for lvl in reversed(range(len(widths))):
        r, w = cfg.image_size >> lvl, widths[lvl]
        for _ in range(cfg.num_res_blocks + 1):
            n += res(cur + skips.pop(), w)
            cur = w
            if ddpm_up_attention and r in cfg.attn_resolutions:
                n += attn(w)
        if not ddpm_up_attention and r in cfg.attn_resolutions:
            n += attn(w)
        if lvl > 0:
            n += conv(w, w)
    return n + gn(cur) + conv(cur, cfg.out_channels)


@pytest.mark.parametrize(
    "cfg",
    [paper_config(32), paper_config(128), tiny_config(32),
     _cfg(image_size=32, ch=16, ch_mult=(1, 2, 3), num_res_blocks=2, attn_resolutions=(32, 8), in_channels=1)],
    ids=["paper32", "paper128", "tiny32", "odd"],
)
def test_param_count_closed_form(cfg):
    abstract = nnx.eval_shape(lambda: UNet(cfg, rngs=nnx.Rngs(0)))
    assert param_count(abstract) == _count(cfg)


def test_paper_model_matches_ddpm_cifar10_size():
    # DDPM (Ho et al. 2020) reports 35.7M parameters for its CIFAR-10 model, which applies
    # attention after every up-path block; score_sde's "ddpm" (ours) applies it once per level.
    # (test_param_count_closed_form checks our count against _count)
    n = _count(paper_config(32), ddpm_up_attention=True)
    assert abs(n / 1e6 - 35.7) < 0.05


def test_group_count():
    # min(32, C // 4) reduced to a divisor of C: 32 at every paper width
    assert [group_count(c) for c in (128, 256, 384, 512, 640)] == [32] * 5
    assert [group_count(c) for c in (1, 4, 8, 24, 48, 96, 40, 44)] == [1, 1, 2, 6, 12, 24, 10, 11]
    for c in range(1, 300):
        g = group_count(c)
        assert c % g == 0 and g <= 32 and (c < 4 or c // g >= 4)


# ----------------------------------------------------------------------------- time embeddings
def test_sinusoidal_embedding_closed_form():
    tau = np.array([0.0, 0.5, 3.0, 999.0])
    for dim in (8, 9, 128):
        half = dim // 2
        w = 10000.0 ** (-np.arange(half) / (half - 1))
        ref = np.concatenate([np.sin(tau[:, None] * w), np.cos(tau[:, None] * w)], axis=1)
        if dim % 2:
            ref = np.pad(ref, ((0, 0), (0, 1)))
        np.testing.assert_allclose(np.asarray(sinusoidal_embedding(jnp.asarray(tau), dim)), ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(np.asarray(linear_embedding(jnp.asarray(tau), 5)), np.repeat(tau[:, None], 5, 1))


def test_time_input_formula():
    t = jnp.array([0.25, 0.5, 0.9])
    idx = jnp.array([0, 2, 1])
    np.testing.assert_allclose(np.asarray(time_input(t, idx, multiplier=4.0, per_image_offset=True, num_images=3)),
                               4.0 * (np.array([0.25, 0.5, 0.9]) + np.array([0, 2, 1]) - 1.5), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(time_input(t, idx, multiplier=4.0, per_image_offset=False, num_images=3)),
                               4.0 * np.array([0.25, 0.5, 0.9]), rtol=1e-12)


@pytest.mark.parametrize("time_embedding", ["linear", "fourier"])
def test_output_depends_on_time(time_embedding):
    # the fourier embedding resolves t in [0, 1] only with a large time_multiplier (DDPM's 999);
    # the linear one wants O(1) inputs (a huge bias is normalised away by the next GroupNorm)
    mult = {"linear": 2.0, "fourier": 999.0}[time_embedding]
    model = _build(_cfg(time_embedding=time_embedding, time_multiplier=mult), seed=2)
    x = _images(1, 3, 16, seed=5)
    y0, y1 = _fwd(model, x, jnp.array([0.2])), _fwd(model, x, jnp.array([0.6]))
    assert float(jnp.max(jnp.abs(y0 - y1))) > 1e-2


def test_per_image_offset_is_a_shifted_time():
    offset = _build(_cfg(per_image_offset=True, num_images=4), seed=3)
    plain = _build(_cfg(), seed=3)  # same draws: same parameters
    x = _images(3, 3, 16, seed=1)
    t = jnp.array([0.3, 0.3, 0.8])
    idx = jnp.array([1, 0, 3])
    y = _fwd(offset, x, t, idx)
    # mult * (t + idx - n/2) == mult * t' with t' = t + idx - 2
    np.testing.assert_allclose(np.asarray(y), np.asarray(_fwd(plain, x, t + idx - 2.0)), rtol=1e-5, atol=1e-6)
    # the same image and time under another index is a different function
    y_other = _fwd(offset, x, t, jnp.array([0, 1, 2]))
    assert float(jnp.max(jnp.abs(y - y_other))) > 1e-2
    # idx is ignored without per_image_offset
    np.testing.assert_array_equal(np.asarray(_fwd(plain, x, t, idx)), np.asarray(_fwd(plain, x, t)))


# ----------------------------------------------------------------------------- dropout, jit, dtypes
def test_dropout_only_in_train_mode():
    model = _build(_cfg(dropout=0.5), seed=4)
    x, t = _images(2, 3, 16, seed=2), jnp.array([0.1, 0.9])
    e1, e2 = _fwd(model, x, t), _fwd(model, x, t)
    np.testing.assert_array_equal(np.asarray(e1), np.asarray(e2))
    r1, r2 = _fwd(model, x, t, train=True), _fwd(model, x, t, train=True)  # the stream advances
    assert float(jnp.max(jnp.abs(r1 - r2))) > 1e-3
    assert float(jnp.max(jnp.abs(r1 - e1))) > 1e-3
    # an explicit rngs at call time makes the train-mode draw reproducible
    fwd_rngs = nnx.jit(lambda m, x, t, r: m(x, t, train=True, rngs=r))
    d7a, d7b = fwd_rngs(model, x, t, nnx.Rngs(dropout=7)), fwd_rngs(model, x, t, nnx.Rngs(dropout=7))
    np.testing.assert_array_equal(np.asarray(d7a), np.asarray(d7b))
    assert float(jnp.max(jnp.abs(d7a - fwd_rngs(model, x, t, nnx.Rngs(dropout=8))))) > 1e-3
    # without dropout, train mode equals eval mode, and eval mode ignores the dropout rate
    no_drop = _build(_cfg(), seed=4)
    np.testing.assert_array_equal(np.asarray(_fwd(no_drop, x, t, train=True)), np.asarray(_fwd(no_drop, x, t)))
    np.testing.assert_allclose(np.asarray(_fwd(no_drop, x, t)), np.asarray(e1), rtol=1e-6, atol=1e-7)


@pytest.mark.slow  # 5 s of eager U-Net dispatch; every other test runs the model jitted
def test_jit_matches_eager():
    model = _build(_cfg(), seed=5)
    x, t = _images(2, 3, 16, seed=3), jnp.array([0.2, 0.6])
    eager = np.asarray(model(x, t, train=False))
    np.testing.assert_allclose(np.asarray(_fwd(model, x, t)), eager, rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_close_to_float32():
    bf16 = _build(_cfg(dtype="bfloat16"), seed=6)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    assert bf16.up[0].blocks[0].conv0.dtype == jnp.bfloat16
    x, t = _images(2, 3, 16, seed=4), jnp.array([0.3, 0.7])
    y32 = np.asarray(_fwd(_build(_cfg(), seed=6), x, t), np.float64)
    y16 = _fwd(bf16, x, t)
    assert y16.dtype == jnp.float32  # output in the input's dtype
    rel = np.linalg.norm(np.asarray(y16, np.float64) - y32) / np.linalg.norm(y32)
    assert 1e-4 < rel < 5e-2  # bfloat16 carries 8 mantissa bits: it differs, but only at ~1e-2


def test_float32_only_with_x64_off():
    with jax.enable_x64(False):
        model = _build(_cfg(), seed=5)
        x, t = _images(2, 3, 16, seed=3), jnp.array([0.2, 0.6])
        y = _fwd(model, x, t)
        assert y.dtype == jnp.float32
    with jax.enable_x64(True):
        np.testing.assert_allclose(np.asarray(y), np.asarray(_fwd(_build(_cfg(), seed=5), x, t)), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_raise():
    m = _build(_cfg(per_image_offset=True, num_images=3))
    x, t, idx = _images(2, 3, 16), jnp.array([0.1, 0.2]), jnp.array([0, 2])
    assert nnx.eval_shape(lambda m: m(x, t, idx, train=False), m).shape == x.shape  # valid call
    with pytest.raises(TypeError, match=r"^x: .*floating"):
        m(jnp.zeros((2, 3, 16, 16), jnp.int32), t, idx, train=False)
    with pytest.raises(ValueError, match=r"^x: .*\[B, C, H, W\]"):
        m(x[0], t, idx, train=False)
    with pytest.raises(ValueError, match=r"^x: .*in_channels"):
        m(x[:, :1], t, idx, train=False)
    with pytest.raises(ValueError, match=r"^x: .*divisible"):
        m(x[:, :, :15, :15], t, idx, train=False)
    with pytest.raises(ValueError, match=r"^x: .*image_size = 16"):
        m(_images(2, 3, 8), t, idx, train=False)
    with pytest.raises(ValueError, match=r"^t: .*\[B\]"):
        m(x, t[:, None], idx, train=False)
    with pytest.raises(ValueError, match=r"^t: .*\[B\]"):
        m(x, t[:1], idx, train=False)
    with pytest.raises(ValueError, match=r"^idx: required"):
        m(x, t, train=False)
    with pytest.raises(TypeError, match=r"^idx: .*integer"):
        m(x, t, jnp.array([0.0, 1.0]), train=False)
    with pytest.raises(ValueError, match=r"^idx: .*num_images=3"):
        m(x, t, jnp.array([0, 3]), train=False)
    with pytest.raises(ValueError, match=r"^idx: .*\[B\]"):
        m(x, t, jnp.array([0, 1, 2]), train=False)


@pytest.mark.parametrize(
    "kw, exc, pattern",
    [
        (dict(image_size=30), ValueError, r"^image_size: .*multiple"),
        (dict(ch_mult=()), ValueError, r"^ch_mult"),
        (dict(ch_mult=(1, 0)), ValueError, r"^ch_mult"),
        (dict(time_embedding="gaussian"), ValueError, r"^time_embedding"),
        (dict(dropout=1.0), ValueError, r"^dropout"),
        (dict(num_images=0), ValueError, r"^num_images"),
        (dict(ch=0), ValueError, r"^ch: "),
        (dict(ch=2, time_embedding="fourier"), ValueError, r"^ch: .*fourier"),
        (dict(attn_resolutions=(16, -1)), ValueError, r"^attn_resolutions"),
        (dict(time_multiplier=float("nan")), ValueError, r"^time_multiplier"),
        (dict(dtype="int32"), TypeError, r"^dtype"),
        (dict(param_dtype="float8"), TypeError, r"^param_dtype"),
    ],
)
def test_bad_config_raises(kw, exc, pattern):
    with pytest.raises(exc, match=pattern):
        paper_config(**kw)


def test_presets_and_registry():
    assert get_config("paper", 64) == paper_config(64)
    p = paper_config(32)
    assert (p.ch, p.ch_mult, p.num_res_blocks, p.attn_resolutions, p.dropout) == (128, (1, 2, 2, 2), 2, (16,), 0.1)
    t = get_config("tiny", 32, dropout=0.1)
    assert t.ch == 32 and t.ch_mult == (1, 2) and t.dropout == 0.1
    assert UNetConfig(ch_mult=[1, 2], image_size=8).ch_mult == (1, 2)  # lists become tuples (hashable)
    hash(p)
    with pytest.raises(ValueError, match=r"^name"):
        get_config("huge")


def test_attention_note_names_a_middle_attention_over_32x32_and_the_levels_that_shrink_it():
    # every preset at the sizes the configs use attends over at most 32x32 tokens: no note
    for cfg in (paper_config(32), paper_config(64), paper_config(128), tiny_config(16), tiny_config(32),
                tiny_config(64)):
        assert cfg.attention_note() == "", cfg
    note = tiny_config(128).attention_note()  # the 32x32 demo's two levels at 128x128
    assert "middle self-attention runs at 64x64 (4,096 tokens" in note
    assert note.endswith("ch_mult=(1, 2, 2, 2) runs it at 16x16")
    # the suggested levels must divide image_size: 200 stops at 25x25
    assert UNetConfig(image_size=200, ch_mult=(1,)).attention_note().endswith("ch_mult=(1, 2, 2, 2) runs it at 25x25")
    # no level can be added to an odd size: the note says so without a suggestion
    odd = UNetConfig(image_size=33, ch_mult=(1,)).attention_note()
    assert "runs at 33x33" in odd and "runs it at" not in odd


def test_attention_resolutions_no_level_has_are_named():
    """``attn_resolutions=(5,)`` was taken without a word and gave no attention (a walkthrough)."""
    for cfg in (paper_config(32), paper_config(64), paper_config(128), tiny_config(16), tiny_config(32)):
        assert cfg.unused_attention_note() == "", cfg
    assert UNetConfig(image_size=16, ch_mult=(1, 2), attn_resolutions=(5, 8)).unused_attention_note() == (
        "attn_resolutions=(5, 8): no level of this U-Net is [5] pixels wide (its levels at image_size 16: [16, 8]), "
        "so no attention runs there (the middle attention is always on)")
    assert "[16]" in tiny_config(8).unused_attention_note()  # the tiny preset's 16 at 8x8
