"""Basics (the modules directly in this folder: errors, options, devices, atomic writes, image I/O, training data,
metric weights, profiling) and the generic runners in the subfolders (training, evaluation). Nothing here imports
``models``: the runners receive a model from their entry script, so ``models`` -> ``utils`` is the only direction."""
