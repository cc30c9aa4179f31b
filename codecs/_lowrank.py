"""Low-rank stages: ``svd``, ``powersgd`` (warm-started), ``tucker`` (Tucker-2) and ``cp``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ._stage import (
    DecodeCost,
    EncodeContext,
    Encoded,
    EncodeFurther,
    Stage,
    check_param,
    expect,
    expect_part,
    expect_parts,
    is_int,
    parts_size,
    register_stage,
)


def _check_rank(stage: str, param: str, rank: float) -> None:
    ok = (is_int(rank) and rank >= 1) or (isinstance(rank, float) and 0 < rank <= 1)
    check_param(ok, stage, param, "an integer >= 1 or a float in (0, 1] (fraction of energy)", rank)


EXACT_SVD_MAX = 1024
"""Above this smaller side the exact eigensolver takes seconds to minutes: an integer rank is sketched."""
SKETCH_MIN_SIDE = 65
"""Below this smaller side the exact eigensolver is the cheaper (one thread: LeNet-5's 64 x 800 conv2
delta, 212-235 us exact against 310-350 us sketched; its 84 x 120 fc2, 240 against ~100)."""
SKETCH_OVERSAMPLE = 10
SKETCH_POWER_ITERATIONS = 1
"""One product with a a^T: 2 cost 8 % more of a LeNet-5 encode and 25 % more of a 1.66M-parameter one,
for no accuracy measured in the default run, S1 or S3 (BENCHMARKS.md, "svd's sketch with one power
iteration")."""
UNSCALED_MIN, UNSCALED_MAX = 2.0**-30, 2.0**30
"""svd factors a matrix whose largest magnitude lies in this range as it is, others divided by it.

Float32's relative precision does not depend on scale; what scaling prevents is over- and underflow
in the products: with |x| <= 2^30 and at most 2^40 elements, a Gram matrix or a a^T y holds values
up to (2^30 * 2^20)^2 = 2^100 < 2^127, and the leading squared singular values kept are at least
(2^-30)^2 = 2^-60, far above float32's smallest normal (2^-126)."""
_SMALLEST_SUBNORMAL = float(torch.finfo(torch.float32).smallest_normal) * 2.0**-23


def _rank_for_energy(s: torch.Tensor, fraction: float) -> int:
    """Smallest r whose leading singular values hold ``fraction`` of the energy sum(s**2)."""
    energy = torch.cumsum(s.double() ** 2, 0)
    if energy[-1] <= 0:
        return 1
    return min(int(torch.searchsorted(energy, fraction * energy[-1]).item()) + 1, s.numel())


def _matrix(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def _low_rank_pays(rows: int, cols: int, r: int) -> bool:
    return r * (rows + cols) < rows * cols


def _scale(x: torch.Tensor) -> float:
    """max |x| (1 for an all-zero x): factoring x / scale keeps every intermediate far from overflow."""
    lo, hi = x.aminmax()  # not x.abs().amax(): a temporary as large as x, in fresh pages each encode
    biggest = max(-float(lo), float(hi))
    return biggest if biggest > 0 else 1.0


def _factor_rank(stage: str, parts: list[torch.Tensor], shape: tuple[int, ...], transpose_q: bool) -> int:
    """Check P and Q against ``shape``; return their rank r (r (rows + cols) < rows * cols)."""
    expect_parts(stage, parts, 2)
    if len(shape) < 2:  # messages are formatted only when raised: this runs for every factored node
        expect(False, stage, f"factored tensors have >= 2 dimensions, found shape {shape}")
    rows, cols = shape[0], math.prod(shape[1:])
    p, q = parts
    expect(p.dim() == 2 and q.dim() == 2, stage, "factors must be matrices")
    r = p.shape[1]
    if not (r >= 1 and _low_rank_pays(rows, cols, r)):
        expect(False, stage, f"rank {r} does not shrink a {rows} x {cols} matrix")
    expect_part(stage, p, "P", dtype=torch.float32, shape=(rows, r))
    expect_part(stage, q, "Q", dtype=torch.float32, shape=(cols, r) if transpose_q else (r, cols))
    return r


def _factors_cost(stage: str, parts: list[torch.Tensor], shape: tuple[int, ...], transpose_q: bool) -> DecodeCost:
    r = _factor_rank(stage, parts, shape, transpose_q)
    n = math.prod(shape)
    return DecodeCost(scratch_bytes=2 * 4 * n, work=n * r)


def _decode_factors(stage: str, parts: list[torch.Tensor], shape: tuple[int, ...], transpose_q: bool) -> torch.Tensor:
    _factor_rank(stage, parts, shape, transpose_q)
    p, q = parts
    product: torch.Tensor = p @ (q.T if transpose_q else q)
    return product.reshape(shape)


def _eigh(gram: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of ``gram``, which is a a^T."""
    try:
        return torch.linalg.eigh(gram)  # type: ignore[no-any-return]
    except torch.linalg.LinAlgError:
        # LAPACK's symmetric eigensolver can fail to converge on a Gram matrix with many repeated
        # eigenvalues (a sparse update of a few quantized values: a catch-up over top-k steps);
        # the SVD of a itself converges there, at a higher cost paid only in this case.
        u, s, _ = torch.linalg.svd(a, full_matrices=False)
        return (s * s).flip(0), u.flip(1)


def _eighs(factors: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`_eigh` of each a a^T for a in ``factors``: one batched call per size of Gram matrix.

    A batched ``eigh`` runs LAPACK's solver on each matrix of the batch in turn, as separate calls
    would (the same results bit for bit, tested), for one dispatch instead of several.
    """
    grams = [a @ a.T for a in factors]
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(grams)
    by_size: dict[int, list[int]] = {}
    for i, gram in enumerate(grams):
        by_size.setdefault(gram.shape[0], []).append(i)
    for same in by_size.values():
        if len(same) == 1:
            out[same[0]] = _eigh(grams[same[0]], factors[same[0]])
            continue
        try:
            w, v = torch.linalg.eigh(torch.stack([grams[i] for i in same]))
        except torch.linalg.LinAlgError:  # one of them failed: each its own call, with its fallback
            for i in same:
                out[i] = _eigh(grams[i], factors[i])
            continue
        for i, wi, vi in zip(same, w.unbind(), v.unbind(), strict=True):
            out[i] = (wi, vi)
    return [pair for pair in out if pair is not None]


def _sketch_pays(rank: int | float, side: int) -> bool:
    """Whether the leading ``rank`` singular vectors of a matrix of smaller side ``side`` are sketched."""
    if not isinstance(rank, int):
        return False  # a fraction of the energy needs the whole spectrum
    if side > EXACT_SVD_MAX:
        return 2 * rank < side
    return side >= SKETCH_MIN_SIDE and 3 * (rank + SKETCH_OVERSAMPLE) <= side


@dataclass
class _Factoring:
    """One matrix on its way through :meth:`SVD.encode_batch`.

    ``a`` is the matrix (divided by ``scale`` unless that is 1) with its smaller side first: m
    for a wide m (rows <= cols), m^T for a tall one. ``projected`` is what the Gram matrix is
    made of: ``a`` itself, or basis^T a once a sketch found ``basis``, an orthonormal basis of
    a's leading range.
    """

    a: torch.Tensor
    wide: bool
    scale: float
    sketched: bool
    seed: int
    projected: torch.Tensor
    basis: torch.Tensor | None = None


def _sketch_ranges(jobs: list[_Factoring], rank: int) -> None:
    """Set ``basis`` and ``projected`` of each job: an approximate range of its leading ``rank`` singular vectors.

    Randomized subspace iteration (Halko, Martinsson and Tropp 2011, algorithm 4.4): a Gaussian
    test matrix of rank + SKETCH_OVERSAMPLE columns drawn from the job's seed,
    SKETCH_POWER_ITERATIONS products with a a^T, re-orthonormalized between them so that the
    smaller directions are not rounded away; Rayleigh-Ritz on the basis found follows in
    :meth:`SVD.encode_batch`. Measured on real LeNet-5 and McMahan CNN deltas, the rank-4 and
    rank-6 errors are within 0.7 % of Eckart-Young's (0.1-0.4 % on the larger matrices); on a
    flat spectrum (a Gaussian matrix) within 1 % (``tests/test_codecs_math.py``). Each step is
    taken for every job before the next (see :meth:`SVD.encode_batch`).
    """
    ys = []
    for job in jobs:
        columns = min(rank + SKETCH_OVERSAMPLE, job.a.shape[0])
        test = torch.randn(job.a.shape[1], columns, generator=torch.Generator().manual_seed(job.seed))
        ys.append(job.a @ test)
    for _ in range(SKETCH_POWER_ITERATIONS):
        qs = [torch.linalg.qr(y).Q for y in ys]
        ys = [job.a @ (job.a.T @ q) for job, q in zip(jobs, qs, strict=True)]
    bases = [torch.linalg.qr(y).Q for y in ys]
    for job, basis in zip(jobs, bases, strict=True):
        job.basis, job.projected = basis, basis.T @ job.a


def _factors(top: torch.Tensor, projected: torch.Tensor, scale: float, wide: bool) -> Encoded:
    """P and Q from the leading singular vectors ``top`` of m (wide) or of m^T (tall), and ``projected`` = top^T m
    (wide) or top^T m^T (tall)."""
    if wide:  # top = U_r, projected = S_r V_r^T: its rows have the singular values as norms
        norms = torch.linalg.vector_norm(projected, dim=1)
        # a zero row stays zero whatever it is divided by; the smallest subnormal changes no other norm
        q = projected / norms.clamp_min(_SMALLEST_SUBNORMAL)[:, None]
        return Encoded([EncodeFurther(top * (norms if scale == 1.0 else norms * scale)), EncodeFurther(q)])
    # top = V_r, projected = (m V_r)^T
    return Encoded([EncodeFurther(projected.T * scale), EncodeFurther(top.T.contiguous())])


@register_stage
@dataclass(frozen=True)
class SVD(Stage):
    """Truncated SVD of each tensor with >= 2 dims, reshaped to (out, in*kh*kw).

    Math: M = U S V^T; send P = U_r S_r (out x r) and Q = V_r^T (r x in*kh*kw); M_r = P Q, the
    best rank-r approximation: ||M - M_r||_F^2 = sum_{i>r} s_i^2 (Eckart-Young). Cost: for an
    integer rank on matrices whose smaller side is >= 65 and >= 3 (r + 10), a randomized SVD
    (10 oversamples, 1 power iteration, its test matrix drawn from the encode's seed;
    O(out * in * (r + 10))), whose error is within ~1 % of Eckart-Young's (0.1-0.7 % on real
    updates); otherwise an exact SVD (O(out * in * min(out, in)), from the eigendecomposition
    of the smaller Gram matrix). See :meth:`encode_batch`. Sends r (out + in) values.
    Pays: where updates are close to low rank (large fully connected layers); a tensor that
    factoring would not make smaller, and 1-D tensors, go to the next stage unchanged.

    Parameters
    ----------
    rank : int | float
        An integer rank, or a float in (0, 1]: the fraction of energy sum(s**2) kept
        (default: 4).
    """

    name: ClassVar[str] = "svd"
    rank: int | float = 4

    def __post_init__(self) -> None:
        _check_rank(self.name, "rank", self.rank)

    def encode(self, x: torch.Tensor, ctx: EncodeContext) -> Encoded | None:
        return self.encode_batch([x], [ctx])[0]

    def encode_batch(self, xs: Sequence[torch.Tensor], ctxs: Sequence[EncodeContext]) -> list[Encoded | None]:
        """Truncated SVDs of ``xs``, each step taken for every matrix before the next.

        For an integer rank on a matrix whose smaller side is at least SKETCH_MIN_SIDE (and three
        times rank + SKETCH_OVERSAMPLE), the leading singular vectors are sketched
        (:func:`_sketch_ranges`): 2-3x faster there, and minutes faster on large matrices.
        Otherwise they come from the eigendecomposition of the smaller Gram matrix: for a wide m
        (rows <= cols), m m^T = U S^2 U^T gives U_r; for a tall one, m^T m = V S^2 V^T gives V_r.
        The Gram matrix is min(rows, cols) square, so this costs a product and a small symmetric
        eigensolver instead of a bidiagonalization of m. Squaring doubles the relative rounding
        error of small singular values; the leading ones, which are kept, are unaffected at
        float32 precision.

        Step by step rather than matrix by matrix: in a node's round, after training has evicted
        them from the caches, LAPACK's and MKL's code paths cost several times what they cost
        when called again at once (an eigensolver call: ~40 us in the round, ~17 us in a loop).
        Each matrix gets the same operations on the same operands either way, so the factors are
        the same bit for bit.
        """
        jobs = [self._job(x, ctx.seed) for x, ctx in zip(xs, ctxs, strict=True)]
        todo = [job for job in jobs if job is not None]
        _sketch_ranges([job for job in todo if job.sketched], int(self.rank))
        spectra = iter(_eighs([job.projected for job in todo]))
        return [None if job is None else self._factored(job, *next(spectra)) for job in jobs]

    def _job(self, x: torch.Tensor, seed: int) -> _Factoring | None:
        """``x`` as a matrix to factor, or None where factoring would not shrink it (or it has < 2 dims)."""
        if x.dim() < 2:
            return None
        rows, cols = x.shape[0], x.numel() // x.shape[0]
        if isinstance(self.rank, int) and not _low_rank_pays(rows, cols, min(self.rank, rows, cols)):
            return None  # decided before any arithmetic on x: small tensors (conv1 of LeNet-5) end here
        scale = _scale(x)
        if UNSCALED_MIN <= scale <= UNSCALED_MAX:  # no x / scale: a copy of x in fresh pages, each encode
            m, scale = _matrix(x), 1.0
        else:
            m = _matrix(x) / scale
        wide = rows <= cols
        a = m if wide else m.T
        return _Factoring(a, wide, scale, _sketch_pays(self.rank, min(rows, cols)), seed, projected=a)

    def _factored(self, job: _Factoring, w: torch.Tensor, v: torch.Tensor) -> Encoded | None:
        """P and Q from the eigendecomposition (w, v) of the job's Gram matrix; None if its rank would not pay."""
        rows, cols = job.a.shape if job.wide else job.a.shape[::-1]
        if isinstance(self.rank, float):
            r = _rank_for_energy(w.flip(0).clamp_min(0).sqrt(), self.rank)
            if not _low_rank_pays(rows, cols, r):
                return None
        else:
            r = min(self.rank, w.numel())
        top = v[:, -r:].flip(1)
        # Rayleigh-Ritz on a sketch: U_r = basis top, and U_r^T a = top^T (basis^T a), from the
        # projection already made: (rank + 10) x rows times fewer operations than from a
        left = top if job.basis is None else job.basis @ top
        return _factors(left, top.T @ job.projected, job.scale, job.wide)

    def decode_cost(self, parts: list[torch.Tensor], meta: bytes, shape: tuple[int, ...]) -> DecodeCost:
        return _factors_cost(self.name, parts, shape, transpose_q=False)

    def decode(self, parts: list[torch.Tensor], meta: bytes, shape: tuple[int, ...]) -> torch.Tensor:
        return _decode_factors(self.name, parts, shape, transpose_q=False)


@register_stage
@dataclass(frozen=True)
class PowerSGD(Stage):
    """PowerSGD low-rank approximation (Vogels et al. 2019) with a warm-started Q.

    Math: M (out x in*kh*kw); with Q from the previous encode of this tensor (state):
    P = orth(M Q), Q = M^T P, repeated ``iters`` times; send P and Q, M ~ P Q^T. The warm start
    makes one iteration per round track the dominant subspace over rounds. Cost: 2 * iters
    matrix products (O(out * in * r)), r (out + in) values; no SVD. Pays: like ``svd`` at a
    fraction of its compute; needs error feedback to converge. Tensors with < 2 dims, or that
    factoring would not shrink, go to the next stage unchanged.

    Parameters
    ----------
    rank : int
        Rank r >= 1 (default: 1).
    iters : int
        Power iterations per encode, >= 1 (default: 1).
    """

    name: ClassVar[str] = "powersgd"
    rank: int = 1
    iters: int = 1

    def __post_init__(self) -> None:
        check_param(is_int(self.rank) and self.rank >= 1, self.name, "rank", "an integer >= 1", self.rank)
        check_param(
            is_int(self.iters) and 1 <= self.iters <= 100, self.name, "iters", "an integer in 1..100", self.iters
        )

    def encode(self, x: torch.Tensor, ctx: EncodeContext) -> Encoded | None:
        if x.dim() < 2:
            return None
        rows, cols = x.shape[0], x.numel() // x.shape[0]
        r = min(self.rank, rows, cols)
        if not _low_rank_pays(rows, cols, r):
            return None  # decided before any arithmetic on x
        scale = _scale(x)
        m = _matrix(x) / scale
        q = ctx.state.get("q")
        if q is None or q.shape != (m.shape[1], r):
            q = torch.randn(m.shape[1], r, generator=ctx.generator())
        q = q / _scale(q)  # only the warm start's direction matters
        for _ in range(self.iters):
            p = torch.linalg.qr(m @ q).Q
            q = m.T @ p
        q = q * scale
        if bool(torch.isfinite(q).all()):  # an overflowing q is refused below; keep the last good warm start
            ctx.state["q"] = q.clone()
        return Encoded([EncodeFurther(p.contiguous()), EncodeFurther(q.contiguous())])

    def check_state(self, entry: str, value: torch.Tensor) -> None:
        """PowerSGD keeps ``q``, a finite float32 matrix of at most ``rank`` columns."""
        if entry != "q":
            raise ValueError(f"stage {self.name!r} keeps only a state entry 'q', found {entry!r}")
        ok = value.dtype == torch.float32 and value.dim() == 2 and 1 <= value.shape[1] <= self.rank
        if not ok:
            raise ValueError(
                f"stage {self.name!r}: state 'q' must be a float32 matrix with 1..{self.rank} columns, "
                f"found {value.dtype} of shape {tuple(value.shape)}"
            )
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"stage {self.name!r}: state 'q' holds NaN or infinite values")

    def decode_cost(self, parts: list[torch.Tensor], meta: bytes, shape: tuple[int, ...]) -> DecodeCost:
        return _factors_cost(self.name, parts, shape, transpose_q=True)

    def decode(self, parts: list[torch.Tensor], meta: bytes, shape: tuple[int, ...]) -> torch.Tensor:
        return _decode_factors(self.name, parts, shape, transpose_q=True)


def _mode_basis(unfolded: torch.Tensor, rank: float) -> torch.Tensor:
    """Leading left singular vectors of a mode unfolding (HOSVD)."""
    u, s, _ = torch.linalg.svd(unfolded, full_matrices=False)
    r = _rank_for_energy(s, rank) if isinstance(rank, float) else min(rank, s.numel())
    basis: torch.Tensor = u[:, :r].contiguous()
    return basis


@register_stage
@dataclass(frozen=True)
class Tucker(Stage):
    """Tucker-2 decomposition of 4-D conv kernels on their channel modes.

    Math: W (O x I x kh x kw) ~ G x_1 U x_2 V with U (O x r_o), V (I x r_i) orthonormal and
    core G = W x_1 U^T x_2 V^T (r_o x r_i x kh x kw); U, V from HOSVD refined by ``iters``
    HOOI sweeps. Cost: SVDs of the two channel unfoldings; r_o O + r_i I + r_o r_i kh kw values.
    Pays: on wide conv layers (the factors are the 1x1 -> kxk -> 1x1 structure of a
    compressed conv); other tensors go to the next stage unchanged, as does a kernel that
    Tucker would not shrink.

    Parameters
    ----------
    ranks : int | float | tuple
        (r_out, r_in); an int gives both, a float in (0, 1] keeps that fraction of energy
        per mode (default: 4).
    iters : int
        HOOI refinement sweeps, 0..50 (default: 1).
    """

    name: ClassVar[str] = "tucker"
    ranks: int | float | tuple[int | float, int | float] = 4
    iters: int = 1

    def __post_init__(self) -> None:
        ranks = self.ranks if isinstance(self.ranks, tuple) else (self.ranks, self.ranks)
        check_param(len(ranks) == 2, self.name, "ranks", "an int, a float or a pair (r_out, r_in)", self.ranks)
        for r in ranks:
            _check_rank(self.name, "ranks", r)
        check_param(is_int(self.iters) and 0 <= self.iters <= 50, self.name, "iters", "an integer in 0..50", self.iters)

    def encode(self, x: torch.Tensor, ctx: EncodeContext) -> Encoded | None:
        if x.dim() != 4:
            return None
        o, i, kh, kw = x.shape
        r_out, r_in = self.ranks if isinstance(self.ranks, tuple) else (self.ranks, self.ranks)
        scale = _scale(x)
        x = x / scale
        u = _mode_basis(x.reshape(o, -1), r_out)
        v = _mode_basis(x.transpose(0, 1).reshape(i, -1), r_in)
        for _ in range(self.iters):  # HOOI: each basis from the tensor projected on the other
            u = _mode_basis(torch.einsum("oiyx,ib->obyx", x, v).reshape(o, -1), u.shape[1])
            v = _mode_basis(torch.einsum("oiyx,oa->iayx", x, u).reshape(i, -1), v.shape[1])
        if u.shape[1] * o + v.shape[1] * i + u.shape[1] * v.shape[1] * kh * kw >= x.numel():
            return None
        core = torch.einsum("oiyx,oa,ib->abyx", x, u, v).mul_(scale).contiguous()
        return Encoded([EncodeFurther(core), EncodeFurther(u), EncodeFurther(v)])

    def _ranks(self, parts: list[torch.Tensor], shape: tuple[int, ...]) -> tuple[int, int]:
        """Check the core and factors against ``shape``; return (r_out, r_in)."""
        expect_parts(self.name, parts, 3)
        expect(len(shape) == 4, self.name, f"Tucker-2 rebuilds 4-D kernels, found shape {shape}")
        core, u, v = parts
        expect(core.dim() == 4 and u.dim() == 2 and v.dim() == 2, self.name, "core must be 4-D and factors 2-D")
        ra, rb = core.shape[:2]
        o, i, kh, kw = shape
        expect(1 <= ra <= o and 1 <= rb <= i, self.name, f"ranks ({ra}, {rb}) must be in 1..{o} and 1..{i}")
        expect(
            ra * o + rb * i + ra * rb * kh * kw < o * i * kh * kw,
            self.name,
            f"ranks ({ra}, {rb}) do not shrink {shape}",
        )
        expect_part(self.name, core, "the core", dtype=torch.float32, shape=(ra, rb, kh, kw))
        expect_part(self.name, u, "U", dtype=torch.float32, shape=(o, ra))
        expect_part(self.name, v, "V", dtype=torch.float32, shape=(i, rb))
        return ra, rb

    def decode_cost(self, parts: list[torch.Tensor], meta: bytes, shape: tuple[int, ...]) -> DecodeCost:
        ra, rb = self._ranks(parts, shape)
        n = math.prod(shape)
        middle = shape[0] * rb * shape[2] * shape[3]  # core x_1 U, at most n since rb <= I
        work = middle * ra + n * rb
        return DecodeCost(scratch_bytes=3 * 4 * (n + middle) + 2 * parts_size(parts)[0], work=work)

    def decode(self, parts: list[torch.Tensor], meta: bytes, shape: tuple[int, ...]) -> torch.Tensor:
        self._ranks(parts, shape)
        core, u, v = parts
        # two products, in this order, so that no intermediate exceeds the output
        middle = torch.einsum("abyx,oa->obyx", core, u)
        return torch.einsum("obyx,ib->oiyx", middle, v).contiguous()


@register_stage
@dataclass(frozen=True)
class CP(Stage):
    """CP (CANDECOMP/PARAFAC) decomposition of 4-D conv kernels by alternating least squares.

    Math: W ~ sum_{j<r} a_j (x) b_j (x) c_j (x) d_j with factors A (O x r), B (I x r),
    C (kh x r), D (kw x r); each ALS step solves one factor exactly given the others
    (A = W_(1) (D . C . B) (B^T B * C^T C * D^T D)^+). Initialized from HOSVD bases. Cost:
    ``iters`` ALS sweeps; r (O + I + kh + kw) values. Pays: the most compact of the
    factorizations for conv kernels at small r, but the fit is approximate and can need many
    sweeps; other tensors, and kernels CP would not shrink, go to the next stage unchanged.

    Parameters
    ----------
    rank : int
        CP rank r >= 1 (default: 4).
    iters : int
        ALS sweeps, 1..500 (default: 25).
    """

    name: ClassVar[str] = "cp"
    rank: int = 4
    iters: int = 25

    def __post_init__(self) -> None:
        check_param(is_int(self.rank) and self.rank >= 1, self.name, "rank", "an integer >= 1", self.rank)
        check_param(
            is_int(self.iters) and 1 <= self.iters <= 500, self.name, "iters", "an integer in 1..500", self.iters
        )

    def encode(self, x: torch.Tensor, ctx: EncodeContext) -> Encoded | None:
        if x.dim() != 4 or self.rank * sum(x.shape) >= x.numel():
            return None
        r = self.rank
        scale = _scale(x)
        x = x / scale
        gen = ctx.generator()
        factors = []
        for mode, size in enumerate(x.shape):
            unfolded = x.movedim(mode, 0).reshape(size, -1)
            u = torch.linalg.svd(unfolded, full_matrices=False)[0][:, :r]
            if u.shape[1] < r:
                u = torch.cat([u, torch.randn(size, r - u.shape[1], generator=gen) / math.sqrt(size)], 1)
            factors.append(u.contiguous())
        subscripts = ["oiyx,ir,yr,xr->or", "oiyx,or,yr,xr->ir", "oiyx,or,ir,xr->yr", "oiyx,or,ir,yr->xr"]
        for _ in range(self.iters):
            for mode in range(4):
                others = [f for m, f in enumerate(factors) if m != mode]
                gram = torch.ones(r, r)
                for f in others:
                    gram = gram * (f.T @ f)
                rhs = torch.einsum(subscripts[mode], x, *others)
                factors[mode] = rhs @ torch.linalg.pinv(gram)
        factors[0] = factors[0] * scale
        return Encoded([EncodeFurther(f.contiguous()) for f in factors])

    def _rank(self, parts: list[torch.Tensor], shape: tuple[int, ...]) -> int:
        expect_parts(self.name, parts, 4)
        expect(len(shape) == 4, self.name, f"CP rebuilds 4-D kernels, found shape {shape}")
        expect(parts[0].dim() == 2, self.name, "factors must be matrices")
        r = parts[0].shape[1]
        expect(1 <= r and r * sum(shape) < math.prod(shape), self.name, f"rank {r} does not shrink {shape}")
        for f, size, what in zip(parts, shape, "ABCD", strict=True):
            expect_part(self.name, f, f"factor {what}", dtype=torch.float32, shape=(size, r))
        return r

    def decode_cost(self, parts: list[torch.Tensor], meta: bytes, shape: tuple[int, ...]) -> DecodeCost:
        r = self._rank(parts, shape)
        n = math.prod(shape)
        o, i, kh, kw = shape
        # the output and one chunk of each Khatri-Rao product, each at most n values
        return DecodeCost(scratch_bytes=4 * 4 * n, work=r * (n + o * i + kh * kw))

    def decode(self, parts: list[torch.Tensor], meta: bytes, shape: tuple[int, ...]) -> torch.Tensor:
        r = self._rank(parts, shape)
        a, b, c, d = parts
        o, i, kh, kw = shape
        # sum over rank chunks of (A . B)(C . D)^T (Khatri-Rao products), each chunk at most n values
        chunk = max(1, math.prod(shape) // (o * i + kh * kw))
        out = torch.zeros(o * i, kh * kw)
        for s in range(0, r, chunk):
            ab = (a[:, None, s : s + chunk] * b[None, :, s : s + chunk]).reshape(o * i, -1)
            cd = (c[:, None, s : s + chunk] * d[None, :, s : s + chunk]).reshape(kh * kw, -1)
            out.addmm_(ab, cd.T)
        return out.reshape(shape)
