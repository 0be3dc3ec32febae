"""The OSCAR model on the tiny zoo: shapes, determinism, decoder-only data, x0 formulas, LoRA, export."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from models.oscar.coded_image import CodedImage
from models.blocks.one_step import predict_x0
from models.oscar.latent_norms import channel_rms, dequantize_rms, quantize_rms, rescale_to_rms
from models.blocks.lora import lora_parameters
from models.blocks.codec_method import ModelLoadError
from models.oscar.model import OSCARModel
from models.blocks.model_zoo import load_sd_components
from models.oscar.options import HyperEncoderOptions, ModelOptions
from models.blocks.padding import pad_to_multiple

SMALL = dict(hyper_encoder=HyperEncoderOptions(channels=16, hyper_dim=32, codebook_dim=8), lora_rank=2, lora_alpha=1.0)


def small_options(**kwargs) -> ModelOptions:
    return ModelOptions(**{**SMALL, **kwargs})


@pytest.fixture(scope="module")
def model(tiny_zoo) -> OSCARModel:
    torch.manual_seed(0)
    return OSCARModel(load_sd_components(tiny_zoo), small_options()).eval()


def image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, h, w, generator=g) * 2 - 1


@pytest.mark.parametrize("size", [(64, 64), (96, 160), (77, 45), (45, 77), (17, 5)])
def test_encode_decode_shapes_all_levels(model, size):
    h, w = size
    x = image(h, w)
    for level, point in enumerate(model.rate_points):
        coded = model.encode(x, level)
        assert tuple(coded.indices.shape) == point.token_grid(h, w)
        assert coded.indices.dtype == torch.int64
        assert 0 <= int(coded.indices.min()) and int(coded.indices.max()) < point.codebook_size
        assert coded.norm_codes is not None and len(coded.norm_codes) == 4
        y = model.decode(coded)
        assert y.shape == (1, 3, h, w) and y.min() >= -1 and y.max() <= 1


def test_decode_uses_only_transmitted_data(model):
    """A CodedImage rebuilt from plain integers (what a file carries) decodes to the same pixels."""
    coded = model.encode(image(70, 90), 3)
    rebuilt = CodedImage(
        level=int(coded.level), height=70, width=90,
        indices=torch.tensor(coded.indices.tolist(), dtype=torch.int64),
        norm_codes=tuple(int(c) for c in coded.norm_codes),
    )
    assert torch.equal(model.decode(coded), model.decode(rebuilt))
    # The norms matter: other codes give another image.
    shifted = tuple((c + 20) % 64 for c in rebuilt.norm_codes)
    other = CodedImage(level=3, height=70, width=90, indices=rebuilt.indices, norm_codes=shifted)
    assert not torch.equal(model.decode(other), model.decode(rebuilt))


def test_determinism_in_process(model):
    x = image(64, 96, seed=3)
    a, b = model.encode(x, 0), model.encode(x, 0)
    assert torch.equal(a.indices, b.indices) and a.norm_codes == b.norm_codes
    assert torch.equal(model.decode(a), model.decode(b))


def test_determinism_across_processes(model, tiny_zoo, tmp_path):
    export = model.save_pretrained(tmp_path / "export", zoo_path=str(tiny_zoo))
    x = image(64, 96, seed=5)
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(
        f"""
        import torch
        from models.oscar.model import OSCARModel
        model = OSCARModel.from_pretrained({str(export)!r})
        x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)
        coded = model.encode(x, 2)
        torch.save({{"indices": coded.indices, "norms": torch.tensor(coded.norm_codes), "y": model.decode(coded)}},
                   {str(tmp_path / 'out.pt')!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    other = torch.load(tmp_path / "out.pt", weights_only=True)
    loaded = OSCARModel.from_pretrained(export)
    coded = loaded.encode(x, 2)
    assert torch.equal(other["indices"], coded.indices)
    assert tuple(other["norms"].tolist()) == coded.norm_codes
    assert torch.equal(other["y"], loaded.decode(coded))
    # The export reproduces the in-memory model exactly.
    assert torch.equal(model.decode(model.encode(x, 2)), loaded.decode(coded))
    assert loaded.fingerprint() == model.fingerprint()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_x0_matches_scheduler(prediction_type):
    from diffusers import DDPMScheduler

    from models.blocks.model_zoo import SD21_SCHEDULER

    scheduler = DDPMScheduler(**{**SD21_SCHEDULER, "prediction_type": prediction_type})
    g = torch.Generator().manual_seed(0)
    sample, output = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for t in (150, 310, 500, 999):
        expected = scheduler.step(output, t, sample).pred_original_sample
        got = predict_x0(scheduler.alphas_cumprod, prediction_type, output, torch.tensor(t), sample)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_x0_inverts_noising():
    """For a sample made by add_noise, the exact noise / velocity gives back the clean latent."""
    from diffusers import DDPMScheduler

    from models.blocks.model_zoo import SD21_SCHEDULER

    scheduler = DDPMScheduler(**SD21_SCHEDULER)
    x0, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    t = torch.tensor([400])
    x_t = scheduler.add_noise(x0, noise, t)
    v = scheduler.get_velocity(x0, noise, t)
    torch.testing.assert_close(predict_x0(scheduler.alphas_cumprod, "v_prediction", v, t, x_t), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(predict_x0(scheduler.alphas_cumprod, "epsilon", noise, t, x_t), x0, rtol=1e-4, atol=1e-4)


def test_lora_only_where_intended(model):
    unet = model.unet
    lora_names = [n for n, _ in unet.named_parameters() if "lora_" in n]
    assert lora_names and all(p.requires_grad for p in lora_parameters(unet))
    # Every LoRA sits on a targeted module of its group; nothing on norms or the time embedding.
    for name in lora_names:
        module = name.split(".lora_")[0]
        adapter = name.split(".")[-2]
        group = adapter.removeprefix("default_")
        assert module in model.lora_groups[group], name
        assert "norm" not in module and "time_emb" not in module and "time_embedding" not in module
    frozen_trainable = [n for n, p in unet.named_parameters() if p.requires_grad and "lora_" not in n]
    assert frozen_trainable == []
    rank = model.config.lora_rank
    expected = 0
    for group in model.lora_groups.values():
        for module_name in group:
            base = unet.get_submodule(module_name).base_layer
            if isinstance(base, torch.nn.Linear):
                expected += rank * (base.in_features + base.out_features)
            else:
                k = base.kernel_size[0] * base.kernel_size[1]
                expected += rank * base.in_channels * k + base.out_channels * rank
    assert sum(p.numel() for p in lora_parameters(unet)) == expected


def test_sd21_lora_counts_match_release():
    """With the real architecture (on the meta device: no memory), the adapters match the release exactly."""
    from diffusers import UNet2DConditionModel

    from models.blocks.lora import add_oscar_lora, trainable_unet_state
    from models.blocks.model_zoo import SD21_UNET

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD21_UNET)
        groups = add_oscar_lora(unet, rank=16, alpha=8)
    assert {g: len(m) for g, m in groups.items()} == {"encoder": 94, "decoder": 148, "others": 16}
    assert groups["encoder"][:2] == ["conv_in", "down_blocks.0.attentions.0.proj_in"]
    assert groups["decoder"][-1] == "conv_out" and groups["others"][-1] == "mid_block.resnets.1.conv2"
    assert sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n) == 16_222_848
    state = trainable_unet_state(unet)
    assert len(state) == 518
    from tests.release_fixture import release_layout

    layout = release_layout()["state_dict_unet"]
    assert {k: list(v.shape) for k, v in state.items()} == layout


def test_latent_norm_quantization():
    rms = torch.tensor([[0.07, 0.5, 1.0, 3.9]])  # inside the range [1/16, 4]
    bits = 6
    back = dequantize_rms(quantize_rms(rms, bits), bits)
    assert torch.all((back / rms - 1).abs() < 0.034)
    z = torch.randn(1, 4, 8, 8) * torch.tensor([0.5, 1, 2, 3])[None, :, None, None]
    scaled = rescale_to_rms(torch.randn(1, 4, 8, 8), channel_rms(z))
    torch.testing.assert_close(channel_rms(scaled), channel_rms(z))
    assert quantize_rms(torch.tensor([1e-9, 100.0]), bits).tolist() == [0, 63]  # clamped to the range
    with pytest.raises(ValueError, match="latent-norm codes"):
        dequantize_rms(torch.tensor([64]), 6)


def test_norm_modes(tiny_zoo):
    x = image(64, 64)
    torch.manual_seed(0)
    transmit = OSCARModel(load_sd_components(tiny_zoo), small_options()).eval()
    state = {k: v.clone() for k, v in transmit.state_dict().items()}
    for mode in ("none", "oracle"):
        torch.manual_seed(0)
        other = OSCARModel(load_sd_components(tiny_zoo), small_options(latent_norms=mode)).eval()
        other.load_state_dict(state)
        coded = other.encode(x, 1)
        assert coded.norm_codes is None
        if mode == "oracle":
            with pytest.raises(ValueError, match="oracle_rms"):
                other.decode(coded)
            y = other.decode(coded, oracle_rms=other.latent_rms(x, 1))
        else:
            y = other.decode(coded)
        assert y.shape == x.shape


def test_training_forward_has_gradients(model):
    model.train()
    try:
        out = model(image(64, 64).repeat(2, 1, 1, 1), level=4)
        loss = (out.x_hat - 0).abs().mean() + out.vq_loss
        loss.backward()
    finally:
        model.eval()
    assert out.x_hat.shape == (2, 3, 64, 64)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters(model.unet))
    assert model.prompt_embedding.grad is not None
    assert any(p.grad is not None for p in model.hyper_encoders[4].parameters())
    assert all(p.grad is None for p in model.vae.parameters())
    model.zero_grad(set_to_none=True)


def test_bad_inputs(model):
    with pytest.raises(ValueError, match="level 9"):
        model.encode(image(64, 64), 9)
    with pytest.raises(ValueError, match=r"expected one RGB image"):
        model.encode(torch.zeros(2, 3, 64, 64), 0)
    coded = model.encode(image(64, 64), 0)
    wrong = CodedImage(level=0, height=128, width=64, indices=coded.indices, norm_codes=coded.norm_codes)
    with pytest.raises(ValueError, match="token grid"):
        model.decode(wrong)


def test_padding_reflects_and_handles_tiny_images():
    x = torch.arange(15.0).reshape(1, 1, 3, 5)
    padded = pad_to_multiple(x, 8)
    assert padded.shape == (1, 1, 8, 8)
    assert torch.equal(padded[..., :3, :5], x)
    assert torch.equal(padded[0, 0, 0, 5], x[0, 0, 0, 3])  # reflection, not replication
    assert pad_to_multiple(torch.zeros(1, 3, 1, 1), 64).shape == (1, 3, 64, 64)


def test_vae_tiling_auto(tiny_zoo):
    torch.manual_seed(0)
    model = OSCARModel(load_sd_components(tiny_zoo), small_options(vae_tiling="auto", tiling_min_pixels=128 * 128)).eval()
    calls = []
    original = model.vae._tiled_encode
    model.vae._tiled_encode = lambda *a, **k: calls.append(1) or original(*a, **k)
    small = model.encode(image(64, 64), 4)
    assert calls == []
    big = model.encode(image(192, 160), 4)
    assert calls, "tiled encode was not used above the threshold"
    assert model.decode(big).shape == (1, 3, 192, 160) and not model.vae.use_tiling
    assert small.indices.shape == (8, 8)


def test_export_errors(tmp_path, model, tiny_zoo):
    with pytest.raises(ModelLoadError, match="not an exported model"):
        OSCARModel.from_pretrained(tmp_path)
    export = model.save_pretrained(tmp_path / "m", zoo_path=str(tiny_zoo))
    (export / "unet_lora.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(ModelLoadError, match="cannot be loaded"):
        OSCARModel.from_pretrained(export)


def test_version_1_export_still_loads(tmp_path, tiny_zoo):
    """Exports written before the method registry (oscar_config.json, "format": "oscar-export") keep loading."""
    import json

    from models.registry import export_method, load_codec

    model = OSCARModel(load_sd_components(tiny_zoo), small_options())  # the module's model is modified by tests
    export = model.save_pretrained(tmp_path / "v2", zoo_path=str(tiny_zoo))
    config = json.loads((export / "codec_config.json").read_text())
    assert (config["method"], config["version"]) == ("oscar", 2)
    expected = load_codec(export, device="cpu").fingerprint()
    assert f"{expected:016x}" == config["fingerprint"]
    legacy = {"format": "oscar-export", "version": 1, **{k: config[k] for k in ("model", "model_zoo", "fingerprint")}}
    (export / "codec_config.json").unlink()
    (export / "oscar_config.json").write_text(json.dumps(legacy))
    assert export_method(export) == ("oscar", 1)
    loaded = load_codec(export, device="cpu")
    assert loaded.fingerprint() == expected
    (export / "oscar_config.json").write_text(json.dumps({**legacy, "version": 3}))
    with pytest.raises(ModelLoadError, match="version 3, expected 1"):
        load_codec(export)
