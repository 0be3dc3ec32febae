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


REFERENCE_OPT = Path(__file__).resolve().parents[1] / "options" / "oscar" / "train_diff_reference.json"


def reference_args(setup: dict, name: str, *extra: str) -> list[str]:
    """The reference recipe (oracle norms, posterior samples, inert GAN, ...) at test size; 192-pixel crops give
    the reference discriminator head the 3x3 mid-block grid it needs on the tiny UNet."""
    return args(setup, name, "--opt", str(REFERENCE_OPT), "--set", "data.patch_size=192", *extra)


def test_reference_recipe_with_oracle_norms_validates_and_resumes(setup, stand_in_home):
    straight = train_diff.main(reference_args(setup, "ref_straight"))
    saved = json.loads((straight / "options.json").read_text())
    assert saved["model"]["latent_norms"] == "oracle" and saved["gan"]["mode"] == "reference"
    scores = json.loads((straight / "validation" / "step-4" / "scores.json").read_text())
    assert {"val/psnr_level0", "val/psnr_level1", "val/bpp_level0", "val/bpp_level1"} <= set(scores)
    metrics = [json.loads(line) for line in (straight / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss/gan_generator" in m for m in metrics) and any("loss/discriminator" in m for m in metrics)

    first = train_diff.main(reference_args(setup, "ref_resumed", "--stop-at", "2"))
    assert not (first / "final").exists()
    resumed = train_diff.main(reference_args(setup, "ref_resumed", "--resume", "latest"))
    for name in ("unet_lora.safetensors", "prompt_embedding.safetensors"):
        a, b = load_file(straight / "final" / name), load_file(resumed / "final" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # The reference's conv_in base weights never change, and its discriminator trains its head only.
    from models.blocks.model_zoo import load_sd_components

    model = OSCARModel.from_pretrained(straight / "final")
    assert torch.equal(model.unet.conv_in.base_layer.weight, load_sd_components(setup["zoo"]).unet.conv_in.weight)
    disc_state = load_file(straight / "checkpoints" / "checkpoint-4" / "discriminator" / "trainable.safetensors")
    assert any(k.startswith("head.") for k in disc_state)
    assert all(torch.count_nonzero(v) == 0 for k, v in disc_state.items() if "lora_B" in k)


def test_validation_psnr_is_the_8bit_psnr_of_the_saved_png(setup, stand_in_home):
    """Training validation reports the evaluation's PSNR (8-bit RGB) of exactly the PNG it writes."""
    from utils.data import ValidationImages
    from utils.evaluation.metrics import psnr_uint8, quantize
    from utils.image_io import load_image

    run = train_diff.main(args(setup, "psnr", "--set", "loss.dists=0", "--set", "loss.edge=0", "--set", "loss.gan=0",
                               "--set", "train.max_steps=1", "--set", "train.validate_every=1"))  # fmt: skip
    scores = json.loads((run / "validation" / "step-1" / "scores.json").read_text())
    (item,) = list(ValidationImages(setup["root"] / "val"))
    for level in (0, 1):
        png = load_image(run / "validation" / "step-1" / f"{item.name}_level{level}.png")[0]
        expected = psnr_uint8(quantize(png), quantize(item.image))
        assert scores[f"val/psnr_level{level}"] == pytest.approx(expected, abs=1e-9)
