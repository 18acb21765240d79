"""Statistics rows for many torch-Adam tensors at once: ``torch._foreach_*`` passes, or one numpy
buffer for small CPU tensors. The same rows as :func:`.reference.tensor_statistics`, batched."""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .._runtime import FLAT_MAX_NUMEL, PIECE_NUMEL, host_values
from .rows import (
    COUNT,
    EPS_COUNT,
    GRAD_COUNT,
    JUMP_COUNT,
    JUMP_SQ,
    NUM_STATS,
    STALENESS_SQ,
    UPDATE_SQ,
    reconstruction_tolerance,
)

__all__ = ["adam_statistics"]


def _flatten(ts: Sequence[Tensor]) -> Tensor:
    """``torch.cat([t.reshape(-1) for t in ts])``, in one call (the helper DDP buckets with)."""
    flatten = getattr(torch._utils, "_flatten_dense_tensors", None)
    return flatten(list(ts)) if flatten is not None else torch.cat([t.reshape(-1) for t in ts])


class _Scratch(threading.local):
    """Working buffers of the numpy path, kept from call to call (per thread): at a step's rate,
    fresh buffers of megabytes cost more in page faults than the arithmetic done in them. They
    serve calls of at most ``FLAT_MAX_NUMEL`` elements, so they never hold more than a few times
    that; larger calls allocate their own."""

    def __init__(self):
        self.buffers: dict[tuple, np.ndarray] = {}  # (name, dtype) -> its buffer
        self.views: dict[tuple, np.ndarray] = {}  # (name, dtype, total, rows) -> a view of it

    def get(self, name: str, total: int, dtype, rows: int = 0) -> np.ndarray:
        """A buffer of ``total`` elements (``(rows, total)`` with ``rows``) of ``dtype``; its
        content is whatever the last call left."""
        key = (name, dtype, total, rows)
        view = self.views.get(key)
        if view is not None:
            return view
        shape = (rows, total) if rows else (total,)
        if total > FLAT_MAX_NUMEL:
            return np.empty(shape, dtype=dtype)
        size = max(rows, 1) * total
        buffer = self.buffers.get(key[:2])
        if buffer is None or buffer.size < size:
            buffer = self.buffers[key[:2]] = np.empty(size, dtype=dtype)
            self.views = {k: v for k, v in self.views.items() if k[:2] != key[:2]}  # views of the old one
        view = self.views[key] = buffer[:size].reshape(shape)
        return view


_SCRATCH = _Scratch()


def _numpy_adam_statistics(g, m, v, v_den, *, beta1, beta2, eps, step, compute_dtype) -> Tensor:
    """``adam_statistics`` for small CPU tensors, on one concatenated numpy buffer: the same
    elementwise operations in the same order as the foreach path, then one float64 segment sum per
    statistic. A numpy call on a few thousand elements costs about a microsecond, a torch dispatch
    ten or more, and the foreach path makes some twenty of them."""
    sizes = [t.numel() for t in g]

    def cat(ts: Sequence[Tensor], copy: bool = False) -> np.ndarray:
        if len(ts) == 1:
            flat = ts[0].detach().numpy().reshape(-1)
            return flat.copy() if copy else flat
        with torch.no_grad():  # one call: the per-tensor flattening happens in C++, not Python
            return _flatten(ts).numpy()

    g, m, v = cat(g, copy=True), cat(m, copy=True), cat(v)  # the statistics overwrite g and m
    v_den = v if v_den is None else cat(v_den)
    segments = Segments(sizes)
    return segments.rows(g, m, v, v_den, beta1=beta1, beta2=beta2, eps=eps, step=step, compute_dtype=compute_dtype)


def pieces(sizes: Sequence[int], limit: int) -> list[list[tuple[int, int, int]]]:
    """Tensors of ``sizes`` elements laid end to end, cut into pieces of at most ``limit``
    elements: per piece its ``(tensor, start, stop)`` slices, in order (a large tensor spans
    several pieces, small ones share one)."""
    cut: list[list[tuple[int, int, int]]] = [[]]
    room = limit
    for i, size in enumerate(sizes):
        start = 0
        while start < size:
            if room == 0:
                cut.append([])
                room = limit
            stop = min(size, start + room)
            cut[-1].append((i, start, stop))
            room -= stop - start
            start = stop
    return cut if cut[0] else []


def _piece(flats: list[Tensor], piece: list[tuple[int, int, int]], dtype: torch.dtype, copy: bool) -> np.ndarray:
    """The ``piece``'s slices of the 1-D tensors ``flats``, end to end in ``dtype``: a copy where
    ``copy`` (the statistics overwrite it), else possibly a view."""
    parts = [flats[i][a:b] for i, a, b in piece]
    flat = parts[0] if len(parts) == 1 else torch.cat(parts)
    if flat.dtype != dtype:
        return flat.to(dtype).numpy()  # a copy already
    return flat.numpy().copy() if copy and len(parts) == 1 else flat.numpy()


def _pieced_numpy_adam_statistics(grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, **kw) -> Tensor:
    """``adam_statistics`` of CPU tensors too large for one buffer: the numpy path on pieces of
    at most ``PIECE_NUMEL`` elements, each piece's rows added to its tensors' (every statistic is
    a sum over coordinates). Its memory stays a few pieces' worth whatever the model's size, where
    the foreach path holds three temporaries the size of its input."""
    compute_dtype = kw["compute_dtype"]
    with torch.no_grad():
        views = [[t.detach().reshape(-1) for t in ts] for ts in (grads, exp_avgs, exp_avg_sqs)]
        views.append(views[2] if max_exp_avg_sqs is None else [t.detach().reshape(-1) for t in max_exp_avg_sqs])
        rows = np.zeros((len(grads), NUM_STATS), dtype=np.float64)
        for piece in pieces([t.numel() for t in grads], PIECE_NUMEL):
            g, m = _piece(views[0], piece, compute_dtype, True), _piece(views[1], piece, compute_dtype, True)
            v = _piece(views[2], piece, compute_dtype, False)
            v_den = v if max_exp_avg_sqs is None else _piece(views[3], piece, compute_dtype, False)
            index = [i for i, _, _ in piece]
            rows[index] += Segments([b - a for _, a, b in piece]).array(g, m, v, v_den, **kw)
    return torch.from_numpy(rows)


class Segments:
    """Tensors of ``sizes`` elements laid end to end in one flat buffer: the statistics rows of
    the buffers ``g``, ``m``, ``v`` (numpy, the compute dtype), one float64 sum per tensor."""

    __slots__ = ("sizes", "offsets", "counts", "count_dtype")

    def __init__(self, sizes: Sequence[int]):
        self.sizes = list(sizes)
        self.offsets = np.zeros(len(self.sizes), dtype=np.int64)
        np.cumsum(self.sizes[:-1], out=self.offsets[1:])
        self.counts = np.array(self.sizes, dtype=np.float64)
        # A count never exceeds its tensor's size: the narrowest integer that holds every size.
        largest = max(self.sizes, default=0)
        self.count_dtype = np.uint16 if largest < 1 << 16 else np.int32 if largest < 1 << 31 else np.int64

    def sums(self, terms: np.ndarray, dtype) -> np.ndarray:
        """Per-tensor sums of ``terms`` (``(total,)``, or of each row of ``(k, total)``),
        accumulated in ``dtype`` (numpy casts in its own small buffers: the same sums as of a copy
        in ``dtype``)."""
        if len(self.sizes) == 1:
            return terms.sum(-1, dtype=dtype)[..., None]
        return np.add.reduceat(terms, self.offsets, axis=-1, dtype=dtype)

    def rows(self, g, m, v, v_den, *, beta1, beta2, eps, step, compute_dtype) -> Tensor:
        """The rows ``(len(sizes), NUM_STATS)`` (float64), see :meth:`array`."""
        kw = dict(beta1=beta1, beta2=beta2, eps=eps, step=step, compute_dtype=compute_dtype)
        return torch.from_numpy(self.array(g, m, v, v_den, **kw))

    def array(self, g, m, v, v_den, *, beta1, beta2, eps, step, compute_dtype) -> np.ndarray:
        """The rows ``(len(sizes), NUM_STATS)`` (float64, numpy) of the flat buffers ``g``, ``m``,
        ``v``, ``v_den``; overwrites ``g`` and ``m`` (the caller's own copies), reads the others.

        The sums of squares and ratios add up in float64, each as soon as its terms are made (in
        the buffer the next one reuses: few buffers, which stay in the cache); the three counts are
        masks (``bool``) summed as integers, exact. Each mask is the one the foreach path builds
        from ``sign(clamp_min(x, 0))``: ``x > 0`` is 1 exactly there (NaN: neither)."""
        dt = g.dtype.type
        n, total = len(self.sizes), g.shape[0]
        c1 = 1 - beta1**step
        c2 = 1 - beta2**step
        eps_sq = max(float(eps) ** 2, torch.finfo(compute_dtype).tiny)
        has_previous = step > 1 and beta2 > 0  # β2 = 0: v_t = g_t² keeps nothing of v_{t-1}
        # rows: has a gradient, ε does not dominate it (both), a previous moment to rebuild
        masks = _SCRATCH.get("masks", total, np.bool_, 3 if has_previous else 2)
        work = _SCRATCH.get("work", total, g.dtype)
        sums = []
        with np.errstate(all="ignore"):
            denom = np.sqrt(v_den, out=work)
            np.divide(denom, dt(math.sqrt(c2)), out=denom)
            np.add(denom, dt(eps), out=denom)
            u = np.divide(m, denom, out=m)
            np.multiply(u, u, out=u)
            sums.append(self.sums(u, np.float64))
            np.greater(denom, dt(2 * eps), out=masks[1])  # √v̂ > ε
            np.abs(g, out=work)  # not g² > 0, which underflows for tiny gradients
            np.greater(work, dt(0.0), out=masks[0])
            np.logical_and(masks[1], masks[0], out=masks[1])
            g2 = np.multiply(g, g, out=g)
            tv, tg2, t_work = torch.from_numpy(v), torch.from_numpy(g2), torch.from_numpy(work)
            # clamp_min as the foreach path's: NaN stays NaN (numpy's maximum is slower at it)
            floor = torch.clamp_min(tv, c2 * eps_sq, out=t_work).numpy()
            sums.append(self.sums(np.divide(g2, floor, out=work), np.float64))
            if has_previous:
                c2_prev = 1 - beta2 ** (step - 1)
                scale = beta2 * c2_prev
                # a + α·b as torch computes it (fused multiply-add in its vector kernels): the
                # cancellation in w = v - (1-β2)·g² makes two roundings visible in the jump sums.
                w_t = torch.add(tv, tg2, alpha=-(1 - beta2), out=torch.from_numpy(_SCRATCH.get("w", total, g.dtype)))
                tol = reconstruction_tolerance(compute_dtype)
                residue = torch.add(w_t, tv, alpha=-tol, out=t_work).numpy()
                np.greater(residue, dt(0.0), out=masks[2])
                torch.clamp_min_(w_t, scale * eps_sq)
                np.multiply(g2, masks[2], out=g2)
                sums.append(self.sums(np.divide(g2, w_t.numpy(), out=work), np.float64))
            counts = self.sums(masks.view(np.uint8), self.count_dtype)
        rows = np.zeros((n, NUM_STATS), dtype=np.float64)
        rows[:, UPDATE_SQ] = sums[0] / (c1 * c1)
        rows[:, GRAD_COUNT] = counts[0]
        rows[:, EPS_COUNT] = counts[0] - counts[1]
        rows[:, STALENESS_SQ] = sums[1] * c2
        if has_previous:
            rows[:, JUMP_COUNT] = counts[2]
            rows[:, JUMP_SQ] = sums[2] * scale
        rows[:, COUNT] = self.counts
        return rows


def _sums(terms: list[Tensor]) -> Tensor:
    """Per-tensor sums of non-negative terms, in their dtype: one multi-tensor reduction on a GPU.

    Not ``torch._foreach_norm`` on the CPU: there it accumulates float32 serially (a relative
    error of 1.7e-3 at 8M elements, 2.8e-2 at 33M, against about 1e-8 for ``Tensor.sum``, which
    sums in cascade), enough to put a step-1 update RMS of exactly 1 above its bound.
    """
    if terms[0].device.type == "cpu":
        return torch.stack([t.sum() for t in terms])
    return torch.stack(torch._foreach_norm(terms, 1))


def _sums_of_squares(terms: list[Tensor]) -> Tensor:
    """Per-tensor sums of squares; squares ``terms`` in place on the CPU (see :func:`_sums`)."""
    if terms[0].device.type == "cpu":
        torch._foreach_mul_(terms, terms)
        return _sums(terms)
    return torch.stack(torch._foreach_norm(terms, 2)).square_()


def _eps_counts(denom: list[Tensor], g: list[Tensor], eps: float) -> tuple[Tensor, Tensor]:
    """``(#(√v̂ ≤ ε and g ≠ 0), #(g ≠ 0))`` per tensor from ``denom = √v̂ + ε``, which it overwrites.

    √v̂ ≤ ε ⟺ denom ≤ 2ε. The gradient mask is |g| > 0, not g² > 0, which underflows for tiny
    gradients, exactly the ones this statistic is about.
    """
    torch._foreach_sub_(denom, 2 * eps)
    torch._foreach_clamp_min_(denom, 0.0)
    torch._foreach_sign_(denom)  # 1 where ε does not dominate
    has_grad = torch._foreach_abs(g)
    torch._foreach_sign_(has_grad)  # 1 where g ≠ 0
    torch._foreach_mul_(denom, has_grad)
    grad_count = _sums(has_grad)
    return grad_count - _sums(denom), grad_count


def adam_statistics(
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    *,
    beta1: float,
    beta2: float,
    eps: float,
    step: int,
    max_exp_avg_sqs: Sequence[Tensor] | None = None,
    flat: bool | None = None,
) -> Tensor:
    """Statistics rows ``(len(grads), NUM_STATS)`` for tensors stepped by torch Adam/AdamW.

    All tensors share device, dtype, hyper-parameters and step count ``step`` (the count after the
    step). ``grads`` are the gradients the step used. Reads the moments from the state after the
    step: v_{t-1} is rebuilt from v_t, so no copy of the state is taken. Sums accumulate in float32
    for float32/low-precision tensors (float64 for float64) and come back as float64.

    ``flat``: ``None`` concatenates CPU tensors into one numpy buffer when they hold at most
    ``FLAT_MAX_NUMEL`` elements in all (elementwise terms in the compute dtype, per-tensor sums
    in float64), and runs larger ones through it in pieces of ``PIECE_NUMEL``; ``False`` runs the
    per-tensor ``torch._foreach_*`` passes (always used on other devices, where they are batched
    kernels already); ``True`` takes one buffer whatever the size.
    """
    n = len(grads)
    device = grads[0].device if n else torch.device("cpu")
    if n == 0:
        return torch.zeros(0, NUM_STATS, dtype=torch.float64, device=device)
    compute_dtype = torch.float64 if grads[0].dtype == torch.float64 else torch.float32

    def up(ts: Sequence[Tensor]) -> list[Tensor]:
        return [t if t.dtype == compute_dtype else t.to(compute_dtype) for t in ts]

    if flat is None and device.type == "cpu" and sum(t.numel() for t in grads) > FLAT_MAX_NUMEL:
        kw = dict(beta1=beta1, beta2=beta2, eps=eps, step=step, compute_dtype=compute_dtype)
        try:
            return _pieced_numpy_adam_statistics(grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, **kw)
        except (TypeError, RuntimeError):  # a tensor numpy cannot view (conjugate/negative bit, ...)
            flat = False
    g, m, v = up(grads), up(exp_avgs), up(exp_avg_sqs)
    if flat is None:
        flat = True
    if flat and device.type == "cpu" and all(t.numel() for t in g):  # reduceat needs non-empty segments
        v_den = None if max_exp_avg_sqs is None else up(max_exp_avg_sqs)
        try:
            return _numpy_adam_statistics(
                g, m, v, v_den, beta1=beta1, beta2=beta2, eps=eps, step=step, compute_dtype=compute_dtype
            )
        except (TypeError, RuntimeError):  # a tensor numpy cannot view (conjugate/negative bit, ...)
            pass
    v_den = v if max_exp_avg_sqs is None else up(max_exp_avg_sqs)
    c1 = 1 - beta1**step
    c2 = 1 - beta2**step
    # ε = 0 is legal; the floor keeps 0/0 (coordinates that never saw a gradient) out of the sums.
    eps_sq = max(float(eps) ** 2, torch.finfo(compute_dtype).tiny)
    rows = torch.empty(n, NUM_STATS, dtype=compute_dtype, device=device)

    # update: m / (sqrt(v_den)/sqrt(c2) + eps) / c1, torch's own operation order.
    denom = torch._foreach_sqrt(v_den)
    torch._foreach_div_(denom, math.sqrt(c2))
    torch._foreach_add_(denom, eps)
    u = torch._foreach_div(m, denom)
    rows[:, UPDATE_SQ] = _sums_of_squares(u) / (c1 * c1)
    del u

    rows[:, EPS_COUNT], rows[:, GRAD_COUNT] = _eps_counts(denom, g, eps)
    del denom

    # staleness: g² / max(v/c2, ε²) = c2 · g² / max(v, c2·ε²)
    g2 = torch._foreach_mul(g, g)
    v_floor = torch._foreach_clamp_min(v, c2 * eps_sq)
    ratio = torch._foreach_div(g2, v_floor)
    rows[:, STALENESS_SQ] = _sums(ratio) * c2
    del v_floor, ratio

    # gradient jump against v_{t-1} = (v - (1-β2)g²)/β2, bias-corrected by c2' = 1 - β2^(t-1).
    if step > 1 and beta2 > 0:  # β2 = 0: v_t = g_t² keeps nothing of v_{t-1}
        c2_prev = 1 - beta2 ** (step - 1)
        scale = beta2 * c2_prev  # v̂_{t-1} = w / scale with w = v - (1-β2)·g²
        w = torch._foreach_add(v, g2, alpha=-(1 - beta2))
        tol = reconstruction_tolerance(compute_dtype)
        residue = torch._foreach_add(w, v, alpha=-tol)  # > 0 iff w > tol·v
        torch._foreach_clamp_min_(residue, 0.0)
        torch._foreach_sign_(residue)  # the valid-coordinate mask
        rows[:, JUMP_COUNT] = _sums(residue)
        torch._foreach_clamp_min_(w, scale * eps_sq)
        torch._foreach_mul_(g2, residue)
        torch._foreach_div_(g2, w)
        rows[:, JUMP_SQ] = _sums(g2) * scale
        del w, residue
    else:
        rows[:, JUMP_SQ] = 0.0
        rows[:, JUMP_COUNT] = 0.0
    del g2

    rows[:, COUNT] = host_values([t.numel() for t in grads], compute_dtype, device)
    return rows.double()


def flat_eligible(grads: Sequence[Tensor]) -> bool:
    """Whether ``adam_statistics(..., flat=None)`` takes the numpy buffer for these tensors."""
    return (
        bool(grads)
        and grads[0].device.type == "cpu"
        and sum(t.numel() for t in grads) <= FLAT_MAX_NUMEL
        and all(t.numel() for t in grads)  # reduceat needs non-empty segments
    )


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def _cat(ts: Sequence[Tensor], total: int, name: str) -> Tensor:
    """``torch.cat(ts)`` of 1-D tensors of one dtype, ``total`` elements in all, into the scratch
    buffer ``name``."""
    dtype = _NUMPY_DTYPES.get(ts[0].dtype)
    if dtype is None:
        return torch.cat(ts)
    return torch.cat(ts, out=torch.from_numpy(_SCRATCH.get(name, total, dtype)))


class _Concatenation:
    """One flat copy per call of a fixed list of tensors: one ``numpy.concatenate`` of numpy views
    taken once (they follow the tensors' in-place updates; a numpy array is fewer indirections
    per tensor than a torch one) where all are contiguous CPU tensors of one float dtype numpy
    has, else a ``torch.cat`` of 1-D views, else the flattening helper."""

    __slots__ = ("arrays", "views", "tensors", "name", "total")

    def __init__(self, tensors: Sequence[Tensor], name: str):
        self.tensors, self.name = list(tensors), name
        self.total = sum(t.numel() for t in self.tensors)
        first = self.tensors[0]
        simple = all(t.is_contiguous() and t.dtype == first.dtype for t in self.tensors)
        self.views = [t.detach().view(-1) for t in self.tensors] if simple else None
        self.arrays = None
        if simple and first.device.type == "cpu" and first.dtype in _NUMPY_DTYPES:
            try:
                self.arrays = [t.numpy() for t in self.views]
            except (TypeError, RuntimeError):  # a tensor numpy cannot view (conjugate, negative bit)
                pass

    def __call__(self, copy: bool = False) -> Tensor:
        """The flat copy, or with one tensor its 1-D view unless ``copy`` (the caller overwrites it)."""
        if self.views is not None and len(self.views) == 1:
            return self.views[0].clone() if copy else self.views[0]
        if self.arrays is not None:
            out = _SCRATCH.get(self.name, self.total, self.arrays[0].dtype)
            return torch.from_numpy(np.concatenate(self.arrays, out=out))
        if self.views is None:
            return _flatten([t.detach() for t in self.tensors])
        return _cat(self.views, self.total, self.name)


class FlatRun:
    """The numpy path of :func:`adam_statistics` prepared for fixed moment tensors (a layout kept
    across steps): their sizes, offsets and views are taken once; each call concatenates the
    gradients and the moments as they are now and returns the same rows as
    ``adam_statistics(grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=..., flat=True)``."""

    __slots__ = ("segments", "m", "v", "v_den", "grads_1d")

    def __init__(self, exp_avgs: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor], max_exp_avg_sqs=None):
        self.segments = Segments([t.numel() for t in exp_avgs])
        self.m, self.v = _Concatenation(exp_avgs, "m"), _Concatenation(exp_avg_sqs, "v")
        self.v_den = None if max_exp_avg_sqs is None else _Concatenation(max_exp_avg_sqs, "v_den")
        # Gradients have their parameter's shape: one cat of the tensors themselves where all are 1-D.
        self.grads_1d = all(t.dim() == 1 for t in exp_avgs)

    def __call__(self, grads: Sequence[Tensor], *, beta1: float, beta2: float, eps: float, step: int) -> Tensor:
        kw = dict(beta1=beta1, beta2=beta2, eps=eps, step=step)
        compute_dtype = torch.float64 if grads[0].dtype == torch.float64 else torch.float32

        def host(t: Tensor) -> np.ndarray:
            return (t if t.dtype == compute_dtype else t.to(compute_dtype)).numpy()

        with torch.no_grad():  # no copy here requires grad, whatever the gradients do
            if len(grads) == 1:
                g = grads[0].detach().reshape(-1).clone()
            elif self.grads_1d:
                try:
                    g = _cat(grads, self.m.total, "g")
                except RuntimeError:  # a gradient of another shape than its moments: flatten them
                    g = _flatten(grads)
            else:
                g = _flatten(grads)
            g, m, v = host(g), host(self.m(copy=True)), host(self.v())
            v_den = v if self.v_den is None else host(self.v_den())
        if not g.shape[0] == m.shape[0] == v.shape[0] == v_den.shape[0]:
            raise ValueError(f"gradients of {g.shape[0]} elements for moments of {m.shape[0]}, {v.shape[0]}")
        # g and m are this call's own copies, which the statistics overwrite; v may be the optimizer's
        return self.segments.rows(g, m, v, v_den, compute_dtype=compute_dtype, **kw)
