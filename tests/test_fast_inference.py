"""The fast inference path (models/fast_inference.py) against the fp32 reference, on the tiny random model.

Quality guard: for the same indices, the fast decoder matches the reference to > 40 dB PSNR (bf16) and
merging LoRA in fp32 changes the output by < 1e-4; the hyper-encoders, hence the indices of a latent, are
untouched; files written by the reference model decode with the prepared one (frozen fingerprint).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from models.oscar.coded_image import CodedImage
from models.oscar.fast_inference import (
    attention_processors,
    inference_precision_default,
    prepare_for_inference,
)
from models.oscar.model import OSCARModel
from models.blocks.model_zoo import build_sd_components
from models.oscar.options import HyperEncoderOptions, ModelOptions
from models.blocks.padding import pad_to_multiple

OPTIONS = ModelOptions(
    hyper_encoder=HyperEncoderOptions(channels=32, hyper_dim=64, codebook_dim=16), lora_rank=4, lora_alpha=2.0
)
SIZE = (64, 96)  # H, W: not square, so a transposed layout would show


def randomize_lora(unet: torch.nn.Module, std: float = 0.05, seed: int = 1) -> None:
    """peft initialises lora_B to zero, so a fresh adapter is a no-op; a trained one is not."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(scope="module")
def reference() -> OSCARModel:
    torch.manual_seed(0)
    model = OSCARModel(build_sd_components("tiny", seed=0), OPTIONS).eval()
    randomize_lora(model.unet)
    return model


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    """A smooth random image (white noise is not what a codec sees)."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(1, 3, SIZE[0] // 8, SIZE[1] // 8, generator=g)
    return torch.nn.functional.interpolate(coarse, size=SIZE, mode="bilinear", align_corners=False) * 2 - 1


@pytest.fixture(scope="module")
def coded(reference, image) -> dict[int, tuple[CodedImage, torch.Tensor]]:
    """Reference symbols and reference decode at the lowest and the highest level."""
    out = {}
    for level in (0, reference.num_levels - 1):
        c = reference.encode(image, level)
        out[level] = (c, reference.decode(c))
    return out


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR on the [0, 1] scale of two images in [-1, 1]."""
    mse = ((a.float() - b.float()) / 2).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def prepared(reference: OSCARModel, precision: str, **kwargs) -> OSCARModel:
    return prepare_for_inference(copy.deepcopy(reference), precision, **kwargs)


@pytest.fixture(scope="module")
def fast_bf16(reference) -> OSCARModel:
    """The default fast path: merged, bf16, channels_last, SDPA (the VAE encoder converted too)."""
    return prepared(reference, "bf16")


@pytest.fixture(scope="module")
def merged_fp32(reference) -> OSCARModel:
    """Merge only: fp32, NCHW."""
    return prepared(reference, "fp32", merge_lora=True, channels_last=False)


def test_lora_is_multi_adapter_and_nonzero(reference):
    """The merge test below is only meaningful with several adapters and non-zero LoRA deltas."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = {n for m in reference.unet.modules() if isinstance(m, BaseTunerLayer) for n in m.lora_A}
    assert names == {"default_encoder", "default_decoder", "default_others"}
    assert any(p.abs().sum() > 0 for n, p in reference.unet.named_parameters() if "lora_B" in n)


def test_merged_lora_fp32_equals_unmerged(reference, merged_fp32, coded):
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in merged_fp32.unet.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and all(m.merged for m in layers)
    for c, y_ref in coded.values():
        assert (merged_fp32.decode(c) - y_ref).abs().max().item() < 1e-4
    # The deltas were really folded in: with the adapters switched off, the reference decodes otherwise.
    c, y_ref = coded[0]
    reference.unet.disable_adapters()
    try:
        assert (reference.decode(c) - y_ref).abs().max().item() > 1e-3
    finally:
        reference.unet.enable_adapters()


@pytest.mark.parametrize("which", ["fast_bf16", "merged_fp32"])
def test_fast_decode_quality(request, coded, which):
    fast = request.getfixturevalue(which)
    assert fast.unet.dtype == (torch.bfloat16 if which == "fast_bf16" else torch.float32)
    for level, (c, y_ref) in coded.items():
        y = fast.decode(c)
        assert y.dtype == torch.float32 and y.shape == y_ref.shape
        quality = psnr(y, y_ref)
        assert quality > 40.0, f"level {level}: {which} is {quality:.1f} dB from the fp32 reference"


def test_indices_unchanged(reference, fast_bf16, coded, image):
    exact = prepared(reference, "bf16", fast_encoder=False)
    for he_ref, he_fast in zip(reference.hyper_encoders, exact.hyper_encoders):
        assert all(p.dtype == torch.float32 for p in he_fast.parameters())
        for (name, a), b in zip(he_ref.state_dict().items(), he_fast.state_dict().values()):
            assert torch.equal(a, b), name
    for level, (c, _) in coded.items():
        # Same latent -> same indices: the hyper-encoder and VQ are fp32 and untouched.
        stride = reference.rate_points[level].pixel_stride
        z = reference.image_to_latent(pad_to_multiple(image, stride)).float()
        assert torch.equal(fast_bf16.hyper_encoders[level].encode(z)[0], c.indices)
        # fast_encoder=False leaves the VAE encoder as it is: encoding is bit-identical end to end.
        c_exact = exact.encode(image, level)
        assert torch.equal(c_exact.indices, c.indices) and c_exact.norm_codes == c.norm_codes
        # With a bf16 VAE encoder only near-tie tokens may move.
        agreement = (fast_bf16.encode(image, level).indices == c.indices).float().mean().item()
        assert agreement >= 0.9, f"level {level}: only {agreement:.1%} of indices agree"


def test_reference_files_decode_with_prepared_model(reference, fast_bf16, image):
    """The fingerprint is frozen at the fp32 weights, so files cross between the two paths."""
    assert fast_bf16.fingerprint() == reference.fingerprint()
    data = reference.compress(image, 1)
    assert psnr(fast_bf16.decompress(data), reference.decompress(data)) > 40.0
    assert fast_bf16.compress(image, 1)[:3] == data[:3]  # magic, version and fingerprint bits
    saved = fast_bf16.index_counts[1]
    fast_bf16.index_counts[1] = saved + 1  # new priors change the identity: refused, not silently kept
    try:
        with pytest.raises(RuntimeError, match="fingerprint is frozen"):
            fast_bf16.compress(image, 1)
    finally:
        fast_bf16.index_counts[1] = saved
    other = prepared(reference, "fp32", merge_lora=False, channels_last=False)
    with pytest.raises(RuntimeError, match="fingerprint is frozen"):  # replaced wholesale: refused at once
        other.index_counts = [c + 1 for c in other.index_counts]


def test_sdpa_is_installed_and_setup_recorded(reference, fast_bf16):
    from diffusers.models.attention_processor import AttnProcessor

    assert fast_bf16.unet.conv_in.base_layer.weight.is_contiguous(memory_format=torch.channels_last)
    assert fast_bf16.inference_setup["lora_merged"] and fast_bf16.inference_setup["vae_tiling"] == "auto"
    with pytest.raises(ValueError, match="already prepared"):
        prepare_for_inference(fast_bf16, "fp32")
    model = copy.deepcopy(reference)
    model.unet.set_attn_processor(AttnProcessor())
    model.vae.set_attn_processor(AttnProcessor())
    fast = prepare_for_inference(model, "fp32", merge_lora=False, channels_last=False)
    assert attention_processors(fast.unet) == {"AttnProcessor2_0"}
    assert attention_processors(fast.vae) == {"AttnProcessor2_0"}


def test_compile_guard_skips_with_warning(reference, monkeypatch):
    import models.oscar.fast_inference as fi

    monkeypatch.setattr(fi, "compile_unavailable_reason", lambda device: "no backend here")
    with pytest.warns(UserWarning, match="torch.compile skipped: no backend here"):
        fast = prepared(reference, "fp32", merge_lora=False, channels_last=False, compile=True)
    assert fast.inference_setup["compiled"] == []


def test_precision_defaults_and_fallbacks(reference):
    assert inference_precision_default("cpu") == "fp32"
    with pytest.warns(UserWarning, match="fp16"):
        fast = prepared(
            reference, "fp16", merge_lora=False, channels_last=False
        )  # CPU: resolve_dtype falls back to fp32
    assert fast.unet.dtype == torch.float32
    with pytest.raises(ValueError, match="precision"):
        prepare_for_inference(reference, "int8")  # refused before anything is changed
