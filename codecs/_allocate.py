"""The planner behind the ``budget`` stage: per-tensor menus, Lagrangian choice, measured correction."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from ._budget import (
    BITS_CHOICES,
    NODE_BYTES,
    RANK_GRID,
    TOLERANCE,
    Budget,
    BudgetMissWarning,
    Choice,
    budget_settings,
    encode_choice,
    group_bytes,
    group_bytes_many,
    k_grid,
    quant_relative_error,
    width_stage,
)
from ._lowrank import PowerSGD
from ._stage import Stage
from ._wire import Writer

if TYPE_CHECKING:
    from ._pipeline import Codec

FILL_STEPS = 400
"""Most greedy steps spent on the bytes left by the discrete menus."""
BISECTIONS = 48
"""Halvings of the price's 120 decades: 4e-13 of a decade at the end, far finer than any two breakpoints."""
FACTOR_RANGE = 30.0
"""Range**2 / mean square of a low-rank factor's entries, for the estimate of their quantization error."""


@dataclass
class Tensor:
    """One float tensor of the update as the planner sees it."""

    name: str
    t: torch.Tensor  # as given
    x: torch.Tensor  # float32, contiguous
    menu: list[Choice]
    mags: np.ndarray  # magnitudes in descending order
    off_menu: list[Choice] = field(default_factory=list)  # ranks and widths with more error for their bytes


def _stage_of(later: Sequence[Stage], names: tuple[str, ...]) -> Stage | None:
    return next((s for s in later if s.name in names), None)


def _fixed_value_bits(later: Sequence[Stage]) -> tuple[int, str]:
    """Bits per kept value, and the coder, when no quantizer width is chosen."""
    coder = _stage_of(later, ("fp16", "bf16", "ternary", "sign"))
    if coder is None:
        return 32, "float"
    return (16, "half") if coder.name in ("fp16", "bf16") else (1, "sign")


def _run_starts(a: np.ndarray) -> np.ndarray:
    """Where each run of equal values of the non-empty 1-D ``a`` begins."""
    edge = np.empty(a.size, dtype=bool)
    edge[0] = True
    np.not_equal(a[1:], a[:-1], out=edge[1:])
    return np.flatnonzero(edge)


def _code_bits(mags: np.ndarray, spread: float, widths: Sequence[int], ks: np.ndarray) -> dict[int, np.ndarray]:
    """Entropy in bits of the quantizer codes of the k largest entries (sign included), per width and k in ``ks``.

    The quantizer's range is the tensor's (min, max) for every k that keeps both extremes, so an
    entry's code does not depend on k; magnitudes sorted in descending order have non-increasing
    codes, and the codes of a prefix are counted from the run lengths (all k at once: a run
    [start, end) of the ascending codes holds end - max(start, n - k) of the k largest). One pass
    at 8 bits serves every width: floor(m / (spread / w)) = floor(m / (spread / 255)) // (255 / w)
    for w = 2**b - 1 dividing 255, so a narrower width's runs are unions of the 8-bit runs.
    """
    step = spread / 255 if spread > 0 else 1.0
    codes = np.minimum(mags[::-1] / step, 255).astype(np.int64)  # non-decreasing
    n = mags.size
    starts = _run_starts(codes)
    ends = np.append(starts[1:], n)
    first = np.maximum(starts[None, :], (n - ks)[:, None])
    counts = np.maximum(ends[None, :] - first, 0).astype(np.float64)
    run_codes = codes[starts]
    out = {}
    for bits in widths:
        levels = (1 << bits) - 1
        if 255 % levels:
            raise ValueError(f"width {bits} does not divide 8 bits' levels")
        narrow = run_codes // (255 // levels)  # non-decreasing: the runs of one narrow code are adjacent
        merged = np.add.reduceat(counts, _run_starts(narrow), axis=1)
        p = merged / ks[:, None].astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(merged > 0, p * np.log2(np.where(merged > 0, p, 1.0)), 0.0)
        out[bits] = np.minimum(float(bits), 1.0 - terms.sum(axis=1))
    return out


def _index_bits(n: int, k: int) -> float:
    """Bits per kept entry of its position after zstd: the entropy of a random k-subset, per entry."""
    p = k / n
    if p >= 1:
        return 0.0
    return max(0.1, -(p * math.log2(p) + (1 - p) * math.log2(1 - p)) / p)


def _index_bits_many(n: int, ks: np.ndarray) -> np.ndarray:
    """:func:`_index_bits` for every k in ``ks`` (each in 1..n-1)."""
    p = ks / n
    return np.maximum(0.1, -(p * np.log2(p) + (1 - p) * np.log2(1 - p)) / p)


def _topk_menu(
    x: torch.Tensor, mags_sorted: np.ndarray, later: Sequence[Stage], spread: float, entropy: dict[int, np.ndarray]
) -> list[Choice]:
    """Top-k sizes x value codings, with the dropped energy (exact) plus the value coding's error.

    ``spread`` is max(x) - min(x); ``entropy`` maps each quantizer width to :func:`_code_bits` on
    the top-k grid. Only the points on the lower convex hull of (bytes, error) are returned: no
    price picks another.
    """
    n = x.numel()
    ks = k_grid(n)
    if ks.size == 0:
        return []
    mags = np.ascontiguousarray(mags_sorted, dtype=np.float64)
    energy = np.cumsum(mags * mags)  # not np.dot: a BLAS call may spin up threads, costing milliseconds
    kept = energy[ks - 1]
    sums = np.cumsum(mags)[ks - 1]
    total = float(energy[-1])
    quant = _stage_of(later, ("quantize",))
    fixed_bits, coder = _fixed_value_bits(later)
    index_bytes = ks * _index_bits_many(n, ks) / 8 + NODE_BYTES
    fields = [0]
    value_bits = [np.full(ks.size, float(fixed_bits))]
    value_err = [kept - sums**2 / ks if coder == "sign" else np.zeros(ks.size)]
    extra = [np.zeros(ks.size)]
    if quant is not None:
        blocks = _block_code_scale(x, mags_sorted, quant, spread)
        for bits, calibration in _quant_calibration(x, mags, quant, spread).items():
            fields.append(bits)
            if bits in blocks:  # past one block the codes spread over each block's own range
                block, scale = blocks[bits]
                value_bits.append(np.where(ks > block, np.minimum(float(bits), entropy[bits] * scale), entropy[bits]))
            else:
                value_bits.append(entropy[bits])
            value_err.append(calibration * ks * spread**2 * quant_relative_error(bits))
            extra.append(group_bytes_many(quant, bits, ks) + NODE_BYTES)
    # rows: k; columns: codings (the order of the menu before pruning)
    vbits = np.stack(value_bits, axis=1)
    sizes = index_bytes[:, None] + ks[:, None] * vbits / 8 + np.stack(extra, axis=1)
    errors = (total - kept)[:, None] + np.stack(value_err, axis=1)
    menu = []
    for flat in _lower_hull(sizes.ravel(), errors.ravel()).tolist():
        j, c = divmod(flat, len(fields))
        menu.append(Choice("topk", int(ks[j]), fields[c], float(sizes[j, c]), float(errors[j, c]), float(vbits[j, c])))
    return menu


def _lower_hull(sizes: np.ndarray, errors: np.ndarray) -> np.ndarray:
    """Indices of the points on the lower convex hull of (size, error), by increasing size.

    A point above the hull (or on a segment of it) never minimizes ``error + lam * size`` alone
    for any ``lam > 0``, so a Lagrangian choice over the hull is the choice over every point.
    First the Pareto front (each point strictly better than every smaller one), then every point
    on or above the chord of its two neighbours is dropped, all at once, until none is: such a
    point is above the hull, a hull vertex never is, and a polyline convex at every vertex is
    the hull.
    """
    order = np.lexsort((errors, sizes))
    ordered = errors[order]
    best_before = np.minimum.accumulate(np.concatenate([[np.inf], ordered[:-1]]))
    hull = order[ordered < best_before]
    while hull.size >= 3:
        x, y = sizes[hull], errors[hull]
        above = (y[1:-1] - y[:-2]) * (x[2:] - x[1:-1]) >= (y[2:] - y[1:-1]) * (x[1:-1] - x[:-2])
        if not above.any():
            break
        hull = hull[np.concatenate([[True], ~above, [True]])]
    return hull


def _rounding(
    values: np.ndarray, shape: tuple[int, ...], quant: Stage, widths: Sequence[int]
) -> dict[int, tuple[float, np.ndarray]]:
    """Round-to-nearest min-max quantization of ``values`` (float64, flat, of ``shape``) at each width.

    Per width: the squared error and the histogram of the codes, with the groups ``quant`` uses
    at that width (the groups' ranges are found once per distinct grouping). In float64 (an
    estimate, not the stage's exact float32 arithmetic); a block pads its last group by
    repeating the last value, as the stage does, and the padding is left out of both results.
    """
    from ._quant import Quantize

    if not isinstance(quant, Quantize):
        raise TypeError(f"expected a quantize stage, found {quant.name!r}")
    n = values.size
    by_grouping: dict[str | int, list[int]] = {}
    for bits in widths:
        by_grouping.setdefault(width_stage(quant, bits)._granularity(n), []).append(bits)
    out = {}
    for granularity, same in by_grouping.items():
        if granularity == "tensor" or (granularity == "channel" and len(shape) < 2):
            groups = values.reshape(1, -1)
        elif granularity == "channel":
            groups = values.reshape(shape[0], -1)
        else:
            pad = (-n) % int(granularity)
            groups = np.concatenate([values, np.repeat(values[-1:], pad)]).reshape(-1, int(granularity))
        lo = groups.min(axis=1, keepdims=True)
        span = groups.max(axis=1, keepdims=True) - lo
        shifted = groups - lo
        for bits in same:
            levels = (1 << bits) - 1
            step = span / levels
            codes = np.clip(np.rint(shifted / np.where(step > 0, step, 1.0)), 0, levels)
            err = float(np.square((codes * step - shifted).reshape(-1)[:n]).sum())
            out[bits] = (err, np.bincount(codes.reshape(-1)[:n].astype(np.int64), minlength=levels + 1))
    return out


def _block_code_scale(x: torch.Tensor, mags: np.ndarray, quant: Stage, spread: float) -> dict[int, tuple[int, float]]:
    """Per width with outlier blocks: (block size, measured / estimated code entropy of the top entries).

    :func:`_code_bits` prices the codes of the k largest entries on the tensor's one range; past
    one block of kept values, ``quantize`` gives each block its own range, which spreads the codes
    (towards the full width). One rounding pass with the real blocks over the top entries (5 %, at
    least four blocks) measures by how much; the top-k menu scales the code bits of every k past
    one block by that ratio. (Pricing every such k at the measured entropy itself tracked the codes
    more closely on LeNet-5's fc1 but lost to uniform top-k at equal bytes on the synthetic update.)
    """
    from ._quant import Quantize

    n = x.numel()
    if not isinstance(quant, Quantize) or spread <= 0 or not quant.outlier_block or quant.granularity != "tensor":
        return {}
    block = quant.outlier_block
    k = min(n - 1, max(round(0.05 * n), 4 * block))
    widths = [b for b in BITS_CHOICES if b <= 4]
    if k <= block or not widths:
        return {}
    flat = x.detach().reshape(-1).numpy()
    values = flat[np.abs(flat) >= mags[k - 1]][:k].astype(np.float64)
    rounded = _rounding(values, (k,), quant, widths)
    estimated = _code_bits(mags, spread, widths, np.array([k]))
    out = {}
    for bits in widths:
        counts = rounded[bits][1]
        p = counts[counts > 0] / k
        out[bits] = (block, float(-(p * np.log2(p)).sum()) / max(float(estimated[bits][0]), 1e-9))
    return out


def _quant_calibration(x: torch.Tensor, mags: np.ndarray, quant: Stage, spread: float) -> dict[int, float]:
    """Per width in BITS_CHOICES: measured / estimated quantization error of the top 5 % of ``x``.

    ``mags``: |x| in descending order. Blocks make the ratio < 1. The top 5 % are the entries
    at least the k-th largest magnitude, in index order (on ties, the first k of them).
    """
    from ._quant import Quantize

    if not isinstance(quant, Quantize) or spread <= 0:
        return dict.fromkeys(BITS_CHOICES, 1.0)
    flat = x.detach().reshape(-1).numpy()
    k = max(1, min(flat.size, round(0.05 * flat.size)))
    values = flat[np.abs(flat) >= mags[k - 1]][:k].astype(np.float64)
    rounded = _rounding(values, (k,), quant, BITS_CHOICES)
    return {b: max(rounded[b][0], 1e-30) / (k * spread**2 * quant_relative_error(b)) for b in BITS_CHOICES}


def _squared_singular_values(m: torch.Tensor) -> torch.Tensor:
    """s_i**2 of ``m``, descending (float64), from the eigenvalues of its smaller Gram matrix.

    A third of the cost of ``svdvals`` on LeNet-5's matrices; squaring loses the relative
    precision of the smallest singular values, whose energies only add up past the ranks kept.
    """
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    try:
        w: torch.Tensor = torch.linalg.eigvalsh(gram)
    except torch.linalg.LinAlgError:  # see _lowrank._gram_eigh: the SVD converges where this may not
        s: torch.Tensor = torch.linalg.svdvals(m)
        return s.double().pow(2)
    return w.double().clamp_min(0).flip(0)


def _lowrank_menu(x: torch.Tensor, later: Sequence[Stage]) -> tuple[list[Choice], list[Choice]]:
    """Ranks x value codings: the energy past rank r (Eckart-Young) plus the factors' quantization.

    Returned as the points of least error for their bytes (the menu: a point with more bytes and
    no less error than another is never worth choosing or moving to), and the others (kept for a
    target that only they can hit, see :func:`_retargeted`).
    """
    points = _lowrank_points(x, later)
    if not points:
        return [], []
    size, error = np.array([c.est_bytes for c in points]), np.array([c.est_error for c in points])
    order = np.lexsort((error, size))
    best_before = np.minimum.accumulate(np.concatenate([[np.inf], error[order][:-1]]))
    on_front = np.zeros(len(points), bool)
    on_front[order[error[order] < best_before]] = True
    front = [points[i] for i in order if on_front[i]]
    return front, [p for p, on in zip(points, on_front, strict=True) if not on]


def _lowrank_points(x: torch.Tensor, later: Sequence[Stage]) -> list[Choice]:
    """Every rank x value coding of :func:`_lowrank_menu`, in no particular order."""
    if x.dim() < 2:
        return []
    stage = _stage_of(later, ("svd", "powersgd"))
    if stage is None:
        return []
    m = x.reshape(x.shape[0], -1)
    rows, cols = m.shape
    limit = (rows * cols - 1) // (rows + cols)
    cap = stage.rank if isinstance(stage, PowerSGD) else limit  # its warm start is checked against the rank
    top = min(limit, cap, rows, cols)
    if top < 1:
        return []
    s2 = _squared_singular_values(m)
    energy = torch.cumsum(s2, 0).numpy()
    total = float(energy[-1])
    quant = _stage_of(later, ("quantize",))
    fixed_bits, coder = _fixed_value_bits(later)
    if coder == "sign":
        return []
    ranks = np.arange(1, top + 1) if top <= RANK_GRID else np.unique(np.round(np.geomspace(1, top, RANK_GRID)))
    ranks = ranks.astype(np.int64)
    kept = energy[ranks - 1].astype(np.float64)
    values = ranks * (rows + cols)
    codings = [(0, fixed_bits, np.zeros(ranks.size))]
    if quant is not None:
        codings += [(b, b, 2 * kept * FACTOR_RANGE * quant_relative_error(b)) for b in BITS_CHOICES]
    sizes, errors, widths = [], [], []
    for width, bits, value_err in codings:
        extra = 2 * (group_bytes_many(quant, width, values // 2) + (3 * NODE_BYTES if width else 0))
        sizes.append(values * bits / 8 + extra + NODE_BYTES)
        errors.append(total - kept + value_err)
        widths.append(np.full(ranks.size, width))
    size, error, width_of = np.concatenate(sizes), np.concatenate(errors), np.concatenate(widths)
    rank = np.tile(ranks, len(codings))
    return [
        Choice("lowrank", int(r), int(w), float(b), float(e))
        for r, w, b, e in zip(rank, width_of, size, error, strict=True)
    ]


def _measured(codec: Codec, budget: Budget, item: Tensor, choice: Choice) -> Choice:
    """``choice`` with its bytes and squared error measured by encoding and decoding the tensor."""
    from ._pipeline import DecodeLimits, _Decoder
    from ._wire import Reader

    node = encode_choice(codec, budget, item.name, item.t, item.x, choice).getvalue()
    out = _Decoder(list(codec.tensor_stages), DecodeLimits()).node(Reader(node), 0, item.name)
    err = float((out.double() - item.x.double()).pow(2).sum())
    size = len(node)
    for stage in codec.stages:
        if stage.kind == "bytes":  # the node's size after entropy coding, alone
            size = min(size, len(stage.encode_bytes(node)))
    return Choice(choice.kind, choice.size, choice.bits, float(size), err)


def _dense_menu(x: torch.Tensor, quant: Stage | None, widths: Sequence[int] = BITS_CHOICES) -> list[Choice]:
    """Every value quantized at each width: the exact rounding error, bytes from the codes' entropy.

    The bytes are the smaller of the packed codes and their entropy (of the codes' histogram), plus
    the group ranges and two nodes' framing (the measured correction absorbs the rest).
    """
    from ._quant import Quantize

    n = x.numel()
    if not isinstance(quant, Quantize) or n == 0:
        return []
    values = x.detach().reshape(-1).numpy().astype(np.float64)
    shape = tuple(x.shape)
    menu = []
    for bits, (err, counts) in _rounding(values, shape, quant, widths).items():
        p = counts[counts > 0] / n
        code_bits = float(-(p * np.log2(p)).sum())  # the entropy of the codes actually sent
        size = min(math.ceil(n * bits / 8), n * code_bits / 8) + group_bytes(quant, bits, n, shape) + 2 * NODE_BYTES
        menu.append(Choice("dense", 0, bits, size, err))
    return menu


def build_menu(codec: Codec, budget: Budget, item: Tensor, limit: float = math.inf) -> list[Choice]:
    """Every operating point of one tensor: dropped, dense, and the tunable stages' settings.

    ``limit``: the most bytes any plan may spend; a dense width whose estimated codes alone take
    more is left off unpriced (its rounding would cost more time than any other point). The ranks
    and widths left off for more error than a menu point go to ``item.off_menu``.
    """
    later = codec.tensor_stages[1:]
    x = item.x
    n = x.numel()
    total = float(x.double().pow(2).sum())
    menu = [Choice("zero", 0, 0, float(NODE_BYTES), total), Choice("raw", 0, 0, float(n * item.t.element_size()), 0.0)]
    names = {s.name for s in later}
    quant = _stage_of(later, ("quantize",))
    spread = float(x.max() - x.min()) if n else 0.0
    ks = k_grid(n)
    # the entropy of the k largest magnitudes' codes, shared by the top-k menu and the dense widths' check
    entropy = _code_bits(item.mags, spread, BITS_CHOICES, ks) if quant is not None and ks.size else {}
    if "topk" in names:
        menu += _topk_menu(x, item.mags, later, spread, entropy)
    if names & {"svd", "powersgd"}:
        front, item.off_menu = _lowrank_menu(x, later)
        menu += front
    if quant is not None:
        skip = {b for b, bits in entropy.items() if n * float(bits[-1]) / 8 > limit}
        menu += _dense_menu(x, quant, [b for b in BITS_CHOICES if b not in skip])
    if not names & {"topk", "svd", "powersgd", "quantize"} and later:
        menu.append(_measured(codec, budget, item, Choice("spec")))
    return menu


def choose(items: list[Tensor], target: float, *, sparse: bool = True) -> list[Choice]:
    """Per tensor, the menu point minimizing error + lam * bytes, for the least lam within ``target`` bytes.

    The bytes left go to wider top-k sizes if ``sparse`` (a ``topk`` stage follows), else to
    whole menu points (:func:`_upgrade`).
    """
    width = max(len(item.menu) for item in items)
    sizes = np.full((len(items), width), np.inf)
    errors = np.full((len(items), width), np.inf)
    for i, item in enumerate(items):
        sizes[i, : len(item.menu)] = [c.est_bytes for c in item.menu]
        errors[i, : len(item.menu)] = [c.est_error for c in item.menu]
    rows = np.arange(len(items))

    def pick(lam: float) -> np.ndarray:
        picks: np.ndarray = np.argmin(errors + lam * sizes, axis=1)  # padding: inf + lam * inf = inf (lam > 0)
        return picks

    lo, hi = -60.0, 60.0  # log10 of lam, relative to the error per byte of the whole update
    scale = max(float(errors[:, 0].sum()), 1e-30) / max(target, 1.0)
    for _ in range(BISECTIONS):
        mid = (lo + hi) / 2
        if sizes[rows, pick(scale * 10**mid)].sum() <= target:
            hi = mid
        else:
            lo = mid
    picked = [items[i].menu[j] for i, j in enumerate(pick(scale * 10**hi))]
    leftover = target - sum(c.est_bytes for c in picked)
    return _fill(items, picked, leftover) if sparse else _upgrade(items, picked, leftover)


def _upgrade(items: list[Tensor], picked: list[Choice], leftover: float) -> list[Choice]:
    """Spend the bytes the Lagrangian plan leaves on whole menu points, most error removed per byte first.

    The price that meets the target jumps from one hull point to the next on every tensor at
    once, and with coarse menus (ranks, widths) the plan can fall far short of the target: on
    LeNet-5 at 0.2 bpp over ``svd`` it took half. Each step moves one tensor to any point of its
    menu (not only the hull) that fits the bytes left, the move removing the most squared error
    per added byte. (With top-k, :func:`_fill` widens the sizes finely instead: moving small
    tensors to whole points there lost to uniform top-k at equal bytes on the synthetic update.)
    """
    picked = list(picked)
    width = max(len(item.menu) for item in items)
    sizes = np.full((len(items), width), np.inf)  # padding: never a move
    errors = np.full((len(items), width), np.inf)
    for i, item in enumerate(items):
        sizes[i, : len(item.menu)] = [c.est_bytes for c in item.menu]
        errors[i, : len(item.menu)] = [c.est_error for c in item.menu]
    now_size = np.array([c.est_bytes for c in picked])[:, None]
    now_error = np.array([c.est_error for c in picked])[:, None]
    while True:
        added = sizes - now_size
        fits = (added > 0) & (added <= leftover) & (errors < now_error)
        if not fits.any():
            return picked
        gain = np.where(fits, (now_error - errors) / np.where(fits, added, 1.0), -np.inf)
        i, j = (int(v) for v in np.unravel_index(int(np.argmax(gain)), gain.shape))
        leftover -= float(added[i, j])
        picked[i] = items[i].menu[j]
        now_size[i], now_error[i] = sizes[i, j], errors[i, j]


def _fill(items: list[Tensor], picked: list[Choice], leftover: float) -> list[Choice]:
    """Spend the bytes the discrete menus leave on the top-k sizes, most squared error per byte first.

    Greedy in small steps (a sixteenth of a tensor's k at a time): each step widens the top-k of
    the tensor whose next entries remove the most squared error per byte, until the bytes run
    out or every top-k tensor is full. Each tensor's price and gain are kept and recomputed only
    when its top-k changes.
    """
    picked = list(picked)
    sizes = [item.x.numel() for item in items]
    # (bytes of one more entry, squared error it removes per byte) of each widenable top-k tensor
    offers: dict[int, tuple[float, float]] = {}

    def offer(i: int) -> None:
        c, n = picked[i], sizes[i]
        if c.kind == "topk" and c.size < n - 1:
            per_value = _value_bytes(c, n)
            offers[i] = (per_value, float(items[i].mags[c.size]) ** 2 / per_value)
        else:
            offers.pop(i, None)

    for i in range(len(picked)):
        offer(i)
    for _ in range(FILL_STEPS):
        best, gain = -1, 0.0
        for i, (per_value, g) in offers.items():
            if per_value <= leftover and g > gain:
                best, gain = i, g
        if best < 0:
            break
        c, n = picked[best], sizes[best]
        per_value = offers[best][0]
        k = int(min(n - 1, c.size + max(1, c.size // 16), c.size + leftover // per_value))
        leftover -= (k - c.size) * per_value
        picked[best] = Choice("topk", k, c.bits, c.est_bytes + (k - c.size) * per_value, c.est_error, c.value_bits)
        offer(best)
    return picked


def _value_bytes(c: Choice, n: int) -> float:
    """Estimated bytes of one more top-k entry: its value and its position."""
    return (c.value_bits + _index_bits(n, c.size)) / 8


def _descending_magnitudes(x: torch.Tensor) -> np.ndarray:
    """|x| flattened, in descending order (numpy's sort: many times faster than torch's on one thread)."""
    mags = np.sort(np.abs(x.detach().reshape(-1).numpy()))
    return np.ascontiguousarray(mags[::-1])


def encode_with_budget(budget: Budget, codec: Codec, records: list[tuple[str, torch.Tensor]]) -> bytes:
    """Plan, encode, measure, correct: the blob whose payload is closest to ``bpp * n / 8`` bytes."""
    # a tensor with values near float32's limits gives inf or NaN estimates (its squares overflow);
    # its plans are still encoded and checked like any other, and numpy must not warn (an exception
    # where warnings are errors)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return _encode_with_budget(budget, codec, records)


def _encode_with_budget(budget: Budget, codec: Codec, records: list[tuple[str, torch.Tensor]]) -> bytes:
    n = sum(t.numel() for _, t in records)
    target = budget.bpp * n / 8
    fixed = Writer()
    fixed.varint(len(records))
    items: list[Tensor] = []
    nodes: dict[str, Writer] = {}
    for name, t in records:
        x = codec.staged_input(name, t)
        fixed.extend(codec.record(name, t, Writer()))
        if x is None:
            nodes[name] = codec.raw_node(t)
            fixed.extend(nodes[name])
        else:
            items.append(Tensor(name, t, x, [], _descending_magnitudes(x)))
    for item in items:
        # no plan spends more than twice the target: the second plan asks for at most that
        item.menu = build_menu(codec, budget, item, 2 * target)
    cache: dict[tuple[str, Choice], Writer] = {}
    blobs: dict[tuple[tuple[str, int, int], ...], tuple[bytes, int]] = {}
    measured: list[_Measured] = []

    def attempt(picked: list[Choice]) -> tuple[bytes, int]:
        # a plan met before (coarse menus, a target below every plan) is not encoded again
        key = tuple((c.kind, c.size, c.bits) for c in picked)
        if key not in blobs:
            blobs[key] = _encode_plan(codec, budget, records, items, picked, nodes, cache)
            measured.append(_Measured(blobs[key][1], picked))
        return blobs[key]

    # Lagrangian plans, each corrected by the last one's measured bytes, then the best of them with
    # every top-k size and rank scaled by a common factor, found by secant steps (the payload is
    # nearly smooth in it; many tensors' ranks round at different factors). Without top-k the
    # menus of the kinds just encoded are first rescaled to their measured bytes, and the next
    # plan asks for the target less what the rescaled menus still miss (zstd across nodes).
    plans: list[tuple[int, list[Choice], bytes]] = []
    sparse = any(s.name == "topk" for s in codec.tensor_stages)
    ask = target
    for _ in range(min(2 if sparse else 3, budget.passes)):
        picked = choose(items, ask - fixed.size, sparse=sparse) if items else []
        blob, payload = attempt(picked)
        plans.append((payload, picked, blob))
        if abs(payload - target) <= TOLERANCE * target:
            return blob
        # proportional correction, at most 2x either way: one bad estimate must not swing the plan
        if sparse:
            ask = max(ask * min(2.0, max(0.5, target / max(payload, 1))), fixed.size + 1.0)
        else:
            estimate = _recalibrate(codec, items, picked, nodes) + fixed.size
            ask = max(target * min(2.0, max(0.5, estimate / max(payload, 1))), fixed.size + 1.0)
    payload, base, blob = min(plans, key=lambda p: abs(p[0] - target))
    best = (payload, blob, base)
    tried = [(1.0, payload)]
    for _ in range(budget.passes - len(plans)):
        factor = _next_factor(tried, target)
        picked = _scaled(items, base, factor)
        blob, payload = attempt(picked)
        if payload == tried[-1][1]:
            break  # no top-k size or rank left to change
        tried.append((factor, payload))
        if abs(payload - target) < abs(best[0] - target):
            best = (payload, blob, picked)
        if abs(payload - target) <= TOLERANCE * target:
            break
    # at least RETARGET_PASSES more: scaling stops at once where every rank is at its cap
    spare = max(RETARGET_PASSES, budget.passes - len(plans) - len(tried) + 1)
    options = [[*item.menu, *item.off_menu] for item in items]
    payload, blob = _retarget(attempt, measured, options, best, target, spare)
    _warn_if_missed(codec, payload, target)
    return blob


RETARGET_PASSES = 6
"""Encodes granted to :func:`_retargeted`'s plans beyond what is left of ``Budget.passes``."""

_Attempt = Callable[[list[Choice]], tuple[bytes, int]]


class _Measured(NamedTuple):
    """A plan that was encoded, and its payload bytes."""

    payload: int
    plan: list[Choice]


def _retarget(
    attempt: _Attempt,
    measured: list[_Measured],
    options: list[list[Choice]],
    best: tuple[int, bytes, list[Choice]],
    target: float,
    spare: int,
) -> tuple[int, bytes]:
    """(payload, blob) of the plan nearest the target after at most ``spare`` encodes of one-tensor changes.

    Changes of the best plan come first (:func:`_retargeted`). When none comes nearer and the best
    plan misses by more than the stated tolerance (:func:`allowed_miss`), changes of the measured
    plan nearest the target on its other side. Each plan that comes nearer starts the next round.
    """
    while spare > 0 and abs(best[0] - target) > TOLERANCE * target:
        here = _Measured(best[0], best[2])
        nearer, spare = _first_nearer(
            attempt, _retargeted(options, here, _own_ratio(here), here.payload, target), spare, target, best
        )
        across = None if nearer is not None else _nearest_across(measured, here.payload, target)  # incl. just now
        if across is not None and abs(here.payload - target) > allowed_miss(target) * target:
            ratio = _ratio_between(across, here)
            nearer, spare = _first_nearer(
                attempt, _retargeted(options, across, ratio, here.payload, target), spare, target, best
            )
        if nearer is None:
            break  # no change of one tensor of either plan comes nearer
        best = nearer
    return best[0], best[1]


def _first_nearer(
    attempt: _Attempt, plans: list[list[Choice]], spare: int, target: float, best: tuple[int, bytes, list[Choice]]
) -> tuple[tuple[int, bytes, list[Choice]] | None, int]:
    """The first of ``plans`` (at most ``spare`` encoded) nearer the target than ``best``, and the encodes left."""
    for picked in plans[:spare]:
        spare -= 1
        blob, payload = attempt(picked)
        if abs(payload - target) < abs(best[0] - target):
            return (payload, blob, picked), spare
    return None, spare


def _nearest_across(measured: list[_Measured], best: int, target: float) -> _Measured | None:
    """The measured plan nearest the ``target`` on the other side of it from the payload ``best``, if any."""
    across = [m for m in measured if (m.payload > target) != (best > target)]
    return min(across, key=lambda m: abs(m.payload - target)) if across else None


def _own_ratio(base: _Measured) -> float:
    """Payload bytes per estimated byte of ``base`` as a whole (zstd's gain)."""
    estimated = sum(c.est_bytes for c in base.plan)
    return base.payload / estimated if estimated > 0 else 1.0


def _ratio_between(base: _Measured, best: _Measured) -> float:
    """Payload bytes per estimated byte of the difference between two plans; :func:`_own_ratio` where it has none.

    A change of the all-dropped plan adds codes that do not compress to a payload of names that zstd
    shrinks: on LeNet-5, 1.6 bytes per estimated byte between it and a plan of one more tensor,
    against 0.93 for the all-dropped plan as a whole.
    """
    step = sum(c.est_bytes for c in best.plan) - sum(c.est_bytes for c in base.plan)
    ratio = (best.payload - base.payload) / step if step != 0 else 0.0
    return ratio if ratio > 0 else _own_ratio(base)


def _retargeted(
    options: list[list[Choice]], base: _Measured, ratio: float, best_payload: int, target: float
) -> list[list[Choice]]:
    """Plans that change one tensor's choice of ``base``, nearest the ``target`` by their estimated payload first.

    ``options[i]``: every choice of tensor i, its menu and the ranks and widths off it; ``base``:
    the best plan yet (its payload is ``best_payload``) or a measured plan on the other side of the target;
    ``ratio``: payload bytes per estimated byte of a change (:func:`_own_ratio`, :func:`_ratio_between`).

    The Lagrangian plans take only points of least error for their bytes. Where the steps between
    those are coarse (each tensor's rank at ``powersgd``'s own rank, and the next width doubling a
    large tensor's bytes), the payload can stay outside the tolerance while another rank and width
    of one tensor, more error for its bytes, lands inside it: hitting the budget comes first. The
    caller tries the other side's plan when no change of the best one comes nearer: on LeNet-5 at
    0.02 bpp over ``svd`` the best plan (181 bytes for 154, one small tensor at 2 bits) can only
    drop to 111 bytes, while one tensor added to the 111-byte plan lands at 158. Only plans
    predicted nearer than ``best_payload`` are returned; the caller takes the first that is, and asks
    again from it.
    """
    payload, picked = base
    candidates = []
    for i, (choices, current) in enumerate(zip(options, picked, strict=True)):
        for c in choices:
            if (c.kind, c.size, c.bits) == (current.kind, current.size, current.bits):
                continue
            miss = abs(payload + (c.est_bytes - current.est_bytes) * ratio - target)
            if miss < abs(best_payload - target):  # e.g. none below a target smaller than the smallest blob
                candidates.append((miss, c.est_error - current.est_error, i, c))
    candidates.sort(key=lambda m: (m[0], m[1]))
    return [[*picked[:i], c, *picked[i + 1 :]] for _, _, i, c in candidates]


def allowed_miss(target: float) -> float:
    """The stated tolerance for ``target`` bytes: 3 %, or 10 % under 2 kB (whole ranks and widths are coarse)."""
    return 0.03 if target >= 2048 else 0.10


_WARNED: set[str] = set()
"""Codec specs whose budget miss was reported: once per spec, not every round."""


def _warn_if_missed(codec: Codec, payload: int, target: float) -> None:
    """Warn (once per spec) when the payload misses the target by more than the stated tolerance.

    3 %, or 10 % under 2 kB where whole ranks and widths are coarse (see ``Budget``). A miss is
    not an error: the blob is the closest plan the pipeline allows (a target below the smallest
    blob or above dense, ``powersgd``'s own rank as a cap), but the user asked for other bytes.
    """
    allowed = allowed_miss(target)
    if target <= 0:
        return  # an update without elements: there was nothing to allocate
    if abs(payload - target) <= allowed * target or codec.spec in _WARNED:
        return
    _WARNED.add(codec.spec)
    warnings.warn(
        f"{codec.spec!r}: the payload is {payload:,} bytes for a target of {target:,.0f} ({payload / target:.2f}x); "
        "no plan of this pipeline comes closer (a target below the smallest blob or above dense, or "
        "powersgd's own rank capping each tensor's rank). Reported once per codec.",
        BudgetMissWarning,
        stacklevel=2,
    )


def _recalibrate(codec: Codec, items: list[Tensor], picked: list[Choice], nodes: dict[str, Writer]) -> float:
    """Rescale each tensor's menu points of the kind and width it was just encoded at to the measured bytes.

    The menus price low-rank factors and dense codes at their width before entropy coding; zstd
    takes a quarter to a third off 8-bit factors on the McMahan CNN, so a plan made from the
    estimates alone fell 14 % short at 2 bpp. A node is measured alone (through the codec's byte
    stages); nodes under 256 bytes, where a frame's own overhead dominates, are left as estimated.
    Returns the plan's estimated bytes after the rescaling.
    """
    total = 0.0
    for item, c in zip(items, picked, strict=True):
        raw = nodes[item.name].getvalue()
        if c.kind not in ("lowrank", "dense") or len(raw) < 256 or c.est_bytes <= 0:
            total += c.est_bytes
            continue
        size = len(raw)
        for stage in codec.stages:
            if stage.kind == "bytes":
                size = min(size, len(stage.encode_bytes(raw)))
        ratio = size / c.est_bytes
        item.menu = [
            dataclasses.replace(m, est_bytes=m.est_bytes * ratio) if (m.kind, m.bits) == (c.kind, c.bits) else m
            for m in item.menu
        ]
        total += size
    return total


def _next_factor(tried: list[tuple[float, int]], target: float) -> float:
    """The next top-k scale factor: proportional at first, then secant steps (kept positive)."""
    factor, payload = tried[-1]
    guess = factor * target / max(payload, 1)
    if len(tried) >= 2:
        factor0, payload0 = tried[-2]
        if payload != payload0:
            secant = factor + (target - payload) * (factor - factor0) / (payload - payload0)
            if secant > 0:
                guess = secant
    return guess


def _scaled(items: list[Tensor], picked: list[Choice], factor: float) -> list[Choice]:
    """``picked`` with every top-k size and rank multiplied by ``factor`` (within 1..n-1, 1..the menu's top rank)."""
    out = []
    for item, c in zip(items, picked, strict=True):
        if c.kind == "topk":
            k = int(min(item.x.numel() - 1, max(1, round(c.size * factor))))
            c = Choice("topk", k, c.bits, c.est_bytes, c.est_error, c.value_bits)
        elif c.kind == "lowrank":
            top = max(m.size for m in item.menu if m.kind == "lowrank")
            c = Choice("lowrank", int(min(top, max(1, round(c.size * factor)))), c.bits, c.est_bytes, c.est_error)
        out.append(c)
    return out


def _encode_plan(
    codec: Codec,
    budget: Budget,
    records: list[tuple[str, torch.Tensor]],
    items: list[Tensor],
    picked: list[Choice],
    nodes: dict[str, Writer],
    cache: dict[tuple[str, Choice], Writer],
) -> tuple[bytes, int]:
    """The blob for one plan, and its payload bytes (the blob less its header)."""
    for item, choice in zip(items, picked, strict=True):
        key = (item.name, Choice(choice.kind, choice.size, choice.bits))
        if key not in cache:
            cache[key] = encode_choice(codec, budget, item.name, item.t, item.x, choice)
        nodes[item.name] = cache[key]
    body = Writer()
    body.varint(len(records))
    starts = []
    for name, t in records:
        starts.append(body.size)
        body.extend(codec.record(name, t, nodes[name]))
    blob = codec.finish(body, starts)
    return blob, len(blob) - codec.header_size(body.size)


def plan_settings(codec: Codec, choice: Choice, n: int) -> list[Stage | None]:
    """The later stages a choice sets for a tensor of ``n`` elements (for tests and benchmarks)."""
    return budget_settings(choice, codec.tensor_stages[1:], n)
