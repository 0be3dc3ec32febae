"""Evaluation runner (test.py): real files for any method, metrics, RD plots, BD-rates. It receives the codec from
its entry script and imports only the basics in ``utils/*.py``, never ``models``."""
