"""One step of the Adam family for one tensor: the specification, and its compiled fast path.

``adam_step_`` is the readable reference. The fast path, ``fused_step_``, steps a whole list of
tensors with the same math compiled by ``torch.compile`` (one vectorized, OpenMP-parallel loop per
call on CPU, one kernel on GPU):

* a tensor of at least ``SMALL`` elements runs its first ``numel // BLOCK · BLOCK`` coordinates as
  a ``(k, BLOCK)`` alias: statistics and the clipping RMS are summed per row in the compute dtype,
  the rows in float64, as ``adam_monitor.kernels`` does (inductor runs these sums in loops of
  their own: a reduction that reads a buffer the graph then writes in place does not fuse with
  that write, so statistics cost about one more read of the state);
* the small tensors and those tails are concatenated and stepped in one call (a compiled call
  costs ~0.1-0.3 ms of Python and guards, more than the arithmetic of a bias), their statistics
  returned per coordinate and summed per tensor in float64;
* ``update_clip`` needs the tensor-wide RMS before the update: a compiled reduction pass first
  (``v`` rebuilt, not written), then the update pass with the resulting per-tensor scale.

Step scalars travel in one float64 tensor: one graph serves every step and tensor of a dtype.

With hyper-parameters of the step (β2_t may vary, see ``Adam``)::

    v_t = β2_t·v_{t-1} + (1-β2_t)·g²                 v̂_t = v_t / c2_t
    adam:   m_t = β1·m_{t-1} + (1-β1)·g              u = (m_t/c1) / (√v̂_t + ε)
    laprop: m_t = β1·m_{t-1} + (1-β1)·g/(√v̂_t + ε)   u = m_t/c1
    atan2:  m_t = β1·m_{t-1} + (1-β1)·g              u = a·atan2(m_t/c1, b·√v̂_t)
    clip d: u ← u / max(1, RMS_t/d),   RMS_t = √mean(g²/max(v̂_t, ε²))
    p ← p·(1 - η·λ·s) - η·u      (s = 1/max(1, RMS_t/d) with clipping, else 1)

``c1 = 1 - β1^t`` with momentum bias correction, else 1.
"""

from __future__ import annotations

import types
import warnings
from typing import Callable

import torch
from torch import Tensor

__all__ = ["ATAN2_A", "ATAN2_B", "BLOCK", "NORMALIZE", "SMALL", "adam_step_", "flat_alias", "fused_step_"]

#: atan2 constants of Everett et al. 2024 ("Scaling Exponents Across Parameterizations and
#: Optimizers", Adam-atan2): u = a·atan2(m̂, b·√v̂). a = 1.27 ≈ 4/π makes a steady signal
#: (m̂ = √v̂, Adam's |u| = 1) move by a·π/4 ≈ 1, as Adam does; |u| ≤ a·π/2 ≈ 2 always.
ATAN2_A = 1.27
ATAN2_B = 1.0

NORMALIZE = ("adam", "laprop", "atan2")

#: Coordinates summed in the compute dtype before the float64 sum over blocks (fast path).
BLOCK = 1024
#: Tensors below this many elements are concatenated and stepped in one compiled call.
SMALL = 1 << 16


def _direction(grad: Tensor, exp_avg: Tensor, sqrt_v_hat: Tensor, beta1, eps, inv_c1, normalize: str) -> Tensor:
    """Update ``exp_avg`` in place and return the direction u (before clipping)."""
    if normalize == "adam":
        exp_avg.mul_(beta1).add_(grad * (1 - beta1))
        return exp_avg * inv_c1 / (sqrt_v_hat + eps)
    if normalize == "laprop":
        # momentum of the normalized gradient; only m is bias-corrected at the update
        exp_avg.mul_(beta1).add_(grad / (sqrt_v_hat + eps) * (1 - beta1))
        return exp_avg * inv_c1
    if normalize == "atan2":
        exp_avg.mul_(beta1).add_(grad * (1 - beta1))
        return ATAN2_A * torch.atan2(exp_avg * inv_c1, ATAN2_B * sqrt_v_hat)
    raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")


def adam_step_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    eps_sq: float,
    inv_c1: float,
    inv_sqrt_c2: float,
    inv_c2_prev: float,
    update_clip: float | None,
    normalize: str,
    statistics: bool,
) -> Tensor | None:
    """Update ``param``, ``exp_avg``, ``exp_avg_sq`` in place; return a statistics row if asked.

    Scalars come pre-inverted (``inv_c1 = 1/c1``, ``inv_sqrt_c2 = 1/√c2_t``) because a division by
    a scalar costs a vector division per element in the compiled loop. ``inv_c2_prev = 1/c2_{t-1}``
    (0 at the first step) is read only with ``statistics``: pass a constant otherwise, since the
    compiler specializes on the value of a float it does not use (a recompile every step).
    ``eps_sq`` is ``max(ε², tiny)``: the floor of ``max(v̂, ε²)`` that keeps 0/0 out when ε = 0.

    The row has the columns of ``adam_monitor.diagnostics.STAT_FIELDS`` with the semantics of
    ``tensor_statistics(grad, u, v̂_t, v̂_{t-1}, ε)``; sums accumulate in float64.
    """
    f64 = torch.float64
    g2 = grad * grad
    if statistics:
        # gradient_jump compares g_t with the v̂_{t-1} the step found: read v before overwriting it.
        had_moment = exp_avg_sq > 0
        v_hat_prev = (exp_avg_sq * inv_c2_prev).clamp_min(eps_sq)
        jump_sq = torch.where(had_moment, g2 / v_hat_prev, 0.0).sum(dtype=f64)
        jump_count = had_moment.sum(dtype=f64)
    exp_avg_sq.mul_(beta2).add_(g2 * (1 - beta2))
    v_hat = exp_avg_sq * (inv_sqrt_c2 * inv_sqrt_c2)
    sqrt_v_hat = exp_avg_sq.sqrt() * inv_sqrt_c2
    update = _direction(grad, exp_avg, sqrt_v_hat, beta1, eps, inv_c1, normalize)

    if update_clip is not None or statistics:
        staleness_sq = (g2 / v_hat.clamp_min(eps_sq)).sum(dtype=f64)
    decay = 1 - lr * weight_decay
    if update_clip is not None:
        # step over max(1, RMS_t/d) = step·min(1, d/RMS_t); RMS_t = 0 gives d/0 = inf → 1.
        rms = (staleness_sq / grad.numel()).sqrt()
        scale = (update_clip / rms).clamp_max(1.0).to(update.dtype)
        update = update * scale
        decay = 1 - lr * weight_decay * scale  # the clipped lr also sets the decay (Wortsman et al.)
    param.mul_(decay).sub_(update * lr)

    if not statistics:
        return None
    return torch.stack(
        [
            update.square().sum(dtype=f64),
            staleness_sq,
            jump_sq,
            jump_count,
            (sqrt_v_hat <= eps).sum(dtype=f64),
            torch.full((), grad.numel(), dtype=f64, device=grad.device),
        ]
    )


def flat_alias(t: Tensor) -> Tensor:
    """A 1-D tensor on ``t``'s storage that is not a view of ``t`` (``t`` must be contiguous).

    A view would carry its base's shape into the compiled graph's guards, costing one compile per
    parameter rank; a plain alias gives one graph for every shape.
    """
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), (t.numel(),), (1,))


# ----------------------------------------------------------------------------- fast path

# Positions in the float64 scalar vector of the compiled functions.
NUM_SUMS = 5  # the summed statistics; the row's last column is the count
_SCALARS = ("lr", "beta1", "beta2", "weight_decay", "eps", "eps_sq", "inv_c1", "inv_sqrt_c2", "inv_c2_prev")


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the per-row sums: float32 for float32 and narrower, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def _staleness_kernel(grad: Tensor, exp_avg_sq: Tensor, s: Tensor, *, rows: bool) -> Tensor:
    """Pass 1 of clipping: ``g²/max(v̂_t, ε²)`` with ``v_t`` rebuilt as the step will (not written).

    ``rows``: ``(k, BLOCK)`` inputs, summed per row in the compute dtype, rows in float64 (0-d);
    else 1-D inputs, the per-coordinate terms returned.
    """
    _, _, beta2, _, _, eps_sq, _, inv_sqrt_c2, _ = s.unbind()
    g2 = grad * grad
    v = exp_avg_sq * beta2 + g2 * (1 - beta2)
    terms = g2 / (v * (inv_sqrt_c2 * inv_sqrt_c2)).clamp_min(eps_sq)
    return terms.sum(-1, dtype=_acc(grad.dtype)).sum(dtype=torch.float64) if rows else terms


def _step_kernel(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, s: Tensor, scale: Tensor | None,
    *, normalize: str, statistics: bool, rows: bool,
) -> Tensor | None:
    """``adam_step_`` with the clipping scale given (pass 2); statistics as five sums (``rows``,
    ``(k, BLOCK)`` inputs: per row in the compute dtype, rows in float64) or five per-coordinate
    terms ``(5, N)`` (1-D inputs)."""
    lr, beta1, beta2, weight_decay, eps, eps_sq, inv_c1, inv_sqrt_c2, inv_c2_prev = s.unbind()
    g2 = grad * grad
    if statistics:
        had_moment = exp_avg_sq > 0
        v_hat_prev = (exp_avg_sq * inv_c2_prev).clamp_min(eps_sq)
        jump = torch.where(had_moment, g2 / v_hat_prev, 0.0)
    exp_avg_sq.mul_(beta2).add_(g2 * (1 - beta2))
    v_hat = exp_avg_sq * (inv_sqrt_c2 * inv_sqrt_c2)
    sqrt_v_hat = exp_avg_sq.sqrt() * inv_sqrt_c2
    update = _direction(grad, exp_avg, sqrt_v_hat, beta1, eps, inv_c1, normalize)
    if scale is None:
        decay = 1 - lr * weight_decay
    else:
        update = update * scale
        decay = 1 - lr * weight_decay * scale
    param.mul_(decay).sub_(update * lr)
    if not statistics:
        return None
    terms = [
        update.square(),
        g2 / v_hat.clamp_min(eps_sq),
        jump,
        had_moment.to(grad.dtype),
        (sqrt_v_hat <= eps).to(grad.dtype),
    ]
    if rows:
        return torch.stack([t.sum(-1, dtype=_acc(grad.dtype)) for t in terms]).sum(-1, dtype=torch.float64)
    return torch.stack(terms)


_COMPILED: dict[tuple, Callable] = {}


def _compiled(fn: Callable, *key) -> Callable:
    """``fn`` compiled, one distinct code object per configuration (lazy, cached per process), so
    that configurations do not share dynamo's per-function recompile limit."""
    full_key = (fn.__name__, *key)
    compiled = _COMPILED.get(full_key)
    if compiled is None:
        name = "_".join(str(k) for k in full_key)
        copy = types.FunctionType(fn.__code__.replace(co_name=name), fn.__globals__, name)
        compiled = _COMPILED[full_key] = torch.compile(copy, dynamic=True, fullgraph=True)
    return compiled


def _segment_sums(terms: Tensor, segment_ids: Tensor, segments: int) -> Tensor:
    """Per-segment float64 sums of the last dimension of ``terms``: ``(..., segments)``."""
    out = torch.zeros(*terms.shape[:-1], segments, dtype=torch.float64, device=terms.device)
    return out.index_add_(-1, segment_ids, terms.to(torch.float64))


def fused_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    *,
    update_clip: float | None,
    normalize: str,
    statistics: bool,
    **scalars: float,
) -> list[Tensor] | None:
    """``adam_step_`` on every tensor of the lists (compiled), all sharing the step's scalars.

    The tensors must be contiguous, non-empty, of one dtype and device. Returns the statistics
    rows (float64, as ``adam_step_``) when asked. Compilation errors surface before any tensor
    is written.
    """
    device, dtype = params[0].device, params[0].dtype
    s = torch.tensor([scalars[k] for k in _SCALARS], dtype=torch.float64, device=device)
    numels = [p.numel() for p in params]
    heads = [n // BLOCK * BLOCK if n >= SMALL else 0 for n in numels]
    pieces = [(i, h, n - h) for i, (h, n) in enumerate(zip(heads, numels)) if n > h]
    lists = (params, grads, exp_avgs, exp_avg_sqs)
    clip = update_clip is not None

    def head_view(t: Tensor, h: int) -> Tensor:  # a (k, BLOCK) alias, not a view (see flat_alias)
        view = t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), (h // BLOCK, BLOCK), (BLOCK, 1))
        torch._dynamo.mark_static(view, 1)  # BLOCK stays a constant in the graph (static loop bounds)
        return view

    # The batch: small tensors and tails, concatenated (copies: written back at the end).
    if pieces:
        flats = [[ts[i].view(-1)[h:] if h else ts[i].view(-1) for i, h, _ in pieces] for ts in lists]
        batch = [torch.cat(ts) for ts in flats]
        total = batch[0].numel()
        if total == 1:  # a size-1 dimension would specialize a graph of its own
            batch = [torch.cat([b, b.new_zeros(1)]) for b in batch]
        if clip or statistics:
            lengths = torch.tensor([n for _, _, n in pieces], device=device)
            segment_ids = torch.repeat_interleave(torch.arange(len(pieces), device=device), lengths)

    head_index = [i for i, h in enumerate(heads) if h]
    head_views = [[head_view(ts[i], heads[i]) for i in head_index] for ts in lists]
    scales = batch_scale = None
    if clip:
        # Pass 1: the tensor-wide Σ g²/max(v̂_t, ε²) (head rows + tail coordinates), then s_t.
        staleness = torch.zeros(len(params), dtype=torch.float64, device=device)
        if head_index:
            fn = _compiled(_staleness_kernel, True)
            staleness[head_index] = torch.stack([fn(g, v, s, rows=True) for g, v in zip(head_views[1], head_views[3])])
        if pieces:
            terms = _compiled(_staleness_kernel, False)(batch[1], batch[3], s, rows=False)
            staleness.index_add_(0, torch.tensor([i for i, _, _ in pieces], device=device),
                                 _segment_sums(terms[:total], segment_ids, len(pieces)))  # fmt: skip
        numel_t = torch.tensor(numels, dtype=torch.float64, device=device)
        scale_all = (update_clip / (staleness / numel_t).sqrt()).clamp_max(1.0).to(dtype)
        if head_index:
            scales = scale_all[head_index]
        if pieces:
            batch_scale = torch.repeat_interleave(scale_all[[i for i, _, _ in pieces]], lengths)
            if batch_scale.numel() < batch[0].numel():
                batch_scale = torch.cat([batch_scale, batch_scale.new_ones(1)])

    # Pass 2, the batch first: its compiled call writes only the concatenated copies.
    config = dict(normalize=normalize, statistics=statistics)
    if pieces:
        terms = _compiled(_step_kernel, normalize, clip, statistics, False)(*batch, s, batch_scale, rows=False, **config)
    if head_index:
        # One call per head: a single call over a list would unroll the list into the graph
        # (compile time growing with the model, ~40 s for 17 heads) to save ~0.1 ms per head.
        fn = _compiled(_step_kernel, normalize, clip, statistics, True)
        head_rows = [fn(*views, s, None if scales is None else scales[j], rows=True, **config)
                     for j, views in enumerate(zip(*head_views))]  # fmt: skip
        for i in head_index:
            torch.autograd.graph.increment_version(params[i])  # the alias wrote p behind autograd's back
    if pieces:
        sizes = [n for _, _, n in pieces]
        for k in (0, 2, 3):  # param, exp_avg, exp_avg_sq
            torch._foreach_copy_(flats[k], list(batch[k][:total].split(sizes)))
    if not statistics:
        return None
    rows = torch.zeros(len(params), NUM_SUMS + 1, dtype=torch.float64, device=device)
    rows[:, NUM_SUMS] = torch.tensor(numels, dtype=torch.float64, device=device)
    if head_index:
        rows[head_index, :NUM_SUMS] = torch.stack(head_rows)
    if pieces:
        rows[:, :NUM_SUMS].index_add_(0, torch.tensor([i for i, _, _ in pieces], device=device),
                                      _segment_sums(terms[:, :total], segment_ids, len(pieces)).T)  # fmt: skip
    return list(rows.unbind())


def warn_eager_fallback(error: BaseException) -> None:
    warnings.warn(
        f"torch.compile failed for the Adam step ({type(error).__name__}: {error}); "
        "running the eager step instead. Pass fused=False to skip compilation.",
        RuntimeWarning,
        stacklevel=3,
    )
