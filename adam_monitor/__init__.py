"""adam-monitor: observe and guard Adam-family training runs."""

from .alert_log import InstabilityError, InstabilityWarning
from .alerts import Alert, Thresholds
from .diagnostics import DIAGNOSTICS
from .monitor import Monitor

__version__ = "0.1.0"

__all__ = ["AdamMonitor", "Alert", "DIAGNOSTICS", "InstabilityError", "InstabilityWarning", "Monitor", "Thresholds", "__version__"]


def __getattr__(name):
    # The Lightning adapter is imported on first use, so plain-PyTorch users never pay for Lightning.
    if name == "AdamMonitor":
        from .callback import AdamMonitor

        return AdamMonitor
    raise AttributeError(f"module 'adam_monitor' has no attribute {name!r}")
