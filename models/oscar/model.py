"""OSCAR: a multi-rate image codec on Stable Diffusion that decodes in one UNet step.

Dataflow (one image, rate level ``l`` with ``k`` stride-2 steps and codebook size ``K``)::

    x ──pad to 8·2^k──► VAE enc (posterior mean) ─► z ──► hyper-encoder l ─► indices (token grid)  ┐ encoder
                                                    └──► channel RMS ──────► norm codes (24 bits)   ┘ side
    ───────────────────────────────────────────── transmitted ─────────────────────────────────────────────
    indices ─► hyper-decoder l ─► ẑ ─► rescale to the transmitted RMS ─► UNet(ẑ, t_l, prompt) ─► x0     ┐ decoder
                                                          x0 ─► VAE dec ─► clamp [-1, 1] ─► crop ─► x̂   ┘ side

The VAE and the UNet's base weights are frozen Stable Diffusion 2.1; OSCAR trains LoRA adapters on the UNet,
its ``conv_in``, a prompt embedding that replaces text, and one hyper-encoder per level. ``encode`` and
``decode`` are the only way from pixels to symbols and back, so compression, evaluation and benchmarks all run
the same code; ``forward`` is the training path (the same computation, with gradients and without indices).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from models.blocks.codec_method import CodecError, CodecMethod, LevelInfo, Stage, run_stages
from models.blocks.index_coder import RANS_MIN_SYMBOLS, IndexPrior, bits_per_index
from models.blocks.lora import add_oscar_lora, trainable_unet_state
from models.blocks.model_zoo import SDComponents
from models.blocks.one_step import predict_x0
from models.blocks.padding import crop_to, pad_to_multiple
from models.oscar.bitstream import METHOD_ID, CodecInfo, header_bits, read_bitstream, read_header, write_bitstream
from models.oscar.coded_image import CodedImage
from models.oscar.export import EXPORT_VERSION, load_export, save_export, zoo_digest
from models.oscar.hyper_encoder import HyperEncoder
from models.oscar.latent_norms import channel_rms, dequantize_rms, quantize_rms, rescale_to_rms
from models.oscar.options import HyperEncoderOptions, ModelOptions
from models.oscar.rate_table import RatePoint, rate_point
from utils.options import options_to_dict

PROMPT_TOKENS = 77  # SD's text-token count; the learned embedding takes the place of the text encoder


@dataclass
class OSCAROutput:
    """Training-path result for a batch at one level."""

    x_hat: torch.Tensor  # reconstructed image in [-1, 1]
    latent: torch.Tensor  # z: VAE latent of the input (no gradient)
    latent_hat: torch.Tensor  # ẑ after rescaling: the UNet's input
    latent_decoded: torch.Tensor  # ẑ as the hyper-decoder gives it, before rescaling (the reference's latent loss)
    x0_latent: torch.Tensor  # the UNet's one-step clean-latent estimate
    vq_loss: torch.Tensor


class OSCARModel(nn.Module, CodecMethod):
    """Frozen SD-2.1 VAE and UNet with OSCAR's trainable parts; see the module docstring for the dataflow."""

    method_name = "oscar"
    method_id = METHOD_ID
    export_version = EXPORT_VERSION
    file_suffix = ".oscar"

    def __init__(self, sd: SDComponents, config: ModelOptions, *, lora: bool = True) -> None:
        super().__init__()
        self.config = config
        self.vae = sd.vae.requires_grad_(False).eval()
        self.unet = sd.unet.requires_grad_(False).eval()
        self.scheduler = sd.scheduler
        self.zoo_path = Path(sd.path)
        self.rate_points: list[RatePoint] = [rate_point(bpp) for bpp in config.levels]
        he = config.hyper_encoder
        self.hyper_encoders = nn.ModuleList(
            HyperEncoder(
                in_channels=self.vae.config.latent_channels,
                channels=he.channels,
                hyper_dim=he.hyper_dim,
                codebook_dim=he.codebook_dim,
                codebook_size=point.codebook_size,
                downsamplings=point.downsamplings,
                ema_decay=he.ema_decay,
                commitment_weight=he.commitment_weight,
            )
            for point in self.rate_points
        )
        if lora and getattr(self.unet, "peft_config", None):
            raise ValueError("this UNet already carries LoRA adapters; build OSCARModel on freshly loaded SD components")
        self.lora_groups = add_oscar_lora(self.unet, config.lora_rank, config.lora_alpha) if lora else {}
        cross_dim = self.unet.config.cross_attention_dim
        self.prompt_embedding = nn.Parameter(torch.randn(PROMPT_TOKENS, cross_dim) * 0.02)
        self.register_buffer("timesteps", torch.tensor(config.timesteps, dtype=torch.long), persistent=False)
        self._fingerprint: int | None = None
        self._fingerprint_frozen = False
        self._codec_info: CodecInfo | None = None
        self._index_counts = [torch.zeros(p.codebook_size, dtype=torch.int64) for p in self.rate_points]

    @property
    def index_counts(self) -> list[torch.Tensor]:
        """Usage counts of each codebook entry per level: the entropy coder's static prior (zeros = uniform)."""
        return self._index_counts

    @index_counts.setter
    def index_counts(self, counts: list[torch.Tensor]) -> None:
        if len(counts) != self.num_levels:
            raise ValueError(f"expected index counts for {self.num_levels} levels, got {len(counts)}")
        for level, (c, point) in enumerate(zip(counts, self.rate_points)):
            if tuple(c.shape) != (point.codebook_size,):
                raise ValueError(f"index counts of level {level}: shape {tuple(c.shape)}, expected ({point.codebook_size},)")
        self._index_counts = [c.detach().cpu().to(torch.int64) for c in counts]
        self.invalidate_fingerprint()  # files written with other priors must not be read with these

    # ------------------------------------------------------------------------------------------ geometry

    @property
    def levels(self) -> list[LevelInfo]:
        return [LevelInfo(f"{p.label_bpp:g} bpp", p.label_bpp) for p in self.rate_points]

    @property
    def device(self) -> torch.device:
        return self.prompt_embedding.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def unet_multiple(self) -> int:
        """The UNet halves its input once per down block but the last: latents are padded to this multiple."""
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    def check_level(self, level: int) -> RatePoint:
        if not 0 <= level < len(self.rate_points):
            raise CodecError(f"level {level}: this model has levels 0..{len(self.rate_points) - 1}")
        return self.rate_points[level]

    def nominal_bpp(self, level: int, height: int, width: int) -> float:
        return self.check_level(level).nominal_bpp(height, width)

    # ---------------------------------------------------------------------------------------- VAE parts

    @contextlib.contextmanager
    def _vae_tiling(self, num_pixels: int) -> Iterator[None]:
        mode = self.config.vae_tiling
        use = mode == "on" or (mode == "auto" and num_pixels >= self.config.tiling_min_pixels)
        if use:
            self.vae.enable_tiling()
        try:
            yield
        finally:
            if use:
                self.vae.disable_tiling()

    def image_to_latent(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled VAE latent of ``x`` in [-1, 1]; the posterior mean unless ``sample`` (stage 1 of the reference)."""
        with self._vae_tiling(x.shape[-2] * x.shape[-1]):
            # Each half of the VAE may have its own precision (fast inference can convert the decoder alone).
            dist = self.vae.encode(x.to(self.vae.encoder.conv_in.weight.dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mean
        return z * self.vae.config.scaling_factor

    def latent_to_image(self, z: torch.Tensor) -> torch.Tensor:
        first = self.vae.post_quant_conv if self.vae.post_quant_conv is not None else self.vae.decoder.conv_in
        z = z.to(first.weight.dtype) / self.vae.config.scaling_factor
        with self._vae_tiling(z.shape[-2] * z.shape[-1] * 64):
            x = self.vae.decode(z).sample
        return x.clamp(-1.0, 1.0)

    # ------------------------------------------------------------------------------------- one-step UNet

    def denoise(self, latent_hat: torch.Tensor, level: int) -> torch.Tensor:
        """One UNet pass at the level's pseudo timestep; returns the scheduler's x0 estimate."""
        h, w = latent_hat.shape[-2:]
        z_in = pad_to_multiple(latent_hat, self.unet_multiple).to(self.unet.dtype)
        t = self.timesteps[level].to(z_in.device)
        prompt = self.prompt_embedding.to(self.unet.dtype)[None].expand(z_in.shape[0], -1, -1)
        out = self.unet(z_in, t, encoder_hidden_states=prompt).sample
        x0 = predict_x0(self.scheduler.alphas_cumprod, self.scheduler.config.prediction_type, out, t, z_in)
        return crop_to(x0, h, w)

    def _rescale(self, latent_hat: torch.Tensor, target_rms: torch.Tensor | None) -> torch.Tensor:
        return latent_hat if target_rms is None else rescale_to_rms(latent_hat, target_rms)

    def _target_rms(self, latent: torch.Tensor) -> torch.Tensor | None:
        """What the decoder will rescale to: the transmitted (quantized) RMS, the oracle RMS, or nothing."""
        mode = self.config.latent_norms
        if mode == "transmit":
            bits = self.config.norm_bits
            return dequantize_rms(quantize_rms(channel_rms(latent), bits), bits)
        if mode == "oracle":
            return channel_rms(latent)
        return None

    # ------------------------------------------------------------------------------------------ training

    def forward(
        self, x: torch.Tensor, level: int, sample_posterior: bool = False, generator: torch.Generator | None = None
    ) -> OSCAROutput:
        """Training path for a batch whose sides are multiples of 64 (training crops)."""
        self.check_level(level)
        with torch.no_grad():
            z = self.image_to_latent(x, sample=sample_posterior, generator=generator).float()
        he_out = self.hyper_encoders[level](z)
        z_hat = self._rescale(he_out.latent_hat, self._target_rms(z))
        x0 = self.denoise(z_hat, level)
        x_hat = self.latent_to_image(x0)
        return OSCAROutput(
            x_hat=x_hat, latent=z, latent_hat=z_hat, latent_decoded=he_out.latent_hat, x0_latent=x0, vq_loss=he_out.vq_loss
        )

    # -------------------------------------------------------------------------------- encoder / decoder

    def _image_latent(self, image: torch.Tensor, level: int) -> torch.Tensor:
        """The VAE latent of the image padded to the level's stride (fp32)."""
        point = self.check_level(level)
        if image.dim() != 4 or image.shape[0] != 1 or image.shape[1] != 3:
            raise ValueError(f"expected one RGB image of shape (1, 3, H, W), got {tuple(image.shape)}")
        return self.image_to_latent(pad_to_multiple(image.to(self.device), point.pixel_stride)).float()

    def _latent_symbols(self, z: torch.Tensor, level: int, height: int, width: int) -> CodedImage:
        """Hyper-encoder indices (and the transmitted norm codes) of a latent."""
        indices = self.hyper_encoders[level].encode(z)[0]
        norm_codes = None
        if self.config.latent_norms == "transmit":
            norm_codes = tuple(int(c) for c in quantize_rms(channel_rms(z), self.config.norm_bits)[0])
        return CodedImage(level=level, height=int(height), width=int(width), indices=indices.cpu(), norm_codes=norm_codes)

    @torch.no_grad()
    def encode(self, image: torch.Tensor, level: int) -> CodedImage:
        """Encoder side: an image ``(1, 3, H, W)`` in [-1, 1] to its symbols at ``level``."""
        z = self._image_latent(image, level)
        return self._latent_symbols(z, level, image.shape[-2], image.shape[-1])

    def _hyper_decode(self, coded: CodedImage, oracle_rms: torch.Tensor | None = None) -> torch.Tensor:
        """Symbols to the UNet's input latent: hyper-decoder, then the rescale to the transmitted norms."""
        point = self.check_level(coded.level)
        expected = point.token_grid(coded.height, coded.width)
        if tuple(coded.indices.shape) != expected:
            raise ValueError(
                f"token grid {tuple(coded.indices.shape)} does not match {coded.height}x{coded.width} at level "
                f"{coded.level} (expected {expected})"
            )
        latent_hat = self.hyper_encoders[coded.level].decode(coded.indices.to(self.device)[None]).float()
        mode = self.config.latent_norms
        target = None
        if mode == "transmit":
            if coded.norm_codes is None or len(coded.norm_codes) != self.latent_channels:
                raise ValueError(f"this model needs {self.latent_channels} transmitted latent-norm codes")
            codes = torch.tensor(coded.norm_codes, device=self.device)[None]
            target = dequantize_rms(codes, self.config.norm_bits)
        elif mode == "oracle":
            if oracle_rms is None:
                raise ValueError("latent_norms='oracle' needs the original latent's channel RMS (oracle_rms)")
            target = oracle_rms.to(self.device)
        return self._rescale(latent_hat, target)

    def _latent_image(self, x0: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return crop_to(self.latent_to_image(x0), height, width).float()

    @torch.no_grad()
    def decode(self, coded: CodedImage, oracle_rms: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder side: symbols to an image ``(1, 3, H, W)`` in [-1, 1], using only what was transmitted.

        ``oracle_rms`` (the original latent's channel RMS, shape ``(1, C)``) is used only when the model is
        configured with ``latent_norms="oracle"``: the reference's behaviour, which leaks encoder-side
        information that is not counted in the rate, kept so that results can be compared.
        """
        x0 = self.denoise(self._hyper_decode(coded, oracle_rms), coded.level)
        return self._latent_image(x0, coded.height, coded.width)

    @torch.no_grad()
    def latent_rms(self, image: torch.Tensor, level: int) -> torch.Tensor:
        """Channel RMS of the padded image's latent (what ``latent_norms="oracle"`` decoding receives)."""
        x = pad_to_multiple(image.to(self.device), self.check_level(level).pixel_stride)
        return channel_rms(self.image_to_latent(x))

    # ------------------------------------------------------------------------------ files (CodecMethod)

    def codec_info(self) -> CodecInfo:
        """What the file format needs from the model: fingerprint, level geometry, priors, side information.

        Cached and rebuilt when the fingerprint or the priors change (assigning ``index_counts`` resets the
        fingerprint): a file must never carry the identity of other priors than it was coded with.
        """
        cached = self._codec_info
        if cached is not None:
            if not _same_counts(cached.priors, self.index_counts):
                self.invalidate_fingerprint()  # counts edited in place (assigning the list resets it already)
            elif cached.fingerprint == self.fingerprint():
                return cached
        priors = []
        for level, (counts, point) in enumerate(zip(self.index_counts, self.rate_points)):
            try:
                priors.append(IndexPrior.from_counts(counts, point.codebook_size))
            except ValueError as err:  # e.g. priors of another codebook size in a hand-edited export
                raise CodecError(f"index prior of level {level}: {err}") from None
        transmit = self.config.latent_norms == "transmit"
        info = CodecInfo(
            fingerprint=self.fingerprint(),
            levels=[(p.downsamplings, p.codebook_size) for p in self.rate_points],
            priors=priors,
            norm_count=self.latent_channels if transmit else 0,
            norm_bits=self.config.norm_bits if transmit else 0,
        )
        self._codec_info = info
        return info

    def check_file_mode(self) -> None:
        if self.config.latent_norms == "oracle":
            raise CodecError(
                "the model is configured with latent_norms='oracle', which needs the original image at decoding; "
                "files need 'transmit' (or 'none')"
            )

    def encode_stages(self, level: int) -> list[Stage]:
        state: dict[str, int] = {}

        def vae_encoder(image: torch.Tensor) -> torch.Tensor:
            state["height"], state["width"] = int(image.shape[-2]), int(image.shape[-1])
            return self._image_latent(image, level)

        return [
            Stage("vae_encoder", "VAE enc", "encode", vae_encoder),
            Stage("hyper_encoder", "hyper-enc", "encode",
                  lambda z: self._latent_symbols(z, level, state["height"], state["width"])),
            Stage("entropy_encode", "EC enc", "encode", lambda coded: write_bitstream(coded, self.codec_info()),
                  entropy=True),
        ]

    def decode_stages(self, oracle_rms: torch.Tensor | None = None) -> list[Stage]:
        """``oracle_rms``: the original latent's norms for ``latent_norms="oracle"`` (see :meth:`roundtrip`)."""

        def hyper_decoder(coded: CodedImage) -> tuple[torch.Tensor, CodedImage]:
            return self._hyper_decode(coded, oracle_rms), coded

        def unet(state: tuple[torch.Tensor, CodedImage]) -> tuple[torch.Tensor, CodedImage]:
            return self.denoise(state[0], state[1].level), state[1]

        return [
            Stage("entropy_decode", "EC dec", "decode", lambda data: read_bitstream(data, self.codec_info()),
                  entropy=True),
            Stage("hyper_decoder", "hyper-dec", "decode", hyper_decoder),
            Stage("unet", "UNet", "decode", unet),
            Stage("vae_decoder", "VAE dec", "decode", lambda s: self._latent_image(s[0], s[1].height, s[1].width)),
        ]

    def roundtrip(self, image: torch.Tensor, level: int, write: Callable[[bytes], bytes]) -> torch.Tensor:
        """With ``latent_norms="oracle"`` the decoder is handed the original latent's norms (no file carries them)."""
        if self.config.latent_norms != "oracle":
            return super().roundtrip(image, level, write)
        with torch.no_grad():  # the same stages as compress/decompress, minus their file-mode check
            data = write(run_stages(self.encode_stages(level), image))
            self.check_decode_size(data)
            return run_stages(self.decode_stages(oracle_rms=self.latent_rms(image, level)), data)

    @property
    def side_information_leak(self) -> str | None:
        if self.config.latent_norms == "oracle":
            return "latent norms of the original image (oracle, not transmitted)"
        return None

    def level_header(self, data: bytes) -> tuple[int, int, int]:
        header = read_header(data)
        return header.level, header.width, header.height

    def file_size_bounds(self, level: int, height: int, width: int) -> tuple[int, int]:
        """(smallest, largest) possible file size in bytes, known before encoding.

        The largest is the fixed-length file. The smallest equals it when rANS cannot win: fewer tokens than rANS
        accepts, or a uniform prior over a power-of-two codebook (rANS then spends exactly log2 K bits per token
        plus its 8-byte flush). Otherwise a rANS file is at least the header plus that flush.
        """
        info = self.codec_info()
        gh, gw = info.grid(level, height, width)
        count = gh * gw
        prior = info.priors[level]
        head = header_bits(width, height, info.norm_count, info.norm_bits)
        largest = math.ceil((head + count * bits_per_index(prior.codebook_size)) / 8)
        size = prior.codebook_size
        rans_possible = count >= RANS_MIN_SYMBOLS and not (prior.is_uniform and size & (size - 1) == 0)
        smallest = min(largest, math.ceil(head / 8) + 8) if rans_possible else largest
        return smallest, largest

    def prepare_for_inference(self, precision: str | None = "fp32", *, fast_encoder: bool = True, **kwargs: Any) -> "OSCARModel":
        """See :func:`models.oscar.fast_inference.prepare_for_inference` (keyword arguments are passed on)."""
        from models.oscar.fast_inference import prepare_for_inference  # that module builds on this one

        return prepare_for_inference(self, precision, fast_encoder=fast_encoder, **kwargs)

    # ------------------------------------------------------------------------------- trainable weights

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything OSCAR trains (hyper-encoders incl. codebook buffers, UNet LoRA + conv_in, prompt)."""
        state = {f"hyper_encoders.{k}": v for k, v in self.hyper_encoders.state_dict().items()}
        state.update({f"unet.{k}": v for k, v in trainable_unet_state(self.unet).items()})
        state["prompt_embedding"] = self.prompt_embedding.detach()
        return state

    def fingerprint(self) -> int:
        """64-bit identity of the decoder's weights, written into every file (see docs/bitstream.md).

        It hashes every trained tensor, the index priors, the model options and a digest of the frozen SD
        weight files, so a
        file coded with other weights, other levels or another base model is refused instead of decoded
        into garbage.
        """
        if self._fingerprint is None:
            digest = hashlib.sha256()
            digest.update(json.dumps(options_to_dict(self.config), sort_keys=True).encode())
            for name, tensor in sorted(self.trainable_state().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            for counts in self.index_counts:  # the entropy coder's priors: files depend on them too
                digest.update(counts.to("cpu", torch.int64).contiguous().numpy().tobytes())
            digest.update(zoo_digest(self.zoo_path).encode())
            self._fingerprint = int.from_bytes(digest.digest()[:8], "big")
        return self._fingerprint

    def invalidate_fingerprint(self) -> None:
        """Call after changing weights (training) so the next file gets the new identity."""
        if self._fingerprint_frozen:
            raise RuntimeError(
                "the fingerprint is frozen (the model was converted for inference): change weights or index priors "
                "on the fp32 model, then convert it"
            )
        self._fingerprint = None

    def freeze_fingerprint(self) -> int:
        """Compute the fingerprint now and keep it through later conversions (LoRA merge, casts).

        A model converted for fast inference must read and write the same files as the fp32 model it came
        from, although its tensors (and so their hash) differ; any later change of identity raises instead.
        """
        value = self.fingerprint()
        self._fingerprint_frozen = True
        return value

    # ------------------------------------------------------------------------------------ export format

    def save_pretrained(self, out_dir: str | os.PathLike[str], zoo_path: str | None = None) -> Path:
        """Write the exported model (see :mod:`models.oscar.export`), loadable by :meth:`from_pretrained`."""
        return save_export(self, out_dir, zoo_path)

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | os.PathLike[str],
        zoo_path: str | os.PathLike[str] | None = None,
        device: torch.device | str = "cpu",
        overrides: dict[str, Any] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> "OSCARModel":
        """Load an export (version 1 or 2) on the SD zoo it names (or ``zoo_path``); ``overrides`` change options."""
        model = load_export(cls, model_dir, zoo_path, overrides)
        return model.to(device=device, dtype=dtype).eval()

    def to(self, *args: Any, **kwargs: Any) -> "OSCARModel":  # type: ignore[override]
        """Move the model; trained hyper-encoders stay in fp32 (their VQ is computed in fp32 anyway)."""
        super().to(*args, **kwargs)
        self.hyper_encoders.float()
        return self

    # ------------------------------------------------------------------- random-weight presets (benchmark)

    presets = ("tiny", "sd21")

    @classmethod
    def random_preset(cls, preset: str, seed: int = 0) -> "OSCARModel":
        """OSCAR on a preset architecture with seeded random weights, fp32 on the CPU (no zoo is read).

        ``tiny``: the test architecture with small hyper-encoders (:data:`RANDOM_TINY_OPTIONS`), its VAE tiled like
        SD-2.1's; ``sd21``: the real SD-2.1 UNet and VAE with the release's model options. LoRA B matrices are drawn
        with std :data:`RANDOM_LORA_B_STD` (peft starts them at zero) so that merging has something to merge.
        """
        from models.blocks.model_zoo import build_sd_components

        if preset not in cls.presets:
            raise ValueError(f"preset {preset!r}: expected one of {', '.join(cls.presets)}")
        options = RANDOM_TINY_OPTIONS if preset == "tiny" else ModelOptions()
        torch.manual_seed(seed)
        model = cls(build_sd_components(preset, seed=seed), options).eval()
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.unet.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * RANDOM_LORA_B_STD)
        if preset == "tiny":
            use_sd21_tiles(model.vae)
        return model.requires_grad_(False)


def _same_counts(priors: list[IndexPrior], counts: list[torch.Tensor]) -> bool:
    return len(priors) == len(counts) and all(
        tuple(c.shape) == (p.codebook_size,) and bool((c.detach().cpu() == p.to_tensor()).all())
        for p, c in zip(priors, counts)
    )


# ------------------------------------------------------------------- random-weight presets (OSCARModel.random_preset)

# The tiny preset's options (also make_model_zoo.py --preset tiny --export-model): small hyper-encoders, rank-4 LoRA.
RANDOM_TINY_OPTIONS = ModelOptions(
    hyper_encoder=HyperEncoderOptions(channels=32, hyper_dim=64, codebook_dim=16), lora_rank=4, lora_alpha=2.0
)
RANDOM_LORA_B_STD = 0.01


def use_sd21_tiles(vae: nn.Module) -> None:
    """Tile a (tiny) VAE like SD-2.1's (768-pixel tiles) instead of by its own ``config.sample_size``.

    diffusers sizes tiles by ``config.sample_size``; the tiny zoo's 64 would cut a 2048x1365 image into 1,247
    tiles and time diffusers' Python loop rather than anything SD-2.1 does (12 tiles).
    """
    from models.blocks.model_zoo import SD21_VAE

    tile = SD21_VAE["sample_size"]
    vae.tile_sample_min_size = tile
    vae.tile_latent_min_size = tile // 2 ** (len(vae.config.block_out_channels) - 1)
