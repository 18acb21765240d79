"""The published Adam variants as settings of the one core :class:`~adam_monitor.optim.Adam`:
each preset fixes what makes it that variant and keeps every other option of the core."""

from __future__ import annotations

from adam_monitor.optim.adam import Adam

__all__ = ["AdamD", "LaProp", "AdamAtan2", "StableAdamW"]


class AdamD(Adam, fixed={"momentum_bias_correction": False, "normalize": "adam"}):
    r"""Adam without momentum bias correction (v is still bias-corrected), decoupled weight decay::

        m_t = β1·m_{t-1} + (1-β1)·g_t,   v̂_t = v_t/(1-β2^t),   u_t = m_t/(√v̂_t + ε)

    On a constant gradient the first steps are |u_t| = 1 - β1^t (a warmup of timescale 1/(1-β1))
    instead of Adam's full-size steps on a one-sample momentum. Reference: "AdamD: Improved bias-
    correction in Adam" (J. St. John, 2021, arXiv:2110.10828).
    """


class LaProp(Adam, fixed={"momentum_bias_correction": True, "normalize": "laprop"}):
    r"""LaProp (Ziyin, Wang & Ueda 2020, "LaProp: Separating Momentum and Adaptivity in Adam")::

        v_t = β2·v_{t-1} + (1-β2)·g_t²,   m_t = β1·m_{t-1} + (1-β1)·g_t/(√(v_t/(1-β2^t)) + ε)
        u_t = m_t/(1-β1^t)

    Momentum of the normalized gradient: each gradient is divided by the v̂ of its own step, ε
    inside; both moments are bias-corrected (v at normalization, m at the update). Since
    v_t ≥ (1-β2)·g_t², |u_t| ≤ 1/√(1-β2) for any β1: no β1² < β2 coupling is needed. Decoupled
    weight decay.
    """


class AdamAtan2(
    Adam,
    fixed={"momentum_bias_correction": True, "normalize": "atan2", "eps": 0.0},
    positional=("lr", "betas", "weight_decay"),
):
    r"""Adam-atan2 (Everett et al. 2024, "Scaling Exponents Across Parameterizations and Optimizers")::

        u_t = a·atan2(m̂_t, b·√v̂_t),   a = 1.27, b = 1,   m̂, v̂ bias-corrected as in Adam

    ε-free and scale-invariant: the division m̂/(√v̂+ε) becomes an angle, so a gradient that
    underflows v cannot blow the step up; |u_t| ≤ a·π/2 ≈ 2. Decoupled weight decay.
    """


class StableAdamW(Adam, fixed={"momentum_bias_correction": True, "normalize": "adam"}, defaults={"update_clip": 1.0}):
    r"""StableAdamW (Wortsman et al. 2023, "Stable and low-precision training for large-scale
    vision-language models"): AdamW with Adafactor's per-tensor update clipping::

        RMS_t = √mean(g_t²/max(v̂_t, ε²)),   η_t = η/max(1, RMS_t)
        p_t = p_{t-1}·(1 - η_t·λ) - η_t·m̂_t/(√v̂_t + ε)

    RMS_t > 1 means v̂ is stale (the gradient outgrew the second moment, the precursor of loss
    spikes); the clip then shrinks the step instead of letting m̂/√v̂ overshoot.
    """
