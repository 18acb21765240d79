"""Calibration of the alert rules on small real training runs with and without loss spikes.

Run ``python tests/benchmarks/spike_scenarios.py [--quick] [--jobs N]``. Four scenario families,
each a spike run and its matched stable control over several seeds (plain torch loops on data
generated in-process: a small MLP on a synthetic teacher regression; for ``high_lr`` a tiny
transformer on a sequence task, ``TASKS``):

a. ``stale_v``: the loss weight declines geometrically to 1e-4 over steps 200–400, stays there
   until step 800 and jumps back to 1 (β2 = 0.995: v̂ lags the decline and the gradient then
   outruns it); control: the same run with the weight held at 1.
b. ``high_lr``: a 2-layer causal transformer without normalization layers (d = 32, 2 heads) on
   sequence reversal with 5% label noise (loss floor ~0.4 nats), β = (0.9, 0.999), a 100-step
   linear warmup to lr 3e-2, gradient norm clipped at 20 (a loose safety clip: the control's norm is
   ~0.5); the model learns the task (loss 0.7–0.9 by step 100), then single-step gradient bursts of the
   first-layer and embedding tensors set in and the loss spikes (steps 182–216) and recovers;
   control: lr 1e-2, otherwise the same. Warmup does not prevent these spikes (without it the run is
   chaotic from the start and spikes in fewer seeds): the peak lr does (CALIBRATION.md).
c. ``beta_coupling``: β = (0.95, 0.8), β1² > β2; the loss weight drops to 1e-3 at step 200, so
   m decays like β1^k and √v like β2^{k/2}: the update grows by β1/√β2 = 1.06 per step;
   control: β = (0.9, 0.95), same drop.
d. ``tiny_eps``: full batch, ε = 1e-12: once converged √v̂ decays, the preconditioned sharpness
   η·λ/(√v̂+ε) grows by β2^{-1/2} per step and its crossing of (2+2β1)/(1-β1) = 38 starts a spike
   (around step 260), after which the run stays in a chaotic spiking regime; control: ε = 1e-3
   caps it (ε then sets the step: ``eps_dominance`` fires there, truly — see REGIME_RULES).

A spike is a loss above ``SPIKE_FACTOR`` x its rolling median over the previous ``WINDOW`` steps
for more than one step in a row. An alert of a precursor rule predicts it when it is raised 1–20
steps before the spike's first step (``beta_coupling`` from configuration_alerts: at step 1). The
baseline is what a user already has: a z-score of the loss or of the gradient norm over a rolling
window (OLMo, Lightning's SpikeDetection), alerting once per excursion. An *episode* is a spike with
no other spike starting in the ``WINDOW`` steps before it (the onset of a spiking regime); its recall
is reported beside the per-spike recall. ``eps_dominance`` states a regime (Adam acting as SGD with
lr η/ε), not a coming spike: its alerts are counted apart, not as predictions or false alerts.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from adam_monitor.alerts import Alert, AlertRules, Thresholds, configuration_alerts  # noqa: E402
from adam_monitor.engine.reader import StepReader  # noqa: E402

PRECURSOR_RULES = ("stale_second_moment", "update_rms_spike", "gradient_growth", "nonfinite", "beta_coupling")
REGIME_RULES = ("eps_dominance",)
SPIKE_FACTOR = 3.0
WINDOW = 50
MIN_HISTORY = 10
LEAD_MIN, LEAD_MAX = 1, 20
Z_WINDOW, Z_THRESHOLD = 50, 6.0


# ------------------------------------------------------------------------------------------------
# training runs


@dataclass
class RunConfig:
    steps: int
    betas: tuple[float, float] = (0.9, 0.999)
    lr: float = 1e-2
    eps: float = 1e-8
    warmup: int = 0
    full_batch: bool = False
    weight: Callable[[int], float] | None = None  # loss weight at step t (the reported loss is unweighted)
    model: str = "teacher_mlp"  # a key of TASKS: the model and the data it trains on
    clip: float = 0.0  # clip the gradient norm to this before the step (0: no clipping)


@dataclass
class Run:
    scenario: str
    kind: str  # "spike" or "control"
    seed: int
    losses: list[float]
    grad_norms: list[float]
    alerts: list[Alert]


def _mlp(d: int, h: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(d, h), torch.nn.Tanh(), torch.nn.Linear(h, h), torch.nn.Tanh(), torch.nn.Linear(h, 1)
    )


@dataclass
class Task:
    model: torch.nn.Module
    loss: Callable[[int], torch.Tensor]  # the (unweighted) training loss of step t, graph attached


def _teacher_task(cfg: RunConfig, seed: int, d: int = 16, h: int = 64) -> Task:
    """The student MLP on a teacher MLP's outputs (noise 0.1; ``full_batch``: 256 fixed points, no noise)."""
    torch.manual_seed(seed)
    teacher, model = _mlp(d, h), _mlp(d, h)
    teacher.requires_grad_(False)
    fixed_x = torch.randn(256, d)
    fixed_y = teacher(fixed_x)

    def loss(t: int) -> torch.Tensor:
        if cfg.full_batch:
            x, y = fixed_x, fixed_y
        else:
            x = torch.randn(256, d)
            y = teacher(x) + 0.1 * torch.randn(256, 1)
        return torch.nn.functional.mse_loss(model(x), y)

    return Task(model, loss)


class _Block(torch.nn.Module):
    """A transformer block without normalization layers: x + attn(x), then x + mlp(x)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.proj = torch.nn.Linear(d, d)
        self.fc1, self.fc2 = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class _TinyGPT(torch.nn.Module):
    def __init__(self, vocab: int, ctx: int, d: int, heads: int, layers: int):
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Embedding(ctx, d)
        self.blocks = torch.nn.Sequential(*[_Block(d, heads) for _ in range(layers)])
        self.head = torch.nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.tok(idx) + self.pos(torch.arange(idx.shape[1]))))


def _reverse_task(
    cfg: RunConfig,
    seed: int,
    vocab: int = 32,
    n: int = 15,
    d: int = 32,
    heads: int = 2,
    layers: int = 2,
    batch: int = 16,
    noise: float = 0.05,
) -> Task:
    """A 2-layer, 2-head, d = 32 causal transformer without normalization layers, next-token
    cross-entropy on ``a_1 … a_n SEP a_n … a_1`` (n = 15 random tokens of 31, then their reverse;
    only the reversed half is scored), each target replaced by a random token with probability
    ``noise``: the loss floor is ~0.36 nats (0.4–0.45 reached), so the gradient never vanishes
    (without the noise the loss falls to ~1e-3 and then spikes even at lr 3e-3: the vanishing-gradient
    mechanism of ``tiny_eps``, not a too-high lr) and a 3x spike means the learned attention pattern
    broke. Fresh sequences each step, drawn in advance."""
    torch.manual_seed(seed)
    model = _TinyGPT(vocab, 2 * n + 1, d, heads, layers)
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(vocab - 1, (cfg.steps * batch, n), generator=gen)
    seq = torch.cat([a, torch.full((cfg.steps * batch, 1), vocab - 1), a.flip(1)], 1)
    x, y = seq[:, :-1], seq[:, 1:].clone()
    flip = torch.rand(y.shape, generator=gen) < noise
    y = torch.where(flip, torch.randint(vocab - 1, y.shape, generator=gen), y)
    y[:, :n] = -100  # the random half is not predictable

    def loss(t: int) -> torch.Tensor:
        rows = slice((t - 1) * batch, t * batch)
        logits = model(x[rows]).reshape(-1, vocab)
        return torch.nn.functional.cross_entropy(logits, y[rows].reshape(-1), ignore_index=-100)

    return Task(model, loss)


TASKS: dict[str, Callable[[RunConfig, int], Task]] = {
    "teacher_mlp": _teacher_task,
    "reverse_gpt": _reverse_task,
}


def train(cfg: RunConfig, seed: int, thresholds: Thresholds | None = None) -> tuple:
    """Train ``TASKS[cfg.model]`` with Adam, the monitor's rules reading each step; returns
    (losses, grad_norms, alerts). ``grad_norms`` are before clipping; the rules see the gradient the
    step used."""
    task = TASKS[cfg.model](cfg, seed)
    model = task.model
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    names = [n for n, _ in model.named_parameters()]
    reader = StepReader(opt)
    rules = AlertRules(names, optimizer="Adam", betas=cfg.betas, thresholds=thresholds)
    alerts = configuration_alerts([g["betas"] for g in opt.param_groups], optimizer="Adam", step=1)
    params = list(model.parameters())
    losses, grad_norms = [], []
    for t in range(1, cfg.steps + 1):
        if cfg.warmup:
            for g in opt.param_groups:
                g["lr"] = cfg.lr * min(1.0, t / cfg.warmup)
        loss = task.loss(t)
        opt.zero_grad(set_to_none=False)
        (loss * (cfg.weight(t) if cfg.weight else 1.0)).backward()
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        if cfg.clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)  # the monitor sees the clipped gradient
        opt.step()
        result = reader.read()
        if result is not None:
            alerts += rules.observe(result[1], result[0])
        losses.append(loss.item())
        grad_norms.append(grad_norm.item())
    return losses, grad_norms, alerts


def _decline(t: int, floor: float) -> float:
    """1 up to step 200, then a geometric decline to ``floor`` over 200 steps."""
    return floor ** min(1.0, max(0.0, (t - 200) / 200))


def _stale_weight(t: int) -> float:
    return _decline(t, 1e-4) if t <= 800 else 1.0


def _vanishing_weight(t: int) -> float:
    return 1.0 if t <= 200 else 1e-3


SCENARIOS: dict[str, tuple[RunConfig, RunConfig]] = {
    "stale_v": (
        RunConfig(steps=900, betas=(0.9, 0.995), lr=3e-2, weight=_stale_weight),
        RunConfig(steps=900, betas=(0.9, 0.995), lr=3e-2),
    ),
    "high_lr": (
        RunConfig(steps=500, betas=(0.9, 0.999), lr=3e-2, warmup=100, clip=20.0, model="reverse_gpt"),
        RunConfig(steps=500, betas=(0.9, 0.999), lr=1e-2, warmup=100, clip=20.0, model="reverse_gpt"),
    ),
    "beta_coupling": (
        RunConfig(steps=400, betas=(0.95, 0.8), lr=1e-2, weight=_vanishing_weight),
        RunConfig(steps=400, betas=(0.9, 0.95), lr=1e-2, weight=_vanishing_weight),
    ),
    "tiny_eps": (
        RunConfig(steps=700, betas=(0.9, 0.99), lr=1e-2, eps=1e-12, full_batch=True),
        RunConfig(steps=700, betas=(0.9, 0.99), lr=1e-2, eps=1e-3, full_batch=True),
    ),
}


def _run_one(task: tuple) -> Run:
    name, kind, seed, thresholds = task
    torch.set_num_threads(1)  # tiny tensors: a thread pool only adds spin-waits
    cfg = SCENARIOS[name][0 if kind == "spike" else 1]
    losses, grad_norms, alerts = train(cfg, seed, thresholds)
    return Run(name, kind, seed, losses, grad_norms, alerts)


def run_scenarios(
    seeds: Sequence[int],
    names: Sequence[str] | None = None,
    thresholds: Thresholds | None = None,
    jobs: int = 1,
) -> list[Run]:
    """All (scenario, seed, spike/control) runs; ``jobs`` > 1 trains them in that many processes."""
    tasks = [
        (name, kind, seed, thresholds) for name in names or SCENARIOS for seed in seeds for kind in ("spike", "control")
    ]
    if jobs <= 1:
        return [_run_one(t) for t in tasks]
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_run_one, tasks))


# ------------------------------------------------------------------------------------------------
# labelling and scoring


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


def monitor_alert_steps(run: Run) -> list[int]:
    return sorted(a.step for a in run.alerts if a.rule in PRECURSOR_RULES)


def regime_alert_steps(run: Run) -> list[int]:
    return sorted(a.step for a in run.alerts if a.rule in REGIME_RULES)


def episode_starts(spikes: Sequence[int], window: int = WINDOW) -> list[int]:
    """Spikes with no other spike starting in the ``window`` steps before them."""
    return [s for i, s in enumerate(spikes) if i == 0 or s - spikes[i - 1] > window]


def baseline_alert_steps(run: Run) -> list[int]:
    return sorted(set(zscore_alerts(run.losses)) | set(zscore_alerts(run.grad_norms)))


def _leads(spikes: Sequence[int], alert_steps: Sequence[int], config_flag: bool) -> list[int | None]:
    leads = []
    for s in spikes:
        if config_flag:
            leads.append(s - 1)
            continue
        ahead = [s - a for a in alert_steps if LEAD_MIN <= s - a <= LEAD_MAX]
        leads.append(max(ahead) if ahead else None)
    return leads


@dataclass
class Score:
    runs: int = 0
    spikes: int = 0
    caught: int = 0
    leads: list[int] = field(default_factory=list)
    control_steps: int = 0
    control_alerts: int = 0
    episodes: int = 0
    episodes_caught: int = 0
    regime_alerts: int = 0  # eps_dominance on control runs (not counted as false alerts)

    @property
    def episode_recall(self) -> float:
        return self.episodes_caught / self.episodes if self.episodes else math.nan

    @property
    def recall(self) -> float:
        return self.caught / self.spikes if self.spikes else math.nan

    @property
    def median_lead(self) -> float:
        return statistics.median(self.leads) if self.leads else math.nan

    @property
    def false_per_1000(self) -> float:
        return 1000 * self.control_alerts / self.control_steps if self.control_steps else math.nan


def score(runs: Sequence[Run]) -> dict[str, dict[str, Score]]:
    """``{scenario: {"monitor": Score, "baseline": Score}}`` (spikes of control runs are not scored)."""
    table: dict[str, dict[str, Score]] = {}
    for run in runs:
        row = table.setdefault(run.scenario, {"monitor": Score(), "baseline": Score()})
        flagged = any(a.rule == "beta_coupling" and a.step == 1 for a in run.alerts)
        for who, steps, config in (
            ("monitor", monitor_alert_steps(run), flagged),
            ("baseline", baseline_alert_steps(run), False),
        ):
            s = row[who]
            if run.kind == "spike":
                s.runs += 1
                spikes = label_spikes(run.losses)
                leads = _leads(spikes, steps, config)
                s.spikes += len(spikes)
                s.caught += sum(lead is not None for lead in leads)
                s.leads += [lead for lead in leads if lead is not None]
                onsets = set(episode_starts(spikes))
                s.episodes += len(onsets)
                s.episodes_caught += sum(lead is not None for sp, lead in zip(spikes, leads) if sp in onsets)
            else:
                s.control_steps += len(run.losses)
                s.control_alerts += len(steps)
                if who == "monitor":
                    s.regime_alerts += len(regime_alert_steps(run))
    return table


def control_spikes(runs: Sequence[Run]) -> int:
    return sum(len(label_spikes(r.losses)) for r in runs if r.kind == "control")


def combined(table: dict[str, dict[str, Score]]) -> dict[str, Score]:
    """The scores of all scenarios together (leads pooled, not a mean of medians)."""
    total = {"monitor": Score(), "baseline": Score()}
    for row in table.values():
        for who, t in total.items():
            for f in fields(Score):  # counts add up, lists of leads concatenate
                setattr(t, f.name, getattr(t, f.name) + getattr(row[who], f.name))
    return total


def format_table(table: dict[str, dict[str, Score]]) -> str:
    head = (
        "| scenario | runs | spikes | monitor recall | monitor median lead | monitor false/1000 | "
        "baseline recall | baseline median lead | baseline false/1000 | episodes | monitor / baseline "
        "episode recall |"
    )
    lines = [head, "|" + "---|" * 11]
    for name, row in list(table.items()) + [("all", combined(table))]:
        m, b = row["monitor"], row["baseline"]
        lines.append(
            f"| {name} | {m.runs} | {m.spikes} | {m.recall:.2f} | {m.median_lead:g} | {m.false_per_1000:.2f} | "
            f"{b.recall:.2f} | {b.median_lead:g} | {b.false_per_1000:.2f} | {m.episodes} | "
            f"{m.episode_recall:.2f} / {b.episode_recall:.2f} |"
        )
    regime = {name: row["monitor"].regime_alerts for name, row in table.items() if row["monitor"].regime_alerts}
    lines.append(f"\nregime alerts (eps_dominance) on control runs, not counted above: {regime or 'none'}")
    return "\n".join(lines)


def goal_met(table: dict[str, dict[str, Score]], min_recall=0.9, min_lead=3.0, max_false=0.5) -> dict[str, bool]:
    """Whether recall, median lead and false-alert rate of the monitor meet the goal: for all
    scenarios together (``"all"``, the goal as stated) and for each scenario."""
    rows = {"all": combined(table), **table}
    return {
        name: row["monitor"].recall >= min_recall
        and row["monitor"].median_lead >= min_lead
        and row["monitor"].false_per_1000 <= max_false
        for name, row in rows.items()
    }


def coupling_flagged_at_step_1(runs: Sequence[Run]) -> bool | None:
    """Every run whose betas have β1² ≥ β2 raised ``beta_coupling`` at step 1 (None: no such run)."""
    coupled = [r for r in runs if r.scenario == "beta_coupling" and r.kind == "spike"]
    if not coupled:
        return None
    return all(any(a.rule == "beta_coupling" and a.step == 1 for a in r.alerts) for r in coupled)


def quick(thresholds: Thresholds | None = None, jobs: int = 2) -> dict[str, dict[str, Score]]:
    """The reduced calibration (one seed) a slow test runs."""
    return score(run_scenarios(seeds=(0,), thresholds=thresholds, jobs=jobs))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed instead of three (about 20-40 s)")
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS), help="only these scenarios")
    parser.add_argument("--jobs", type=int, default=2, help="training processes (default 2)")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        metavar="SEED",
        help="these seeds instead (the thresholds were chosen on seeds 0-26: 27 and up are held out)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny tensors: a thread pool only adds spin-waits
    seeds = tuple(args.seeds) if args.seeds else (0,) if args.quick else (0, 1, 2)
    start = time.perf_counter()
    runs = run_scenarios(seeds, args.scenario, jobs=args.jobs)
    table = score(runs)
    print(format_table(table))
    print(f"\nspikes labelled in control runs: {control_spikes(runs)}")
    met = goal_met(table)
    print(
        "goal (recall >= 0.9, median lead >= 3 steps, <= 0.5 false alerts per 1000 control steps): "
        f"all scenarios together {'met' if met.pop('all') else 'NOT met'}; per scenario {met}"
    )
    print(f"beta_coupling raised at step 1 in every β1² > β2 run: {coupling_flagged_at_step_1(runs)}")
    print(f"Thresholds: {Thresholds()}")
    print(f"{len(runs)} runs, {sum(len(r.losses) for r in runs)} steps in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
