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
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from models.oscar.coded_image import CodedImage
from models.blocks.one_step import predict_x0
from models.oscar.hyper_encoder import HyperEncoder
from models.oscar.latent_norms import channel_rms, dequantize_rms, quantize_rms, rescale_to_rms
from models.blocks.lora import add_oscar_lora, trainable_unet_state
from models.oscar.rate_table import RatePoint, rate_point
from models.blocks.state_dicts import state_dict_mismatch
from utils.atomic import atomic_directory
from utils.errors import UserError
from models.blocks.model_zoo import SDComponents, load_sd_components
from models.oscar.options import ModelOptions
from utils.options import build_options, options_to_dict
from models.blocks.padding import crop_to, pad_to_multiple

PROMPT_TOKENS = 77  # SD's text-token count; the learned embedding takes the place of the text encoder
EXPORT_FORMAT = "oscar-export"
EXPORT_VERSION = 1
CONFIG_FILE = "oscar_config.json"
UNET_FILE = "unet_lora.safetensors"
PROMPT_FILE = "prompt_embedding.safetensors"
PRIORS_FILE = "index_priors.safetensors"


class ModelLoadError(UserError):
    """An exported model folder or a checkpoint that cannot be loaded (missing, truncated, wrong layout)."""


@dataclass
class OSCAROutput:
    """Training-path result for a batch at one level."""

    x_hat: torch.Tensor  # reconstructed image in [-1, 1]
    latent: torch.Tensor  # z: VAE latent of the input (no gradient)
    latent_hat: torch.Tensor  # ẑ after rescaling: the UNet's input
    x0_latent: torch.Tensor  # the UNet's one-step clean-latent estimate
    vq_loss: torch.Tensor


class OSCARModel(nn.Module):
    """Frozen SD-2.1 VAE and UNet with OSCAR's trainable parts; see the module docstring for the dataflow."""

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
    def num_levels(self) -> int:
        return len(self.rate_points)

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
        if not 0 <= level < self.num_levels:
            raise ValueError(f"level {level}: expected 0..{self.num_levels - 1} ({self.num_levels} levels)")
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
        return OSCAROutput(x_hat=x_hat, latent=z, latent_hat=z_hat, x0_latent=x0, vq_loss=he_out.vq_loss)

    # -------------------------------------------------------------------------------- encoder / decoder

    @torch.no_grad()
    def encode(self, image: torch.Tensor, level: int) -> CodedImage:
        """Encoder side: an image ``(1, 3, H, W)`` in [-1, 1] to its symbols at ``level``."""
        point = self.check_level(level)
        if image.dim() != 4 or image.shape[0] != 1 or image.shape[1] != 3:
            raise ValueError(f"expected one RGB image of shape (1, 3, H, W), got {tuple(image.shape)}")
        height, width = image.shape[-2:]
        x = pad_to_multiple(image.to(self.device), point.pixel_stride)
        z = self.image_to_latent(x).float()
        indices = self.hyper_encoders[level].encode(z)[0]
        norm_codes = None
        if self.config.latent_norms == "transmit":
            norm_codes = tuple(int(c) for c in quantize_rms(channel_rms(z), self.config.norm_bits)[0])
        return CodedImage(level=level, height=int(height), width=int(width), indices=indices.cpu(), norm_codes=norm_codes)

    @torch.no_grad()
    def decode(self, coded: CodedImage, oracle_rms: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder side: symbols to an image ``(1, 3, H, W)`` in [-1, 1], using only what was transmitted.

        ``oracle_rms`` (the original latent's channel RMS, shape ``(1, C)``) is used only when the model is
        configured with ``latent_norms="oracle"``: the reference's behaviour, which leaks encoder-side
        information that is not counted in the rate, kept so that results can be compared.
        """
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
        latent_hat = self._rescale(latent_hat, target)
        x0 = self.denoise(latent_hat, coded.level)
        return crop_to(self.latent_to_image(x0), coded.height, coded.width).float()

    @torch.no_grad()
    def latent_rms(self, image: torch.Tensor, level: int) -> torch.Tensor:
        """Channel RMS of the padded image's latent (what ``latent_norms="oracle"`` decoding receives)."""
        x = pad_to_multiple(image.to(self.device), self.check_level(level).pixel_stride)
        return channel_rms(self.image_to_latent(x))

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
        """Write the exported model: options + safetensors, loadable by :meth:`from_pretrained`."""
        out = Path(out_dir)
        with atomic_directory(out) as tmp:  # an existing export is replaced only once the new one is complete
            for i, encoder in enumerate(self.hyper_encoders):
                encoder.save_pretrained(tmp / "hyper_encoders" / f"level_{i}", safe_serialization=True)
            unet_state = {k: v.detach().cpu().contiguous() for k, v in trainable_unet_state(self.unet).items()}
            save_file(unet_state, tmp / UNET_FILE)
            save_file({"prompt_embedding": self.prompt_embedding.detach().cpu().contiguous()}, tmp / PROMPT_FILE)
            save_file({f"level_{i}": c.cpu().contiguous() for i, c in enumerate(self.index_counts)}, tmp / PRIORS_FILE)
            config = {
                "format": EXPORT_FORMAT,
                "version": EXPORT_VERSION,
                "model": options_to_dict(self.config),
                "model_zoo": str(zoo_path if zoo_path is not None else self.zoo_path),
                "fingerprint": f"{self.fingerprint():016x}",
            }
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        return out

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | os.PathLike[str],
        zoo_path: str | os.PathLike[str] | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        overrides: dict[str, Any] | None = None,
    ) -> "OSCARModel":
        """Load an exported model on the SD zoo it names (or ``zoo_path``); ``overrides`` change model options."""
        model_dir = Path(model_dir)
        config = read_export_config(model_dir)
        raw_model = dict(config["model"])
        raw_model.update(overrides or {})
        options = build_options(ModelOptions, raw_model, f"{model_dir / CONFIG_FILE}: model")
        zoo = Path(zoo_path) if zoo_path is not None else Path(config["model_zoo"])
        if not zoo.is_absolute() and not zoo.exists() and (model_dir / zoo).exists():
            zoo = model_dir / zoo
        sd = load_sd_components(zoo, device="cpu", dtype=torch.float32)
        model = cls(sd, options)
        try:
            for i, encoder in enumerate(model.hyper_encoders):
                loaded = HyperEncoder.from_pretrained(model_dir / "hyper_encoders" / f"level_{i}")
                encoder.load_state_dict(loaded.state_dict())
            load_unet_trainable(model.unet, load_file(model_dir / UNET_FILE), str(model_dir / UNET_FILE))
            model.prompt_embedding.data.copy_(load_file(model_dir / PROMPT_FILE)["prompt_embedding"])
            if (model_dir / PRIORS_FILE).is_file():
                priors = load_file(model_dir / PRIORS_FILE)
                model.index_counts = [priors[f"level_{i}"].to(torch.int64) for i in range(model.num_levels)]
        except (OSError, KeyError, RuntimeError, ValueError, SafetensorError) as err:
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelLoadError(f"{model_dir}: exported model cannot be loaded ({message})") from None
        # The identity is taken from the stored fp32 weights, before any cast: the same export loaded in another
        # precision reads the same files.
        stored = config.get("fingerprint")
        if stored and model.fingerprint() != int(stored, 16) and not overrides:
            warnings.warn(
                f"{model_dir}: fingerprint {model.fingerprint():016x} differs from the exported {stored} (another "
                f"model zoo than at export?); files written with the exported model will be refused",
                stacklevel=2,
            )
        return model.to(device=device, dtype=dtype).eval()

    def to(self, *args: Any, **kwargs: Any) -> "OSCARModel":  # type: ignore[override]
        """Move the model; trained hyper-encoders stay in fp32 (their VQ is computed in fp32 anyway)."""
        super().to(*args, **kwargs)
        self.hyper_encoders.float()
        return self


def read_export_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"{model_dir}: not an exported OSCAR model ({CONFIG_FILE} not found); export one with train_diff.py "
            f"or `python scripts/make_model_zoo.py --preset tiny --out ZOO --export-model DIR`"
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{path}: invalid JSON ({err})") from None
    if config.get("format") != EXPORT_FORMAT:
        raise ModelLoadError(f"{path}: format {config.get('format')!r}, expected {EXPORT_FORMAT!r}")
    if config.get("version") != EXPORT_VERSION:
        raise ModelLoadError(f"{path}: version {config.get('version')!r}, this code reads version {EXPORT_VERSION}")
    for key in ("model", "model_zoo"):
        if key not in config:
            raise ModelLoadError(f"{path}: key {key!r} missing")
    return config


def load_unet_trainable(unet: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load LoRA + conv_in tensors into a UNet that has OSCAR's adapters; every expected key must be present."""
    problem = state_dict_mismatch(trainable_unet_state(unet), state)
    if problem:
        raise ModelLoadError(f"{source}: UNet weights do not match this model ({problem})")
    unet.load_state_dict(state, strict=False)


def zoo_digest(path: Path) -> str:
    """Cheap identity of the SD weight files: size plus the first and last MiB of each (not a full hash)."""
    digest = hashlib.sha256()
    for sub in ("unet", "vae"):
        for weight_file in sorted((Path(path) / sub).glob("diffusion_pytorch_model*")):
            size = weight_file.stat().st_size
            digest.update(f"{sub}/{weight_file.name}:{size}".encode())
            with open(weight_file, "rb") as f:
                digest.update(f.read(1 << 20))
                if size > 2 << 20:
                    f.seek(-(1 << 20), os.SEEK_END)
                    digest.update(f.read())
    return digest.hexdigest()
