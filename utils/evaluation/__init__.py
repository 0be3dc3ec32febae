"""Evaluation runner (test.py): real files for any method, metrics, RD plots, BD-rates. A runner: it may import
the registry, methods, building blocks and basics."""
