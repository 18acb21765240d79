"""Does an lr raised at once spike the loss? Three lr raises beside the benchmark's ``lr_step``.

``step_size_jump`` was built on the ``lr_step`` family (``families_spike.py``: a converged run
whose lr steps ×100 at once), which its spikes follow. These runs, of other models and data, tell
whether what it sees predicts a spike elsewhere: after training for a while at a low lr, the lr
of every group is raised ×10 or ×100 at once, against the same raise ramped over 100 steps (seeds
outside the benchmark's). Per run: the loss before the raise and the largest after it, the
spikes (``spike_scenarios.label_spikes``), the ``step_size_jump`` alerts (step, ratio) and the
first warnings of the other rules. ``python tests/benchmarks/step_size_check.py`` (about 3 minutes).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# Its models and set-up: the same data and harness, the seeds outside the benchmark's.
from fresh_state_check import SEEDS, SPIKE, Family, Setup, bench, fh  # noqa: E402

RAMP = 100
FACTORS = (10, 100)


def _raised(opt: torch.optim.Optimizer, variant: str, at: int, low: float, high: float):
    """After step t: every group's lr for step t + 1, ``low`` before ``at``, ``high`` from ``at`` on
    (spike) or ramped there over ``RAMP`` steps."""
    ramp = 1 if variant == SPIKE else RAMP

    def after(t: int) -> None:
        for group in opt.param_groups:
            group["lr"] = low + (high - low) * min(1.0, max(0.0, (t + 2 - at) / ramp))

    return after


def char_mlp(seed: int, variant: str, factor: float, at: int = 300, low: float = 1e-3) -> Setup:
    model, loss = fh.char_mlp_loss(seed, 500)
    opt = torch.optim.Adam(model.parameters(), lr=low)
    return Setup(model, opt, loss, steps=500, after_step=_raised(opt, variant, at, low, low * factor))


def gpt(seed: int, variant: str, factor: float, at: int = 250, low: float = 3e-4) -> Setup:
    torch.manual_seed(seed)
    _, vocab = fh.stdlib_text()
    model = fh.NormGPT(vocab, 32, d=32, heads=2, layers=2)
    loss = fh.lm_loss(model, fh.text_windows(seed, 450, batch=16, ctx=32), vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=low, betas=(0.9, 0.95))
    return Setup(model, opt, loss, steps=450, clip=1.0, after_step=_raised(opt, variant, at, low, low * factor))


def mixture(seed: int, variant: str, factor: float, at: int = 300, low: float = 1e-3) -> Setup:
    model, loss = fh.mixture_loss(seed, full_batch=False)
    opt = torch.optim.Adam(model.parameters(), lr=low)
    return Setup(model, opt, loss, steps=500, after_step=_raised(opt, variant, at, low, low * factor))


CHECKS = {"char_mlp": (char_mlp, 300), "gpt": (gpt, 250), "mixture": (mixture, 300)}


def main() -> None:
    for name, (build, at) in CHECKS.items():
        for factor in FACTORS:

            def setup(seed: int, variant: str, build=build, factor=factor) -> Setup:
                return build(seed, variant, factor)

            family = Family(f"{name}_x{factor}", False, "the lr raised at once; control: ramped", setup)
            for variant in family.variants:
                for seed in SEEDS:
                    record, _ = bench.train(family, variant, seed)
                    alerts = bench.replay(record)
                    jumps = [(a.step, round(a.value, 1)) for a in alerts if a.rule == "step_size_jump"]
                    others = [(a.rule, a.step) for a in alerts if a.severity != "info"][:3]
                    before, after = record.losses[at - 2], record.losses[at - 1 :].max()
                    print(
                        f"{family.name} {variant} seed {seed}: loss {before:.3f} -> max {after:.3f} "
                        f"({after / before:.2f}x), spikes {record.spikes[:5]}, step_size_jump {jumps}, "
                        f"warnings {others}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
