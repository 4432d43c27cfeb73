"""Matrix-free backward-Euler operators of the linearised log-density Fokker-Planck equation.

One time step of the log-FP equation (method.md sections 2.2, 3.1-3.2; design.md decision 2),
implicit in ``m`` with the nonlinear ``|grad m|^2`` term linearised around a lagged score::

    A m = m_prev - dt * div_h(f),
    A m = m - dt*(g2/2)*Lap_h(m) + dt*(f - (g2/2)*lagged_score) . grad_h(m)

on the H x W pixel lattice with spacing ``h``. Every (image, channel, time step) is one system
with H*W unknowns; any number of leading batch axes are solved as independent systems.

The operator is stored as five coefficient fields (centre, east, west, south, north), so that

    (A m)[i, j] = c[i,j] m[i,j] + e[i,j] m_E + w[i,j] m_W + s[i,j] m_S + n[i,j] m_N

where ``m_E`` etc. are the neighbour values selected by the scheme's coupling and boundary rule.
:meth:`FPOperator.matvec` applies it with array shifts (jit-able, no loops over pixels) and
:meth:`FPOperator.to_scipy` assembles exactly the same coefficients into a scipy sparse matrix:
both use :func:`_neighbours` on the same arrays, so the reference matrix cannot drift from the
stencil.

Schemes
-------
``"consistent"`` (default): central differences, the gradient a 2-vector. With
``k = dt*g2/(2 h^2)``, ``v = f - (g2/2) * lagged_score`` (component 0 along W = x, 1 along H = y)::

    centre = 1 + 4k,  east/west = -k +- dt*v_x/(2h),  south/north = -k +- dt*v_y/(2h)

``"fitted"``: the consistent scheme with exponential fitting (Il'in-Allen-Southwell) of the
diffusion in each direction: with the half cell Peclet number ``p_x = dt*v_x/(2h) / k``
``= v_x h / g2`` (likewise ``p_y``) and ``sigma(p) = p coth p``::

    centre = 1 + 2k (sigma(p_x) + sigma(p_y)),
    east/west = -k sigma(p_x) +- dt*v_x/(2h),  south/north = -k sigma(p_y) +- dt*v_y/(2h)

computed as ``k (sigma(p) -+ p) = k B(+-2p)`` with the Bernoulli function
``B(x) = x/(e^x - 1)`` (the Scharfetter-Gummel weights; no cancellation).
``sigma(p) >= max(1, |p|)``, so every off-diagonal coefficient is <= 0 and every row of the
matrix sums to 1 on the interior, whatever the score: A is a strictly diagonally dominant
M-matrix (discrete maximum principle). The central scheme loses this once ``|p| > 1`` (cell
Peclet number above 2, i.e. ``|score| > 2/h`` with f = 0): its off-diagonals change sign, the
solution of a step can oscillate, the oscillation steepens the next lagged score, and Paper B's
outer sweeps diverge for about a fifth of the built-in 32x32 images (BUILD_NOTES.md). Since
``sigma(p) = 1 + p^2/3 + O(p^4)``, the fitted scheme is a second-order perturbation of the
central one where the score is resolved (``|p| << 1``; same O(h^2) consistency) and becomes
upwinding where it is not. [INF: not in the papers; the pre-computation's default.]

``"paper_b"``: Paper B's official code, literally (method.md 3.2). The unknowns are coupled along
the *flattened* (row-major) pixel index: +-1 neighbours run across row ends with no break, the
+-W neighbours are the pixels above and below. The gradient is the scalar sum of the two partials,
``s = lagged_score[..., 0] + lagged_score[..., 1]`` (and likewise ``f``), and the coefficients are
those of the code, including its signs and the column-node placement::

    alpha = (f - (g2/2) s) dt/(2h),  delta = (g2/2) dt/h^2,  a = alpha + delta,  c = alpha - delta
    A[k,k] = 1 + 2 g2 dt/h^2,  A[k,k+1] = a[k+1],  A[k,k+W] = a[k+W],
    A[k,k-1] = c[k-1],  A[k,k-W] = c[k-W]

It is *not* a consistent discretisation of the PDE (the Laplacian appears antisymmetric); it is
provided so that the papers' numbers can be reproduced.

Boundaries
----------
``"zero"`` (the papers): m = 0 outside the grid. ``"dirichlet"``: given values at the ghost nodes
around the grid (``boundary_values`` of shape ``[..., H+2, W+2]``, only its outer ring is read);
the matrix is that of ``"zero"`` and the known ghost values move to the right-hand side
(:meth:`FPOperator.rhs`). ``"reflect"``: zero normal derivative with half-sample symmetry, the
ghost node equals the boundary node itself. For ``"paper_b"`` the flattened +-1 coupling has its
ghosts only at the two ends of the flat vector (west of pixel (0, 0), east of pixel (H-1, W-1)).

The drift's source ``-dt*div_h(f)`` reads ghost values of ``f`` too. The boundary conditions
above are conditions on m; f is a given field, so the consistent and fitted schemes extrapolate
it linearly for every boundary (``2 f_0 - f_1``: the one-sided difference at the border, exact
for a linear drift such as VP's). Paper B's scheme takes f = 0 beyond the two ends of its flat
coupling (and vertically outside the grid), as it does for m (the papers use f = 0).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from krylovjax import _checks

Array = jax.Array

SCHEMES = ("consistent", "fitted", "paper_b")
BOUNDARIES = ("zero", "dirichlet", "reflect")


class DTypeError(TypeError, ValueError):
    """A dtype the solvers do not support (they run in float32 or float64 only).

    A ``TypeError`` (the project's rule for dtypes, as :class:`krylovjax.data.ImageDTypeError`)
    that is also a ``ValueError``, so ``except ValueError`` around :func:`fp_operator` or
    :func:`krylovjax.solve_fp` catches every failure.
    """


# Neighbour order used everywhere: east (+x, along W), west (-x), south (+y, along H), north (-y).
_DIRECTIONS = ("east", "west", "south", "north")


def _shift(x, axis: int, step: int, fill):
    """x shifted so that out[i] = x[i + step] along a negative ``axis``; ghosts from ``fill``.

    ``fill=None`` repeats the boundary entry (half-sample reflection); an array ``fill`` supplies
    the ghost slab (same shape as a slice of x along ``axis``); a float fills with that value.
    Works on numpy and JAX arrays alike (plain slicing), so the host-side assembly and the
    jitted stencil share this code.
    """
    xp = np if isinstance(x, np.ndarray) else jnp
    lead = (slice(None),) * (x.ndim + axis)
    if step > 0:
        body, edge = x[lead + (slice(step, None),)], x[lead + (slice(-1, None),)]
    else:
        body, edge = x[lead + (slice(None, step),)], x[lead + (slice(0, 1),)]
    if fill is None:
        ghost = edge
    elif isinstance(fill, (int, float)):
        ghost = xp.full_like(edge, fill)
    else:
        ghost = xp.broadcast_to(xp.expand_dims(xp.asarray(fill), axis), edge.shape).astype(x.dtype)
    return xp.concatenate((body, ghost) if step > 0 else (ghost, body), axis=axis)


def _ghost_slabs(ghost: Array | None, scheme: str):
    """The ghost values each direction reads, from a ``[..., H+2, W+2]`` ring (or None)."""
    if ghost is None:
        return {d: 0.0 for d in _DIRECTIONS}
    if scheme != "paper_b":
        return {
            "east": ghost[..., 1:-1, -1],
            "west": ghost[..., 1:-1, 0],
            "south": ghost[..., -1, 1:-1],
            "north": ghost[..., 0, 1:-1],
        }
    # paper_b: flat +-1 coupling has one ghost at each end of the flattened vector.
    return {
        "east": ghost[..., -2, -1],
        "west": ghost[..., 1, 0],
        "south": ghost[..., -1, 1:-1],
        "north": ghost[..., 0, 1:-1],
    }


def _extrapolated_ghosts(x: Array) -> dict[str, Array]:
    """Ghost slabs of a field ``x`` [..., H, W] (H, W >= 2) extrapolated linearly from the two
    nodes next to each side (``2 x_0 - x_1``), for :func:`_neighbours`."""
    return {
        "east": 2.0 * x[..., :, -1] - x[..., :, -2],
        "west": 2.0 * x[..., :, 0] - x[..., :, 1],
        "south": 2.0 * x[..., -1, :] - x[..., -2, :],
        "north": 2.0 * x[..., 0, :] - x[..., 1, :],
    }


def _neighbours(x: Array, scheme: str, fills: dict[str, Any]) -> dict[str, Array]:
    """Neighbour values of a field ``x`` [..., H, W] in each direction, for a scheme.

    ``fills[d]`` is the ghost rule for direction d: a float (constant ghost), an array slab, or
    None (reflect: the boundary node itself).
    """
    out = {
        "south": _shift(x, -2, +1, fills["south"]),
        "north": _shift(x, -2, -1, fills["north"]),
    }
    if scheme != "paper_b":
        out["east"] = _shift(x, -1, +1, fills["east"])
        out["west"] = _shift(x, -1, -1, fills["west"])
    else:
        shape = x.shape
        flat = x.reshape(shape[:-2] + (shape[-2] * shape[-1],))
        out["east"] = _shift(flat, -1, +1, fills["east"]).reshape(shape)
        out["west"] = _shift(flat, -1, -1, fills["west"]).reshape(shape)
    return out


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FPOperator:
    """One backward-Euler log-FP step for a batch of systems: ``A m = rhs``.

    Build it with :func:`fp_operator`. Fields are arrays broadcast to ``[..., H, W]`` (the batch
    shape ``...`` is that of the inputs); ``scheme`` and ``boundary`` are static.

    Attributes:
      centre, east, west, south, north: stencil coefficients ``[..., H, W]``.
      source: ``-dt * div_h(f)`` ``[..., H, W]``, added to the right-hand side.
      ghost: Dirichlet ghost values ``[..., H+2, W+2]`` or None.
      diffusion: ``k = dt*g2/(2 h^2)`` ``[..., 1, 1]``, the diffusion number of the part all
        systems share (``I + k L``, the operator with zero score and drift; see
        :func:`krylovjax.preconditioners.diffusion_preconditioner`); :func:`fp_operator`
        always sets it. None (an operator built by hand): only the consistent scheme's can be
        recovered, from the centre coefficient ``1 + 4k``.
    """

    centre: Array
    east: Array
    west: Array
    south: Array
    north: Array
    source: Array | None
    ghost: Array | None
    diffusion: Array | None = None
    scheme: str = dataclasses.field(metadata=dict(static=True), default="consistent")
    boundary: str = dataclasses.field(metadata=dict(static=True), default="zero")

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return self.centre.shape[:-2]

    @property
    def grid_shape(self) -> tuple[int, int]:
        return self.centre.shape[-2:]

    @property
    def dtype(self):
        return self.centre.dtype

    def _fills(self, ghost_values: bool):
        if self.boundary == "reflect":
            return {d: None for d in _DIRECTIONS}
        if ghost_values and self.boundary == "dirichlet":
            return _ghost_slabs(self.ghost, self.scheme)
        return {d: 0.0 for d in _DIRECTIONS}

    def matvec(self, m: Array) -> Array:
        """``A m`` for fields ``m`` of shape ``[..., H, W]`` (batch shape broadcastable)."""
        if m.shape[-2:] != self.grid_shape:
            raise ValueError(
                f"m: expected a field of grid shape {self.grid_shape} in its last two axes, "
                f"got shape {m.shape}")
        nb = _neighbours(m, self.scheme, self._fills(ghost_values=False))
        return (self.centre * m + self.east * nb["east"] + self.west * nb["west"]
                + self.south * nb["south"] + self.north * nb["north"])

    __call__ = matvec

    def rhs(self, m_prev: Array) -> Array:
        """Right-hand side ``m_prev - dt*div_h(f)`` minus the Dirichlet ghost contributions."""
        if m_prev.shape[-2:] != self.grid_shape:
            raise ValueError(
                f"m_prev: expected grid shape {self.grid_shape} in its last two axes, "
                f"got shape {m_prev.shape}")
        b = m_prev.astype(self.dtype)
        if self.source is not None:
            b = b + self.source
        if self.boundary == "dirichlet":
            # A applied to the zero field with the ghost values switched on is exactly the
            # ghost contribution: the same neighbour code as matvec.
            zero = jnp.zeros(self.batch_shape + self.grid_shape, self.dtype)
            nb = _neighbours(zero, self.scheme, self._fills(ghost_values=True))
            b = b - (self.east * nb["east"] + self.west * nb["west"]
                     + self.south * nb["south"] + self.north * nb["north"])
        return b

    def diagonal(self) -> Array:
        """The matrix diagonal ``[..., H, W]`` (reflect folds the ghost coefficients in)."""
        if self.boundary != "reflect":
            return self.centre
        h, w = self.grid_shape
        idx = jnp.arange(h * w, dtype=self.dtype).reshape(h, w)
        nb = _neighbours(idx, self.scheme, {d: -1.0 for d in _DIRECTIONS})
        ghost = {d: _checks.left_pad_rank((nb[d] < 0).astype(self.dtype), self.centre.ndim)
                 for d in _DIRECTIONS}  # explicit dtype and rank: as promoted implicitly
        return self.centre + sum(getattr(self, d) * ghost[d] for d in _DIRECTIONS)

    def to_scipy(self, index: tuple[int, ...] | int = ()):
        """The system at batch ``index`` as a ``scipy.sparse.csr_matrix`` (float64).

        Uses the very same coefficient arrays and neighbour rule as :meth:`matvec`: the
        neighbour code is applied to the grid of flat indices, with ghost nodes marked -1
        (dropped, for zero/dirichlet) or mapped to the node itself (reflect).
        """
        import scipy.sparse as sp

        if isinstance(index, (int, np.integer)):
            index = (index,)
        if (not isinstance(index, tuple) or len(index) != len(self.batch_shape)
                or any(isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer))
                       or not -n_ <= i < n_ for i, n_ in zip(index, self.batch_shape))):
            raise ValueError(f"index: expected a full batch index into batch shape "
                             f"{self.batch_shape} (one int per axis, in range), got {index!r}")
        h, w = self.grid_shape
        n = h * w
        idx = np.arange(n, dtype=np.float64).reshape(h, w)
        fills = {d: (None if self.boundary == "reflect" else -1.0) for d in _DIRECTIONS}
        nb = _neighbours(idx, self.scheme, fills)
        rows = [idx.ravel()]
        cols = [idx.ravel()]
        coef = self.centre[index]
        if coef.shape != (h, w):
            raise ValueError(
                f"index: expected a full batch index into batch shape {self.batch_shape}, "
                f"got {index}")
        vals = [np.asarray(coef, np.float64).ravel()]
        for d in _DIRECTIONS:
            col = np.asarray(nb[d]).ravel()
            keep = col >= 0
            rows.append(idx.ravel()[keep])
            cols.append(col[keep])
            vals.append(np.asarray(getattr(self, d)[index], np.float64).ravel()[keep])
        mat = sp.coo_matrix(
            (np.concatenate(vals), (np.concatenate(rows).astype(np.int64),
                                    np.concatenate(cols).astype(np.int64))),
            shape=(n, n))
        return mat.tocsr()  # duplicate (reflect) entries are summed


def _bernoulli_pair(x: Array) -> tuple[Array, Array]:
    """``(B(x), B(-x))`` of the Bernoulli function ``B(x) = x / (e^x - 1)`` (> 0; ``B(0) = 1``).

    One ``expm1`` for both, and no cancellation: ``B(|x|)`` is evaluated directly and the other
    value as ``B(-|x|) = B(|x|) + |x|``, a sum of two non-negative terms, so both stay >= 0 in
    any precision (the M-matrix signs of the fitted scheme). Near 0 the series
    ``1 -+ x/2 + x^2/12`` in ``x`` itself (so derivatives are right at ``x = 0`` too)."""
    a = jnp.abs(x)
    small = a < 1e-3
    q = jnp.where(small, 1.0, a)
    b_abs = q / jnp.expm1(q)  # B(|x|), used where |x| >= 1e-3
    b_neg = b_abs + a  # B(-|x|)
    pos = x >= 0
    even = 1.0 + x * x / 12.0
    b_x = jnp.where(small, even - x / 2.0, jnp.where(pos, b_abs, b_neg))
    b_minus_x = jnp.where(small, even + x / 2.0, jnp.where(pos, b_neg, b_abs))
    return b_x, b_minus_x


def _as_param(name: str, value, batch_shape, dtype) -> Array:
    """A positive scalar or per-system coefficient, broadcast to ``batch_shape + (1, 1)``."""
    arr = jnp.asarray(value)
    if not jnp.issubdtype(arr.dtype, jnp.floating) and not jnp.issubdtype(arr.dtype, jnp.integer):
        raise TypeError(f"{name}: expected a real number or array, got dtype {arr.dtype}")
    arr = arr.astype(dtype)
    try:
        # a scalar gets the batch's rank (size-1 axes) explicitly: no implicit rank promotion
        arr = jnp.broadcast_to(arr, batch_shape) if arr.ndim else arr.reshape((1,) * len(batch_shape))
    except ValueError:
        raise ValueError(
            f"{name}: expected a scalar or an array broadcastable to the batch shape "
            f"{batch_shape}, got shape {arr.shape}") from None
    _checks.check_positive(name, arr)
    return arr[..., None, None]


def fp_operator(
    g2,
    dt,
    h=1.0,
    lagged_score: Array | None = None,
    drift: Array | None = None,
    *,
    grid_shape: tuple[int, int] | None = None,
    batch_shape: tuple[int, ...] | None = None,
    scheme: str = "consistent",
    boundary: str = "zero",
    boundary_values: Array | None = None,
    dtype=None,
) -> FPOperator:
    """Build the backward-Euler log-FP operator (method.md 3.1-3.2, design.md decision 2).

    Args:
      g2: ``g(t_n)^2``, a positive scalar or per-system array (broadcast to the batch shape).
      dt: time step, positive scalar or per-system array.
      h: grid spacing, positive scalar or per-system array.
      lagged_score: ``[..., 2, H, W]`` lagged score (component 0 = d/dx along W, 1 = d/dy along
        H), or None for zero.
      drift: ``[..., 2, H, W]`` drift ``f`` in the same component order, or None for zero. For
        ``div_h(f)`` it is extrapolated linearly beyond the grid whatever the boundary of m
        (Paper B's scheme: ghosts as for m; module docstring).
      grid_shape, batch_shape: needed only when neither ``lagged_score`` nor ``drift`` is given.
      scheme: ``"consistent"``, ``"fitted"`` or ``"paper_b"`` (see module docstring).
      boundary: ``"zero"``, ``"dirichlet"`` (needs ``boundary_values``) or ``"reflect"``.
      boundary_values: ``[..., H+2, W+2]`` ghost values for ``"dirichlet"``; only the outer
        ring is read.
      dtype: float dtype of the coefficients, float32 or float64; default: that of the fields
        (which must then be float32 or float64: the solvers support no other), else float32
        or float64 as x64 dictates.

    Returns:
      An :class:`FPOperator` whose ``matvec`` applies A and ``rhs(m_prev)`` builds the
      right-hand side.

    Raises:
      ValueError / TypeError naming the argument for bad shapes, options, non-finite or
      non-positive concrete values (skipped under ``jax.jit``), and :class:`DTypeError` (both)
      for a dtype other than float32 or float64 (float16 too, checked under ``jax.jit`` as well:
      a float16 operator made every solver fail later with an error naming something else).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme: expected one of {SCHEMES}, got {scheme!r}")
    if boundary not in BOUNDARIES:
        raise ValueError(f"boundary: expected one of {BOUNDARIES}, got {boundary!r}")
    fields = {k: v for k, v in (("lagged_score", lagged_score), ("drift", drift)) if v is not None}
    shapes = {}
    for name, v in fields.items():
        v = jnp.asarray(v)
        _checks.check_float(name, v)
        if v.ndim < 3 or v.shape[-3] != 2:
            raise ValueError(f"{name}: expected shape [..., 2, H, W], got {v.shape}")
        _checks.check_finite(name, v)
        shapes[name] = v.shape
        fields[name] = v
    if shapes:
        first = next(iter(shapes.values()))
        gs = first[-2:]
        for name, s in shapes.items():
            if s[-2:] != gs:
                raise ValueError(f"{name}: grid shape {s[-2:]} does not match {gs}")
        try:
            bs = jnp.broadcast_shapes(*[s[:-3] for s in shapes.values()])
        except ValueError:
            raise ValueError(
                "lagged_score, drift: batch shapes do not broadcast: "
                + ", ".join(f"{k} {v}" for k, v in shapes.items())) from None
        if grid_shape is not None and tuple(grid_shape) != tuple(gs):
            raise ValueError(f"grid_shape: {grid_shape} does not match the fields' grid {gs}")
        grid_shape = tuple(gs)
        if batch_shape is not None:
            try:
                bs = jnp.broadcast_shapes(bs, _checks.as_sizes("batch_shape", batch_shape, 0))
            except ValueError:
                raise ValueError(f"batch_shape: {tuple(batch_shape)} does not broadcast with the "
                                 f"fields' batch shape {tuple(bs)}") from None
        batch_shape = tuple(bs)
    else:
        if grid_shape is None:
            raise ValueError("grid_shape: required when lagged_score and drift are both None")
        grid_shape = _checks.as_sizes("grid_shape", grid_shape, 2)
        batch_shape = _checks.as_sizes("batch_shape", batch_shape or (), 0)
    if len(grid_shape) != 2 or min(grid_shape) < 2:
        raise ValueError(f"grid_shape: expected (H, W) with H, W >= 2, got {grid_shape}")

    # Per-system parameters may carry a batch shape of their own.
    for name, v in (("g2", g2), ("dt", dt), ("h", h)):
        a = jnp.asarray(v)
        if a.ndim:
            try:
                batch_shape = tuple(jnp.broadcast_shapes(batch_shape, a.shape))
            except ValueError:
                raise ValueError(
                    f"{name}: shape {a.shape} does not broadcast with the batch shape "
                    f"{batch_shape}") from None

    dtype_name = "dtype" if dtype is not None or not fields else next(iter(fields))
    if dtype is None:
        dtype = (fields[next(iter(fields))].dtype if fields
                 else jnp.result_type(float))
    dtype = jnp.dtype(dtype)
    if not _checks.is_float32_or_64(dtype):
        raise DTypeError(f"{dtype_name}: expected a floating dtype, float32 or float64 (those of "
                         f"the solvers), got {dtype}")

    g2 = _as_param("g2", g2, batch_shape, dtype)
    dt = _as_param("dt", dt, batch_shape, dtype)
    h = _as_param("h", h, batch_shape, dtype)
    full = batch_shape + grid_shape

    def comp(v, i):
        if v is None:
            return jnp.zeros(full, dtype)
        return jnp.broadcast_to(v[..., i, :, :].astype(dtype), full)

    s = fields.get("lagged_score")
    f = fields.get("drift")
    vx = comp(f, 0) - 0.5 * g2 * comp(s, 0)
    vy = comp(f, 1) - 0.5 * g2 * comp(s, 1)

    k = dt * g2 / (2.0 * h * h)  # [*batch, 1, 1]
    if scheme in ("consistent", "fitted"):
        ax = dt * vx / (2.0 * h)
        ay = dt * vy / (2.0 * h)
        if scheme == "consistent":
            centre = jnp.broadcast_to(1.0 + 4.0 * k, full)
            coeffs = dict(east=-k + ax, west=-k - ax, south=-k + ay, north=-k - ay)
        else:  # k (sigma(p) -+ p) = k B(+-2p): no cancellation, exactly <= 0
            px, py = 2.0 * ax / k, 2.0 * ay / k
            (bex, bwx), (bsy, bny) = _bernoulli_pair(px), _bernoulli_pair(py)
            coeffs = dict(east=-k * bex, west=-k * bwx, south=-k * bsy, north=-k * bny)
            centre = 1.0 - sum(coeffs.values())
    else:
        alpha = (vx + vy) * dt / (2.0 * h)
        delta = jnp.broadcast_to(0.5 * g2 * dt / (h * h), full)
        a = alpha + delta
        c = alpha - delta
        centre = jnp.broadcast_to(1.0 + 2.0 * g2 * dt / (h * h), full)
        # Column-node placement: the coefficient of neighbour k+-1 is taken at that neighbour
        # (for a ghost neighbour, at the node itself). Same neighbour code as the matvec.
        edge = {d: None for d in _DIRECTIONS}
        na = _neighbours(a, "paper_b", edge)
        nc = _neighbours(c, "paper_b", edge)
        coeffs = dict(east=na["east"], west=nc["west"], south=na["south"], north=nc["north"])

    source = None
    if f is not None:
        if scheme != "paper_b":
            # The boundary condition is one of m; f is a given field, extrapolated linearly to
            # the ghost ring for every boundary, so div_h(f) at the border is the one-sided
            # difference (exact for a linear drift such as VP's). Zero ghosts (zero and
            # dirichlet before 2026-12-06) made it ~ f / 2h there, an O(1/h) error of the
            # source: the Gaussian oracle with an Ornstein-Uhlenbeck drift did not converge;
            # edge replication (reflect) gave half the border's normal derivative.
            fx, fy = comp(f, 0), comp(f, 1)
            nx = _neighbours(fx, scheme, _extrapolated_ghosts(fx))
            ny = _neighbours(fy, scheme, _extrapolated_ghosts(fy))
        else:  # Paper B: the scalar sum of partials applied to the summed drift, ghosts as for m
            fills = {d: (None if boundary == "reflect" else 0.0) for d in _DIRECTIONS}
            nx = ny = _neighbours(comp(f, 0) + comp(f, 1), scheme, fills)
        div = (nx["east"] - nx["west"] + ny["south"] - ny["north"]) / (2.0 * h)
        source = -dt * div

    ghost = None
    if boundary == "dirichlet":
        if boundary_values is None:
            raise ValueError(
                "boundary_values: required for boundary='dirichlet', shape [..., H+2, W+2]")
        gv = jnp.asarray(boundary_values)
        _checks.check_float("boundary_values", gv)
        want = (grid_shape[0] + 2, grid_shape[1] + 2)
        if gv.shape[-2:] != want:
            raise ValueError(
                f"boundary_values: expected shape [..., {want[0]}, {want[1]}] (the grid plus "
                f"a ghost ring), got {gv.shape}")
        _checks.check_finite("boundary_values", gv)
        try:
            ghost = jnp.broadcast_to(gv.astype(dtype), batch_shape + want)
        except ValueError:
            raise ValueError(
                f"boundary_values: batch shape {gv.shape[:-2]} does not broadcast to "
                f"{batch_shape}") from None
    elif boundary_values is not None:
        raise ValueError(
            f"boundary_values: only used with boundary='dirichlet', got boundary={boundary!r}")

    return FPOperator(
        centre=centre,
        diffusion=jnp.broadcast_to(k, batch_shape + (1, 1)),
        source=source,
        ghost=ghost,
        scheme=scheme,
        boundary=boundary,
        **{d: jnp.broadcast_to(coeffs[d], full) for d in _DIRECTIONS},
    )


def diffusion_coefficient(g2, dt, h=1.0):
    """``k = dt*g2/(2 h^2)``: the shared diffusion part ``I - dt*(g2/2)*Lap_h`` is ``I + k L``
    with ``L`` the unscaled 5-point negative Laplacian."""
    return jnp.asarray(dt) * jnp.asarray(g2) / (2.0 * jnp.asarray(h) ** 2)
