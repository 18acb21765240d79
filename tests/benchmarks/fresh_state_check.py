"""Does a tensor that starts late at full lr spike the loss? Three unfreezes beside the benchmark's own.

The ``unfreeze`` family (``families_spike.py``) spikes when two frozen layers start with empty Adam
state at the full lr; ``fresh_state`` was built on that family's miss. These three unfreezes, of
other models and data, tell whether what it sees predicts a spike elsewhere: each at full lr
against the same unfreeze with the lr ramped over 50 steps (seeds outside the benchmark's). Per run:
lr over the weights' RMS at the unfreeze, the loss before it and the largest after it, the spikes
(``spike_scenarios.label_spikes``), the ``fresh_state`` alerts (step, tensor, ratio) and the first
warnings of the other rules. ``python tests/benchmarks/fresh_state_check.py`` (about 2 minutes).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
for _path in (HERE.parents[1], HERE):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import families_healthy as fh  # noqa: E402
import spike_scenarios as bench  # noqa: E402
from families import SPIKE, Family, Setup  # noqa: E402

SEEDS = (5, 6, 7)
RAMP = 50


def _ramped(opt: torch.optim.Optimizer, frozen: list[torch.Tensor], variant: str, at: int, lr: float):
    """After step t: unfreeze ``frozen`` for step ``at``, group 0's lr at full size at once (spike)
    or ramped over ``RAMP`` steps."""
    ramp = 1 if variant == SPIKE else RAMP

    def after(t: int) -> None:
        if t + 1 == at:
            for p in frozen:
                p.requires_grad_(True)
        opt.param_groups[0]["lr"] = lr * min(1.0, max(0.0, (t + 2 - at) / ramp))

    return after


def _split(frozen: list[torch.Tensor], rest: list[torch.Tensor]) -> list[dict]:
    for p in frozen:
        p.requires_grad_(False)  # no gradient, so no Adam state until the unfreeze
    return [{"params": frozen}, {"params": rest}]


def char_embedding(seed: int, variant: str, at: int = 300, lr: float = 1e-2) -> Setup:
    model, loss = fh.char_mlp_loss(seed, 500)
    frozen = list(model.tok.parameters())
    opt = torch.optim.Adam(_split(frozen, list(model.net.parameters())), lr=lr)
    return Setup(model, opt, loss, steps=500, after_step=_ramped(opt, frozen, variant, at, lr))


def gpt_blocks(seed: int, variant: str, at: int = 250, lr: float = 3e-3) -> Setup:
    torch.manual_seed(seed)
    _, vocab = fh.stdlib_text()
    model = fh.NormGPT(vocab, 32, d=32, heads=2, layers=2)
    loss = fh.lm_loss(model, fh.text_windows(seed, 450, batch=16, ctx=32), vocab)
    named = list(model.named_parameters())
    frozen = [p for n, p in named if "block" in n]
    opt = torch.optim.AdamW(_split(frozen, [p for n, p in named if "block" not in n]), lr=lr, betas=(0.9, 0.95))
    return Setup(model, opt, loss, steps=450, clip=1.0, after_step=_ramped(opt, frozen, variant, at, lr))


def mixture_hidden(seed: int, variant: str, at: int = 300, lr: float = 1e-2) -> Setup:
    model, loss = fh.mixture_loss(seed, full_batch=False)
    params = list(model.parameters())
    frozen = params[:-2]
    opt = torch.optim.Adam(_split(frozen, params[-2:]), lr=lr)
    return Setup(model, opt, loss, steps=500, after_step=_ramped(opt, frozen, variant, at, lr))


CHECKS = {
    "char_embedding": (char_embedding, 300),
    "gpt_blocks": (gpt_blocks, 250),
    "mixture_hidden": (mixture_hidden, 300),
}


def main() -> None:
    for name, (build, at) in CHECKS.items():
        family = Family(name, False, "an unfreeze at full lr; control: its lr ramped", build)
        for variant in family.variants:
            for seed in SEEDS:
                setup = build(seed, variant)
                lr = setup.optimizer.param_groups[0]["lr"] if variant == SPIKE else None
                scale = [
                    p.detach().pow(2).mean().sqrt().item()
                    for p in setup.optimizer.param_groups[0]["params"]
                    if p.numel() >= 256
                ]
                record, _ = bench.train(family, variant, seed)
                alerts = bench.replay(record)
                fresh = [(a.step, a.parameter, round(a.value, 2)) for a in alerts if a.rule == "fresh_state"]
                others = [(a.rule, a.step) for a in alerts if a.severity != "info"][:3]
                before, after = record.losses[at - 2], record.losses[at - 1 :].max()
                relative = f"{lr / max(scale):.2f}-{lr / min(scale):.2f}" if lr else "-"
                print(
                    f"{name} {variant} seed {seed}: lr/weight RMS {relative}, loss {before:.3f} -> max {after:.3f} "
                    f"({after / before:.2f}x), spikes {record.spikes[:5]}, fresh_state {fresh}, warnings {others}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
