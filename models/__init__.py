"""Codec methods and their building blocks.

Layers inside this package (see README "Code layout"; tests/test_layering.py enforces them):
``models/blocks/`` shared building blocks (may import ``utils/*.py`` basics only), ``models/<method>/`` one folder
per method (may import blocks and basics, never another method), ``models/registry.py`` the method table.
"""
