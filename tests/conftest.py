"""Shared fixtures: a tiny random-weight SD model zoo built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory) -> Path:
    from models.blocks.model_zoo import write_model_zoo

    return write_model_zoo("tiny", tmp_path_factory.mktemp("zoo") / "tiny", seed=0)


@pytest.fixture(scope="session")
def kodak_dir() -> Path:
    """The Kodak images beside the checkout (CI and developers only); tests that need them skip without."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "kodak"
    if not path.is_dir() or not any(path.glob("*.png")):
        pytest.skip("Kodak images not found at ../shared/data/kodak")
    return path


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, tiny_zoo) -> Path:
    """An untrained exported OSCAR model (small hyper-encoders) on the tiny zoo, for file-level tests."""
    import torch

    from models.oscar.model import OSCARModel
    from models.blocks.model_zoo import load_sd_components
    from models.oscar.options import HyperEncoderOptions, ModelOptions

    options = ModelOptions(hyper_encoder=HyperEncoderOptions(channels=16, hyper_dim=32, codebook_dim=8), lora_rank=2, lora_alpha=1.0)
    torch.manual_seed(0)
    model = OSCARModel(load_sd_components(tiny_zoo), options)
    return model.save_pretrained(tmp_path_factory.mktemp("export") / "model", zoo_path=str(tiny_zoo))
