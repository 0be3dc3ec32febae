"""The interface every codec method implements, and what all methods share on top of it.

A method (OSCAR, StableCodec, SODEC, ...) is an ``nn.Module`` that codes one image at one of its rate levels to
the bytes of a file and back. Everything around a model (the file CLIs, evaluation, the benchmark, the bitstream
report) talks to it through this class only, so adding a method means adding its folder under ``models/`` and
registering it in ``models/registry.py``.

A method provides:

* ``method_name`` / ``method_id`` (the container's method field) / ``export_version`` / ``file_suffix``;
* its levels (:class:`LevelInfo`: a label and the rate it is named after) and the nominal or expected rate of
  a level for an image size (:meth:`nominal_bpp`);
* the coding path as named stages (:meth:`encode_stages`, :meth:`decode_stages`): ``compress`` and
  ``decompress`` are their composition, and the benchmark times the very same stages one by one;
* ``save_pretrained`` / ``from_pretrained`` of an export whose ``codec_config.json`` records the method name and
  export version (:func:`write_export_config`, :func:`read_export_config`);
* the model identity written into every file (:meth:`fingerprint`, frozen by :meth:`freeze_fingerprint` before
  a conversion), and the conversion to the fast inference path (:meth:`prepare_for_inference`).

Shared here: argument checks, rate control (level for a target bpp, the largest level whose file fits a byte
budget) and the export config's format checks.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from models.blocks.container import size_limits_problem
from utils.errors import UserError
from utils.image_io import DEFAULT_MAX_DECODE_PIXELS
from utils.options import parse_json

CONFIG_FILE = "codec_config.json"


class CodecError(UserError, ValueError):
    """The request cannot be served: an image outside the format's limits, an unknown level, an unreachable rate."""


class DecodeLimitError(CodecError):
    """A file declares more pixels than the decoder is allowed to produce (:attr:`CodecMethod.max_decode_pixels`)."""


class ModelLoadError(UserError):
    """An exported model folder or a checkpoint that cannot be loaded (missing, truncated, wrong layout)."""


@dataclass(frozen=True)
class LevelInfo:
    """One rate level of a model: ``label`` for tables and plots, ``bpp_label`` the rate it is named after."""

    label: str
    bpp_label: float


@dataclass(frozen=True)
class Stage:
    """One named step of the coding path; ``run`` maps the previous stage's output to this stage's output.

    ``side`` is ``"encode"`` or ``"decode"``; ``entropy`` marks entropy coding (no FLOPs to count).
    """

    name: str
    label: str
    side: str
    run: Callable[[Any], Any]
    entropy: bool = False


def run_stages(stages: Sequence[Stage], value: Any) -> Any:
    for stage in stages:
        value = stage.run(value)
    return value


class CodecMethod(ABC):
    """Mixin of a codec method's ``nn.Module``; see the module docstring for what a method provides."""

    method_name: ClassVar[str]
    method_id: ClassVar[int]
    export_version: ClassVar[int]
    file_suffix: ClassVar[str]

    # Decoding refuses files that declare more pixels than this (None: only the format's own limit). Callers that
    # decode untrusted files keep the default or set it with :meth:`set_decode_limit`, which also names the
    # setting to quote in the error (a command-line flag, an option key).
    max_decode_pixels: int | None = DEFAULT_MAX_DECODE_PIXELS
    decode_limit_setting: str = "max_decode_pixels"

    # ----------------------------------------------------------------------------------------- levels

    @property
    @abstractmethod
    def levels(self) -> list[LevelInfo]:
        """The model's rate levels, lowest rate first."""

    @abstractmethod
    def nominal_bpp(self, level: int, height: int, width: int) -> float:
        """The rate a level is designed for at this image size (symbols only, no header)."""

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    def check_level(self, level: int) -> None:
        if not 0 <= level < self.num_levels:
            raise CodecError(f"level {level}: this model has levels 0..{self.num_levels - 1}")

    # ----------------------------------------------------------------------------------------- coding

    @abstractmethod
    def encode_stages(self, level: int) -> list[Stage]:
        """Stages from an image ``(1, 3, H, W)`` in [-1, 1] on the model's device to the file's bytes."""

    @abstractmethod
    def decode_stages(self) -> list[Stage]:
        """Stages from a file's bytes to the image ``(1, 3, H, W)`` in [-1, 1] (float32, on the model's device)."""

    def check_file_mode(self) -> None:
        """Raise :class:`CodecError` when the model is configured for a comparison mode that files cannot serve."""

    def compress(self, image: torch.Tensor, level: int) -> bytes:
        """One image ``(1, 3, H, W)`` in [-1, 1] to the bytes of a file at ``level``."""
        self.check_file_mode()
        self.check_level(level)
        if image.dim() != 4 or image.shape[0] != 1 or image.shape[1] != 3:
            raise CodecError(f"expected one RGB image of shape (1, 3, H, W), got {tuple(image.shape)}")
        check_image_size(int(image.shape[-2]), int(image.shape[-1]))
        with torch.no_grad():
            return run_stages(self.encode_stages(level), image)

    def decompress(self, data: bytes) -> torch.Tensor:
        """A file's bytes to the image; a file not valid for this model raises a ``BitstreamError`` subclass.

        The size the header declares is checked against :attr:`max_decode_pixels` before any decode stage runs
        (:class:`DecodeLimitError`).
        """
        self.check_file_mode()
        data = bytes(data)
        self.check_decode_size(data)
        with torch.no_grad():
            return run_stages(self.decode_stages(), data)

    def set_decode_limit(self, max_pixels: int | None, setting: str | None = None) -> None:
        """Allow files of up to ``max_pixels`` pixels (None: any size the format allows); errors name ``setting``."""
        if max_pixels is not None and max_pixels < 1:
            raise CodecError(f"decode limit {max_pixels} pixels: expected a positive number of pixels")
        self.max_decode_pixels = max_pixels
        if setting is not None:
            self.decode_limit_setting = setting

    def check_decode_size(self, data: bytes) -> None:
        """Raise :class:`DecodeLimitError` when the file's header declares more than :attr:`max_decode_pixels` pixels.

        Only the header is read (:meth:`level_header`), so a file that is not valid for this method raises its
        ``BitstreamError`` here, and nothing is allocated or computed for the declared size.
        """
        limit = self.max_decode_pixels
        if limit is None:
            return
        _, width, height = self.level_header(data)
        if width * height > limit:
            raise DecodeLimitError(
                f"the file declares a {width}x{height} image ({width * height:,} pixels), above the decode limit of "
                f"{limit:,} pixels; if you trust the file, raise the limit with {self.decode_limit_setting}"
            )

    def roundtrip(self, image: torch.Tensor, level: int, write: Callable[[bytes], bytes]) -> torch.Tensor:
        """Compress, hand the bytes to ``write`` (which stores them and returns what was read back), decompress.

        Evaluation goes through this so that a comparison mode which needs the original at the decoder (and so
        cannot go through files alone) can override it; :attr:`side_information_leak` then says what leaks.
        """
        return self.decompress(write(self.compress(image, level)))

    @property
    def side_information_leak(self) -> str | None:
        """A label when decoding uses encoder-side information that no file carries (results must say so)."""
        return None

    @abstractmethod
    def level_header(self, data: bytes) -> tuple[int, int, int]:
        """(level, width, height) stored in a file of this method, read without decoding it."""

    # ----------------------------------------------------------------------------------------- identity

    @abstractmethod
    def fingerprint(self) -> int:
        """Non-negative integer identity of everything the decoder computes with; files carry a tag of it."""

    @abstractmethod
    def freeze_fingerprint(self) -> int:
        """Compute the identity now and keep it through later conversions (casts, merged adapters)."""

    @abstractmethod
    def prepare_for_inference(self, precision: str | None = "fp32", *, fast_encoder: bool = True, **kwargs: Any) -> CodecMethod:
        """Convert in place for fast coding at ``precision`` (None: the device's default); files keep their identity.

        ``fast_encoder=False`` leaves the encoder side exact, so that the bytes equal the fp32 reference path's.
        """

    # ----------------------------------------------------------------------------------------- export

    @abstractmethod
    def save_pretrained(self, out_dir: str | os.PathLike[str], **kwargs: Any) -> Path:
        """Write the export folder (``codec_config.json`` + safetensors)."""

    @classmethod
    @abstractmethod
    def from_pretrained(
        cls,
        model_dir: str | os.PathLike[str],
        zoo_path: str | os.PathLike[str] | None = None,
        device: torch.device | str = "cpu",
        overrides: dict[str, Any] | None = None,
    ) -> CodecMethod:
        """Load an export written by :meth:`save_pretrained` (any export version up to ``export_version``)."""

    # ----------------------------------------------------------------------------------------- random presets

    presets: ClassVar[tuple[str, ...]] = ()  # the architectures random_preset builds, e.g. ("tiny", "sd21")

    @classmethod
    def random_preset(cls, preset: str, seed: int = 0) -> CodecMethod:
        """The method on a preset architecture (one of :attr:`presets`) with seeded random weights, fp32 on the CPU.

        Built in memory (no export, no model zoo) for the benchmark: latency, memory and FLOPs do not depend on
        the weights' values. Every trainable part must be non-trivial (e.g. LoRA B matrices drawn at random, not
        peft's zeros), so that what the fast inference path merges or skips is really there.
        """
        raise NotImplementedError(f"method {cls.method_name!r} has no random-weight presets")

    # ----------------------------------------------------------------------------------------- rate control

    def levels_by_rate(self, height: int, width: int) -> list[int]:
        """Levels from the highest nominal rate for this size down to the lowest (ties: higher index first)."""
        return sorted(range(self.num_levels), key=lambda lv: (self.nominal_bpp(lv, height, width), lv), reverse=True)

    def level_for_bpp(self, height: int, width: int, bpp: float) -> int:
        """The level with the highest nominal rate not above ``bpp`` for this size."""
        if not bpp > 0:
            raise CodecError(f"target rate {bpp} bpp: expected a positive bit rate")
        order = self.levels_by_rate(height, width)
        for level in order:
            if self.nominal_bpp(level, height, width) <= bpp:
                return level
        lowest = order[-1]
        raise CodecError(
            f"no level reaches {bpp:g} bpp for a {width}x{height} image: the lowest is level {lowest} at "
            f"{self.nominal_bpp(lowest, height, width):.4g} bpp"
        )

    def file_size_bounds(self, level: int, height: int, width: int) -> tuple[int, int] | None:
        """(smallest, largest) file size in bytes known before encoding, or None when the method cannot tell."""
        return None

    def compress_to_max_bytes(self, image: torch.Tensor, max_bytes: int) -> tuple[int, bytes]:
        """The highest-rate level whose actual file fits in ``max_bytes``, and that file.

        Levels are tried from the highest nominal rate down; each is encoded for real unless
        :meth:`file_size_bounds` shows it cannot fit.
        """
        if max_bytes < 1:
            raise CodecError(f"file size limit {max_bytes} bytes: expected a positive number of bytes")
        height, width = int(image.shape[-2]), int(image.shape[-1])
        check_image_size(height, width)
        smallest_seen: tuple[int, int] | None = None
        for level in self.levels_by_rate(height, width):
            bounds = self.file_size_bounds(level, height, width)
            size, data = (bounds[0] if bounds else 0), None
            if size <= max_bytes:
                data = self.compress(image, level)
                size = len(data)
                if size <= max_bytes:
                    return level, data
            if smallest_seen is None or size < smallest_seen[1]:
                smallest_seen = (level, size)
        assert smallest_seen is not None
        raise CodecError(
            f"no level fits {max_bytes} bytes for a {width}x{height} image: the smallest file is "
            f"{'at least ' if smallest_seen[1] > max_bytes else ''}{smallest_seen[1]} bytes (level {smallest_seen[0]})"
        )


def check_image_size(height: int, width: int) -> None:
    problem = size_limits_problem(width, height)
    if problem:
        raise CodecError(problem)


# --------------------------------------------------------------------------------------------- export config


def write_export_config(directory: Path, method: str, version: int, fields: dict[str, Any]) -> None:
    """``codec_config.json``: the method name and export version first, then the method's own fields."""
    config = {"method": method, "version": version, **fields}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def read_export_config(model_dir: str | os.PathLike[str], legacy: dict[str, tuple[str, str, int]] | None = None) -> dict[str, Any]:
    """The parsed ``codec_config.json`` of an export, with at least ``method`` and ``version``.

    ``legacy`` maps older config file names to (format string, method, version) for exports written before
    this file existed (e.g. OSCAR's ``oscar_config.json``); their config is returned with method and version set.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"{model_dir}: exported model folder not found")
    path = model_dir / CONFIG_FILE
    legacy_entry = None
    if not path.is_file():
        for name, entry in (legacy or {}).items():
            if (model_dir / name).is_file():
                path, legacy_entry = model_dir / name, entry
                break
        else:
            raise ModelLoadError(
                f"{model_dir}: not an exported model ({CONFIG_FILE} not found); export one with a training script "
                f"or `python scripts/make_model_zoo.py --preset tiny --out ZOO --export-model DIR`"
            )
    try:
        config = parse_json(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{path}: invalid JSON ({err})") from None
    except ValueError as err:  # nested too deeply, or an integer too long to read
        raise ModelLoadError(f"{path}: {err}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    if legacy_entry is not None:
        format_name, method, version = legacy_entry
        if config.get("format") != format_name:
            raise ModelLoadError(f"{path}: format {config.get('format')!r}, expected {format_name!r}")
        if config.get("version") != version:
            raise ModelLoadError(f"{path}: version {config.get('version')!r}, expected {version}")
        config = {**config, "method": method}
    for key in ("method", "version"):
        if key not in config:
            raise ModelLoadError(f"{path}: key {key!r} missing")
    if not isinstance(config["method"], str) or not isinstance(config["version"], int):
        raise ModelLoadError(f"{path}: 'method' must be a string and 'version' an integer")
    config["config_path"] = str(path)
    return config


def check_export_version(config: dict[str, Any], method: str, newest: int) -> None:
    """Refuse an export of another method, or of a newer export version than this code reads."""
    if config["method"] != method:
        raise ModelLoadError(f"{config['config_path']}: an export of method {config['method']!r}, not {method!r}")
    if not 1 <= config["version"] <= newest:
        raise ModelLoadError(
            f"{config['config_path']}: {method} export version {config['version']}; this code reads versions 1..{newest}"
        )
