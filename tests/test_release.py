"""Loading the authors' released checkpoint layout safely, and refusing wrong or truncated files."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from models.blocks.codec_method import ModelLoadError
from models.oscar.release import load_release_checkpoint, read_release_checkpoint
from tests.release_fixture import fabricate_release, release_dict_from_model, release_layout
from tests.test_oscar import image, small_options
from models.blocks.model_zoo import build_sd_components, load_sd_components


@pytest.fixture(scope="module")
def source_model(tiny_zoo):
    from models.oscar.model import OSCARModel

    torch.manual_seed(1)
    return OSCARModel(load_sd_components(tiny_zoo), small_options()).eval()


@pytest.fixture(scope="module")
def release_file(source_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("release") / "oscar.pkl"
    torch.save(release_dict_from_model(source_model), path)
    return path


def test_release_layout_loads_unchanged(source_model, release_file, tiny_zoo):
    torch.manual_seed(2)  # other random init: everything must come from the file
    model = load_release_checkpoint(release_file, load_sd_components(tiny_zoo), options=small_options()).eval()
    x = image(64, 96)
    for level in (0, 7):
        coded = source_model.encode(x, level)
        assert torch.equal(model.encode(x, level).indices, coded.indices)
        assert torch.equal(model.decode(coded), source_model.decode(coded))


def test_full_size_release_layout(tmp_path):
    """A checkpoint with the release's exact names and shapes loads into the SD-2.1 architecture."""
    from models.oscar.model import OSCARModel
    from models.blocks.lora import lora_target_groups
    from diffusers import UNet2DConditionModel
    from models.blocks.model_zoo import SD21_UNET

    with torch.device("meta"):
        groups = lora_target_groups(UNet2DConditionModel(**SD21_UNET))
    path = tmp_path / "oscar.pkl"
    ckpt = fabricate_release(path, groups)
    model = load_release_checkpoint(path, build_sd_components("sd21"))
    assert sum(p.numel() for p in model.hyper_encoders.parameters()) == 81_820_960
    state = model.unet.state_dict()
    for key in ("conv_in.base_layer.weight", "mid_block.resnets.1.conv2.lora_B.default_others.weight"):
        assert torch.equal(state[key], ckpt["state_dict_unet"][key])
    he = model.hyper_encoders.state_dict()
    assert torch.equal(he["3.quantizer._codebook.embed"], ckpt["hyper_encoders"]["3.quantizer._codebook.embed"])
    assert torch.equal(model.prompt_embedding.detach(), ckpt["embeddings"].detach())
    assert len(release_layout()["hyper_encoders"]) == len(he)


def test_garbage_and_truncated_files_are_refused(release_file, tmp_path):
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(ModelLoadError, match="not a readable torch checkpoint"):
        read_release_checkpoint(garbage)
    truncated = tmp_path / "truncated.pkl"
    data = release_file.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=str(truncated)):
        read_release_checkpoint(truncated)
    with pytest.raises(ModelLoadError, match="not found"):
        read_release_checkpoint(tmp_path / "missing.pkl")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_code_in_pickle_is_not_run(tmp_path):
    path = tmp_path / "evil.pkl"
    torch.save({"hyper_encoders": _Exploit()}, path)
    with pytest.raises(ModelLoadError, match="refused: not a plain tensor checkpoint"):
        read_release_checkpoint(path)


def test_wrong_layouts_are_refused(source_model, tiny_zoo, tmp_path):
    base = release_dict_from_model(source_model)

    def refused(ckpt, match):
        path = tmp_path / "bad.pkl"
        torch.save(ckpt, path)
        with pytest.raises(ModelLoadError, match=match):
            load_release_checkpoint(path, load_sd_components(tiny_zoo), options=small_options())

    refused({k: v for k, v in base.items() if k != "embeddings"}, "key 'embeddings' missing")
    refused([1, 2, 3], "expected a dict")
    refused({**base, "rank_unet": "16"}, "'rank_unet' is a str, expected int")
    he = dict(base["hyper_encoders"])
    he.pop("0.proj.12.bias")
    refused({**base, "hyper_encoders": he}, r"missing 0.proj.12.bias")
    he = dict(base["hyper_encoders"])
    he["0.proj.12.bias"] = torch.zeros(5)
    refused({**base, "hyper_encoders": he}, r"0.proj.12.bias has shape \(5,\)")
    unet = dict(base["state_dict_unet"])
    unet.pop("conv_in.base_layer.weight")
    refused({**base, "state_dict_unet": unet}, "missing conv_in.base_layer.weight")
    refused({**base, "unet_lora_others_modules": []}, "unet_lora_others_modules")
