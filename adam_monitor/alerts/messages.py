"""The text of the step rules' alerts: one function per rule, from its finding to the message.

Each message names the tensor (or the pool of small tensors and its worst member), the numbers the
rule saw, the mechanism, and one fix. Pure string formatting: the findings come from
:mod:`adam_monitor.alerts.rules`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .records import Thresholds

if TYPE_CHECKING:
    from .rules import (
        EpsFinding,
        FreshFinding,
        GrowthFinding,
        NonfiniteFinding,
        SpikeFinding,
        StaleFinding,
        StepSizeFinding,
    )

__all__ = [
    "describe_subject",
    "nonfinite_message",
    "stale_message",
    "spike_message",
    "growth_message",
    "fresh_message",
    "step_size_message",
    "eps_message",
    "EPISODE_FIXES",
    "evidence_message",
]

Betas = Sequence[tuple[float, float]]


def describe_subject(
    subject: int, member: int, names: Sequence[str], subject_betas: Betas, min_numel: int
) -> tuple[str, str]:
    """(parameter name, how the text refers to it) for a tensor, or for a pool and its worst ``member``."""
    n = len(names)
    if subject < n:
        return names[subject], names[subject]
    b1, b2 = subject_betas[subject]
    name = names[member]
    return name, f"the tensors under {min_numel} elements with betas ({b1:g}, {b2:g}), pooled (worst: {name})"


def _others(count: int) -> str:
    extra = count - 1
    return f" ({extra} more subject{'s' if extra > 1 else ''} started the same episode)" if extra > 0 else ""


def nonfinite_message(finding: NonfiniteFinding, step: int, names: Sequence[str]) -> str:
    return (
        f"{names[finding.tensor]}: NaN/Inf in its gradient, Adam state or update at step {step} ({finding.value}); "
        "the optimizer state now carries it into every later step. Restore the last good checkpoint, then lower "
        "the learning rate, clip gradients, check the loss and data for NaN/Inf, or use a GradScaler under fp16."
    )


def stale_message(finding: StaleFinding, names: Sequence[str], subject_betas: Betas, th: Thresholds) -> str:
    _, what = describe_subject(finding.subject, finding.member, names, subject_betas, th.min_numel)
    _, b2 = subject_betas[finding.subject]
    return (
        f"{what}: the gradient outran Adam's second moment about {finding.jump:.3g}x (staleness "
        f"{finding.staleness:.3g}); with beta2 = {b2:g} v_hat needs ~{1 / (1 - b2):.0f} steps to catch up "
        f"and the update is predicted to overshoot to {finding.peak:.3g}x its steady size (threshold "
        f"{th.stale_peak:g}). A loss spike may follow within a few steps: lower beta2 (e.g. 0.95), "
        "clip the update (StableAdamW / update_clip) or lower the learning rate." + _others(finding.count)
    )


def spike_message(finding: SpikeFinding, step: int, names: Sequence[str], subject_betas: Betas, th: Thresholds) -> str:
    _, what = describe_subject(finding.subject, finding.member, names, subject_betas, th.min_numel)
    value, bound = finding.value, finding.bound
    if value > bound:
        # finding.bound carries the factor and rounding margin it was compared with; the text gives B_t itself.
        why = (
            f"above the worst-case Adam bound B_{step} = {bound / th.bound_factor / (1 + 1e-4):.3g} "
            f"(x{th.bound_factor:g}): this direction is not a bounded Adam update; check the optimizer's "
            "betas and update rule"
        )
    else:
        why = (
            f"{value / finding.baseline:.3g}x its recent level {finding.baseline:.3g} (threshold "
            f"{finding.threshold:.3g}); lower the learning rate or clip the update (update_clip / StableAdamW) "
            "before the loss follows"
        )
    return f"{what}: update RMS {value:.3g} is {why}." + _others(finding.count)


def growth_message(finding: GrowthFinding, names: Sequence[str], subject_betas: Betas, th: Thresholds) -> str:
    _, what = describe_subject(finding.subject, finding.member, names, subject_betas, th.min_numel)
    b1, _ = subject_betas[finding.subject]
    edge = (2 + 2 * b1) / (1 - b1)
    return (
        f"{what}: its gradient grew about {finding.ratio:.3g}x per step against sqrt(v_hat) for "
        f"{finding.steps}+ steps in a row (staleness now {finding.staleness:.3g}): an oscillation is "
        "building up. Typical of Adam's adaptive edge of stability: after the gradient vanished, "
        "sqrt(v_hat) decayed, the effective step lr/(sqrt(v_hat)+eps) grew and the preconditioned "
        f"sharpness crossed (2+2*beta1)/(1-beta1) = {edge:.3g}. A loss spike may "
        f"follow within a few steps: raise eps (eps >= lr*sharpness/{edge:.3g} caps the effective step), "
        "lower the learning rate, or clip the update (update_clip / StableAdamW)." + _others(finding.count)
    )


def fresh_message(finding: FreshFinding, step: int, names: Sequence[str], th: Thresholds) -> str:
    others = finding.count - 1
    also = f" ({others} more tensor{'s' if others > 1 else ''} started at this step)" if others > 0 else ""
    return (
        f"{names[finding.tensor]}: took its first optimizer step at step {step}, with a fresh Adam state, "
        f"and moved its coordinates by {finding.move:.3g} (lr x update RMS), {finding.move / finding.peers:.3g}x "
        f"the {finding.peers:.3g} of the tensors already training (threshold {th.fresh_ratio:g}x). A fresh "
        "state's first steps are sign descent: every coordinate moves by about lr until m_hat averages out the "
        "gradient's noise. Harmless where lr is small against the scale of its weights; otherwise it throws off "
        "the layers adapted to them and the loss jumps within a few steps. If it does: warm it up: give it a "
        f"param group of its own whose lr ramps up from about 0 when it starts training.{also}"
    )


def step_size_message(finding: StepSizeFinding, step: int, names: Sequence[str], th: Thresholds) -> str:
    ratio = finding.move / finding.largest
    name, lr, before = names[finding.tensor], finding.lr, finding.lr_before
    cause = f"the lr of {name} went from {before:.3g} to {lr:.3g} at this step ({lr / before:.3g}x)"
    return (
        f"{name}: at step {step} the parameters trained so far moved by {finding.move:.3g} (lr x update RMS over "
        f"their coordinates), {ratio:.3g}x their largest move on any step before ({finding.largest:.3g}; "
        f"threshold {th.step_size_ratio:g}x): {cause}. A step size the run has never taken: harmless where the "
        "new lr is small against the loss's curvature; otherwise the loss rises or spikes within a few steps. "
        "If it does: raise the lr gradually (a ramp over about 1/(1-beta2) steps lets v_hat and the weights adapt)."
    )


def eps_message(finding: EpsFinding, names: Sequence[str], th: Thresholds) -> str:
    head = (
        f"{names[finding.tensor]}: eps sets the step of {finding.fraction:.0%} of its coordinates that got a "
        f"gradient (sqrt(v_hat) <= eps) for {th.eps_steps} steps in a row, so Adam acts as SGD with lr/eps there. "
    )
    if finding.from_start:  # the gradients never rose above eps: their scale, not convergence
        regime = (
            "Its gradients have been below eps from the first step: harmless for a bias followed by a "
            "normalization layer (its gradient is ~0 by construction); otherwise lower eps, scale the loss "
            "up, use Adam-atan2 (no eps), or check for gradient underflow (fp16/bf16)."
        )
    else:  # they fell below eps as the run went on
        regime = (
            "Its gradients fell below eps as the run converged: this is what keeps a converged run from "
            "Adam's adaptive edge of stability; lower eps only if this tensor must keep learning fast."
        )
    return head + regime + _others(finding.count)


#: The one fix of an episode, by the rule that started it (its primary cause).
EPISODE_FIXES = {
    "stale_second_moment": "lower beta2 (e.g. 0.95), clip the update (StableAdamW / update_clip) or lower the learning rate",
    "update_rms_spike": "lower the learning rate or clip the update (update_clip / StableAdamW)",
    "gradient_growth": "raise eps (it caps the effective step lr/(sqrt(v_hat)+eps)), lower the learning rate, or clip the update",
    "fresh_state": "warm up the tensor that started: ramp its param group's lr up from about 0 when it starts training",
    "step_size_jump": "raise the lr gradually (a ramp over about 1/(1-beta2) steps) instead of at once",
}
_EVIDENCE = {
    "stale_second_moment": "the gradient outran Adam's second moment",
    "update_rms_spike": "the update RMS jumped",
    "gradient_growth": "its gradient is growing geometrically against sqrt(v_hat)",
    "fresh_state": "it took its first step with a fresh Adam state, far larger than its peers'",
    "step_size_jump": "the parameters moved farther than on any step before",
}


def evidence_message(
    rule: str, parameter: str, value: float, threshold: float, cause: str, where: str, since: int
) -> str:
    """The text of a precursor alert that joins an episode another rule started: what it saw, and the
    episode's cause and fix (not its own rule's: one event, one diagnosis)."""
    return (
        f"{parameter}: {_EVIDENCE[rule]} ({value:.3g} against {threshold:.3g}): evidence of the episode "
        f"that started at step {since} with {cause} on {where}. The fix is that episode's: {EPISODE_FIXES[cause]}."
    )
