"""Adam-family optimizers with in-step statistics for the monitor (no Lightning import).

``Adam`` is the configurable core (momentum bias correction, β2 schedule, update clipping,
adam / laprop / atan2 normalization, decoupled weight decay); ``AdamD``, ``LaProp``, ``AdamAtan2``
and ``StableAdamW`` are presets of it. ``adam_step_`` is the single-tensor specification.
"""

from adam_monitor.optim.adam import Adam, adafactor_beta2, worst_case_bound
from adam_monitor.optim.presets import AdamAtan2, AdamD, LaProp, StableAdamW
from adam_monitor.optim.reference import adam_step_

__all__ = [
    "Adam",
    "AdamD",
    "LaProp",
    "AdamAtan2",
    "StableAdamW",
    "adafactor_beta2",
    "worst_case_bound",
    "adam_step_",
]
