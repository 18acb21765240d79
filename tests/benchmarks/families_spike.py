"""Spike families beyond the four the rules were first calibrated on (``families.py``): each a
distinct mechanism, with a matched stable control (one setting changed)."""

from __future__ import annotations

from families import Family

FAMILIES: dict[str, Family] = {}
