"""Reading what an Adam-family step did from the optimizer's own state.

After ``optimizer.step()`` torch Adam/AdamW hold everything the diagnostics need: the gradient the
step used is still in ``p.grad`` (after unscaling and clipping), ``exp_avg``/``exp_avg_sq`` are
``m_t``/``v_t``, and ``v_{t-1}`` follows exactly from ``v_t`` and ``g_t``. So a step post-hook
computes the statistics without copying any state.

Optimizers from :mod:`adam_monitor.optim` compute their statistics inside their own step (their
direction may be clipped, LaProp or atan2, which the state alone does not tell); the reader only
collects them.
"""

from __future__ import annotations

import contextlib
import math
import operator
import sys
from collections import defaultdict
from collections.abc import Iterable
from itertools import chain, islice

import numpy as np
import torch
from torch import Tensor

from .._runtime import host_values
from ..diagnostics.compiled import StateLayout, fast_adam_statistics
from ..diagnostics.reference import adam_direction, nadam_direction, radam_direction, radam_rectification
from ..diagnostics.rows import EPS_COUNT, NUM_STATS, UPDATE_SQ
from ..diagnostics.sharpness import curvature_sums
from . import schedule_free
from .directions import registered_direction
from .moments import dequantized, foreign_moments, low_bit, state_dtype

__all__ = [
    "StepReader",
    "UnsupportedOptimizer",
    "curvature",
    "unsupported_reason",
    "updates",
    "local_tensor",
    "real_view",
    "shard_group",
]


#: A class with a ``step`` of its own (or another library's) is read once a step after its first
#: (Adam's first is sign descent, which other updates share) matches its base's rule, and then
#: checked at every step: an update may depart from Adam's only at times (a bound that binds late,
#: a clipping or a projection of some tensors). Each check takes the first coordinates of two
#: parameters, the next ones in turn at each step: enough to tell another update from rounding, at
#: a cost that does not grow with the model.
VERIFIED_NUMEL, VERIFIED_TENSORS = 4096, 2

#: Coordinates of low-bit moments dequantized at once: a read holds float32 copies of this many
#: (or of its largest tensor), not of the whole model whose memory the low-bit state saves.
DEQUANTIZED_NUMEL = 1 << 22


def all_reduce(tensor: Tensor, group) -> None:
    """The one collective of a step under sharding (module-level so tests can count it)."""
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM, group=group)


class UnsupportedOptimizer(Exception):
    """The optimizer's state cannot be read as Adam state; the message says what is missing."""


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2), the tensor itself otherwise."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def betas_of(group: dict) -> tuple[float, float]:
    """``(β1, β2)`` of a param group: torch's ``betas``, or ``beta1`` and ``beta2`` (optimi's keys)."""
    if "betas" in group:
        beta1, beta2 = group["betas"]
    else:
        beta1, beta2 = group["beta1"], group["beta2"]
    return _as_float(beta1), _as_float(beta2)


#: A step count at which β^step is 0 in float64 for every β a run uses: bias corrections are 1.
_BIAS_FREE_STEP = 1 << 40


def debiased_beta(beta: float, step: float) -> float:
    """``β̂_t = β·(1 − β^{t−1})/(1 − β^t)``: the EMA with this factor holds Adam's bias-corrected
    average itself (m̂_t, v̂_t)."""
    return beta * (1 - beta ** (step - 1)) / (1 - beta**step)


def adam_terms(reader: StepReader, group: dict, step: float) -> tuple[float, float, float]:
    """``(β1, β2, step)`` under which ``group``'s state reads as torch's raw moments: its own,
    or, where the moments are kept bias-corrected (``reader.debiased``: optimi's), ``β̂_t`` at a
    step where the bias corrections are 1, which rebuilds ``v̂_{t−1}`` from ``v̂_t`` exactly."""
    beta1, beta2 = betas_of(group)
    if not reader.debiased:
        return beta1, beta2, step
    if step <= 1:
        return 0.0, 0.0, 1  # β̂_1 = 0: m̂_1 = g, v̂_1 = g²
    return debiased_beta(beta1, step), debiased_beta(beta2, step), _BIAS_FREE_STEP


def step_of(state: dict, group: dict):
    """A parameter's step count: in its state (torch), else in its param group (optimi,
    pytorch-optimizer; schedule-free's ``k``; HeavyBall's ``step_count``, its ``step`` being
    ``None`` between steps); ``None`` where neither holds one."""
    if "step" in state:
        return state["step"]
    if schedule_free.is_schedule_free(group):
        return group["k"]
    step = group.get("step")
    return group.get("step_count") if step is None else step


def step_lr(group: dict):
    """The lr of the step just taken: the group's, or HeavyBall's ``prev_lr`` (its warmup scales the
    lr during the step only, and puts ``base_lr`` back after it)."""
    return group["prev_lr"] if "prev_lr" in group and "base_lr" in group else group["lr"]


def _gradient_as_is(rule: str, decoupled: bool, group: dict) -> bool:
    """Whether the gradient a step of ``group`` used is ``p.grad`` itself (no L2 decay folded in,
    no sign the direction needs, not sparse)."""
    if (rule in ("nadam", "registered") and group.get("maximize", False)) or rule == "sparse_adam":
        return False
    return not group.get("weight_decay", 0.0) or decoupled


def _sparse_adam_direction(p: Tensor, state: dict, beta1: float, beta2: float, eps: float, step: float) -> Tensor:
    """``torch.optim.SparseAdam``'s direction: ``m̂·√c2/(√v + ε)`` at the coordinates its sparse
    gradient holds (an explicit zero value included: its moments move), 0 elsewhere (not stepped)."""
    m, v = state["exp_avg"], state["exp_avg_sq"]
    u = (m / (1 - beta1**step)) * ((1 - beta2**step) ** 0.5 / v.sqrt().add_(eps))
    if p.grad is None or not p.grad.is_sparse:
        return u
    grad = p.grad.coalesce()
    held = torch.zeros(grad.shape[: grad.sparse_dim()], dtype=torch.bool, device=u.device)
    held[tuple(grad._indices())] = True
    return u * held.reshape(held.shape + (1,) * grad.dense_dim())


def _same(t: Tensor) -> Tensor:
    return t


def real_view(t: Tensor) -> Tensor:
    """The local shard as torch Adam steps it: a complex tensor as its real view (``[..., 2]``),
    every real and imaginary part one coordinate."""
    t = local_tensor(t)
    return torch.view_as_real(t) if t.is_complex() else t


def shard_group(p: Tensor):
    """``(process group, rank in it)`` over which ``p`` is sharded (FSDP2 DTensor), else ``None``.

    Statistics of the local shards sum to those of the whole tensor over this group only; mesh
    dimensions on which the tensor is replicated (HSDP's replicas) must not be summed.
    """
    placements = getattr(p, "placements", None)
    mesh = getattr(p, "device_mesh", None)
    if placements is None or mesh is None:
        return None
    dims = [i for i, pl in enumerate(placements) if pl.is_shard()]
    if not dims:
        return None
    if len(dims) > 1:
        raise UnsupportedOptimizer(
            f"a parameter is sharded over {len(dims)} mesh dimensions ({placements}); adam-monitor pools "
            "shards over one mesh dimension (FSDP2 fully_shard, HSDP)"
        )
    return mesh.get_group(dims[0]), mesh.get_local_rank(dims[0])


def _records_statistics(optimizer: torch.optim.Optimizer) -> bool:
    return hasattr(optimizer, "record_statistics") and hasattr(optimizer, "last_statistics")


#: torch's optimizers whose state is Adam's (``exp_avg``, ``exp_avg_sq``, ``step``), each with the
#: rule that turns that state into its direction. The statistics other than the update's are the
#: same for all: they read the moments, not the direction.
UPDATE_RULES = {
    torch.optim.Adam: "adam",
    torch.optim.AdamW: "adam",
    torch.optim.NAdam: "nadam",
    torch.optim.RAdam: "radam",
    torch.optim.SparseAdam: "sparse_adam",
}


def _function(method):
    """The function under ``method``'s decorators (torch wraps every ``step`` in a profiling hook)."""
    while hasattr(method, "__wrapped__"):
        method = method.__wrapped__
    return method


#: The code of the wrapper torch puts around every ``step`` to run its hooks.
_STEP_WRAPPER = torch.optim.Optimizer.profile_hook_step(lambda *args, **kwargs: None).__code__


def nested_step(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the ``step`` running now was called by another ``step`` of ``optimizer``: a subclass's
    step calling its base's, where torch runs the step hooks around each. Only the outer call's
    hooks see the whole step."""
    frame, calls = sys._getframe(1), 0
    while frame is not None:
        if frame.f_code is _STEP_WRAPPER:
            args = frame.f_locals.get("args")
            calls += bool(args) and args[0] is optimizer
        frame = frame.f_back
    return calls > 1


def update_rule(optimizer: torch.optim.Optimizer) -> tuple[str, bool] | None:
    """``(rule, overridden)`` of the nearest class in ``UPDATE_RULES`` ``optimizer`` is, with
    ``overridden`` when its class has a ``step`` of its own (its update may not be the rule's);
    ``("registered", True)`` where the nearest is one with a direction registered
    (:func:`~adam_monitor.engine.directions.register_direction`), whose steps are always checked;
    ``("schedule_free", overridden)`` for schedule-free AdamW (:mod:`.schedule_free`); ``None`` for
    any other optimizer."""
    found = schedule_free.form(optimizer)
    if found is not None:
        return "schedule_free", _function(type(optimizer).step) is not _function(found[1].step)
    for base in type(optimizer).__mro__:
        if registered_direction(base) is not None:
            return "registered", True
        if base in UPDATE_RULES:
            return UPDATE_RULES[base], _function(type(optimizer).step) is not _function(base.step)
    return None


#: Adafactor's groups (torch's ``beta2_decay``, transformers' ``decay_rate``): what it keeps instead of Adam's state.
_ADAFACTOR = (
    "{name} factors its second moment (Adafactor): it keeps a matrix's v as its row and column means, a "
    "coordinate's v̂ rebuilt from them, no first moment (transformers': unless beta1 is set), and by "
    "default scales its steps by each parameter's RMS, so neither Adam's update nor the staleness of a "
    "coordinate's v̂ can be read from it; adam_monitor.optim.Adam(beta2_schedule='adafactor', "
    "update_clip=1.0) is Adam with Adafactor's β2 schedule and update clipping, and is monitored"
)


def unsupported_reason(optimizer: torch.optim.Optimizer) -> str | None:
    """Why this optimizer cannot be monitored, or ``None`` if it can (checks the configuration only)."""
    if _records_statistics(optimizer):
        return None
    name = type(optimizer).__name__
    if any(map(schedule_free.is_schedule_free, optimizer.param_groups)):
        return _schedule_free_reason(optimizer)
    for i, group in enumerate(optimizer.param_groups):
        if "betas" not in group and ("beta2_decay" in group or "decay_rate" in group):
            return _ADAFACTOR.format(name=name)
        missing = [k for k in ("betas", "eps") if k not in group]
        if "betas" in missing and "beta1" in group and "beta2" in group:
            missing.remove("betas")
        if missing and update_rule(optimizer) is not None:
            return f"param group {i} of {name} has no {' or '.join(missing)}"
        if missing:
            return (
                f"{name} is not torch.optim.Adam, AdamW, NAdam, RAdam, SparseAdam or an adam_monitor.optim "
                "optimizer, nor Adam-shaped (betas, or beta1 and beta2, and eps in each param group; exp_avg "
                f"and exp_avg_sq in its state): its param group {i} has no {' or '.join(missing)}"
            )
        if "betas" in group and len(group["betas"]) != 2:
            return f"param group {i} of {name} has {len(group['betas'])} betas, so its update is not Adam's"
    return None


def _schedule_free_reason(optimizer: torch.optim.Optimizer) -> str | None:
    name, found = type(optimizer).__name__, schedule_free.form(optimizer)
    if found is None:
        return (
            f"{name} is a schedule-free optimizer whose step adam-monitor does not read; it reads schedulefree's "
            "AdamWScheduleFree and AdamWScheduleFreeClosure (their z takes Adam's step without momentum)"
        )
    if _function(type(optimizer).step) is not _function(found[1].step):
        return (
            f"{name} overrides the step of {found[1].__name__}, and a schedule-free step cannot be checked "
            "against its rule from p (which holds an average of the iterates, not the point Adam's step moves)"
        )
    return None


def _cpu_steps(raw: list) -> list[float] | None:
    """The step counts as floats when all are CPU tensors (read in place through numpy: no sync,
    no Python call per tensor), else ``None``."""
    if all(isinstance(r, Tensor) and r.device.type == "cpu" for r in raw):
        try:
            with torch.no_grad():
                return torch.stack(raw).to(torch.float64).numpy().tolist()
        except (TypeError, RuntimeError):  # shapes that do not stack: the device read handles them
            pass
    return None


def _read_steps(raw: list) -> list[float]:
    """Step counts held on a device, in one host read (two ops, whatever the number of tensors)."""
    first = raw[0]
    if all(isinstance(r, Tensor) and r.dim() == 0 and r.device == first.device and r.dtype == first.dtype for r in raw):
        return torch.stack(raw).to(torch.float64).tolist()
    return torch.stack([torch.as_tensor(r).detach().reshape(()).to(first.device, torch.float64) for r in raw]).tolist()


def _as_float(x) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def _nadam(grad: Tensor | None, state: dict, group: dict, step: float) -> Tensor:
    """NAdam's direction for the gradient ``grad`` it used (``None``: the part the momentum sets)."""
    beta1, beta2 = betas_of(group)
    m = real_view(state["exp_avg"])
    return nadam_direction(
        torch.zeros_like(m) if grad is None else grad,
        m,
        real_view(state["exp_avg_sq"]),
        beta1=beta1,
        beta2=beta2,
        eps=_as_float(group["eps"]),
        step=step,
        momentum_decay=_as_float(group["momentum_decay"]),
        mu_product=_as_float(state["mu_product"]),
    )


_GRAD = operator.attrgetter("grad")
#: State entries whose tensors a layout holds: replaced ones (a loaded or moved state) rebuild it.
_HELD = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _same_objects(a: Iterable, b: list) -> bool:
    """Whether ``a`` yields exactly the objects of ``b``, in order (identity; one C-level pass)."""
    return all(map(operator.is_, a, b))


class _Bucket:
    """Parameters of one step read together: one param group, device, dtype and step count."""

    __slots__ = (
        "gi",
        "members",
        "positions",
        "rep",
        "params",
        "states",
        "in_order",
        "device",
        "coded",
        "_take",
        "_index",
        "_views",
        "_pieces",
    )

    def __init__(self, layout: _Layout, members: list[int]):
        self.gi = layout.cand_group[members[0]]
        self.members = members  # candidate indices
        self.rep = members[0]
        self.positions = [layout.cand[c] for c in members]
        self.params = [layout.params[i] for i in self.positions]
        self.states = [layout.cand_states[c] for c in members]
        self.in_order = self.positions == list(range(len(layout.params)))
        # Moments another library keeps as codes or under its own names, read afresh at each step.
        self.coded = any(layout.cand_coded[c] for c in members)
        self.device = local_tensor(self.params[0]).device
        self._take = operator.itemgetter(*self.positions) if len(self.positions) > 1 else None
        self._index: dict[torch.device, Tensor] = {}
        self._views = None
        self._pieces: list[_Bucket] | None = None

    def pieces(self, layout: _Layout) -> list[_Bucket]:
        """This bucket as buckets of at most ``DEQUANTIZED_NUMEL`` coordinates (a larger tensor
        alone), made once: low-bit moments are read as float32 copies, one piece at a time."""
        if self._pieces is None:
            pieces, size = [[]], 0
            for c, p in zip(self.members, self.params):
                n = local_tensor(p).numel()
                if pieces[-1] and size + n > DEQUANTIZED_NUMEL:
                    pieces.append([])
                    size = 0
                pieces[-1].append(c)
                size += n
            self._pieces = [self] if len(pieces) == 1 else [_Bucket(layout, m) for m in pieces]
        return self._pieces

    def grads(self, grads: list) -> list:
        """This bucket's gradients out of the read's ``grads`` (one per parameter)."""
        if self.in_order:
            return grads
        return [grads[self.positions[0]]] if self._take is None else list(self._take(grads))

    def index(self, device: torch.device) -> Tensor:
        """The rows' positions as an index tensor on ``device`` (made once)."""
        index = self._index.get(device)
        if index is None:
            index = self._index[device] = host_values(self.positions, torch.long, device)
        return index

    def views(self, view, amsgrad: bool, states: list[dict]) -> tuple[list, list, list | None, StateLayout]:
        """``(exp_avgs, exp_avg_sqs, max_exp_avg_sqs or None, their StateLayout)`` of ``states``
        (this read's, :meth:`_Stepped.states`) as the statistics read them (``view``: the real view
        of complex or sharded tensors), made once where they are the optimizer's own tensors;
        ``UnsupportedOptimizer`` where a state is not Adam's."""
        if self._views is None or self.coded:
            for state in states:
                missing = [k for k in ("exp_avg", "exp_avg_sq") if k not in state]
                if missing:
                    raise UnsupportedOptimizer(
                        f"its state has no {' or '.join(missing)} (keys: {sorted(state, key=str)}), so it is not "
                        f"Adam's state{_state_hint(state)}"
                    )
            m = [view(s["exp_avg"]) for s in states]
            v = [view(s["exp_avg_sq"]) for s in states]
            v_max = [view(s["max_exp_avg_sq"]) for s in states] if amsgrad else None
            views = m, v, v_max, StateLayout(m, v, v_max)
            if self.coded:
                return views  # the dequantized copies of one read are not kept past it
            self._views = views
        return self._views


class _Layout:
    """What a read of the optimizer relies on between steps: its param groups and parameters,
    which of them have a gradient and a state that counts steps (the candidates), their state
    dicts and the tensors in them, and the buckets their statistics are read in.

    A read checks it in a few passes that run in C (identity of the groups, the state dicts and
    their tensors; which gradients are ``None``) and rebuilds it when anything changed: a loaded
    or replaced state, a param group added, a parameter frozen or given a gradient, a state that
    appears at a parameter's first step.
    """

    __slots__ = (
        "groups_list",
        "groups",
        "params_lists",
        "params",
        "mask",
        "state",
        "state_len",
        "state_values",
        "amsgrad",
        "pending",
        "cand",
        "cand_index",
        "cand_group",
        "cand_states",
        "cand_coded",
        "tensor_steps",
        "raw",
        "held",
        "held_tensors",
        "bucket_of",
        "first",
        "known",
        "last",
        "plans",
    )

    def __init__(self, reader: StepReader, grads: list, counts: dict[int, tuple]):
        opt = reader.optimizer
        self.groups_list = opt.param_groups
        self.groups = list(self.groups_list)
        self.params_lists = [g["params"] for g in self.groups]
        self.params = reader.params
        self.mask = [g is not None for g in grads]
        self.state = opt.state
        self.state_len = len(self.state)
        self.state_values = list(self.state.values())
        self.amsgrad = [g.get("amsgrad", False) for g in self.groups]
        self.pending: list[tuple[Tensor, dict]] = []  # a gradient, no step count yet
        self.cand: list[int] = []
        self.cand_group: list[int] = []
        self.cand_states: list[dict] = []
        keys: dict[tuple, int] = {}
        bucket_of = []
        i = 0
        for gi, group in enumerate(self.groups):
            for p in group["params"]:
                if grads[i] is not None:
                    state = self.state.get(p)
                    if not state or step_of(state, group) is None:
                        self.pending.append((p, group))
                    else:
                        self.cand.append(i)
                        self.cand_group.append(gi)
                        self.cand_states.append(state)
                        local = local_tensor(p)
                        bucket_of.append(keys.setdefault((gi, local.device, local.dtype), len(keys)))
                i += 1
        self.cand_index = {i: c for c, i in enumerate(self.cand)}
        self.cand_coded = list(map(foreign_moments, self.cand_states)) if reader.foreign else [False] * len(self.cand)
        self.bucket_of = np.array(bucket_of, dtype=np.int64)
        starts = {}
        self.first = np.array([starts.setdefault(b, c) for c, b in enumerate(bucket_of)], dtype=np.int64)
        self.raw = [step_of(s, self.groups[gi]) for s, gi in zip(self.cand_states, self.cand_group)]
        self.tensor_steps = all(isinstance(s.get("step"), Tensor) for s in self.cand_states)
        # max_exp_avg_sq only where a group keeps it (amsgrad); the step count where it is a tensor
        keys = (_HELD if any(self.amsgrad) else _HELD[:2]) + (("step",) if self.tensor_steps else ())
        keys = [k for k in keys if all(k in s for s in self.cand_states)]
        self.held = operator.itemgetter(*(keys * 2 if len(keys) == 1 else keys)) if keys else None  # tuples
        # Where every state holds these entries, one pass over the live state dicts checks them all
        # (a dict replaced by one holding the same tensors reads the same); else the dicts' identity
        # and the candidates' tensors are checked in two.
        every = bool(keys) and all(all(k in s for k in keys) for s in self.state_values)
        held_states = self.state_values if every else self.cand_states
        self.held_tensors = list(chain.from_iterable(map(self.held, held_states))) if keys else []
        if every:
            self.state_values = None
        saved = [counts.get(id(self.params[i])) for i in self.cand]
        self.last = np.array([math.nan if c is None else c[2] for c in saved], dtype=np.float64)
        known = self.tensor_steps and all(c is not None and c[0] is r for c, r in zip(saved, self.raw))
        self.known = np.array([c[1] for c in saved], dtype=np.float64) if known else None
        self.plans: dict[bytes | None, list[_Bucket]] = {}

    def current(self, optimizer: torch.optim.Optimizer, mask: list[bool]) -> bool:
        """Whether the optimizer is still as this layout found it (see the class docstring)."""
        groups, state = optimizer.param_groups, optimizer.state
        if groups is not self.groups_list or len(groups) != len(self.groups) or not _same_objects(groups, self.groups):
            return False
        for group, params in zip(groups, self.params_lists):
            if group["params"] is not params:
                return False
        if sum(map(len, self.params_lists)) != len(self.params) or mask != self.mask:
            return False  # a parameter appended to a group's list
        if not _same_objects(chain.from_iterable(self.params_lists), self.params):
            return False  # a parameter replaced in its group
        if state is not self.state or len(state) != self.state_len:
            return False
        if self.state_values is not None and not _same_objects(state.values(), self.state_values):
            return False
        if [g.get("amsgrad", False) for g in groups] != self.amsgrad:
            return False
        for p, group in self.pending:  # a state that appeared at this parameter's first step
            s = state.get(p)
            if s and step_of(s, group) is not None:
                return False
        if self.held is None:
            return True
        states = state.values() if self.state_values is None else self.cand_states
        try:  # the tensors of every state, in one pass
            return _same_objects(chain.from_iterable(map(self.held, states)), self.held_tensors)
        except KeyError:  # an entry is gone
            return False

    def save_counts(self, counts: dict[int, tuple]) -> None:
        """Hand what this layout knows of each candidate's count to the next layout, through
        ``counts``: ``id(param) -> (its step tensor or None, the count it held, the last count read)``."""
        known = self.known is not None
        values = self.known.tolist() if known else [math.nan] * len(self.cand)
        for i, r, k, last in zip(self.cand, self.raw, values, self.last.tolist()):
            counts[id(self.params[i])] = (r if known else None, k, last)

    def steps(self, optimizer: torch.optim.Optimizer, after_step: bool) -> np.ndarray:
        """The candidates' step counts now (float64).

        Reading them is a sync per step where they live on a device (fused, capturable), and a
        Python call per tensor on the CPU. Without a GradScaler every ``step()`` adds one to the
        count of each parameter with a gradient, so counts this layout knows (the same tensor
        objects: a loaded state brings new ones) are one more now. Under a GradScaler a fused
        kernel takes the increment back on an inf/NaN step, which only the device knows: the
        scaler sets ``optimizer.found_inf`` for the duration of the step, and then they are read.
        """
        if not self.tensor_steps:
            raw = [step_of(s, self.groups[gi]) for s, gi in zip(self.cand_states, self.cand_group)]
            if isinstance(raw[0], Tensor):
                return np.array(_cpu_steps(raw) or _read_steps(raw), dtype=np.float64)
            return np.array([float(r) for r in raw], dtype=np.float64)
        scaled = getattr(optimizer, "found_inf", None) is not None or getattr(optimizer, "grad_scale", None) is not None
        if after_step and not scaled and self.known is not None:
            steps = self.known + 1
        else:
            # CPU-resident counts are read in place
            steps = np.array(_cpu_steps(self.raw) or _read_steps(self.raw), dtype=np.float64)
        self.known = steps
        return steps

    def plan(self, stepped: np.ndarray, steps: np.ndarray) -> list[_Bucket]:
        """The buckets of the stepped candidates: by bucket and step count. Counts that differ
        within a bucket (a parameter unfrozen late) keep their pattern from step to step, so the
        plan is kept by the pattern of the counts relative to each bucket's first."""
        relative = steps - steps[self.first]
        key = None if stepped.all() and not relative.any() else stepped.tobytes() + relative.tobytes()
        plan = self.plans.get(key)
        if plan is None:
            if len(self.plans) >= 16:
                self.plans.clear()
            members: dict[tuple, list[int]] = {}
            for c in np.flatnonzero(stepped).tolist():
                members.setdefault((int(self.bucket_of[c]), float(relative[c])), []).append(c)
            plan = self.plans[key] = [_Bucket(self, m) for m in members.values()]
        return plan


class _Stepped:
    """What one read found stepped: its buckets and the step counts. Iterates as
    ``(group index, group, param, state, step)`` in parameter order; false when nothing stepped."""

    __slots__ = ("layout", "buckets", "steps", "stepped", "grads", "_readable")

    def __init__(self, layout: _Layout | None, buckets: list[_Bucket], steps, stepped, grads: list):
        self.layout, self.buckets, self.steps, self.stepped, self.grads = layout, buckets, steps, stepped, grads
        self._readable: dict[int, dict] = {}  # candidate -> its state dequantized, for this read

    def state(self, c: int) -> dict:
        """Candidate ``c``'s state with its moments as torch's tensors (low-bit codes dequantized
        once per read, until :meth:`let_go`)."""
        state = self.layout.cand_states[c]
        if not self.layout.cand_coded[c]:
            return state
        readable = self._readable.get(c)
        if readable is None:
            readable = self._readable[c] = dequantized(state)
        return readable

    def states(self, bucket: _Bucket) -> list[dict]:
        """The states of ``bucket``'s parameters as :meth:`state` reads them."""
        return list(map(self.state, bucket.members)) if bucket.coded else bucket.states

    def let_go(self) -> None:
        """Drop what the read held that would outlive it: the gradients (they would outlive a
        ``zero_grad(set_to_none=True)``) and the dequantized moments (float32 copies of the
        parameters, on the optimizers that keep low-bit state to save them)."""
        self.grads = None
        self._readable = {}

    def __bool__(self) -> bool:
        return bool(self.buckets)

    def step(self, bucket: _Bucket) -> float:
        return float(self.steps[bucket.rep])

    def max_step(self) -> float:
        return max(self.step(b) for b in self.buckets)

    def _entries(self) -> list[tuple]:
        entries = []
        for b in self.buckets:
            group, step = self.layout.groups[b.gi], self.step(b)
            entries += [(pos, b.gi, group, p, s, step) for pos, p, s in zip(b.positions, b.params, self.states(b))]
        entries.sort(key=operator.itemgetter(0))
        return [e[1:] for e in entries]

    def __iter__(self):
        return iter(self._entries())

    def find(self, position: int) -> tuple[dict, dict, float] | None:
        """``(group, state, step)`` of the parameter at ``position`` if it stepped, else ``None``."""
        layout = self.layout
        c = layout.cand_index.get(position)
        if c is None or not self.stepped[c]:
            return None
        return layout.groups[layout.cand_group[c]], self.state(c), float(self.steps[c])


_NOTHING = _Stepped(None, [], None, None, [])


def _state_hint(state: dict) -> str:
    """What a state that is not Adam's holds instead, where a known layout tells."""
    if "z" in state:
        return ": a schedule-free optimizer's z and averaged iterate replace Adam's momentum"
    if state and all(isinstance(k, int) for k in state):
        inner = state[next(iter(state))]
        keys = sorted(inner, key=str) if isinstance(inner, dict) else []
        return (
            ": it keeps one state per view of each parameter (HeavyBall's chainable optimizers), read as Adam's "
            f"where a parameter has one view holding an Adam transform's moments (update_by_adam_exp_avg_0, "
            f"update_by_adam_exp_avg_sq_0); this one holds {keys}"
        )
    return ""


def _check_counted(layout: _Layout, optimizer: torch.optim.Optimizer) -> None:
    """``UnsupportedOptimizer`` where a step gave a parameter a state but no step count (in it or
    in its param group): its moments could never be read, and saying nothing would look like a
    monitor that works."""
    for p, _ in layout.pending:
        state = optimizer.state.get(p)
        if not state:
            continue
        name, keys = type(optimizer).__name__, sorted(state, key=str)
        group = next((g for g in optimizer.param_groups if any(q is p for q in g["params"])), {})
        counted = "step" in state or "step" in group
        missing = [k for k in ("exp_avg", "exp_avg_sq") if k not in state]
        lacks = ([f"no {' or '.join(missing)}"] if missing else []) + ([] if counted else ["no step count"])
        lacks = lacks or ["no moments the reader could pair with a step count"]
        where = f"its keys: {keys}" + ("" if counted else "; its param group has no 'step' either")
        hint = _state_hint(state)
        raise UnsupportedOptimizer(
            f"the state of {name} has {' and '.join(lacks)} ({where}), so it is not Adam's state{hint}"
        )


class StepReader:
    """Statistics rows for the last step of one optimizer, one row per parameter.

    Rows follow :attr:`params` (all parameters of all param groups, in order); parameters that did
    not step (frozen, no gradient this step) get a zero row, so they add nothing to any pool.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        reason = unsupported_reason(optimizer)
        if reason is not None:
            raise UnsupportedOptimizer(reason)
        self.optimizer = optimizer
        self._in_step_statistics = _records_statistics(optimizer)
        found = None if self._in_step_statistics else update_rule(optimizer)
        if self._in_step_statistics:
            optimizer.record_statistics = True
            # Another reader (a second Monitor, an AdamDiagnostics) may share the optimizer: the
            # last one released turns the recording off.
            optimizer._statistics_readers = getattr(optimizer, "_statistics_readers", 0) + 1
            self.rule, self.overridden = "in_step", False
        else:
            # Another class whose groups and state are Adam's is read as Adam once its update is
            # verified to be Adam's, like a torch subclass with a step of its own.
            self.rule, self.overridden = found or ("adam", True)
        # Not torch's: how its moments took in the gradient, and its form of decay, are learned.
        self.foreign = not self._in_step_statistics and (found is None or self.rule == "registered")
        self._registered = next(filter(None, map(registered_direction, type(optimizer).__mro__)), None)
        # id(group) -> whether a foreign class's step folds L2 decay into the gradient its moments
        # take in (found by the update check; torch's classes say so in their groups).
        self.l2_folded: dict[int, bool] = {}
        self.debiased = False  # moments kept bias-corrected (found by the update check)
        self._check = UpdateCheck(self) if self.overridden else None
        self._given = _GivenGradients(self) if getattr(optimizer, "consume_grad", False) is True else None
        self._holds = None if self.rule != "schedule_free" else schedule_free.form(optimizer)[0]
        self._last_read: list = []  # what the last read found stepped
        self._released = False
        self._refresh_params()

    def betas(self, group: dict) -> tuple[float, float]:
        """``(β1, β2)`` of the Adam step ``group`` takes (schedule-free: ``(0, β2)``)."""
        return schedule_free.betas(group) if self._holds else betas_of(group)

    def lr(self, group: dict):
        """The lr the last step of ``group`` moved by (schedule-free: after its own warmup)."""
        return schedule_free.lr(group) if self._holds else step_lr(group) if "lr" in group else math.nan

    def decoupled(self, group: dict) -> bool:
        """Whether ``group``'s weight decay is kept out of the gradient its moments took in."""
        if self.foreign:
            return not self.l2_folded.get(id(group), next(iter(self.l2_folded.values()), False))
        return group.get("decoupled_weight_decay", isinstance(self.optimizer, torch.optim.AdamW))

    @property
    def unverified(self) -> bool:
        """Whether the class's own ``step`` is still to be checked against its base's rule."""
        return self._check is not None and not self._check.verified

    def _refresh_params(self) -> None:
        self.params: list[Tensor] = [p for g in self.optimizer.param_groups for p in g["params"]]
        self._position = {id(p): i for i, p in enumerate(self.params)}
        self._layout: _Layout | None = None
        # id(param) -> (its step tensor, the count it held, the last count read), carried from one
        # layout to the next: device-resident counts (fused, capturable) known without a read.
        self._counts: dict[int, tuple] = {}
        groups = [shard_group(p) for p in self.params]
        sharded = [g for g in groups if g is not None]
        self._group = None
        if sharded:
            self._group, rank = sharded[0]
            if any(g[0] is not self._group for g in sharded):
                raise UnsupportedOptimizer("parameters of one optimizer are sharded over different process groups")
            # Whole (unsharded) tensors are the same on every rank of the group: only its first
            # rank contributes them to the sum.
            keep = [1.0 if (g is not None or rank == 0) else 0.0 for g in groups]
            self._replica_weight = keep
            self._replica_rows: dict[torch.device, Tensor] = {}
        # Neither complex nor sharded (DTensor): real_view of every gradient and state tensor is the tensor.
        self._plain = not any(p.is_complex() or callable(getattr(p, "to_local", None)) for p in self.params)

    def _read_layout(self) -> tuple[_Layout, list]:
        """The layout of this read (the last one while the optimizer is as it found it) and
        every parameter's gradient."""
        grads = list(map(_GRAD, self.params))
        layout = self._layout
        if layout is not None and layout.current(self.optimizer, [g is not None for g in grads]):
            return layout, grads
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if len(params) != len(self.params) or not _same_objects(params, self.params):
            self._refresh_params()  # parameters added or replaced: counts start afresh
            grads = list(map(_GRAD, self.params))
        elif layout is not None:
            layout.save_counts(self._counts)
        self._layout = layout = _Layout(self, grads, self._counts)
        return layout, grads

    def _stepped(self, after_step: bool) -> _Stepped:
        """The params whose step count advanced, in buckets."""
        layout, grads = self._read_layout()
        if not layout.cand:
            _check_counted(layout, self.optimizer)
            return _NOTHING
        steps = layout.steps(self.optimizer, after_step)
        # A step skipped by a GradScaler leaves the count unchanged (at 0 when the very first
        # step is skipped, the state having just been created): not a step.
        stepped = (steps != 0) & (steps != layout.last)
        layout.last = steps
        if not stepped.any():
            return _NOTHING
        return _Stepped(layout, layout.plan(stepped, steps), steps, stepped, grads)

    def read(self, *, after_step: bool = False) -> tuple[Tensor, int] | None:
        """Rows ``(len(params), NUM_STATS)`` (float64) for the step just taken and its step count.

        Returns ``None`` when no parameter's step count advanced (a skipped step).
        ``after_step=True`` promises one call per ``optimizer.step()`` call, right after it (a step
        post-hook): step counts kept on the device are then known without reading them.
        """
        if self._given is None:
            return self._read(after_step)
        with self._given.restored():
            return self._read(after_step)

    def _read(self, after_step: bool) -> tuple[Tensor, int] | None:
        stepped = self._stepped(after_step)
        if not stepped:
            if self._check is not None and self._check.consumed():
                raise UnsupportedOptimizer(
                    f"{type(self.optimizer).__name__}.step() cleared the gradients it was given (p.grad is None "
                    "after it), so the gradient the step used cannot be read; keep it in p.grad, or mark the "
                    "optimizer with consume_grad = True (as HeavyBall's are): the monitor then holds the gradients "
                    "given to each step until it has read it"
                )
            return None
        if self._check is not None:
            self._check.after_step(stepped)
        self._last_read = stepped
        device = stepped.buckets[0].device
        try:
            rows = self._rows(stepped, device)
        finally:
            stepped.let_go()
        if self._group is not None:
            weight = self._replica_rows.get(device)
            if weight is None:
                weight = host_values(self._replica_weight, torch.float64, device).unsqueeze(1)
                self._replica_rows[device] = weight
            # Step counts advance identically on every rank, so all ranks reach this collective.
            rows.mul_(weight)
            all_reduce(rows, self._group)
        return rows, int(stepped.max_step())

    def _rows(self, stepped: _Stepped, device: torch.device) -> Tensor:
        """The rows of the stepped parameters (the others zero), on ``device``."""

        def zeros() -> Tensor:
            return torch.zeros(len(self.params), NUM_STATS, dtype=torch.float64, device=device)

        if self._in_step_statistics:
            rows = zeros()
            stats = self.optimizer.last_statistics
            for bucket in stepped.buckets:
                found = list(map(stats.get, bucket.params))
                kept = [i for i, row in enumerate(found) if row is not None]
                if not kept:
                    continue
                block = torch.stack([found[i].to(device) for i in kept]).to(torch.float64)
                if len(kept) == len(found):
                    index = bucket.index(device)
                else:
                    index = host_values([bucket.positions[i] for i in kept], torch.long, device)
                rows.index_copy_(0, index, block)
        else:
            parts = list(self._adam_rows(stepped))
            if len(parts) == 1 and parts[0][0].in_order:  # one bucket holding every parameter in order
                rows = parts[0][1].to(device, non_blocking=True)
            else:
                rows = zeros()
                for bucket, rows_part in parts:
                    rows.index_copy_(0, bucket.index(device), rows_part.to(device, non_blocking=True))
        return rows

    def _adam_rows(self, stepped: _Stepped) -> Iterable[tuple[_Bucket, Tensor]]:
        view = _same if self._plain else real_view
        buckets = chain.from_iterable(b.pieces(stepped.layout) if b.coded else (b,) for b in stepped.buckets)
        for bucket in buckets:
            group = self.optimizer.param_groups[bucket.gi]
            if self._holds:
                yield bucket, schedule_free.statistics(bucket.params, bucket.states, group, self._holds, view)
                continue
            step = stepped.step(bucket)
            beta1, beta2, terms_step = adam_terms(self, group, step)
            eps = _as_float(group["eps"])
            # low-bit moments as float32 copies, dropped with this piece
            states = list(map(dequantized, bucket.states)) if bucket.coded else bucket.states
            exp_avgs, exp_avg_sqs, max_exp_avg_sqs, layout = bucket.views(view, group.get("amsgrad", False), states)
            if _gradient_as_is(self.rule, self.decoupled(group), group):
                grads = bucket.grads(stepped.grads)
                if not self._plain:
                    grads = list(map(real_view, grads))
            else:
                grads = [self._gradient_used(p, state, group, step) for p, state in zip(bucket.params, states)]
            rectified = self.rule != "radam" or radam_rectification(beta2, step) is not None
            if self.rule in ("radam", "sparse_adam"):
                # These add ε to √v, not to √v̂: ε sets the step where √v̂ ≤ ε/√c2.
                eps = eps / (1 - beta2**step) ** 0.5
            rows = fast_adam_statistics(
                grads,
                exp_avgs,
                exp_avg_sqs,
                beta1=beta1,
                beta2=beta2,
                eps=eps,
                step=int(terms_step),
                max_exp_avg_sqs=max_exp_avg_sqs,
                layout=layout,
            )
            if self.rule != "adam":
                # The moments' statistics hold; the update is this optimizer's own direction.
                rows = rows.clone()
                for i, (p, state, g) in enumerate(zip(bucket.params, states, grads)):
                    u = self.direction(p, state, group, step, grad=g)
                    rows[i, UPDATE_SQ] = u.double().square().sum()
                if not rectified:
                    rows[:, EPS_COUNT] = 0.0  # the step is the momentum alone: no ε in it
            yield bucket, rows

    def _gradient_used(self, p: Tensor, state: dict, group: dict, step: float) -> Tensor:
        """The gradient the moments took in: ``p.grad`` (sign-flipped under ``maximize`` where the
        direction needs the sign), plus λ·p_{t-1} under L2 decay."""
        grad = real_view(p.grad.coalesce().to_dense() if p.grad.is_sparse else p.grad)
        wd = group.get("weight_decay", 0.0)
        decoupled = self.decoupled(group)
        used = -grad if group.get("maximize", False) else grad
        if not wd or decoupled:
            # Only NAdam's and registered directions read g itself; the sign changes no statistic.
            return used if self.rule in ("nadam", "registered") else grad
        if self.rule == "registered":
            raise UnsupportedOptimizer(
                f"the moments of {type(self.optimizer).__name__} took in L2 weight decay (g + λ·p), and a "
                "registered direction is read only with decoupled weight decay or none (the gradient it needs "
                "holds p before the step, which is gone after it)"
            )
        param = real_view(p.detach())
        lr = _as_float(step_lr(group))
        if self.rule == "nadam":
            # u = a·g_used/d + b·m/d holds g_used itself, and g_used = g + λ·(p_t + η·u): solved per coordinate.
            b_m = _nadam(None, state, group, step)
            a = _nadam(torch.ones_like(grad), state, group, step) - b_m
            return (used + wd * (param + lr * b_m)) / (1 - wd * lr * a)
        # Adam's and RAdam's L2 decay fed g + λ·p_{t-1} into the moments; p_{t-1} = p_t + η·u_t.
        return used + wd * (param + lr * self.direction(p, state, group, step))

    def direction(self, p: Tensor, state: dict, group: dict, step: float, *, grad: Tensor | None = None) -> Tensor:
        """The direction of ``p``'s last step (the applied step over the lr, decoupled decay
        excluded), rebuilt from state: Adam's ``m̂_t / (√v̂_t + ε)``, RAdam's rectified one, or
        NAdam's or a registered one, which also need the gradient the step used (``grad``; rebuilt
        when not given)."""
        if self.rule == "registered":
            return _registered_direction(self, p, state, group, step, grad)
        if self._holds:
            return schedule_free.direction(p, state, group, self._holds)
        beta1, beta2 = betas_of(group)
        if self.rule == "nadam":
            return _nadam(self._gradient_used(p, state, group, step) if grad is None else grad, state, group, step)
        if self.rule == "sparse_adam":
            return _sparse_adam_direction(p, state, beta1, beta2, _as_float(group["eps"]), step)
        if self.rule == "radam":
            return radam_direction(
                real_view(state["exp_avg"]),
                real_view(state["exp_avg_sq"]),
                beta1=beta1,
                beta2=beta2,
                eps=_as_float(group["eps"]),
                step=step,
            )
        v = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
        beta1, beta2, step = adam_terms(self, group, step)
        return adam_direction(
            real_view(state["exp_avg"]),
            real_view(v),
            bias_correction1=1 - beta1**step,
            bias_correction2=1 - beta2**step,
            eps=_as_float(group["eps"]),
        )

    def release(self) -> None:
        """Stop what reading needed: the optimizer's in-step recording (once no other reader of
        it is left), the update check's hook. Once; later calls do nothing."""
        if self._in_step_statistics and not self._released:
            self._released = True
            self.optimizer._statistics_readers = max(getattr(self.optimizer, "_statistics_readers", 1) - 1, 0)
            if self.optimizer._statistics_readers == 0:
                self.optimizer.record_statistics = False
        if self._check is not None:
            self._check.remove()
            self._check = None
        if self._given is not None:
            self._given.remove()
            self._given = None


def updates(reader: StepReader) -> Iterable[tuple[Tensor, Tensor]]:
    """(param, direction) for every parameter of ``reader``'s optimizer whose last step can be
    rebuilt now (for histograms)."""
    for group in reader.optimizer.param_groups:
        for p in group["params"]:
            state = reader.optimizer.state.get(p)
            state = dequantized(state) if state and reader.foreign else state
            if not state or ("exp_avg" not in state and not (reader._holds and p.grad is not None)):
                continue
            if reader.rule in ("nadam", "registered") and p.grad is None:
                continue  # its direction needs the gradient, which the step cleared
            if reader._in_step_statistics and hasattr(reader.optimizer, "direction"):
                yield p, reader.optimizer.direction(p)
            elif not reader._in_step_statistics:
                yield p, reader.direction(p, state, group, _as_float(step_of(state, group)))


def at_step_start(optimizer: torch.optim.Optimizer, callback) -> torch.utils.hooks.RemovableHandle:
    """Call ``callback()`` where each step of ``optimizer`` starts from its gradients: when it is
    called, or where it is given a closure (Lightning's automatic optimization), when the closure
    returns (the gradients before it are the last step's, or none). Not inside the step of a base
    class that a subclass's step calls."""

    def before(opt, args: tuple, kwargs: dict):
        if nested_step(opt):
            return None
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args[0]: the optimizer
        if closure is None:
            callback()
            return None

        def closure_then_callback():
            loss = closure()
            callback()
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_callback}
        return (args[0], closure_then_callback, *args[2:]), kwargs

    return optimizer.register_step_pre_hook(before)


class _GivenGradients:
    """The gradients given to a step that clears them (HeavyBall's default ``consume_grad=True``):
    held when the step starts from them (:func:`at_step_start`; references, no copies: the step
    reads them in place), put back in ``p.grad`` while the step is read, cleared again after it."""

    def __init__(self, reader: StepReader):
        self._reader = reader
        self._given: list[tuple[Tensor, Tensor]] = []
        self._hook = at_step_start(reader.optimizer, self._hold)

    def _hold(self) -> None:
        params = self._reader.params
        self._given = [(p, g) for p, g in zip(params, map(_GRAD, params)) if g is not None]

    @contextlib.contextmanager
    def restored(self):
        given, self._given = self._given, []
        back = [(p, g) for p, g in given if p.grad is None]
        for p, g in back:
            p.grad = g
        try:
            yield
        finally:
            for p, g in back:
                if p.grad is g:
                    p.grad = None

    def remove(self) -> None:
        self._hook.remove()
        self._given = []


def _registered_direction(reader: StepReader, p: Tensor, state: dict, group: dict, step: float, grad) -> Tensor:
    """The direction registered for the reader's class; what it gets wrong (an error, another
    shape) is reported as the reason the optimizer cannot be read, never raised into the step."""
    grad = reader._gradient_used(p, state, group, step) if grad is None else grad
    name = type(reader.optimizer).__name__
    try:
        u = reader._registered(state, grad, group, step)
    except Exception as error:
        raise UnsupportedOptimizer(
            f"the direction registered for {name} raised {type(error).__name__}: {error}"
        ) from None
    if not isinstance(u, Tensor) or u.numel() != grad.numel():
        got = tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__
        raise UnsupportedOptimizer(
            f"the direction registered for {name} returned {got} for a parameter of shape {tuple(grad.shape)}"
        )
    return real_view(u).reshape(grad.shape)


def curvature(reader: StepReader) -> Tensor | None:
    """The ``CURVATURE_FIELDS`` sums (float64, 3) pooled over the tensors of the step ``reader``
    read last, for the preconditioned sharpness; ``None`` where the direction is not Adam's own
    ``m̂/(√v̂+ε)`` (NAdam, RAdam, SparseAdam, amsgrad, in-step statistics), the tensors are sharded
    or their moments are kept in low-bit codes."""
    if reader.rule != "adam" or reader._group is not None or not reader._last_read:
        return None
    if any(b.coded for b in reader._last_read.buckets):
        return None  # low-bit moments: every tensor's float32 copy would be held at once
    buckets: dict[tuple, list] = defaultdict(list)
    for gi, group, p, state, step in reader._last_read:
        if group.get("amsgrad", False):
            return None
        buckets[(gi, step, p.device, p.dtype)].append((p, state))
    total = None
    for (gi, step, _, _), members in buckets.items():
        group = reader.optimizer.param_groups[gi]
        beta1, beta2, terms_step = adam_terms(reader, group, step)
        sums = curvature_sums(
            [reader._gradient_used(p, s, group, step) for p, s in members],
            [real_view(s["exp_avg"]) for _, s in members],
            [real_view(s["exp_avg_sq"]) for _, s in members],
            beta1=beta1,
            beta2=beta2,
            eps=_as_float(group["eps"]),
            step=int(terms_step),
        ).sum(0)
        total = sums if total is None else total + sums.to(total.device)
    return total


def _head(t: Tensor, numel: int = VERIFIED_NUMEL) -> Tensor:
    """The first ``numel`` coordinates of ``t`` (its local shard's real view), as a copy."""
    return real_view(t.detach()).reshape(-1)[:numel].clone()


def _rounding(dtype: torch.dtype, *parts: Tensor) -> Tensor:
    """An allowance for float rounding in a difference of ``parts`` (of ``dtype``), as a norm."""
    return 4 * torch.finfo(dtype).eps * sum(p.abs().double() for p in parts).norm()


def _learn_gradient_form(reader: StepReader, seen: list) -> None:
    """For a class outside torch's, from ``m_t = β·m_{t−1} + (1 − β)·g_used`` on the sampled
    coordinates: whether its moments took in ``p.grad`` as it is after the step or with L2 decay
    ``λ·p_{t−1}`` folded in, and whether they are kept raw (``β = β1``, torch's) or bias-corrected
    (``β = β̂1_t``); then that ``v`` is the EMA of ``g_used²`` the staleness rebuilds
    ``v_{t−1}`` from. ``UnsupportedOptimizer`` where they are not."""
    name = type(reader.optimizer).__name__
    for p, before, moments, group, state, step in seen:
        if moments is None or p.grad is None:
            continue
        beta1, beta2 = betas_of(group)
        wd = _as_float(group.get("weight_decay", 0.0))
        n = before.numel()
        m_before, v_before = (t.double() for t in moments)
        m_after, v_after = (_head(state[k], n).double() for k in ("exp_avg", "exp_avg_sq"))
        grad = _head(p.grad.to_dense() if p.grad.is_sparse else p.grad, n).double()
        if group.get("maximize", False):
            grad = -grad
        dtype, found = state["exp_avg"].dtype, None
        # What was found before is tried first: late in a run β̂1_t → β1, and both forms fit.
        for debiased in (reader.debiased, not reader.debiased):
            beta = debiased_beta(beta1, step) if debiased else beta1
            taken = (m_after - beta * m_before) / (1 - beta)
            allowed = 1e-3 * taken.norm() + _rounding(dtype, m_after, m_before) / (1 - beta)
            folded_before = reader.l2_folded.get(id(group), False)
            for folded in (folded_before, not folded_before) if wd else (False,):
                used = grad + wd * before.double() if folded else grad
                if (taken - used).norm() <= allowed:
                    found = debiased, folded, used
                    break
            if found:
                break
        if found is None:
            raise UnsupportedOptimizer(
                f"the first moment of {name} took in neither the gradient p.grad holds after its step nor "
                "that plus L2 decay (its step changes the gradient before the moments see it), so its "
                "diagnostics would be wrong"
            )
        reader.debiased, reader.l2_folded[id(group)], used = found
        beta = debiased_beta(beta2, step) if reader.debiased else beta2
        taken = (v_after - beta * v_before) / (1 - beta)
        allowed = 1e-3 * used.square().norm() + _rounding(dtype, v_after, v_before) / (1 - beta)
        if not (taken - used.square()).norm() <= allowed:
            raise UnsupportedOptimizer(
                f"the second moment of {name} is not the moving average of the squared gradient Adam's is "
                "(exp_avg_sq ≠ β2·v + (1 − β2)·g²), so its staleness would be wrong"
            )


def _head_direction(reader: StepReader, p: Tensor, state: dict, group: dict, step: float, n: int) -> Tensor:
    """The first ``n`` coordinates of ``reader.direction``: from those of the moments alone where the
    direction is Adam's (no pass over the whole tensor at every step)."""
    if reader.rule != "adam" or group.get("amsgrad", False):
        return reader.direction(p, state, group, step).reshape(-1)[:n]
    beta1, beta2, step = adam_terms(reader, group, step)
    return adam_direction(
        _head(state["exp_avg"], n),
        _head(state["exp_avg_sq"], n),
        bias_correction1=1 - beta1**step,
        bias_correction2=1 - beta2**step,
        eps=_as_float(group["eps"]),
    )


def _low_bit_direction(
    reader: StepReader, p: Tensor, before: Tensor, moments: tuple[Tensor, Tensor], group: dict, step: float
) -> Tensor:
    """Adam's direction on the first coordinates of ``p`` from the moments before its step (as
    they dequantized) and the gradient it took in: the float values a low-bit optimizer steps with
    and then rounds back into its codes, which the codes after the step hold only to their resolution."""
    beta1, beta2, terms_step = adam_terms(reader, group, step)
    n = before.numel()
    grad = _head(p.grad, n).double()
    if group.get("maximize", False):
        grad = -grad
    if reader.l2_folded.get(id(group), False):
        grad = grad + _as_float(group.get("weight_decay", 0.0)) * before.double()
    raw1 = debiased_beta(beta1, step) if reader.debiased else beta1
    raw2 = debiased_beta(beta2, step) if reader.debiased else beta2
    m = raw1 * moments[0].double() + (1 - raw1) * grad
    v = raw2 * moments[1].double() + (1 - raw2) * grad.square()
    return adam_direction(
        m,
        v,
        bias_correction1=1 - beta1**terms_step,
        bias_correction2=1 - beta2**terms_step,
        eps=_as_float(group["eps"]),
    )


def _check_low_bit(reader: StepReader, p: Tensor, state: dict, group: dict, step: float, stepped: Tensor) -> None:
    """The direction read from a low-bit state after its step against the one the step took
    (``stepped``): the moments' codes must hold it to their own resolution (4 units of the float
    format of the same resolution, :func:`~adam_monitor.engine.moments.state_dtype`). FP8 codes with one scale per block flush
    a block's small second moments to 0, and the direction read there is ε-sized: refused."""
    read = _head_direction(reader, p, state, group, step, stepped.numel()).double()
    resolution = 4 * torch.finfo(state_dtype(reader.optimizer.state[p], p.dtype)).eps
    drift = float((read - stepped).norm() / stepped.norm().clamp_min(1e-300))
    if not drift <= resolution:
        name = type(reader.optimizer).__name__
        raise UnsupportedOptimizer(
            f"the low-bit state of {name} does not hold the moments its step used (the direction read from it "
            f"differs from the step's by {drift:.0%} RMS at step {int(step)}, beyond its {resolution:.0%} "
            "resolution), so its diagnostics would be wrong"
        )


def _kept(reader: StepReader, before: Tensor, after: Tensor, u: Tensor, group: dict) -> Tensor:
    """What of ``before`` the step kept, decoupled weight decay being the only other change: torch's
    ``(1 − η·λ)``; for another class the factor fits the step best within ``[1 − λ, 1]`` (forms of
    decoupled decay differ: ``η·λ``, ``λ``, ``λ·η/η_max``)."""
    lr, wd = _as_float(step_lr(group)), _as_float(group.get("weight_decay", 0.0))
    if not wd or not reader.decoupled(group):
        return before
    if not reader.foreign:
        return before * (1 - lr * wd)
    b = before.double()
    fit = float((b * (after.double() + lr * u)).sum() / b.square().sum().clamp_min(1e-300))
    return before * min(max(fit, 1 - wd), 1.0)


class UpdateCheck:
    """Checks once that an optimizer whose class has a ``step`` of its own (or is not torch's)
    updates as Adam's rule says, on the coordinates it keeps before a step (a pre-hook) and finds
    after it."""

    def __init__(self, reader: StepReader):
        self.reader = reader
        self.verified = False
        self._first = 0  # where in the parameters the next check's sample starts
        # (param, its first coordinates before the step, those of its moments (m, v) or None)
        self._samples: list[tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]] = []
        self._hook = at_step_start(reader.optimizer, self._sample)

    def after_step(self, stepped) -> None:
        """Check the step just read where it was sampled (``UnsupportedOptimizer`` if not Adam's)."""
        if self._samples and self.verify(stepped):
            self.verified = True

    def _sample(self) -> None:
        """Before a step: the first ``VERIFIED_NUMEL`` coordinates of a few parameters."""
        params = self.reader.params
        start = self._first % max(len(params), 1)
        state = self.reader.optimizer.state
        turn = (p for p in chain(params[start:], params[:start]) if p.grad is not None)
        if not self.verified and self.reader.foreign:
            # Low-bit state first: the step read before it is checked would be the least certain.
            turn = sorted(turn, key=lambda p: not low_bit(state.get(p, {})))
        with_grad = list(islice(turn, VERIFIED_TENSORS))
        self._first = start + VERIFIED_TENSORS
        self._samples = []
        for p in with_grad:
            kept = state.get(p, {})
            readable = dequantized(kept)
            m, v = readable.get("exp_avg"), readable.get("exp_avg_sq")
            moments = (_head(m), _head(v)) if isinstance(m, Tensor) and isinstance(v, Tensor) else None
            self._samples.append((p, _head(p), moments, low_bit(kept)))

    def consumed(self) -> bool:
        """Whether the step just taken cleared every gradient it was given."""
        return bool(self._samples) and all(p.grad is None for p, *_ in self._samples)

    def verify(self, stepped) -> bool:
        """The step of the optimizer against its rule rebuilt from state: read on if they agree
        (to float rounding), else ``UnsupportedOptimizer`` saying by how much they differ. A step
        at lr = 0 shows nothing, nor does the first (every coordinate ±1, as a sign or a masked
        update would also give): ``False``, the next one is checked."""
        seen, coded_ids = [], set()
        position = self.reader._position
        for p, before, m_before, coded in self._samples:
            found = stepped.find(position[id(p)]) if id(p) in position else None
            if found is None:
                continue
            group, state, step = found
            if "exp_avg" not in state or "exp_avg_sq" not in state:
                return False  # not Adam's state at all: the read says so
            if _as_float(step_lr(group)) == 0 or step < 2:
                return False  # Adam's first step is sign descent, which many other updates agree with
            if coded and (m_before is None or self.reader.rule != "adam" or group.get("amsgrad", False)):
                return False  # a low-bit state's step is rebuilt from the moments before it, Adam's only
            if coded:
                coded_ids.add(id(p))
            seen.append((p, before, m_before, group, state, step))
        if not seen:
            return False
        self._samples = []
        if self.reader.foreign:
            # A low-bit moment's one-step increment is below its resolution: the form is learned
            # on full-precision state only (torchao keeps small tensors so).
            _learn_gradient_form(self.reader, [x for x in seen if id(x[0]) not in coded_ids])
        measured, rebuilt, rounding = [], [], []
        for p, before, m_before, group, state, step in seen:
            lr = _as_float(step_lr(group))
            after = real_view(p.detach()).reshape(-1)[: before.numel()]
            if id(p) in coded_ids:
                # What the step computed in float before rounding its moments back into their codes.
                u = _low_bit_direction(self.reader, p, before, m_before, group, step).double()
                _check_low_bit(self.reader, p, state, group, step, u)
            else:
                u = _head_direction(self.reader, p, state, group, step, before.numel()).double()
            measured.append(((_kept(self.reader, before, after, u, group) - after) / lr).double())
            rebuilt.append(u)
            rounding.append(_rounding(before.dtype, before, after) / lr)
        error = torch.cat(measured).sub_(torch.cat(rebuilt)).norm()
        size = torch.cat(rebuilt).norm()
        if not error <= 1e-3 * size + torch.stack(rounding).norm():
            name = type(self.reader.optimizer).__name__
            base = next((b.__name__ for b in type(self.reader.optimizer).__mro__ if b in UPDATE_RULES), "Adam")
            kind = "a step() of its own" if not self.reader.foreign else "a step()"
            at = f"at step {int(seen[0][-1])} " if self.verified else ""
            differs = f"{float(error / size) if size > 0 else math.inf:.1%} RMS"
            if self.reader.rule == "registered":
                raise UnsupportedOptimizer(
                    f"the step of {name} is not the direction registered for it ({at}the step it applied differs "
                    f"from that direction by {differs}), so its diagnostics would be wrong"
                )
            raise UnsupportedOptimizer(
                f"{name} has {kind} whose update is not {base}'s ({at}the step it applied differs from {base}'s, "
                f"rebuilt from its state, by {differs}), so its "
                "diagnostics would be wrong"
            )
        return True

    def remove(self) -> None:
        self._samples = []
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
