"""OSCAR (NeurIPS 2025): VQ hyper-encoders per rate, one LoRA SD-2.1 UNet, one denoising step at a rate-dependent
pseudo timestep. Imports building blocks (``models/blocks``) and basics (``utils/*.py``) only."""
