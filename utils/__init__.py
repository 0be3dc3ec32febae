"""Basics (the modules directly in this folder: errors, options, devices, atomic writes, image I/O, training data,
metric weights) import nothing of the project but each other. The subfolders are runners (training,
evaluation, the file CLIs' shared parts): they sit above the methods and may import ``models``."""
