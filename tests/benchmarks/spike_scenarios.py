"""The forecast benchmark: do the alert rules warn before loss spikes, on families of runs they were
not tuned on?

Run ``python tests/benchmarks/spike_scenarios.py [--quick] [--jobs N] [--seeds ...] [--family NAME ...]
[--no-lofo] [--cache DIR | --no-cache]``. The runs are the families of ``families.py``: a *spike
family* builds a run whose loss spikes by one named mechanism (variant ``"spike"``) and its matched
stable control (``"control"``, one setting changed); a *healthy family* builds a run as users train
(``"healthy"``), which must raise no alert. Default seeds 0, 1, 2; ``--quick``: seed 0 at the
default thresholds, without the leave-one-family-out selection (the check CI runs).

**Recording.** Each (family, variant, seed) is trained once, as ``Setup`` says (``loss(t)``;
``(loss · weight(t)).backward()``; clip; ``optimizer.step()``; ``after_step(t)``; ``zero_grad()``),
and recorded per step: the loss, the gradient norm before clipping, the update norm
‖θ_t − θ_{t−1}‖, the statistics rows ``StepReader`` reads after the step, and the (β1, β2) of each
param group (schedules such as OneCycleLR's ``cycle_momentum`` change them per step). Records are
cached on disk (``--cache``, default ``$TMPDIR/adam-monitor-scenarios``), keyed by family, variant,
seed and a hash of families.py, of the recording code here, of the package's statistics code
(``adam_monitor/diagnostics``, ``engine/reader.py``, ``optim``) and of the torch version: a new
threshold only replays, a change of what the rows mean retrains.

**Replay.** The rules do not act on training, so replaying the recorded rows through them gives
exactly the alerts a live run would (checked by ``replay_matches_live``): ``configuration_alerts``
at step 1 and whenever the betas change (each text once, as ``Monitor`` says them), then
``AlertRules.observe`` on every step's rows. When the betas change mid-run the rules keep their
state through ``AlertRules.set_betas`` where it exists, and are rebuilt otherwise (as ``Monitor``
does).

**Labels and leads.** A spike is a loss above ``SPIKE_FACTOR`` x its rolling median over the
previous ``WINDOW`` steps for more than one step in a row (``label_spikes``); an *episode* is a spike
with no other spike starting in the ``WINDOW`` steps before it (the onset of a spiking regime). An
alert of a precursor rule (``PRECURSOR_RULES``) predicts a spike when it is raised ``LEAD_MIN`` to
``LEAD_MAX`` steps before the spike's first step; ``beta_coupling`` raised at step 1 predicts every
spike of its run (the betas alone say the update can grow without limit). ``eps_dominance`` and
every alert of severity ``"info"`` state a regime (Adam acting as SGD with lr η/ε), not a coming
spike: they are counted apart, neither predictions nor false alerts. Any other alert on a control or
healthy run is a false alert. Per family: runs, spikes, recall, median lead, false alerts per 1,000
steps of its control runs (spike families) or of its runs (healthy families), and whether every
healthy run passes the CLI gate (``adam-monitor check``: no alert of severity warning or above).

**Baselines**, scored the same way: a z-score above ``Z_THRESHOLD`` over the previous ``Z_WINDOW``
steps, alerting once per excursion, of the loss (OLMo-core's and Lightning's ``SpikeDetection``), of
the gradient norm (OLMo-core's gradient-norm spike detection) and of the update norm (Levanter's
``clip_update_norm``, a rolling window of update norms). Each is reported, and per family the best
one (highest recall).

**Leave-one-family-out.** The thresholds in ``LOFO_GRID`` (names ``Thresholds`` lacks are
skipped) are chosen, for each spike family F, on all the other families: the grid point that
catches the most spikes of the other spike families (recall pooled over their spikes) with at most
``MAX_CONTROL_FALSE`` false alerts per 1,000 steps of their controls and ``MAX_HEALTHY_FALSE`` per
1,000 steps of the healthy runs; ties go to the point closest to the defaults (sum of |log ratio|);
if no point meets both limits, the one with the fewest false alerts. F is then scored with that
choice. A healthy family H is scored with the point chosen on all spike families (the healthy limit
taken on the healthy families other than H). The goal line reads the held-out figures: every spike
family's recall ≥ ``GOAL_RECALL`` and ≥ its best baseline's, pooled median lead ≥ ``GOAL_LEAD``, false
alerts within both limits and below every baseline's (or none), no healthy run failing the gate.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import itertools
import json
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for _path in (ROOT, HERE):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import families  # noqa: E402
import families_healthy  # noqa: E402
import families_spike  # noqa: E402
from families import CONTROL, HEALTHY, SPIKE, Family  # noqa: E402

#: Every family of the benchmark, by name.
FAMILIES: dict[str, Family] = {**families.FAMILIES, **families_spike.FAMILIES, **families_healthy.FAMILIES}
FAMILY_SOURCES = ("families.py", "families_spike.py", "families_healthy.py")

from adam_monitor.alerts import SEVERITY_ORDER, Alert, AlertRules, Thresholds, configuration_alerts  # noqa: E402
from adam_monitor.diagnostics.sharpness import curvature_sums, edge_of_stability, preconditioned_sharpness  # noqa: E402
from adam_monitor.engine.reader import StepReader  # noqa: E402

PRECURSOR_RULES = ("stale_second_moment", "update_rms_spike", "gradient_growth", "nonfinite", "beta_coupling")
REGIME_RULES = ("eps_dominance",)
SPIKE_FACTOR = 3.0
WINDOW = 50
MIN_HISTORY = 10
LEAD_MIN, LEAD_MAX = 1, 20
Z_WINDOW, Z_THRESHOLD = 50, 6.0

MONITOR = "monitor"
BASELINES = {"loss z": "losses", "grad-norm z": "grad_norms", "update-norm z": "update_norms"}  # name: Record field
#: Precursors measured beside the monitor that it does not raise yet (not baselines: nothing a user
#: has today). ``sharpness >= edge``: the preconditioned sharpness along the update
#: (``adam_monitor.diagnostics.sharpness``) reaching (2+2β1)/(1-β1), once per excursion, re-armed
#: below half the edge: the theory's threshold, nothing chosen on these runs.
CANDIDATES = ("sharpness >= edge",)
WHO = (MONITOR, *BASELINES, *CANDIDATES)

#: The tunable thresholds and the values the leave-one-family-out selection tries.
LOFO_GRID: dict[str, tuple[float, ...]] = {
    "growth_ratio": (1.15, 1.2, 1.3),
    "growth_steps": (3, 4, 6),
    "stale_peak": (1.5, 2.0, 3.0),
    "spike_ratio": (3.0, 5.0),
    "after_alert_window": (0, 50),  # 0: no shortened growth test after a precursor alert
}
MAX_CONTROL_FALSE, MAX_HEALTHY_FALSE = 0.5, 0.1  # false alerts per 1,000 steps
GOAL_RECALL, GOAL_LEAD = 0.9, 3.0

DEFAULT_CACHE = Path(tempfile.gettempdir()) / "adam-monitor-scenarios"
STATISTICS_SOURCES = ("adam_monitor/diagnostics/*.py", "adam_monitor/engine/reader.py", "adam_monitor/optim/*.py")


# ------------------------------------------------------------------------------------------------
# recording


@dataclass
class Record:
    """One trained run: what the harness saw per step (``T`` steps, ``K`` statistics reads)."""

    family: str
    variant: str
    seed: int
    names: list[str]  # one per tensor, in the reader's order (all params of all groups)
    optimizer: str  # the label Monitor gives it: the class name
    adam_groups: list[bool]  # per group: the direction is Adam's m̂/(√v̂+ε), which the beta rules bound
    group_of: np.ndarray  # [n] param group of each tensor
    losses: np.ndarray  # [T] unweighted loss
    grad_norms: np.ndarray  # [T] of the backpropagated (weighted) loss, before clipping
    update_norms: np.ndarray  # [T] ‖θ_t − θ_{t−1}‖
    betas: np.ndarray  # [T, G, 2] each group's betas at the step
    lrs: np.ndarray  # [T, G] each group's lr at the step
    read_steps: np.ndarray  # [K] the optimizer step count of each read
    read_at: np.ndarray  # [K] the harness step t (1-based) of each read
    rows: np.ndarray  # [K, n, NUM_STATS] float64
    sharpness: np.ndarray  # [T] η·u·Hu/u·Pu along the previous update over the edge (NaN: no estimate)
    seconds: float = 0.0  # training time

    @property
    def key(self) -> tuple[str, str, int]:
        return self.family, self.variant, self.seed

    @property
    def steps(self) -> int:
        return len(self.losses)

    @cached_property
    def spikes(self) -> list[int]:
        return label_spikes(self.losses.tolist())

    @cached_property
    def baseline_steps(self) -> dict[str, list[int]]:
        found = {name: zscore_alerts(getattr(self, attr).tolist()) for name, attr in BASELINES.items()}
        found["sharpness >= edge"] = crossings(self.sharpness.tolist(), 1.0, 0.5)
        return found

    def tensor_lrs(self, t: int) -> np.ndarray:
        """Per tensor the lr of its group at harness step ``t``."""
        return self.lrs[t - 1][self.group_of]

    def tensor_betas(self, t: int) -> list[tuple[float, float]]:
        """Per tensor the betas of its group at harness step ``t``."""
        return [(float(b1), float(b2)) for b1, b2 in self.betas[t - 1][self.group_of]]


def _as_float(x) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def _group_betas(opt: torch.optim.Optimizer) -> list[tuple[float, float]]:
    return [(_as_float(g["betas"][0]), _as_float(g["betas"][1])) for g in opt.param_groups]


def _norm(tensors: Iterable[torch.Tensor]) -> float:
    norms = [torch.linalg.vector_norm(t.detach().double()) for t in tensors]
    return torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0


class _Curvature:
    """The preconditioned sharpness of a torch Adam/AdamW run (amsgrad off), over the edge of group 0's
    β1, pooled over every parameter: one value per step, NaN where there is no estimate."""

    def __init__(self, opt: torch.optim.Optimizer):
        self.opt, self.previous, self.lr = opt, None, None
        self.usable = isinstance(opt, torch.optim.Adam) and not any(g.get("amsgrad") for g in opt.param_groups)

    def after_step(self) -> float:
        if not self.usable:
            return math.nan
        sums = torch.zeros(3, dtype=torch.float64)
        for g in self.opt.param_groups:
            b1, b2 = (_as_float(b) for b in g["betas"])
            live = [p for p in g["params"] if p.grad is not None and p in self.opt.state]
            for p in live:
                st = self.opt.state[p]
                step = int(_as_float(st["step"]))
                sums += curvature_sums(
                    [p.grad], [st["exp_avg"]], [st["exp_avg_sq"]], beta1=b1, beta2=b2, eps=g["eps"], step=step
                )[0]
        lr, b1 = _as_float(self.opt.param_groups[0]["lr"]), _as_float(self.opt.param_groups[0]["betas"][0])
        value = math.nan
        if self.previous is not None and b1 > 0:
            ratio = lr / self.lr if self.lr else 1.0
            value = float(preconditioned_sharpness(self.previous, sums, ratio)) / edge_of_stability(b1)
        self.previous, self.lr = sums, lr
        return value


def train(family: Family, variant: str, seed: int, live: Thresholds | None = None) -> tuple[Record, list[Alert]]:
    """Train one run of ``family`` and record it. With ``live``, a plain ``AlertRules`` built from the
    starting betas reads every step's rows as they come (the check of the replay: valid for runs
    whose betas do not change); the alerts it raised are returned beside the record."""
    torch.set_num_threads(1)  # tiny tensors: a thread pool only adds spin-waits
    start = time.perf_counter()
    setup = family.build(seed, variant)
    opt = setup.optimizer
    reader = StepReader(opt)
    params = reader.params
    named = {id(p): n for n, p in setup.model.named_parameters()}
    names = [named.get(id(p), f"param{i}") for i, p in enumerate(params)]
    group_of = [gi for gi, g in enumerate(opt.param_groups) for _ in g["params"]]
    adam_groups = [g.get("normalize", "adam") == "adam" for g in opt.param_groups]
    label = type(opt).__name__
    rules, live_alerts = None, []
    if live is not None:
        pairs = [_group_betas(opt)[gi] for gi in group_of]
        rules = AlertRules(names, optimizer=label, betas=pairs, thresholds=live)
        live_alerts = configuration_alerts(_group_betas(opt), optimizer=label, step=1)
    losses, grad_norms, update_norms, betas, lrs, sharpness = [], [], [], [], [], []
    curvature = _Curvature(opt)
    read_steps, read_at, rows = [], [], []
    for t in range(1, setup.steps + 1):
        loss = setup.loss(t)
        (loss * (setup.weight(t) if setup.weight else 1.0)).backward()
        grad_norms.append(_norm(p.grad for p in params if p.grad is not None))
        if setup.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, setup.clip)  # the statistics see the clipped gradient
        before = [p.detach().clone() for p in params]
        betas.append(_group_betas(opt))  # the betas this step uses (after_step may change them)
        lrs.append([_as_float(g["lr"]) for g in opt.param_groups])
        opt.step()
        update_norms.append(_norm(p.detach() - b for p, b in zip(params, before)))
        sharpness.append(curvature.after_step())
        result = reader.read()
        if result is not None:
            rows.append(result[0].cpu().numpy())
            read_steps.append(result[1])
            read_at.append(t)
            if rules is not None:
                live_alerts += rules.observe(result[1], result[0], np.array(lrs[-1])[group_of])
        if setup.after_step is not None:
            setup.after_step(t)
        opt.zero_grad()
        losses.append(loss.item())
    n = len(params)
    record = Record(
        family=family.name,
        variant=variant,
        seed=seed,
        names=names,
        optimizer=label,
        adam_groups=adam_groups,
        group_of=np.array(group_of, dtype=np.int64),
        losses=np.array(losses, dtype=np.float64),
        grad_norms=np.array(grad_norms, dtype=np.float64),
        update_norms=np.array(update_norms, dtype=np.float64),
        betas=np.array(betas, dtype=np.float64).reshape(len(betas), len(opt.param_groups), 2),
        lrs=np.array(lrs, dtype=np.float64).reshape(len(lrs), len(opt.param_groups)),
        read_steps=np.array(read_steps, dtype=np.int64),
        read_at=np.array(read_at, dtype=np.int64),
        rows=np.array(rows, dtype=np.float64).reshape(len(rows), n, -1),
        sharpness=np.array(sharpness, dtype=np.float64),
        seconds=time.perf_counter() - start,
    )
    return record, live_alerts


# ------------------------------------------------------------------------------------------------
# the cache of records

_ARRAYS = (
    "group_of",
    "losses",
    "grad_norms",
    "update_norms",
    "betas",
    "lrs",
    "read_steps",
    "read_at",
    "rows",
    "sharpness",
)
_META = ("family", "variant", "seed", "names", "optimizer", "adam_groups", "seconds")


def cache_key() -> str:
    """A hash of everything a record depends on besides (family, variant, seed): the families'
    source, the recording code, the package's statistics code and the torch version."""
    h = hashlib.sha256()
    for source in FAMILY_SOURCES:
        h.update((HERE / source).read_bytes())
    h.update(inspect.getsource(train).encode())
    h.update(inspect.getsource(_Curvature).encode())
    for pattern in STATISTICS_SOURCES:
        for path in sorted(ROOT.glob(pattern)):
            h.update(path.relative_to(ROOT).as_posix().encode())
            h.update(path.read_bytes())
    h.update(torch.__version__.encode())
    return h.hexdigest()[:16]


def cache_path(cache: Path, key: str, family: str, variant: str, seed: int) -> Path:
    return cache / f"{family}-{variant}-{seed}-{key}.npz"


def save_record(record: Record, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = json.dumps({k: getattr(record, k) for k in _META})
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, meta=np.array(meta), **{k: getattr(record, k) for k in _ARRAYS})
    os.replace(tmp, path)  # a reader never sees half a file


def load_record(path: Path) -> Record | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            return Record(**meta, **{k: z[k] for k in _ARRAYS})
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or unreadable: train it again


def _train_task(task: tuple[str, str, int, Path | None, str]) -> Record:
    name, variant, seed, cache, key = task
    record, _ = train(FAMILIES[name], variant, seed)
    if cache is not None:
        save_record(record, cache_path(cache, key, name, variant, seed))  # kept even if a later run fails
    return record


def _pool(jobs: int) -> ProcessPoolExecutor:
    # torch.optim imports torch._dynamo on first use (seconds where no bytecode is cached): once
    # here, and the forked workers inherit it.
    import torch._dynamo  # noqa: F401

    return ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork"))


def record_runs(
    names: Sequence[str], seeds: Sequence[int], jobs: int = 1, cache: Path | None = DEFAULT_CACHE
) -> tuple[list[Record], set[tuple[str, str, int]]]:
    """Every (family, variant, seed) record, from the cache where it holds one; returns the records
    and the keys of those trained now. ``cache=None`` trains all and stores nothing."""
    key = cache_key()
    tasks = [(n, v, s) for n in names for s in seeds for v in FAMILIES[n].variants]
    found: dict[tuple, Record] = {}
    if cache is not None:
        for task in tasks:
            record = load_record(cache_path(cache, key, *task))
            if record is not None:
                found[task] = record
    todo = [(*task, cache, key) for task in tasks if task not in found]
    if jobs <= 1 or len(todo) <= 1:
        for task in todo:
            found[task[:3]] = _train_task(task)
    else:
        with _pool(jobs) as pool:
            futures = {pool.submit(_train_task, task): task[:3] for task in todo}
            for future in as_completed(futures):
                found[futures[future]] = future.result()
    return [found[t] for t in tasks], {task[:3] for task in todo}


# ------------------------------------------------------------------------------------------------
# replay


class _Replayer:
    """Feeds one run's steps to the rules as ``Monitor`` would."""

    def __init__(self, record: Record, thresholds: Thresholds | None):
        th = thresholds if thresholds is not None else Thresholds()
        if not all(record.adam_groups):
            th = dataclasses.replace(th, bound_factor=math.inf)  # B_t bounds Adam's direction only
        self.record, self.thresholds = record, th
        self.rules: AlertRules | None = None
        self.betas: list[tuple[float, float]] | None = None
        self.seen: set[str] = set()

    def configure(self, step: int, t: int) -> list[Alert]:
        """Configuration alerts not said before, and rules for the betas of harness step ``t``."""
        record = self.record
        betas = [(float(b1), float(b2)) for b1, b2 in record.betas[t - 1]]
        checked = [b if adam else None for b, adam in zip(betas, record.adam_groups)]
        alerts = configuration_alerts(checked, optimizer=record.optimizer, step=1 if self.betas is None else step)
        fresh = [a for a in alerts if f"{a.rule}|{a.message}" not in self.seen]
        self.seen.update(f"{a.rule}|{a.message}" for a in fresh)
        pairs = record.tensor_betas(t)
        if self.rules is not None and hasattr(self.rules, "set_betas"):
            self.rules.set_betas(pairs)  # keeps the rules' state across the change
        else:
            self.rules = AlertRules(record.names, optimizer=record.optimizer, betas=pairs, thresholds=self.thresholds)
        self.betas = betas
        return fresh

    def step(self, k: int) -> list[Alert]:
        record = self.record
        step, t = int(record.read_steps[k]), int(record.read_at[k])
        alerts = []
        if self.betas is None or not np.array_equal(record.betas[t - 1], self.betas):
            alerts += self.configure(step, t)
        return alerts + self.rules.observe(step, torch.from_numpy(record.rows[k]), record.tensor_lrs(t))


def replay(record: Record, thresholds: Thresholds | None = None) -> list[Alert]:
    """The alerts the rules raise on this record with these thresholds."""
    replayer = _Replayer(record, thresholds)
    alerts = []
    for k in range(len(record.read_steps)):
        alerts += replayer.step(k)
    return alerts


def _alert_dicts(alerts: Sequence[Alert]) -> list[dict]:
    return [a.to_dict() for a in alerts]  # NaN-safe comparison


def replay_matches_live(name: str, variant: str, seed: int, cache: Path | None = None) -> bool:
    """A run trained with live rules raises exactly what its replay raises, twice over (the replay is
    deterministic), also from the record as the cache returns it."""
    record, live = train(FAMILIES[name], variant, seed, live=Thresholds())
    if len(np.unique(record.betas, axis=0)) > 1:
        raise ValueError(f"{name}/{variant}: its betas change, which the plain live rules do not follow")
    copies = [record]
    if cache is not None:
        path = cache / f"check-{name}-{variant}-{seed}.npz"
        save_record(record, path)
        copies.append(load_record(path))
    expected = _alert_dicts(live)
    return all(_alert_dicts(replay(r)) == expected for r in copies for _ in range(2))


# ------------------------------------------------------------------------------------------------
# labelling


def label_spikes(losses: Sequence[float], factor: float = SPIKE_FACTOR, window: int = WINDOW) -> list[int]:
    """First steps (1-based) of loss spikes: loss > factor x rolling median of the previous
    ``window`` losses, on two or more consecutive steps. A spike ends when the loss is back under
    the factor."""
    spikes, history = [], deque(maxlen=window)
    above, start = 0, None
    for i, loss in enumerate(losses):
        step = i + 1
        bar = factor * statistics.median(history) if len(history) >= MIN_HISTORY else math.inf
        if not math.isfinite(loss) or loss > bar:
            above += 1
            if above == 1:
                start = step
            if above == 2:
                spikes.append(start)
        else:
            above = 0
        if math.isfinite(loss):
            history.append(loss)  # a plateau raises its own bar: only a jump counts
    return spikes


def crossings(values: Sequence[float], level: float, rearm: float) -> list[int]:
    """Steps (1-based) where ``values`` reach ``level`` after having been below ``rearm`` (or never above)."""
    steps, armed = [], True
    for i, x in enumerate(values):
        if not math.isfinite(x):
            continue
        if armed and x >= level:
            steps.append(i + 1)
            armed = False
        elif x < rearm:
            armed = True
    return steps


def zscore_alerts(values: Sequence[float], window: int = Z_WINDOW, threshold: float = Z_THRESHOLD) -> list[int]:
    """Steps where ``values`` first exceed mean + threshold·std of the previous ``window`` values
    (once per excursion; non-finite values count as exceeding)."""
    steps, history, active = [], deque(maxlen=window), False
    for i, x in enumerate(values):
        hit = False
        if not math.isfinite(x):
            hit = True
        elif len(history) >= MIN_HISTORY:
            mean = statistics.fmean(history)
            std = statistics.pstdev(history, mean)
            hit = x > mean + threshold * max(std, 1e-12 * abs(mean))
        if hit and not active:
            steps.append(i + 1)
        active = hit
        if math.isfinite(x):
            history.append(x)
    return steps


def episode_starts(spikes: Sequence[int], window: int = WINDOW) -> list[int]:
    """Spikes with no other spike starting in the ``window`` steps before them."""
    return [s for i, s in enumerate(spikes) if i == 0 or s - spikes[i - 1] > window]


def is_regime(alert: Alert) -> bool:
    return alert.rule in REGIME_RULES or alert.severity == "info"


def fails_gate(alert: Alert) -> bool:
    """Whether ``adam-monitor check`` (default level: warning) fails on this alert."""
    return SEVERITY_ORDER.get(alert.severity, -1) >= SEVERITY_ORDER["warning"]


def _leads(spikes: Sequence[int], alert_steps: Sequence[int], config_flag: bool) -> list[int | None]:
    leads = []
    for s in spikes:
        if config_flag:
            leads.append(s - 1)
            continue
        ahead = [s - a for a in alert_steps if LEAD_MIN <= s - a <= LEAD_MAX]
        leads.append(max(ahead) if ahead else None)
    return leads


# ------------------------------------------------------------------------------------------------
# scoring


@dataclass
class Score:
    """One alarm's figures on one family (or several, added with ``+``)."""

    runs: int = 0  # spike runs
    spikes: int = 0
    caught: int = 0
    leads: list[int] = field(default_factory=list)
    episodes: int = 0
    episodes_caught: int = 0
    control_runs: int = 0
    control_steps: int = 0
    control_alerts: int = 0
    control_spikes: int = 0  # labelled on control runs (a control should have none)
    healthy_runs: int = 0
    healthy_steps: int = 0
    healthy_alerts: int = 0
    healthy_spikes: int = 0
    gate_failures: int = 0  # healthy runs with an alert of severity warning or above
    regime_alerts: int = 0  # on control and healthy runs, not counted as false alerts

    def __add__(self, other: Score) -> Score:
        return Score(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(Score)})

    @property
    def recall(self) -> float:
        return self.caught / self.spikes if self.spikes else math.nan

    @property
    def episode_recall(self) -> float:
        return self.episodes_caught / self.episodes if self.episodes else math.nan

    @property
    def median_lead(self) -> float:
        return statistics.median(self.leads) if self.leads else math.nan

    @property
    def control_false(self) -> float:
        """False alerts per 1,000 control steps."""
        return 1000 * self.control_alerts / self.control_steps if self.control_steps else math.nan

    @property
    def healthy_false(self) -> float:
        """False alerts per 1,000 healthy steps."""
        return 1000 * self.healthy_alerts / self.healthy_steps if self.healthy_steps else math.nan

    @property
    def is_healthy(self) -> bool:
        return self.healthy_runs > 0 and not self.runs and not self.control_runs


def _score_run(s: Score, record: Record, steps: Sequence[int], flagged: bool) -> None:
    """Add one run's alarm steps (harness steps) to ``s``; ``flagged``: beta_coupling at step 1."""
    if record.variant == SPIKE:
        s.runs += 1
        leads = _leads(record.spikes, steps, flagged)
        s.spikes += len(record.spikes)
        s.caught += sum(lead is not None for lead in leads)
        s.leads += [lead for lead in leads if lead is not None]
        onsets = set(episode_starts(record.spikes))
        s.episodes += len(onsets)
        s.episodes_caught += sum(lead is not None for sp, lead in zip(record.spikes, leads) if sp in onsets)
    elif record.variant == CONTROL:
        s.control_runs += 1
        s.control_steps += record.steps
        s.control_alerts += len(steps)
        s.control_spikes += len(record.spikes)
    else:
        s.healthy_runs += 1
        s.healthy_steps += record.steps
        s.healthy_alerts += len(steps)
        s.healthy_spikes += len(record.spikes)


def score_monitor(record: Record, alerts: Sequence[Alert], s: Score) -> None:
    """Add the monitor's alerts on one run to ``s``: on spike runs its precursor alerts predict, on
    control and healthy runs every alert that is not a regime alert is false."""
    harness_step = dict(zip(record.read_steps.tolist(), record.read_at.tolist()))
    when = [harness_step.get(a.step, a.step) for a in alerts]
    if record.variant == SPIKE:
        steps = sorted(t for a, t in zip(alerts, when) if a.rule in PRECURSOR_RULES and not is_regime(a))
    else:
        steps = sorted(t for a, t in zip(alerts, when) if not is_regime(a))
        s.regime_alerts += sum(map(is_regime, alerts))
    flagged = any(a.rule == "beta_coupling" and a.step == 1 for a in alerts)
    _score_run(s, record, steps, flagged)
    if record.variant == HEALTHY:
        s.gate_failures += any(map(fails_gate, alerts))


Table = dict[str, dict[str, Score]]  # family -> {MONITOR or a baseline: Score}


def score(records: Sequence[Record], alerts: Sequence[Sequence[Alert]]) -> Table:
    """Per family the monitor's score (from ``alerts``, one list per record) and each baseline's."""
    table: Table = {}
    for record, found in zip(records, alerts):
        row = table.setdefault(record.family, {who: Score() for who in WHO})
        score_monitor(record, found, row[MONITOR])
        for name, steps in record.baseline_steps.items():
            _score_run(row[name], record, steps, False)
    return table


def monitor_scores(records: Sequence[Record], thresholds: Thresholds | None) -> dict[str, Score]:
    """Per family the monitor's score with these thresholds (replayed)."""
    out: dict[str, Score] = {}
    for record in records:
        score_monitor(record, replay(record, thresholds), out.setdefault(record.family, Score()))
    return out


def total(scores: Iterable[Score]) -> Score:
    return sum(scores, Score())


def best_baseline(row: dict[str, Score]) -> str:
    """The baseline of highest recall (ties: fewer false alerts); for healthy families, fewest false alerts."""

    def merit(name: str) -> tuple:
        s = row[name]
        false = s.healthy_false if s.is_healthy else s.control_false
        recall = s.recall if not math.isnan(s.recall) else 0.0
        return (-recall, false if not math.isnan(false) else 0.0)

    return min(BASELINES, key=merit)


# ------------------------------------------------------------------------------------------------
# leave-one-family-out


def grid_points(grid: dict[str, Sequence[float]] = LOFO_GRID) -> list[dict[str, float]]:
    """Every combination of the grid's values for the names ``Thresholds`` has, valid ones only."""
    known = {f.name for f in dataclasses.fields(Thresholds)}
    names = [n for n in grid if n in known]
    points = []
    for values in itertools.product(*(grid[n] for n in names)):
        point = dict(zip(names, values))
        try:
            Thresholds(**point)
        except ValueError:
            continue  # a combination the thresholds' own checks reject
        points.append(point)
    return points


def distance_from_defaults(point: dict[str, float]) -> float:
    """Sum of |log ratio| to the defaults; a value of 0 (a mechanism switched off) counts as one log
    unit per decade of the default it replaces, plus one."""
    defaults = Thresholds()

    def far(v: float, d: float) -> float:
        if v == d:
            return 0.0
        if v <= 0 or d <= 0:
            return 1.0 + math.log10(max(abs(v), abs(d), 1.0))
        return abs(math.log(v / d))

    return sum(far(v, getattr(defaults, n)) for n, v in point.items())


def _rate(alerts: int, steps: int) -> float:
    return 1000 * alerts / steps if steps else 0.0


def choose(scores: Sequence[dict[str, Score]], points: Sequence[dict], families: Sequence[str]) -> int:
    """Index of the grid point chosen on ``families`` (their scores at each point, ``scores[i]``)."""

    def merit(i: int) -> tuple:
        s = total(scores[i][f] for f in families)
        control, healthy = _rate(s.control_alerts, s.control_steps), _rate(s.healthy_alerts, s.healthy_steps)
        feasible = control <= MAX_CONTROL_FALSE and healthy <= MAX_HEALTHY_FALSE
        false = s.control_alerts + s.healthy_alerts
        return (not feasible, 0 if feasible else false, -s.caught, distance_from_defaults(points[i]), i)

    return min(range(len(points)), key=merit)


@dataclass
class Lofo:
    points: list[dict[str, float]]
    chosen: dict[str, int]  # held-out family -> index of its chosen point
    held_out: dict[str, Score]  # held-out family -> its monitor score at that point
    feasible: dict[str, bool]  # whether the chosen point met both false-alert limits on the others


_REPLAY_RECORDS: list[Record] = []  # set before forking the replay workers, which inherit it


def _forked_map(fn: Callable, items: Sequence, records: Sequence[Record], jobs: int) -> list:
    """``fn`` over ``items`` in ``jobs`` processes that see ``records`` as ``_REPLAY_RECORDS``
    (inherited by the fork, not sent to each task)."""
    global _REPLAY_RECORDS
    _REPLAY_RECORDS = list(records)
    try:
        if jobs <= 1 or len(items) <= 1:
            return [fn(item) for item in items]
        with _pool(jobs) as pool:
            return list(pool.map(fn, items, chunksize=max(1, len(items) // (4 * jobs))))
    finally:
        _REPLAY_RECORDS = []


def _replay_index(task: tuple[int, Thresholds | None]) -> list[Alert]:
    torch.set_num_threads(1)
    return replay(_REPLAY_RECORDS[task[0]], task[1])


def replay_all(records: Sequence[Record], thresholds: Thresholds | None = None, jobs: int = 1) -> list[list[Alert]]:
    return _forked_map(_replay_index, [(i, thresholds) for i in range(len(records))], records, jobs)


def _replay_point(point: dict[str, float]) -> dict[str, Score]:
    torch.set_num_threads(1)
    return monitor_scores(_REPLAY_RECORDS, Thresholds(**point))


def grid_scores(records: Sequence[Record], points: Sequence[dict], jobs: int = 1) -> list[dict[str, Score]]:
    """Per grid point, per family, the monitor's score (records replayed, never retrained)."""
    return _forked_map(_replay_point, points, records, jobs)


def leave_one_family_out(records: Sequence[Record], jobs: int = 1) -> Lofo:
    points = grid_points()
    scores = grid_scores(records, points, jobs)
    names = list(dict.fromkeys(r.family for r in records))
    healthy = [n for n in names if FAMILIES[n].healthy]
    spiky = [n for n in names if n not in healthy]
    chosen, feasible = {}, {}
    for name in names:
        others = spiky + [h for h in healthy if h != name] if name in healthy else [n for n in names if n != name]
        i = choose(scores, points, others)
        s = total(scores[i][f] for f in others)
        chosen[name] = i
        feasible[name] = (
            _rate(s.control_alerts, s.control_steps) <= MAX_CONTROL_FALSE
            and _rate(s.healthy_alerts, s.healthy_steps) <= MAX_HEALTHY_FALSE
        )
    return Lofo(points, chosen, {n: scores[chosen[n]][n] for n in names}, feasible)


def lofo_table(table: Table, lofo: Lofo) -> Table:
    """``table`` with each family's monitor score replaced by its held-out one."""
    return {name: {**row, MONITOR: lofo.held_out[name]} for name, row in table.items()}


# ------------------------------------------------------------------------------------------------
# the goal


def _below(monitor: float, baselines: Iterable[float]) -> bool:
    """No higher than any baseline and strictly below it unless the monitor raised none."""
    return all(monitor == 0 or monitor < b for b in baselines)


def goal_met(table: Table) -> dict[str, bool]:
    """Each clause of the goal on ``table`` (the held-out table of ``lofo_table``, or the
    default-threshold one): per spike family recall, then pooled lead, false alerts and the gate."""
    spiky = {n: row for n, row in table.items() if not row[MONITOR].is_healthy}
    everything = {who: total(row[who] for row in table.values()) for who in WHO}
    m = everything[MONITOR]
    met = {
        f"{n} recall": row[MONITOR].recall >= GOAL_RECALL and row[MONITOR].recall >= row[best_baseline(row)].recall
        for n, row in spiky.items()
    }
    met["median lead"] = total(row[MONITOR] for row in spiky.values()).median_lead >= GOAL_LEAD
    control, healthy = _rate(m.control_alerts, m.control_steps), _rate(m.healthy_alerts, m.healthy_steps)
    met["control false"] = control <= MAX_CONTROL_FALSE and _below(
        control, (_rate(everything[b].control_alerts, everything[b].control_steps) for b in BASELINES)
    )
    met["healthy false"] = healthy <= MAX_HEALTHY_FALSE and _below(
        healthy, (_rate(everything[b].healthy_alerts, everything[b].healthy_steps) for b in BASELINES)
    )
    met["gate"] = m.gate_failures == 0
    return met


def goal_line(table: Table, label: str) -> str:
    met = goal_met(table)
    everything = {who: total(row[who] for row in table.values()) for who in WHO}
    m = everything[MONITOR]
    spiky = total(row[MONITOR] for row in table.values() if not row[MONITOR].is_healthy)
    failed = [k for k, ok in met.items() if not ok]
    base = ", ".join(
        f"{b} {_rate(everything[b].control_alerts, everything[b].control_steps):.2f} / "
        f"{_rate(everything[b].healthy_alerts, everything[b].healthy_steps):.2f}"
        for b in BASELINES
    )
    return (
        f"goal ({label}: every spike family's recall >= {GOAL_RECALL:g} and >= its best baseline's, pooled "
        f"median lead >= {GOAL_LEAD:g}, <= {MAX_CONTROL_FALSE:g} false/1000 on controls and <= "
        f"{MAX_HEALTHY_FALSE:g} on healthy runs and below every baseline's, no healthy run failing the gate): "
        f"{'MET' if not failed else 'NOT met (' + '; '.join(failed) + ')'}. Pooled: recall {spiky.recall:.2f}, "
        f"median lead {spiky.median_lead:g}, false/1000 controls {_rate(m.control_alerts, m.control_steps):.2f}, "
        f"healthy {_rate(m.healthy_alerts, m.healthy_steps):.2f} (baselines, controls / healthy: {base}); "
        f"healthy runs failing the gate: {m.gate_failures} of {m.healthy_runs}"
    )


# ------------------------------------------------------------------------------------------------
# tables


def _fmt(x: float, spec: str = ".2f") -> str:
    return "–" if isinstance(x, float) and math.isnan(x) else format(x, spec)


def _cell(s: Score) -> str:
    """recall / median lead / false per 1000 (of control steps, or of healthy steps)."""
    if s.is_healthy:
        return f"– / – / {_fmt(s.healthy_false)}"
    return f"{_fmt(s.recall)} / {_fmt(s.median_lead, 'g')} / {_fmt(s.control_false)}"


def _kind(s: Score) -> str:
    return "healthy" if s.is_healthy else "spike"


def _gate(s: Score) -> str:
    return f"{s.healthy_runs - s.gate_failures}/{s.healthy_runs} pass" if s.healthy_runs else "–"


def _pooled_rows(table: Table) -> list[tuple[str, dict[str, Score]]]:
    groups = {
        "all spike families": [row for row in table.values() if not row[MONITOR].is_healthy],
        "all healthy families": [row for row in table.values() if row[MONITOR].is_healthy],
    }
    return [(label, {who: total(r[who] for r in rows) for who in WHO}) for label, rows in groups.items() if rows]


def format_table(table: Table) -> str:
    """The monitor beside each baseline, per family and pooled. Cells: recall / median lead / false
    alerts per 1,000 steps of the controls (spike families) or of the runs (healthy families)."""
    head = (
        "| family | kind | runs | spikes (control/healthy) | monitor | episodes (monitor / best baseline) | "
        + " | ".join(BASELINES)
        + " | best baseline | regime alerts | gate |"
    )
    head = head.replace(" | best baseline", " | " + " | ".join(CANDIDATES) + " | best baseline")
    lines = [head, "|" + "---|" * (9 + len(BASELINES) + len(CANDIDATES))]
    for name, row in list(table.items()) + _pooled_rows(table):
        m = row[MONITOR]
        best = best_baseline(row)
        runs = m.healthy_runs if m.is_healthy else m.runs
        spikes = f"{m.spikes} ({m.control_spikes + m.healthy_spikes})"
        episodes = "–" if m.is_healthy else f"{m.episodes}: {_fmt(m.episode_recall)} / {_fmt(row[best].episode_recall)}"
        lines.append(
            f"| {name} | {_kind(m)} | {runs} | {spikes} | {_cell(m)} | {episodes} | "
            + " | ".join(_cell(row[b]) for b in (*BASELINES, *CANDIDATES))
            + f" | {best}: {_cell(row[best])} | {m.regime_alerts} | {_gate(m)} |"
        )
    return "\n".join(lines)


def _point_text(point: dict[str, float]) -> str:
    defaults = Thresholds()
    changed = [f"{n}={v:g}" for n, v in point.items() if v != getattr(defaults, n)]
    return ", ".join(changed) or "defaults"


def format_lofo(table: Table, lofo: Lofo) -> str:
    """Per family the point chosen on the others and its held-out figures, beside the defaults'."""
    held = lofo_table(table, lofo)
    lines = [
        "| held-out family | kind | chosen on the others | held out: recall / lead / false per 1000 | "
        "defaults | best baseline | gate |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in table.items():
        h = held[name][MONITOR]
        best = best_baseline(row)
        note = "" if lofo.feasible[name] else " (no point met the limits)"
        lines.append(
            f"| {name} | {_kind(h)} | {_point_text(lofo.points[lofo.chosen[name]])}{note} | {_cell(h)} | "
            f"{_cell(row[MONITOR])} | {best}: {_cell(row[best])} | {_gate(h)} |"
        )
    for label, row in _pooled_rows(held):
        lines.append(f"| {label} | | | {_cell(row[MONITOR])} | | | {_gate(row[MONITOR])} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# checks of the mechanism


def mechanism_check(records: Sequence[Record]) -> dict[str, str]:
    """Per family, on the loss alone: spike runs that spiked, controls and healthy runs that did not."""
    out: dict[str, list[int]] = {}
    for r in records:
        c = out.setdefault(r.family, [0, 0, 0, 0])  # spiked spike runs, spike runs, quiet others, others
        if r.variant == SPIKE:
            c[0] += bool(r.spikes)
            c[1] += 1
        else:
            c[2] += not r.spikes
            c[3] += 1
    return {
        n: (f"{c[2]}/{c[3]} healthy runs quiet" if FAMILIES[n].healthy else f"{c[0]}/{c[1]} spike runs spiked, ")
        + ("" if FAMILIES[n].healthy else f"{c[2]}/{c[3]} controls quiet")
        for n, c in out.items()
    }


def mechanism_holds(records: Sequence[Record]) -> bool:
    return all((bool(r.spikes) if r.variant == SPIKE else not r.spikes) for r in records)


def coupling_flagged_at_step_1(records: Sequence[Record], alerts: Sequence[Sequence[Alert]]) -> bool | None:
    """Every run starting with β1² ≥ β2 in some group (β1 > 0) raised ``beta_coupling`` at step 1
    (None: no such run)."""
    coupled = [
        found
        for record, found in zip(records, alerts)
        if any(b1 > 0 and b1 * b1 >= b2 for b1, b2 in record.betas[0].tolist())
    ]
    if not coupled:
        return None
    return all(any(a.rule == "beta_coupling" and a.step == 1 for a in found) for found in coupled)


# ------------------------------------------------------------------------------------------------
# entry points


def evaluate(
    seeds: Sequence[int],
    names: Sequence[str] | None = None,
    jobs: int = 1,
    cache: Path | None = DEFAULT_CACHE,
    thresholds: Thresholds | None = None,
) -> tuple[list[Record], list[list[Alert]], Table, set[tuple[str, str, int]]]:
    """Records (trained or cached), their replayed alerts, the score table, and the keys trained now."""
    records, trained = record_runs(list(names or FAMILIES), seeds, jobs, cache)
    alerts = replay_all(records, thresholds, jobs)
    return records, alerts, score(records, alerts), trained


def quick(
    thresholds: Thresholds | None = None, jobs: int = 2, cache: Path | None = DEFAULT_CACHE
) -> dict[str, dict[str, Score]]:
    """The default-threshold score table of seed 0 of every family (what the slow test runs)."""
    return evaluate((0,), jobs=jobs, cache=cache, thresholds=thresholds)[2]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="seed 0 of every family, default thresholds only (no leave-one-family-out)"
    )
    parser.add_argument("--jobs", type=int, default=2, help="processes for training and replays (default 2)")
    parser.add_argument("--seeds", type=int, nargs="+", metavar="SEED", help="these seeds (default 0 1 2)")
    parser.add_argument(
        "--family", action="extend", nargs="+", choices=sorted(FAMILIES), metavar="NAME", help="only these families"
    )
    parser.add_argument("--no-lofo", action="store_true", help="default thresholds only, no leave-one-family-out")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"records cache (default {DEFAULT_CACHE})")
    where.add_argument("--no-cache", action="store_true", help="train every run, read and write no cache")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    torch.set_num_threads(1)  # tiny tensors: a thread pool only adds spin-waits
    seeds = tuple(args.seeds) if args.seeds else (0,) if args.quick else (0, 1, 2)
    cache = None if args.no_cache else args.cache
    start = time.perf_counter()
    records, alerts, table, trained = evaluate(seeds, args.family, args.jobs, cache)
    recorded = time.perf_counter() - start
    print(f"seeds {', '.join(map(str, seeds))}; default thresholds ({Thresholds()}):\n")
    print(format_table(table))
    print(f"\non the loss alone: {mechanism_check(records)}")
    print(
        f"beta_coupling raised at step 1 in every run with beta1^2 >= beta2: {coupling_flagged_at_step_1(records, alerts)}"
    )
    print(goal_line(table, "default thresholds, in-sample"))
    lofo_seconds = 0.0
    if not (args.no_lofo or args.quick):
        lofo_start = time.perf_counter()
        lofo = leave_one_family_out(records, args.jobs)
        lofo_seconds = time.perf_counter() - lofo_start
        names = ", ".join(f"{n} {LOFO_GRID[n]}" for n in lofo.points[0]) if lofo.points else "none"
        print(f"\nleave-one-family-out over {len(lofo.points)} grid points ({names}):\n")
        print(format_lofo(table, lofo))
        print(goal_line(lofo_table(table, lofo), "leave-one-family-out"))
    steps = sum(r.steps for r in records)
    trained_seconds = sum(r.seconds for r in records if r.key in trained)
    print(
        f"\n{len(records)} runs, {steps} steps ({len(trained)} trained, {len(records) - len(trained)} from "
        f"{cache if cache is not None else 'no cache'}): records and default replay {recorded:.0f} s, "
        f"leave-one-family-out {lofo_seconds:.0f} s, total {time.perf_counter() - start:.0f} s "
        f"(jobs {args.jobs}{f', training {trained_seconds:.0f} s of process time' if trained else ''})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
