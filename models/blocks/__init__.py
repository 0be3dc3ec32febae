"""Shared building blocks of every codec method: SD loading, LoRA, one-step x0, padding, entropy coding, the file
container and the ``CodecMethod`` interface. They import only the basics in ``utils/*.py``."""
