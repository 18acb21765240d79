"""Adapters for training frameworks other than Lightning, each in its own module.

Nothing is imported here: ``adam_monitor.integrations.transformers`` loads ``transformers``, and
only a program that imports it needs that package (``pip install 'adam-monitor[transformers]'``).
"""
