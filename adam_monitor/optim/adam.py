"""The configurable Adam: validation, state, and the choice of path for each batch of tensors.

With ``compiled=None`` (the default) each batch of tensors takes the fastest path that computes
the same step:

* ``normalize="adam"`` without clipping, β2 schedule or statistics (``Adam``, ``AdamD``):
  torch's own fused AdamW kernel, on the CPU and on CUDA;
* otherwise on CUDA, without statistics: torch's multi-tensor (``_foreach_``) kernels;
* otherwise, when the optimizer holds at least ``2**20`` elements: the compiled step
  (falling back to eager with a warning if compilation fails); else the eager step.

Compilation happens at the first step of each configuration (seconds to tens of seconds, once
per process; cached on disk by inductor). The compiled step keeps aliases of the params and
moments from step to step; it notices new storages (``p.data = ...``, ``load_state_dict``) and
rebuilds them.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from adam_monitor._runtime import (
    FOREACH_CHUNK_NUMEL,
    FOREACH_DEVICES,
    TORCH_FUSED_DEVICES,
    bounded_runs,
)
from adam_monitor.optim.compiled import CompiledSteps
from adam_monitor.optim.foreach import TORCH_FUSED_DTYPES, foreach_step_, torch_fused_available, torch_fused_step_
from adam_monitor.optim.reference import NORMALIZE, adam_step_, direction_from_state
from adam_monitor.theory import worst_case_bound

__all__ = ["Adam", "adafactor_beta2", "worst_case_bound"]


def adafactor_beta2(step: int, beta2: float) -> float:
    """Adafactor's schedule (Shazeer & Stern 2018), capped by the group's β2: ``min(β2, 1 - t^-0.8)``."""
    return min(beta2, 1.0 - step**-0.8)


def _check_group(group: dict[str, Any]) -> None:
    """torch's wording for the classic hyper-parameters; the fix named for the rest."""
    lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if isinstance(lr, Tensor):
        raise TypeError("lr as a Tensor is not supported: pass a float")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {beta1}")
    if not 0.0 <= beta2 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {beta2}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if group["normalize"] not in NORMALIZE:
        raise ValueError(f"Invalid normalize value: {group['normalize']!r}; use one of {NORMALIZE}")
    clip = group["update_clip"]
    if clip is not None and not (isinstance(clip, (int, float)) and clip > 0):
        raise ValueError(
            f"Invalid update_clip value: {clip}; use a positive float (1.0 is the published choice) or None"
        )
    _check_betas(group)


def _check_betas(group: dict[str, Any]) -> None:
    beta1, beta2 = group["betas"]
    # The bound B_t concerns m̂/√v̂; LaProp (|u| ≤ 1/√(1-β2)) and atan2 (|u| ≤ a·π/2) are bounded anyway.
    # β1 = 0 is bounded by 1/√(1-β2) for every β2 (sign descent at β2 = 0): nothing to refuse.
    if group["allow_unstable_betas"] or group["normalize"] != "adam" or beta1 == 0 or beta1 * beta1 < beta2:
        return
    if beta1 * beta1 == beta2:
        growth = "like √t"
    elif beta2 == 0.0:
        growth = "without limit (β2 = 0: v holds only the last gradient, m all of them)"
    else:
        growth = f"exponentially, by β1/√β2 = {beta1 / math.sqrt(beta2):.4g} per step"
    raise ValueError(
        f"Unstable betas=({beta1}, {beta2}): β1² = {beta1 * beta1:.6g} ≥ β2, so the worst-case update "
        f"bound B_t grows {growth} (B_1000 = {worst_case_bound(beta1, beta2, 1000):.4g}; "
        "it is finite only for β2 > β1²). Fix: lower beta1 or raise beta2 so that beta2 > beta1**2, "
        "e.g. betas=(0.9, 0.95) (B_∞ = 1.165) or beta1 == beta2 (B_∞ = 1); "
        "or pass allow_unstable_betas=True."
    )


class Adam(Optimizer):
    r"""Adam with independent knobs and decoupled (AdamW) weight decay.

    For each parameter, at step ``t`` (η = lr, λ = weight_decay)::

        β2_t = β2, or beta2_schedule(t)
        v_t  = β2_t·v_{t-1} + (1-β2_t)·g_t²          v̂_t = v_t / c2_t,   c2_t = 1 - Π_{k≤t} β2_k
        c1_t = 1 - β1^t if momentum_bias_correction else 1
        normalize="adam":   m_t = β1·m_{t-1} + (1-β1)·g_t            u_t = (m_t/c1_t) / (√v̂_t + ε)
        normalize="laprop": m_t = β1·m_{t-1} + (1-β1)·g_t/(√v̂_t + ε)  u_t = m_t/c1_t
        normalize="atan2":  m_t as adam                               u_t = a·atan2(m_t/c1_t, b·√v̂_t)
        update_clip=d:      s_t = 1/max(1, RMS_t/d),  RMS_t = √mean(g_t²/max(v̂_t, ε²));  u_t ← s_t·u_t
        p_t = p_{t-1}·(1 - η·λ·s_t) - η·u_t          (s_t = 1 without clipping)

    With ``momentum_bias_correction=True`` and the other knobs at their defaults this is
    ``torch.optim.AdamW`` (same state, same steps). The default ``False`` is AdamD: the momentum
    is not divided by ``1 - β1^t``, so the first steps are short (|u_t| = 1 - β1^t on a constant
    gradient) instead of full-size on a one-sample average; v stays bias-corrected.

    ``beta2_schedule`` is applied when the step is computed (``group["betas"]`` is never rewritten):
    ``None``; ``"adafactor"``: ``β2_t = min(β2, 1 - t^-0.8)`` (Shazeer & Stern 2018); or a callable
    ``step -> β2_t`` (``group["betas"][1]`` is then unused). v is bias-corrected exactly for a varying
    β2: ``c2_t = 1 - Π_{k≤t} β2_k``, which is ``1 - β2^t`` for a constant β2 and exactly 1 for the
    Adafactor schedule (β2_1 = 0). The running product is kept in ``state["beta2_product"]``.

    ``update_clip=d`` is the update clipping of Adafactor and StableAdamW (Wortsman et al. 2023):
    the per-tensor learning rate — step and decay alike — is divided by ``max(1, RMS_t/d)``;
    ``RMS_t`` is the ``staleness`` diagnostic, and d = 1 is the published choice.

    ``normalize="laprop"`` (Ziyin et al. 2020, "LaProp: Separating Momentum and Adaptivity in Adam"):
    ε sits inside the normalization of each gradient, ``g_t/(√v̂_t + ε)`` with v̂_t bias-corrected at
    that step; the momentum of these normalized gradients is bias-corrected by ``1 - β1^t`` at the
    update. (The reference code folds η into the momentum; here m is η-free, which equals it for a
    constant lr and applies the current lr to the whole momentum under a schedule, as Adam does.)

    ``normalize="atan2"`` (Everett et al. 2024, "Scaling Exponents Across Parameterizations and
    Optimizers"): ε-free, ``a = 1.27``, ``b = 1`` as published; a ≈ 4/π gives a steady signal a
    step of ≈ 1 like Adam, and |u| ≤ a·π/2 ≈ 2 whatever the gradients. ``eps`` is ignored (ε = 0,
    also in the clipping RMS and in statistics).

    Choosing betas: the worst-case update ``|u_t| ≤ B_∞ = (1-β1)/√((1-β2)(1-β1²/β2))`` (ε = 0, any
    gradients) is 7.27 at (0.9, 0.999), 2.345 at (0.9, 0.99), 1.165 at (0.9, 0.95), and 1 for
    ``β1 == β2``, its minimum at a given β2: ``Adam(params, betas=(0.95, 0.95),
    momentum_bias_correction=True)`` never moves a coordinate by more than lr (plus decay). β1² ≥ β2
    has no bound (B_t grows like √t, or exponentially) and is refused for ``normalize="adam"``
    unless ``allow_unstable_betas=True`` (LaProp and atan2 are bounded for any betas); with a
    schedule only the group's β2 is checked.

    Monitoring: set ``record_statistics = True`` and each ``step()`` replaces ``last_statistics``,
    a dict ``{param: row}`` of float64 rows of ``adam_monitor.diagnostics.NUM_STATS`` numbers
    on the param's device (no host sync), equal to ``tensor_statistics(g_t, u_t, v̂_t, v̂_{t-1}, ε)``
    (ε = 0 for atan2), computed inside the step.

    ``compiled``: ``False`` runs the eager single-tensor step (the specification), ``True`` the
    ``torch.compile``'d step (an error if it cannot compile). ``None`` (the default) takes the
    fastest path that computes the same step, per batch of tensors (torch's ``fused=`` names its
    own kernel, which ``None`` picks where it computes this step; it is not an option here):

    see the module's documentation. Params with ``grad=None`` are skipped; sparse gradients are an error.
    """

    def __init_subclass__(cls, *, fixed: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """A preset: ``class P(Adam, fixed={...}, defaults={...}, positional=(...))`` is ``Adam``
        with the options in ``fixed`` set (passing one is an error), other ``defaults``, and the
        optional arguments after ``params`` that may be given by position."""
        defaults = kwargs.pop("defaults", {})
        positional = kwargs.pop("positional", ("lr", "betas", "eps", "weight_decay"))
        super().__init_subclass__(**kwargs)
        if fixed is not None:
            cls.__init__ = _preset_init(cls.__name__, fixed, defaults, positional)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        momentum_bias_correction: bool = False,
        beta2_schedule: str | Callable[[int], float] | None = None,
        update_clip: float | None = None,
        normalize: str = "adam",
        allow_unstable_betas: bool = False,
        compiled: bool | None = None,
        fused: None = None,
    ) -> None:
        if fused is not None:
            raise TypeError(
                f"{type(self).__name__}(fused=...) is torch's switch for its own fused kernel; here it is chosen "
                "automatically where it computes the same step. To force or forbid the torch.compile'd step, "
                "pass compiled=True or compiled=False."
            )
        if beta2_schedule is not None and beta2_schedule != "adafactor" and not callable(beta2_schedule):
            raise ValueError(
                f"Invalid beta2_schedule: {beta2_schedule!r}; use None, 'adafactor' or a callable step -> beta2"
            )
        if compiled not in (None, True, False):
            raise ValueError(f"Invalid compiled value: {compiled!r}; use None, True or False")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            momentum_bias_correction=bool(momentum_bias_correction),
            update_clip=None if update_clip is None else float(update_clip),
            normalize=normalize,
            allow_unstable_betas=bool(allow_unstable_betas),
        )
        # The schedule and the execution choice are not per-group options: a callable is not
        # serializable, and state_dict() must load with torch.load(weights_only=True).
        self.beta2_schedule = beta2_schedule
        self.compiled = compiled
        self.record_statistics: bool = False
        self.last_statistics: dict[Tensor, Tensor] = {}
        self._compiled_steps = CompiledSteps(compiled)
        self._torch_kernel_failed = False  # torch's fused AdamW kernel refused a step (see _step_group)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["betas"] = tuple(group["betas"])
        _check_group(group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # load_state_dict() lands here with the saved groups: a torch Adam/AdamW checkpoint lacks our
        # keys (take them from our defaults) and may use features we do not implement (refuse).
        for group in state.get("param_groups", []):
            for key in ("amsgrad", "maximize", "capturable", "differentiable"):
                if group.get(key):
                    raise ValueError(
                        f"Cannot load a param group with {key}=True: {type(self).__name__} does not implement it"
                    )
            if group.get("decoupled_weight_decay") is False and group.get("weight_decay", 0.0) != 0.0:
                raise ValueError(
                    "Cannot load a torch.optim.Adam group with L2 weight_decay: this optimizer decays "
                    "decoupled (AdamW); load a torch.optim.AdamW checkpoint or set weight_decay=0"
                )
        super().__setstate__(state)
        defaults = getattr(self, "defaults", {})
        for group in self.param_groups:
            for key, value in defaults.items():
                group.setdefault(key, value)
        for param_state in self.state.values():
            step = param_state.get("step")
            if isinstance(step, Tensor) and (step.device.type != "cpu" or step.dtype != torch.float32):
                # a fused/capturable checkpoint keeps step on the device; reading it there would sync
                param_state["step"] = step.to("cpu", torch.float32)
            elif isinstance(step, (int, float)):  # an old torch checkpoint: steps are counted in one foreach add
                param_state["step"] = torch.tensor(float(step), dtype=torch.float32)
        # new state tensors: the compiled path's aliases must not outlive the old ones
        if hasattr(self, "_compiled_steps"):
            self._compiled_steps.forget_layouts()

    def _init_state(self, p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            # torch's layout: a CPU float32 step tensor and moments shaped like the param.
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if self.beta2_schedule is not None:
                state["beta2_product"] = 1.0  # Π_{k≤t} β2_k, for the exact bias correction of v
        return state

    def _beta2(self, step: int, beta2: float) -> float:
        if self.beta2_schedule is None:
            return beta2
        if self.beta2_schedule == "adafactor":
            return adafactor_beta2(step, beta2)
        value = float(self.beta2_schedule(step))
        if not 0.0 <= value < 1.0:
            raise ValueError(f"beta2_schedule({step}) = {value}: the schedule must return a beta2 in [0, 1)")
        return value

    @torch.no_grad()
    def direction(self, p: Tensor) -> Tensor:
        """The direction ``u`` of ``p``'s last step (the step over lr, weight decay excluded), after
        clipping, rebuilt from its state and the gradient the step used (for histograms)."""
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        state = self.state[p]
        t, (beta1, beta2) = int(state["step"]), group["betas"]
        product = state.get("beta2_product")
        return direction_from_state(
            state["exp_avg"],
            state["exp_avg_sq"],
            p.grad,
            c1=1.0 - beta1**t if group["momentum_bias_correction"] else 1.0,
            c2=1.0 - (product if product is not None else beta2**t),
            eps=group["eps"],
            normalize=group["normalize"],
            update_clip=group["update_clip"],
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step. ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        statistics: dict[Tensor, Tensor] | None = {} if self.record_statistics else None
        for index, group in enumerate(self.param_groups):
            self._step_group(index, group, statistics)
        if statistics is not None:
            self.last_statistics = statistics
        return loss

    def _step_group(self, index: int, group: dict[str, Any], statistics: dict[Tensor, Tensor] | None) -> None:
        _check_betas(group)  # a scheduler may have moved them
        params = [p for p in group["params"] if p.grad is not None]
        grads = [_checked_gradient(type(self).__name__, p) for p in params]
        if not params:
            return
        states = [self._init_state(p) for p in params]
        steps = [state["step"] for state in states]
        torch._foreach_add_(steps, 1.0)  # one call for the group, not one tensor add per param
        counts = torch.stack(steps).tolist()  # CPU tensors: no device sync

        # The params share their step's scalars when they share (t, Π β2_k, compute dtype): usually
        # the whole group, then one set of scalars and one compiled_step_ per dtype and device.
        scalar_sets: dict[tuple, dict[str, Any]] = {}
        eager: list[tuple[int, dict[str, Any]]] = []
        batches: dict[str, dict[tuple, list[int]]] = {"torch_fused": {}, "foreach": {}, "compiled": {}}
        use_compiled = self._compiled_steps.decide(sum(p.numel() for g in self.param_groups for p in g["params"]))
        foreach_devices = FOREACH_DEVICES if self.compiled is None and statistics is None else ()
        # torch's fused AdamW kernel computes exactly this step (see torch_fused_step_)
        torch_kernel = (
            self.compiled is None
            and statistics is None
            and group["normalize"] == "adam"
            and group["update_clip"] is None
            and self.beta2_schedule is None
            and torch_fused_available()
            and not self._torch_kernel_failed
        )
        routes = (torch_kernel, foreach_devices, use_compiled)
        for i, (p, g, state, t) in enumerate(zip(params, grads, states, counts)):
            product = state.get("beta2_product")
            dtype = p.dtype
            key = (t, product, dtype)
            scalars = scalar_sets.get(key)
            if scalars is None:
                scalars = scalar_sets[key] = _step_scalars(
                    group, int(t), self._beta2(int(t), group["betas"][1]), product, dtype, record=statistics is not None
                )
            if product is not None:
                state["beta2_product"] = product * scalars["beta2"]
            path, kind, device_index = _path(p, g, state["exp_avg"], state["exp_avg_sq"], routes)
            if path == "eager":
                eager.append((i, scalars))
            else:
                batches[path].setdefault((key, kind, device_index), []).append(i)

        def columns(indices: list[int]) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
            """The params, gradients and moments of ``indices``, as the multi-tensor paths take them."""
            return (
                [params[i] for i in indices],
                [grads[i] for i in indices],
                [states[i]["exp_avg"] for i in indices],
                [states[i]["exp_avg_sq"] for i in indices],
            )

        rows: dict[int, Tensor | None] = {}
        for i, scalars in eager:
            state = states[i]
            rows[i] = adam_step_(params[i], grads[i], state["exp_avg"], state["exp_avg_sq"], **scalars)
        for (key, *_), members in batches["torch_fused"].items():
            try:
                torch_fused_step_(*columns(members), t=int(key[0]), **scalar_sets[key])
            except (RuntimeError, NotImplementedError) as error:
                # a torch build whose kernel does not cover this device or dtype refuses before
                # writing anything: step these eagerly, and skip the kernel from now on
                self._torch_kernel_failed = True
                warnings.warn(
                    f"torch's fused AdamW kernel failed ({type(error).__name__}: {error}); "
                    f"{type(self).__name__} steps without it from now on.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                for i in members:
                    state = states[i]
                    adam_step_(params[i], grads[i], state["exp_avg"], state["exp_avg_sq"], **scalar_sets[key])
        for (key, *_), members in batches["foreach"].items():
            for start, stop in bounded_runs([params[i].numel() for i in members], FOREACH_CHUNK_NUMEL):
                foreach_step_(*columns(members[start:stop]), **scalar_sets[key])
        for ordinal, ((key, *_), members) in enumerate(batches["compiled"].items()):
            batch = columns(members)
            stepped = self._compiled_steps.step((index, ordinal), *batch, scalar_sets[key])
            if stepped is None:  # compilation failed: eager from now on
                stepped = [adam_step_(*tensors, **scalar_sets[key]) for tensors in zip(*batch)]
            rows.update(zip(members, stepped))
        if statistics is not None:
            statistics.update((params[i], rows[i]) for i in sorted(rows))  # in param order


def _preset_init(name: str, fixed: dict[str, Any], defaults: dict[str, Any], positional: tuple[str, ...]):
    """The ``__init__`` of a preset of :class:`Adam`: its own signature, Adam's checks."""
    base = inspect.signature(Adam.__init__)
    unknown = sorted((set(fixed) | set(defaults) | set(positional)) - set(base.parameters))
    if unknown:
        raise TypeError(f"preset {name}: {unknown} are not options of Adam")

    def __init__(self, params, *args, **options):
        if len(args) > len(positional):
            raise TypeError(
                f"{name}() takes at most {len(positional) + 1} positional arguments ({len(args) + 1} given)"
            )
        for option, value in zip(positional, args):
            if option in options:
                raise TypeError(f"{name}() got multiple values for argument {option!r}")
            options[option] = value
        chosen = sorted(set(options) & set(fixed))
        if chosen:
            settings = ", ".join(f"{k}={fixed[k]!r}" for k in chosen)
            raise TypeError(f"{name} fixes {settings}; to choose {', '.join(chosen)}, use adam_monitor.optim.Adam")
        Adam.__init__(self, params, **{**defaults, **options, **fixed})

    parameters = [base.parameters["self"], base.parameters["params"]]
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    parameters += [
        base.parameters[k].replace(kind=kind, default=defaults.get(k, base.parameters[k].default)) for k in positional
    ]
    rest = [k for k in base.parameters if k not in ("self", "params", "fused", *positional, *fixed)]
    kind = inspect.Parameter.KEYWORD_ONLY
    parameters += [
        base.parameters[k].replace(kind=kind, default=defaults.get(k, base.parameters[k].default)) for k in rest
    ]
    __init__.__signature__ = base.replace(parameters=parameters)
    __init__.__qualname__ = f"{name}.__init__"
    return __init__


def _checked_gradient(optimizer: str, p: Tensor) -> Tensor:
    if p.grad.is_sparse:
        raise RuntimeError(f"{optimizer} does not support sparse gradients; use torch.optim.SparseAdam")
    if p.is_complex():
        raise RuntimeError(f"{optimizer} does not support complex parameters; use torch.view_as_real")
    return p.grad


def _step_scalars(
    group: dict[str, Any], t: int, beta2_t: float, product_prev: float | None, dtype: torch.dtype, *, record: bool
) -> dict[str, Any]:
    """The keyword arguments of ``adam_step_`` / ``compiled_step_`` at step ``t`` (β2 of this step: ``beta2_t``)."""
    beta1 = group["betas"][0]
    normalize = group["normalize"]
    eps = 0.0 if normalize == "atan2" else group["eps"]  # atan2 is ε-free
    if product_prev is not None:  # a β2 schedule: exact bias correction by the running product
        c2, c2_prev = 1.0 - product_prev * beta2_t, 1.0 - product_prev
    else:
        c2, c2_prev = 1.0 - beta2_t**t, 1.0 - beta2_t ** (t - 1)
    compute_dtype = torch.promote_types(dtype, torch.float32)
    return dict(
        lr=group["lr"],
        beta1=beta1,
        beta2=beta2_t,
        weight_decay=group["weight_decay"],
        eps=eps,
        eps_sq=max(eps * eps, torch.finfo(compute_dtype).tiny),
        inv_c1=1.0 / (1.0 - beta1**t) if group["momentum_bias_correction"] else 1.0,
        inv_sqrt_c2=1.0 / math.sqrt(c2),
        inv_c2_prev=1.0 / c2_prev if record and c2_prev > 0.0 else 0.0,
        update_clip=group["update_clip"],
        normalize=normalize,
        statistics=record,
    )


def _path(p: Tensor, g: Tensor, m: Tensor, v: Tensor, routes: tuple[bool, tuple[str, ...], bool]):
    """``(path, device type, device index)`` of one param's step: ``"torch_fused"``, ``"foreach"``,
    ``"compiled"`` or ``"eager"``. ``routes``: (torch's kernel computes this step, the devices of the
    multi-tensor step, compiling). Runs for every param at every step: the checks are spelled out,
    cheapest first."""
    torch_kernel, foreach_devices, use_compiled = routes
    dtype = p.dtype
    # One size, dtype and device for the four tensors: what every multi-tensor path needs. (Sizes,
    # not shapes, and device indices: the cheap reads; autograd and zeros_like give the shapes.)
    n, index = p.numel(), p.get_device()
    alike = (
        g.numel() == n
        and m.numel() == n
        and v.numel() == n
        and g.dtype == dtype
        and m.dtype == dtype
        and v.dtype == dtype
        and g.get_device() == index
        and m.get_device() == index
        and v.get_device() == index
    )
    # the kernels of torch and the compiled step read flat memory
    flat = alike and n > 0 and p.is_contiguous() and g.is_contiguous() and m.is_contiguous() and v.is_contiguous()
    kind = "cuda" if p.is_cuda else "cpu" if p.is_cpu else p.device.type
    if flat and torch_kernel and kind in TORCH_FUSED_DEVICES and dtype in TORCH_FUSED_DTYPES:
        return "torch_fused", kind, index
    if alike and kind in foreach_devices:
        return "foreach", kind, index
    if flat and use_compiled:
        return "compiled", kind, index
    return "eager", kind, index
