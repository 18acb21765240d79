"""adam-monitor: observe and guard Adam-family training runs.

Names load on first use (PEP 562): ``import adam_monitor.optim`` or ``adam_monitor.diagnostics``
loads no engine module and no Lightning.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "AdamDiagnostics": "adam_monitor.metrics",
    "AdamMonitor": "adam_monitor.callback",
    "Alert": "adam_monitor.alerts.records",
    "DIAGNOSTICS": "adam_monitor.diagnostics.rows",
    "InstabilityError": "adam_monitor.alerts.records",
    "InstabilityWarning": "adam_monitor.alerts.records",
    "Monitor": "adam_monitor.engine.monitor",
    "Thresholds": "adam_monitor.alerts.records",
    "register_direction": "adam_monitor.engine.directions",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'adam_monitor' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
