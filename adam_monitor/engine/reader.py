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

import math
import sys
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import Tensor

from .._runtime import host_values
from ..diagnostics.compiled import fast_adam_statistics
from ..diagnostics.reference import adam_direction, nadam_direction, radam_direction, radam_rectification
from ..diagnostics.rows import EPS_COUNT, NUM_STATS, UPDATE_SQ
from ..diagnostics.sharpness import curvature_sums

__all__ = [
    "StepReader",
    "UnsupportedOptimizer",
    "curvature",
    "unsupported_reason",
    "local_tensor",
    "real_view",
    "shard_group",
]


#: A class with a ``step`` of its own is read once a step after its first (Adam's first is sign
#: descent, which other updates share) matches its base's rule, checked on the first coordinates
#: of its first parameters (enough to tell another update from rounding).
VERIFIED_NUMEL, VERIFIED_TENSORS = 4096, 8


def all_reduce(tensor: Tensor, group) -> None:
    """The one collective of a step under sharding (module-level so tests can count it)."""
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM, group=group)


class UnsupportedOptimizer(Exception):
    """The optimizer's state cannot be read as Adam state; the message says what is missing."""


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2), the tensor itself otherwise."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _gradient_as_is(rule: str, optimizer: torch.optim.Optimizer, group: dict) -> bool:
    """Whether the gradient a step of ``group`` used is ``p.grad`` itself (no L2 decay folded in,
    no sign the direction needs, not sparse)."""
    if (rule == "nadam" and group.get("maximize", False)) or rule == "sparse_adam":
        return False
    decoupled = group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))
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
    ``None`` for any other optimizer."""
    for base in type(optimizer).__mro__:
        if base in UPDATE_RULES:
            return UPDATE_RULES[base], _function(type(optimizer).step) is not _function(base.step)
    return None


def unsupported_reason(optimizer: torch.optim.Optimizer) -> str | None:
    """Why this optimizer cannot be monitored, or ``None`` if it can (checks the configuration only)."""
    if _records_statistics(optimizer):
        return None
    if update_rule(optimizer) is None:
        return (
            f"{type(optimizer).__name__} is not torch.optim.Adam, AdamW, NAdam, RAdam, SparseAdam or an "
            "adam_monitor.optim optimizer, so its state is not Adam's (exp_avg, exp_avg_sq, step)"
        )
    for i, group in enumerate(optimizer.param_groups):
        missing = [k for k in ("betas", "eps") if k not in group]
        if missing:
            return f"param group {i} of {type(optimizer).__name__} has no {', '.join(missing)}"
    return None


def _cpu_steps(raw: list) -> list[float] | None:
    """The step counts as floats when all are CPU tensors (read through numpy views), else ``None``."""
    try:
        if all(isinstance(r, Tensor) and r.device.type == "cpu" and not r.requires_grad for r in raw):
            return [float(r.numpy()) for r in raw]
    except (TypeError, RuntimeError):  # a dtype numpy lacks: the stacked read handles it
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
    beta1, beta2 = (_as_float(b) for b in group["betas"])
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
        if self._in_step_statistics:
            optimizer.record_statistics = True
            # Another reader (a second Monitor, an AdamDiagnostics) may share the optimizer: the
            # last one released turns the recording off.
            optimizer._statistics_readers = getattr(optimizer, "_statistics_readers", 0) + 1
            self.rule, self.overridden = "in_step", False
        else:
            self.rule, self.overridden = update_rule(optimizer)
        self._check = UpdateCheck(self) if self.overridden else None
        self._last_read: list = []  # what the last read found stepped
        self._released = False
        self._refresh_params()

    @property
    def unverified(self) -> bool:
        """Whether the class's own ``step`` is still to be checked against its base's rule."""
        return self._check is not None

    def _refresh_params(self) -> None:
        self.params: list[Tensor] = [p for g in self.optimizer.param_groups for p in g["params"]]
        self._position = {id(p): i for i, p in enumerate(self.params)}
        self._last_step: dict[int, float] = {}
        # id(param) -> (its step tensor, the count it held at the last hook): device-resident counts
        # (fused, capturable) known without a read.
        self._known_step: dict[int, tuple[Tensor, float]] = {}
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
        # Neither complex nor sharded (DTensor): real_view of every gradient and state tensor is the tensor.
        self._plain = not any(p.is_complex() or callable(getattr(p, "to_local", None)) for p in self.params)

    def _check_params(self) -> None:
        if sum(len(g["params"]) for g in self.optimizer.param_groups) != len(self.params):
            self._refresh_params()

    def _stepped(self, after_step: bool) -> list[tuple[int, dict, Tensor, dict, float]]:
        """(group index, group, param, state, step) of the params whose step count advanced."""
        candidates = []
        for gi, group in enumerate(self.optimizer.param_groups):
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.optimizer.state.get(p)
                if not state or "step" not in state:
                    continue
                candidates.append((gi, group, p, state))
        if not candidates:
            return []
        raw = [s["step"] for _, _, _, s in candidates]
        steps = None
        if isinstance(raw[0], Tensor):
            # Counts this reader has seen are counted on the host: a read is a sync per step on a
            # device, and a Python call per tensor on the CPU.
            steps = self._counted_steps(candidates, raw) if after_step else None
            if steps is None:
                steps = _cpu_steps(raw) or _read_steps(raw)  # CPU-resident counts are read in place
            for (_, _, p, _), r, step in zip(candidates, raw, steps):
                self._known_step[id(p)] = (r, step)
        if steps is None:
            steps = [float(r) for r in raw]
        out = []
        for (gi, group, p, state), step in zip(candidates, steps):
            # A step skipped by a GradScaler leaves the count unchanged (at 0 when the very first
            # step is skipped, the state having just been created): not a step.
            if step == 0 or step == self._last_step.get(id(p)):
                continue
            self._last_step[id(p)] = step
            out.append((gi, group, p, state, step))
        return out

    def _counted_steps(self, candidates, raw) -> list[float] | None:
        """Step counts from the host's own count where that is certain.

        Reading them is a sync per step where they live on a device (fused, capturable), and a
        Python call per tensor on the CPU. Without a GradScaler every ``step()`` adds one to the
        count of each parameter with a gradient, so a count this reader has seen before (the same
        tensor object: a loaded state brings new ones) is one more now. Under a GradScaler a fused
        kernel takes the increment back on an inf/NaN step, which only the device knows: the
        scaler sets ``optimizer.found_inf`` for the duration of the step, and then this returns
        ``None`` (read them).
        """
        if (
            getattr(self.optimizer, "found_inf", None) is not None
            or getattr(self.optimizer, "grad_scale", None) is not None
        ):
            return None
        steps = []
        for (_, _, p, _), r in zip(candidates, raw):
            known = self._known_step.get(id(p))
            if known is None or known[0] is not r:
                return None
            steps.append(known[1] + 1)
        return steps

    def read(self, *, after_step: bool = False) -> tuple[Tensor, int] | None:
        """Rows ``(len(params), NUM_STATS)`` (float64) for the step just taken and its step count.

        Returns ``None`` when no parameter's step count advanced (a skipped step).
        ``after_step=True`` promises one call per ``optimizer.step()`` call, right after it (a step
        post-hook): step counts kept on the device are then known without reading them.
        """
        self._check_params()
        stepped = self._stepped(after_step)
        if not stepped:
            return None
        if self._check is not None and self._check.verify(stepped):
            self._check = None
        self._last_read = stepped
        device = local_tensor(stepped[0][2]).device

        def zeros() -> Tensor:
            return torch.zeros(len(self.params), NUM_STATS, dtype=torch.float64, device=device)

        if self._in_step_statistics:
            rows = zeros()
            stats = self.optimizer.last_statistics
            for _, _, p, _, _ in stepped:
                row = stats.get(p)
                if row is not None:
                    rows[self._position[id(p)]] = row.to(device, non_blocking=True)
        else:
            parts = list(self._adam_rows(stepped))
            if len(parts) == 1 and parts[0][0] is None:  # one bucket holding every parameter in order
                rows = parts[0][1].to(device, non_blocking=True)
            else:
                rows = zeros()
                for positions, rows_part in parts:
                    rows.index_copy_(
                        0, host_values(positions, torch.long, device), rows_part.to(device, non_blocking=True)
                    )
        if self._group is not None:
            # Step counts advance identically on every rank, so all ranks reach this collective.
            rows.mul_(host_values(self._replica_weight, torch.float64, device).unsqueeze(1))
            all_reduce(rows, self._group)
        return rows, int(max(s for *_, s in stepped))

    def _adam_rows(self, stepped) -> Iterable[tuple[list[int] | None, Tensor]]:
        buckets: dict[tuple, list] = defaultdict(list)
        view = _same if self._plain else real_view
        for gi, _group, p, state, step in stepped:
            buckets[(gi, step, p.grad.device, p.grad.dtype)].append((p, state))
        for members in buckets.values():
            for _p, state in members:
                missing = [k for k in ("exp_avg", "exp_avg_sq") if k not in state]
                if missing:
                    raise UnsupportedOptimizer(
                        f"its state has no {' or '.join(missing)} (keys: {sorted(state)}), so it is not torch's Adam state"
                    )
        for (gi, step, _, _), members in buckets.items():
            group = self.optimizer.param_groups[gi]
            beta1, beta2 = (_as_float(b) for b in group["betas"])
            eps = _as_float(group["eps"])
            amsgrad = group.get("amsgrad", False)
            if _gradient_as_is(self.rule, self.optimizer, group):
                grads = [view(p.grad) for p, _ in members]
            else:
                grads = [self._gradient_used(p, state, group, step) for p, state in members]
            rectified = self.rule != "radam" or radam_rectification(beta2, step) is not None
            if self.rule in ("radam", "sparse_adam"):
                # These add ε to √v, not to √v̂: ε sets the step where √v̂ ≤ ε/√c2.
                eps = eps / (1 - beta2**step) ** 0.5
            rows = fast_adam_statistics(
                grads,
                [view(s["exp_avg"]) for _, s in members],
                [view(s["exp_avg_sq"]) for _, s in members],
                beta1=beta1,
                beta2=beta2,
                eps=eps,
                step=int(step),
                max_exp_avg_sqs=[view(s["max_exp_avg_sq"]) for _, s in members] if amsgrad else None,
            )
            if self.rule != "adam":
                # The moments' statistics hold; the update is this optimizer's own direction.
                rows = rows.clone()
                for i, ((p, state), g) in enumerate(zip(members, grads)):
                    u = self.direction(p, state, group, step, grad=g)
                    rows[i, UPDATE_SQ] = u.double().square().sum()
                if not rectified:
                    rows[:, EPS_COUNT] = 0.0  # the step is the momentum alone: no ε in it
            positions = [self._position[id(p)] for p, _ in members]
            if len(positions) == len(self.params) and positions == list(range(len(self.params))):
                yield None, rows  # rows already in parameter order: no scatter
            else:
                yield positions, rows

    def _gradient_used(self, p: Tensor, state: dict, group: dict, step: float) -> Tensor:
        """The gradient the moments took in: ``p.grad`` (sign-flipped under ``maximize`` where the
        direction needs the sign), plus λ·p_{t-1} under L2 decay."""
        grad = real_view(p.grad.coalesce().to_dense() if p.grad.is_sparse else p.grad)
        wd = group.get("weight_decay", 0.0)
        decoupled = group.get("decoupled_weight_decay", isinstance(self.optimizer, torch.optim.AdamW))
        used = -grad if group.get("maximize", False) else grad
        if not wd or decoupled:
            # Only NAdam's direction reads g itself; the sign changes no statistic.
            return used if self.rule == "nadam" else grad
        param = real_view(p.detach())
        lr = _as_float(group["lr"])
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
        NAdam's, which also needs the gradient the step used (``grad``; rebuilt when not given)."""
        beta1, beta2 = (_as_float(b) for b in group["betas"])
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
        return adam_direction(
            real_view(state["exp_avg"]),
            real_view(v),
            bias_correction1=1 - beta1**step,
            bias_correction2=1 - beta2**step,
            eps=_as_float(group["eps"]),
        )

    def updates(self) -> Iterable[tuple[Tensor, Tensor]]:
        """(param, direction) for every parameter with Adam state (for histograms)."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                state = self.optimizer.state.get(p)
                if not state or "exp_avg" not in state:
                    continue
                if self._in_step_statistics and hasattr(self.optimizer, "direction"):
                    yield p, self.optimizer.direction(p)
                elif not self._in_step_statistics:
                    yield p, self.direction(p, state, group, _as_float(state["step"]))

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


def curvature(reader: StepReader) -> Tensor | None:
    """The ``CURVATURE_FIELDS`` sums (float64, 3) pooled over the tensors of the step ``reader``
    read last, for the preconditioned sharpness; ``None`` where the direction is not Adam's own
    ``m̂/(√v̂+ε)`` (NAdam, RAdam, SparseAdam, amsgrad, in-step statistics) or the tensors are sharded."""
    if reader.rule != "adam" or reader._group is not None or not reader._last_read:
        return None
    buckets: dict[tuple, list] = defaultdict(list)
    for gi, group, p, state, step in reader._last_read:
        if group.get("amsgrad", False):
            return None
        buckets[(gi, step, p.device, p.dtype)].append((p, state))
    total = None
    for (gi, step, _, _), members in buckets.items():
        group = reader.optimizer.param_groups[gi]
        beta1, beta2 = (_as_float(b) for b in group["betas"])
        sums = curvature_sums(
            [reader._gradient_used(p, s, group, step) for p, s in members],
            [real_view(s["exp_avg"]) for _, s in members],
            [real_view(s["exp_avg_sq"]) for _, s in members],
            beta1=beta1,
            beta2=beta2,
            eps=_as_float(group["eps"]),
            step=int(step),
        ).sum(0)
        total = sums if total is None else total + sums.to(total.device)
    return total


class UpdateCheck:
    """Checks once that an optimizer whose class has a ``step`` of its own updates as its base's
    rule says, on the coordinates it keeps before a step (a pre-hook) and finds after it."""

    def __init__(self, reader: StepReader):
        self.reader = reader
        self._samples: list[tuple[Tensor, Tensor]] = []  # (param, its first coordinates before the step)
        self._hook = reader.optimizer.register_step_pre_hook(lambda *_: self._sample())

    def _sample(self) -> None:
        """Before a step: the first ``VERIFIED_NUMEL`` coordinates of a few parameters."""
        if nested_step(self.reader.optimizer):
            return  # the base's step inside the subclass's: the parameters before it are not the step's
        with_grad = [p for p in self.reader.params if p.grad is not None][:VERIFIED_TENSORS]
        self._samples = [(p, real_view(p.detach()).reshape(-1)[:VERIFIED_NUMEL].clone()) for p in with_grad]

    def verify(self, stepped) -> bool:
        """The step of a class with a ``step`` of its own against its base's rule rebuilt from state:
        read on if they agree (to float rounding), else ``UnsupportedOptimizer`` saying by how much
        they differ. A step at lr = 0 shows nothing, nor does the first (every coordinate ±1, as
        a sign or a masked update would also give): ``False``, the next one is checked."""
        now = {id(p): (group, state, step) for _, group, p, state, step in stepped}
        measured, rebuilt, rounding = [], [], []
        for p, before in self._samples:
            if id(p) not in now:
                continue
            group, state, step = now[id(p)]
            if "exp_avg" not in state or "exp_avg_sq" not in state:
                return False  # not Adam's state at all: the read says so
            lr, wd = _as_float(group["lr"]), _as_float(group.get("weight_decay", 0.0))
            if lr == 0 or step < 2:
                return False  # Adam's first step is sign descent, which many other updates agree with
            decoupled = group.get("decoupled_weight_decay", isinstance(self.reader.optimizer, torch.optim.AdamW))
            after = real_view(p.detach()).reshape(-1)[: before.numel()]
            kept = before * (1 - lr * wd) if decoupled else before
            measured.append(((kept - after) / lr).double())
            rebuilt.append(self.reader.direction(p, state, group, step).reshape(-1)[: before.numel()].double())
            rounding.append(4 * torch.finfo(before.dtype).eps * (before.abs() + after.abs()).double() / lr)
        if not measured:
            return False
        error = torch.cat(measured).sub_(torch.cat(rebuilt)).norm()
        size = torch.cat(rebuilt).norm()
        self.remove()
        if not error <= 1e-3 * size + torch.cat(rounding).norm():
            base = next(b for b in type(self.reader.optimizer).__mro__ if b in UPDATE_RULES).__name__
            raise UnsupportedOptimizer(
                f"{type(self.reader.optimizer).__name__} has a step() of its own whose update is not {base}'s "
                f"(the step it applied differs from {base}'s, rebuilt from its state, by "
                f"{float(error / size) if size > 0 else math.inf:.1%} RMS), so its diagnostics would be wrong"
            )
        return True

    def remove(self) -> None:
        self._samples = []
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
