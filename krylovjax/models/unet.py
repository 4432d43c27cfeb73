"""The DDPM-style U-Net score network of both papers (method.md section 4.4), in Flax NNX.

Architecture (score_sde's "ddpm" model, as used by Paper B's code for its method and its
baselines):

* input ``x`` ``[B, C, H, W]`` in ``[0, 1]`` mapped to ``2x - 1`` (unless ``centered_input``),
  transposed to NHWC, a 3x3 conv to ``ch`` channels;
* ``len(ch_mult)`` resolution levels going down, each with ``num_res_blocks`` ResNet blocks of
  ``ch * ch_mult[level]`` channels (self-attention after every block whose resolution is in
  ``attn_resolutions``), then a stride-2 3x3 conv (all levels but the last);
* a middle ResNet block, self-attention, ResNet block;
* the levels going up, each with ``num_res_blocks + 1`` ResNet blocks fed the concatenation of
  the running features and the matching skip activation, one self-attention at the level if its
  resolution is listed, then nearest-neighbour x2 upsampling and a 3x3 conv;
* GroupNorm, SiLU, a 3x3 conv to ``out_channels`` initialised to exactly zero (so the
  network's output is zero at initialisation), transposed back to ``[B, C, H, W]``.

A ResNet block is ``GN, SiLU, conv3x3, + Dense(SiLU(temb)), GN, SiLU, dropout, conv3x3`` plus a
1x1 projection of the shortcut when the width changes; its second conv and the attention output
projection start at (almost) zero as in score_sde (variance-scaling with scale 1e-10).
GroupNorm uses ``min(32, channels // 4)`` groups, reduced to the largest divisor of
``channels`` (:func:`group_count`): 32 at every paper width; narrow widths keep >= 4 channels a
group, since a one-channel group would cancel the time-embedding bias.

The time input (method.md 4.3) is ``time_multiplier * t`` or, with ``per_image_offset``,
``time_multiplier * (t + idx - num_images / 2)`` (Paper B's disjoint per-image time intervals),
embedded by :class:`~krylovjax.models.embeddings.TimeEmbedding` ("linear" or "fourier").
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from krylovjax.models.embeddings import TIME_EMBEDDINGS, TimeEmbedding, time_input

__all__ = [
    "UNetConfig",
    "UNet",
    "param_count",
    "group_count",
    "paper_config",
    "tiny_config",
    "get_config",
    "PRESETS",
]

_FLOAT_DTYPES = ("float32", "float64", "bfloat16", "float16")


def _dtype_name(value, name: str) -> str:
    try:
        dt = jnp.dtype(value)
    except TypeError as err:
        raise TypeError(f"{name}: expected one of {_FLOAT_DTYPES}, got {value!r}") from err
    if dt.name not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected one of {_FLOAT_DTYPES}, got {dt.name}")
    return dt.name


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Immutable, hashable settings of :class:`UNet` (method.md 4.4; defaults = the paper's).

    Attributes:
      image_size: ``H = W`` of the inputs; divisible by ``2**(len(ch_mult) - 1)``.
      in_channels: ``C`` of the input images.
      out_channels: ``C`` of the output score field (normally ``in_channels``).
      ch: base width (score_sde ``nf``); 128 in the paper.
      ch_mult: width multiplier per resolution level; ``(1, 2, 2, 2)`` in the paper.
      num_res_blocks: ResNet blocks per level going down (``+1`` going up); 2 in the paper.
      attn_resolutions: spatial sizes at which self-attention is applied; ``(16,)``. The middle
        of the network always has one attention block.
      dropout: dropout rate inside ResNet blocks (active only with ``train=True``); 0.1.
      time_embedding: ``"linear"`` (Paper B) or ``"fourier"`` (DDPM sinusoidal).
      time_multiplier: ``mult`` in the time input ``mult * t`` (method.md 4.3, section 8 table).
      per_image_offset: use ``mult * (t + idx - num_images/2)``; the call then needs ``idx``.
      num_images: number of distinct images indexed by ``idx`` (``n_images``).
      centered_input: ``False`` (default) means inputs are in ``[0, 1]`` and are mapped to
        ``2x - 1``; ``True`` means inputs are already centred and are used unchanged (score_sde's
        ``data.centered``).
      param_dtype: dtype of the parameters (``"float32"``).
      dtype: compute dtype of convolutions, dense layers and attention matmuls; ``"bfloat16"``
        halves memory traffic on accelerators. GroupNorm statistics, the attention softmax and
        the time-embedding MLP stay in float32 (or ``param_dtype`` if wider).
    """

    image_size: int = 32
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    time_embedding: str = "linear"
    time_multiplier: float = 1.0
    per_image_offset: bool = False
    num_images: int = 1
    centered_input: bool = False
    param_dtype: str = "float32"
    dtype: str = "float32"

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        for k in ("ch_mult", "attn_resolutions"):
            v = getattr(self, k)
            if isinstance(v, (int, np.integer)):
                v = (v,)
            try:
                set_(k, tuple(v))
            except TypeError as err:
                raise ValueError(f"{k}: expected a sequence of positive integers, got {v!r}") from err
        for k in ("image_size", "in_channels", "out_channels", "ch", "num_res_blocks", "num_images"):
            v = getattr(self, k)
            if not _is_int(v) or v < 1:
                raise ValueError(f"{k}: expected a positive integer, got {v!r}")
            set_(k, int(v))
        if not self.ch_mult or not all(_is_int(m) and m >= 1 for m in self.ch_mult):
            raise ValueError(f"ch_mult: expected a non-empty sequence of positive integers, got {self.ch_mult!r}")
        if not all(_is_int(r) and r >= 1 for r in self.attn_resolutions):
            raise ValueError(f"attn_resolutions: expected positive integers, got {self.attn_resolutions!r}")
        set_("ch_mult", tuple(int(m) for m in self.ch_mult))
        set_("attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        factor = 2 ** (len(self.ch_mult) - 1)
        if self.image_size % factor:
            raise ValueError(
                f"image_size: expected a multiple of 2**(len(ch_mult)-1) = {factor} "
                f"(ch_mult={self.ch_mult}), got {self.image_size}"
            )
        for k in ("dropout", "time_multiplier"):  # numpy scalars (np.float32(0.1)) as Python numbers
            v = getattr(self, k)
            if isinstance(v, (np.integer, np.floating)):
                set_(k, v.item())
        if not (isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool)
                and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout: expected a rate in [0, 1), got {self.dropout!r}")
        if self.time_embedding not in TIME_EMBEDDINGS:
            raise ValueError(f"time_embedding: expected one of {TIME_EMBEDDINGS}, got {self.time_embedding!r}")
        if self.time_embedding == "fourier" and self.ch < 4:
            raise ValueError(f"ch: the fourier time embedding needs ch >= 4, got {self.ch}")
        if not (isinstance(self.time_multiplier, (int, float)) and math.isfinite(self.time_multiplier)):
            raise ValueError(f"time_multiplier: expected a finite number, got {self.time_multiplier!r}")
        set_("param_dtype", _dtype_name(self.param_dtype, "param_dtype"))
        set_("dtype", _dtype_name(self.dtype, "dtype"))

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Spatial size of each level: ``image_size / 2**level``."""
        return tuple(self.image_size // 2**i for i in range(len(self.ch_mult)))

    def attention_note(self) -> str:
        """A warning when the middle self-attention runs on more than 32x32 tokens, else ``""``.

        The middle of the network attends over every pixel of the last level; its time and memory
        grow with the square of their count (4,096 tokens at 64x64: the 32x32 demo's two levels at
        128x128 took 3.6 s per step on a 2-core CPU instead of 1.7 s with four). The note names the
        ``ch_mult`` that brings that level to 16x16 where ``image_size`` allows it.
        """
        last = self.resolutions[-1]
        if last <= 32:
            return ""
        more, size = list(self.ch_mult), last  # levels of 2x added while the size stays whole
        while size > 16 and size % 2 == 0:
            more.append(2)
            size //= 2
        hint = f"; ch_mult={tuple(more)} runs it at {size}x{size}" if size < last else ""
        return (f"ch_mult={self.ch_mult} at image_size {self.image_size}: the U-Net's middle self-attention runs "
                f"at {last}x{last} ({last * last:,} tokens; its time and memory grow with their square){hint}")

    def unused_attention_note(self) -> str:
        """A warning naming the ``attn_resolutions`` that no level of this network has (so no
        attention there: ``(5,)`` at image_size 16 was taken without a word; a walkthrough,
        2026-12-07), else ``""``."""
        unused = [r for r in self.attn_resolutions if r not in self.resolutions]
        if not unused:
            return ""
        return (f"attn_resolutions={self.attn_resolutions}: no level of this U-Net is {unused} pixels wide "
                f"(its levels at image_size {self.image_size}: {list(self.resolutions)}), so no attention runs "
                "there (the middle attention is always on)")

    def replace(self, **overrides) -> "UNetConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **overrides)


def paper_config(image_size: int = 32, **overrides) -> UNetConfig:
    """Both papers' network (method.md 4.4): ch 128, ch_mult (1,2,2,2), 2 blocks, attention at
    16, dropout 0.1, linear time embedding."""
    return UNetConfig(image_size=image_size, **overrides)


def tiny_config(image_size: int = 32, **overrides) -> UNetConfig:
    """A small network for CPU demos and tests: ch 32, ch_mult (1, 2), 1 block, attention at 16
    (plus the middle attention), no dropout (it only slows fitting of one to three images)."""
    kw: dict[str, Any] = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), dropout=0.0)
    kw.update(overrides)
    return UNetConfig(image_size=image_size, **kw)


#: registry: a config string picks a preset (score_sde style).
PRESETS: dict[str, Callable[..., UNetConfig]] = {"paper": paper_config, "tiny": tiny_config}


def get_config(name: str, image_size: int = 32, **overrides) -> UNetConfig:
    """The preset ``name`` (``"paper"`` or ``"tiny"``) at ``image_size``, with overrides."""
    if name not in PRESETS:
        raise ValueError(f"name: expected one of {tuple(PRESETS)}, got {name!r}")
    return PRESETS[name](image_size, **overrides)


def group_count(channels: int, max_groups: int = 32) -> int:
    """GroupNorm groups: ``min(max_groups, channels // 4)``, reduced to a divisor of ``channels``.

    32 for every paper width (all multiples of 128). The cap of ``channels // 4`` (score_sde's
    ``min(C // 4, 32)``) keeps at least 4 channels per group: with one channel per group
    GroupNorm is an instance norm, which removes the per-channel time-embedding bias added just
    before it, so a narrow network would ignore ``t`` entirely.
    """
    g = max(1, min(max_groups, channels // 4))
    while channels % g:
        g -= 1
    return g


def _init(scale: float = 1.0):
    # score_sde's default_init: variance scaling, fan_avg, uniform; "scale 0" means 1e-10.
    return nnx.initializers.variance_scaling(scale if scale > 0 else 1e-10, "fan_avg", "uniform")


class _Precision:
    """The dtypes one block needs (a plain static object, not a pytree)."""

    def __init__(self, cfg: UNetConfig):
        self.param = jnp.dtype(cfg.param_dtype)
        self.compute = jnp.dtype(cfg.dtype)
        # normalisation / softmax dtype: at least float32
        self.norm = jnp.promote_types(self.param, jnp.float32)


def _conv3x3(cin, cout, prec: _Precision, rngs, *, stride=1, init=None):
    return nnx.Conv(
        cin, cout, (3, 3), strides=stride, padding=((1, 1), (1, 1)),
        kernel_init=init or _init(), dtype=prec.compute, param_dtype=prec.param, rngs=rngs,
    )


def _dense(cin, cout, prec: _Precision, rngs, *, init=None, dtype=None):
    return nnx.Linear(
        cin, cout, kernel_init=init or _init(), dtype=dtype or prec.compute, param_dtype=prec.param, rngs=rngs,
    )


def _norm(c, prec: _Precision, rngs):
    return nnx.GroupNorm(c, num_groups=group_count(c), epsilon=1e-6, dtype=prec.norm, param_dtype=prec.param, rngs=rngs)


class ResnetBlock(nnx.Module):
    """score_sde's ResnetBlockDDPM, NHWC: ``[B, H, W, cin]`` -> ``[B, H, W, cout]``."""

    def __init__(self, cin: int, cout: int, temb_dim: int, dropout: float, prec: _Precision, *, rngs: nnx.Rngs):
        self.compute = prec.compute
        self.norm0 = _norm(cin, prec, rngs)
        self.conv0 = _conv3x3(cin, cout, prec, rngs)
        self.temb_proj = _dense(temb_dim, cout, prec, rngs)
        self.norm1 = _norm(cout, prec, rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.conv1 = _conv3x3(cout, cout, prec, rngs, init=_init(0.0))
        self.shortcut = _dense(cin, cout, prec, rngs) if cin != cout else None  # NIN (1x1)

    def __call__(self, x, temb, *, train: bool, rngs=None):
        h = self.conv0(nnx.silu(self.norm0(x)))
        h = h + self.temb_proj(nnx.silu(temb))[:, None, None, :]
        h = nnx.silu(self.norm1(h)).astype(self.compute)
        h = self.dropout(h, deterministic=not train, rngs=rngs)
        h = self.conv1(h)
        if self.shortcut is not None:
            x = self.shortcut(x)
        return (x + h).astype(self.compute)


class AttnBlock(nnx.Module):
    """Single-head self-attention over all ``H*W`` positions with a residual connection."""

    def __init__(self, c: int, prec: _Precision, *, rngs: nnx.Rngs):
        self.compute = prec.compute
        self.softmax_dtype = prec.norm
        self.norm = _norm(c, prec, rngs)
        self.q = _dense(c, c, prec, rngs)
        self.k = _dense(c, c, prec, rngs)
        self.v = _dense(c, c, prec, rngs)
        self.out = _dense(c, c, prec, rngs, init=_init(0.0))

    def __call__(self, x):
        b, hgt, wid, c = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(b, hgt * wid, c)
        k = self.k(h).reshape(b, hgt * wid, c)
        v = self.v(h).reshape(b, hgt * wid, c)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=self.softmax_dtype) * (c**-0.5)
        w = jax.nn.softmax(logits, axis=-1).astype(self.compute)
        h = jnp.einsum("bqk,bkc->bqc", w, v).reshape(b, hgt, wid, c)
        return (x + self.out(h)).astype(self.compute)


class _DownLevel(nnx.Module):
    def __init__(self, blocks, attns, downsample):
        self.blocks = nnx.List(blocks)
        self.attns = nnx.List(attns)
        self.downsample = downsample


class _UpLevel(nnx.Module):
    def __init__(self, blocks, attn, upsample):
        self.blocks = nnx.List(blocks)
        self.attn = attn
        self.upsample = upsample


class UNet(nnx.Module):
    """The score network ``s_theta(x, t)`` (method.md 4.4), ``[B, C, H, W]`` in and out.

    Example::

        model = UNet(tiny_config(32), rngs=nnx.Rngs(0))
        s = model(x, t, train=False)           # x [B, 3, 32, 32], t [B] -> [B, 3, 32, 32]

    Dropout draws from the ``dropout`` stream of the ``rngs`` given at construction (or of the
    ``rngs`` passed to the call); use ``nnx.jit`` (or ``nnx.split``/``merge``) so the stream
    advances between jitted calls.
    """

    def __init__(self, config: UNetConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, UNetConfig):
            raise TypeError(f"config: expected a UNetConfig, got {type(config).__name__}")
        self.config = config
        prec = _Precision(config)
        self.compute = prec.compute
        ch = config.ch
        temb_dim = 4 * ch
        self.time_embedding = TimeEmbedding(ch, config.time_embedding, param_dtype=prec.norm, rngs=rngs)
        block = lambda cin, cout: ResnetBlock(cin, cout, temb_dim, config.dropout, prec, rngs=rngs)  # noqa: E731

        self.conv_in = _conv3x3(config.in_channels, ch, prec, rngs)
        skip_channels = [ch]
        cur = ch
        down = []
        n_levels = len(config.ch_mult)
        for level, mult in enumerate(config.ch_mult):
            res = config.resolutions[level]
            blocks, attns = [], []
            for _ in range(config.num_res_blocks):
                blocks.append(block(cur, ch * mult))
                cur = ch * mult
                if res in config.attn_resolutions:
                    attns.append(AttnBlock(cur, prec, rngs=rngs))
                skip_channels.append(cur)
            downsample = None
            if level != n_levels - 1:
                downsample = _conv3x3(cur, cur, prec, rngs, stride=2)
                skip_channels.append(cur)
            down.append(_DownLevel(blocks, attns, downsample))
        self.down = nnx.List(down)

        self.mid_block0 = block(cur, cur)
        self.mid_attn = AttnBlock(cur, prec, rngs=rngs)
        self.mid_block1 = block(cur, cur)

        up = []
        for level in reversed(range(n_levels)):
            res = config.resolutions[level]
            blocks = []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(block(cur + skip_channels.pop(), ch * config.ch_mult[level]))
                cur = ch * config.ch_mult[level]
            attn = AttnBlock(cur, prec, rngs=rngs) if res in config.attn_resolutions else None
            upsample = _conv3x3(cur, cur, prec, rngs) if level != 0 else None
            up.append(_UpLevel(blocks, attn, upsample))
        assert not skip_channels
        self.up = nnx.List(up)

        self.norm_out = _norm(cur, prec, rngs)
        self.conv_out = _conv3x3(cur, config.out_channels, prec, rngs, init=nnx.initializers.zeros_init())

    # ------------------------------------------------------------------ validation
    def _check_inputs(self, x, t, idx):
        cfg = self.config
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"x: expected a floating-point image batch, got dtype {x.dtype}")
        if x.ndim != 4:
            raise ValueError(f"x: expected shape [B, C, H, W], got {tuple(x.shape)}")
        b, c, h, w = x.shape
        if c != cfg.in_channels:
            raise ValueError(f"x: expected C = config.in_channels = {cfg.in_channels}, got shape {tuple(x.shape)}")
        factor = 2 ** (len(cfg.ch_mult) - 1)
        if h % factor or w % factor:
            raise ValueError(
                f"x: spatial size {h}x{w} must be divisible by 2**(len(ch_mult)-1) = {factor}"
            )
        if h != cfg.image_size or w != cfg.image_size:
            raise ValueError(
                f"x: expected H = W = config.image_size = {cfg.image_size}, got shape {tuple(x.shape)}"
            )
        if not (jnp.issubdtype(t.dtype, jnp.floating) or jnp.issubdtype(t.dtype, jnp.integer)):
            raise TypeError(f"t: expected a real (float) dtype, got {t.dtype}")
        if t.shape != (b,):
            raise ValueError(f"t: expected shape [B] = ({b},), got {tuple(t.shape)}")
        if cfg.per_image_offset:
            if idx is None:
                raise ValueError("idx: required (shape [B], int) when config.per_image_offset is True")
            if not jnp.issubdtype(idx.dtype, jnp.integer):
                raise TypeError(f"idx: expected an integer dtype, got {idx.dtype}")
            if idx.shape != (b,):
                raise ValueError(f"idx: expected shape [B] = ({b},), got {tuple(idx.shape)}")
            if not isinstance(idx, jax.core.Tracer):
                a = np.asarray(idx)
                if a.size and (a.min() < 0 or a.max() >= cfg.num_images):
                    raise ValueError(
                        f"idx: expected image indices in [0, num_images={cfg.num_images}), "
                        f"got values in [{a.min()}, {a.max()}]"
                    )

    # ------------------------------------------------------------------ forward
    def __call__(self, x: jax.Array, t: jax.Array, idx: jax.Array | None = None, *, train: bool, rngs=None) -> jax.Array:
        """Score ``s_theta(x, t)``.

        Args:
          x: ``[B, C, H, W]`` images (in ``[0, 1]`` unless ``config.centered_input``), floating.
          t: ``[B]`` diffusion times.
          idx: ``[B]`` integer image indices in ``[0, num_images)``; required when
            ``config.per_image_offset``, ignored otherwise.
          train: enables dropout; ``False`` is deterministic.
          rngs: optional ``nnx.Rngs`` for dropout instead of the construction-time stream.

        Returns:
          ``[B, out_channels, H, W]`` in ``x``'s dtype.
        """
        x = jnp.asarray(x)
        t = jnp.asarray(t)
        idx = None if idx is None else jnp.asarray(idx)
        self._check_inputs(x, t, idx)
        cfg = self.config

        tau = time_input(t, idx, multiplier=cfg.time_multiplier, per_image_offset=cfg.per_image_offset,
                         num_images=cfg.num_images)
        temb = self.time_embedding(tau)

        h = jnp.transpose(x, (0, 2, 3, 1))
        if not cfg.centered_input:
            h = 2.0 * h - 1.0
        h = h.astype(self.compute)

        hs = [self.conv_in(h)]
        for level in self.down:
            for i, blk in enumerate(level.blocks):
                h = blk(hs[-1], temb, train=train, rngs=rngs)
                if len(level.attns):
                    h = level.attns[i](h)
                hs.append(h)
            if level.downsample is not None:
                hs.append(level.downsample(hs[-1]))

        h = hs[-1]
        h = self.mid_block0(h, temb, train=train, rngs=rngs)
        h = self.mid_attn(h)
        h = self.mid_block1(h, temb, train=train, rngs=rngs)

        for level in self.up:
            for blk in level.blocks:
                h = blk(jnp.concatenate([h, hs.pop()], axis=-1), temb, train=train, rngs=rngs)
            if level.attn is not None:
                h = level.attn(h)
            if level.upsample is not None:
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest neighbour x2
                h = level.upsample(h)

        h = nnx.silu(self.norm_out(h))
        h = self.conv_out(h.astype(self.compute))
        return jnp.transpose(h, (0, 3, 1, 2)).astype(x.dtype)


def param_count(model: nnx.Module) -> int:
    """Number of scalar parameters (``nnx.Param`` leaves) of ``model``; works on an abstract
    model from ``nnx.eval_shape`` too."""
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    return int(sum(math.prod(leaf.shape) for leaf in leaves))
