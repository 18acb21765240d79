"""Alert rules and records: from statistics rows and betas to :class:`Alert` records, and where they go.

``records`` (Alert, Thresholds, severities, errors), ``configuration`` (the betas),
``rules`` (the step rules, one function per rule returning a named finding), ``messages`` (the
rules' alert texts), ``log`` (alerts.jsonl).
"""

from .configuration import configuration_alerts
from .records import SEVERITY_ORDER, Alert, InstabilityError, InstabilityWarning, Thresholds
from .rules import AlertRules

__all__ = [
    "Alert",
    "AlertRules",
    "InstabilityError",
    "InstabilityWarning",
    "SEVERITY_ORDER",
    "Thresholds",
    "configuration_alerts",
]
