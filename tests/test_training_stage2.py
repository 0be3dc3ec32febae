"""Stage 2 on the tiny zoo (CPU): every loss term including the GAN, export, resume, errors before training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors.torch import load_file

import train_diff
from models.oscar.hyper_encoder import HyperEncoder
from models.oscar.model import OSCARModel
from models.oscar.rate_table import rate_point
from tests.stand_in_weights import torch_home, write_stand_in_weights
from utils.data import write_synthetic_images

LEVELS = [0.0019, 0.0625]  # one level with three downsamplings, one with none: keeps the test fast
HYPER = {"channels": 16, "hyper_dim": 32, "codebook_dim": 8}


@pytest.fixture(scope="module")
def stand_in_home(tmp_path_factory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("torch_home")
    write_stand_in_weights(home, ["dists"])
    with torch_home(home):
        yield home


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_zoo) -> dict:
    root = tmp_path_factory.mktemp("stage2")
    write_synthetic_images(root / "train", count=6, size=96, seed=0)
    write_synthetic_images(root / "val", count=1, size=64, seed=1)
    stage1 = []
    for bpp in LEVELS:
        torch.manual_seed(int(bpp * 1e4))
        folder = root / f"stage1_{bpp}"
        HyperEncoder.from_rate_point(rate_point(bpp), **HYPER).save_pretrained(folder)
        stage1.append(str(folder))
    return {"root": root, "zoo": str(tiny_zoo), "stage1": stage1}


def args(setup: dict, name: str, *extra: str) -> list[str]:
    sets = {
        "name": name,
        "output_root": str(setup["root"] / "runs"),
        "model_zoo.path": setup["zoo"],
        "runtime.device": "cpu",
        "model.levels": LEVELS,
        "model.timesteps": [500, 210],
        "model.hyper_encoder": HYPER,
        "model.lora_rank": 2,
        "model.lora_alpha": 1.0,
        "hyper_encoder_checkpoints": setup["stage1"],
        "data.train_roots": [str(setup["root"] / "train")],
        "data.val_root": str(setup["root"] / "val"),
        "data.patch_size": 64,
        "data.batch_size": 2,
        "data.num_workers": 0,
        "train.max_steps": 4,
        "train.checkpoint_every": 2,
        "train.validate_every": 4,
        "train.log_every": 1,
        "train.log_with": "none",
        "optimizer.learning_rate": 1e-3,
    }
    argv = []
    for key, value in sets.items():
        argv += ["--set", f"{key}={json.dumps(value)}"]
    return argv + list(extra)


def test_all_loss_terms_train_save_and_export(setup, stand_in_home):
    run = train_diff.main(args(setup, "full"))
    metrics = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    logged = set().union(*metrics)
    for term in ("loss/l1", "loss/dists", "loss/edge", "loss/latent", "loss/gan_generator", "loss/discriminator"):
        assert term in logged, term
    assert all(torch.isfinite(torch.tensor(m["loss/total"])) for m in metrics if "loss/total" in m)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert (run / "checkpoints" / "checkpoint-4" / "discriminator").is_dir()
    assert (run / "validation" / "step-4" / "scores.json").is_file()
    # The export loads as a model and codes an image; its priors were measured on training crops.
    model = OSCARModel.from_pretrained(run / "final")
    assert model.config.levels == LEVELS
    assert all(int(c.sum()) > 0 for c in model.index_counts)
    x = torch.rand(1, 3, 48, 80) * 2 - 1
    assert model.decode(model.encode(x, 1)).shape == x.shape
    # Training changed what it should: LoRA, prompt, hyper-encoders.
    start = HyperEncoder.from_pretrained(setup["stage1"][1])
    assert not torch.equal(start.proj[12].weight, model.hyper_encoders[1].proj[12].weight)
    lora_b = load_file(run / "final" / "unet_lora.safetensors")
    assert any(k.endswith("lora_B.default_decoder.weight") and v.abs().sum() > 0 for k, v in lora_b.items())


def test_resume_matches_uninterrupted_run(setup, stand_in_home):
    straight = train_diff.main(args(setup, "straight", "--set", "loss.dists=0", "--set", "loss.edge=0"))
    first = train_diff.main(args(setup, "resumed", "--set", "loss.dists=0", "--set", "loss.edge=0", "--stop-at", "2"))
    assert not (first / "final").exists()
    resumed = train_diff.main(args(setup, "resumed", "--set", "loss.dists=0", "--set", "loss.edge=0", "--resume", "latest"))
    a = load_file(straight / "final" / "unet_lora.safetensors")
    b = load_file(resumed / "final" / "unet_lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pa = load_file(straight / "final" / "prompt_embedding.safetensors")["prompt_embedding"]
    pb = load_file(resumed / "final" / "prompt_embedding.safetensors")["prompt_embedding"]
    assert torch.equal(pa, pb)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"hyper_encoder_checkpoints": ["nowhere/a", "nowhere/b"]}, "is not a stage-1 checkpoint"),
        ({"data.train_roots": ["does/not/exist"]}, "does/not/exist"),
        ({"model_zoo.path": "no/zoo"}, "model zoo no/zoo"),
    ],
)
def test_bad_inputs_stop_before_training(setup, stand_in_home, capsys, change, message):
    extra = []
    for key, value in change.items():
        extra += ["--set", f"{key}={json.dumps(value)}"]
    with pytest.raises(SystemExit) as info:
        train_diff.main(args(setup, "bad", *extra))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (setup["root"] / "runs" / "bad").exists()


def test_missing_dists_weights_stop_before_training(setup, tmp_path, capsys):
    with torch_home(tmp_path / "empty_home"):
        with pytest.raises(SystemExit):
            train_diff.main(args(setup, "noweights"))
    err = capsys.readouterr().err
    assert "DISTS_weights" in err or "vgg16" in err


def test_mismatched_stage1_checkpoint(setup, stand_in_home, capsys):
    swapped = list(reversed(setup["stage1"]))
    with pytest.raises(SystemExit):
        train_diff.main(args(setup, "swapped", "--set", f"hyper_encoder_checkpoints={json.dumps(swapped)}"))
    assert "does not fit level 0" in capsys.readouterr().err
