"""OSCAR's export folder: what ``save_pretrained`` writes and ``from_pretrained`` reads.

Layout (export version 2): ``codec_config.json`` (method, version, model options, SD zoo location, fingerprint),
``hyper_encoders/level_<i>/`` (config.json + safetensors each), ``unet_lora.safetensors`` (LoRA + conv_in),
``prompt_embedding.safetensors`` and ``index_priors.safetensors`` (per-level codebook usage: the entropy coder's
prior). Version 1 differs only in its config file (``oscar_config.json`` with ``"format": "oscar-export"``).
Everything is safetensors + JSON; no pickles.

An export is complete or refused. ``codec_config.json`` lists every weight file the writer put beside it
(``"files"``: paths relative to the export folder). Before anything is built, :func:`check_export_files` checks
that each listed file exists and reads as what its name says (a safetensors header that matches the file's size,
a JSON object), and refuses the export with one line per problem, e.g.
``EXPORT: index_priors.safetensors missing (listed in codec_config.json)`` or
``EXPORT: hyper_encoders/level_3 missing (listed in codec_config.json)``. The index priors are loaded when the
list names them; an export whose list does not name them has none, and codes with uniform priors. Exports
written before the list existed are checked against the files that writer always wrote (every level's
hyper-encoder, the LoRA, the prompt embedding and the index priors): a missing one, index priors included, is
refused the same way; they never fall back to uniform priors.

The SD zoo's location is stored twice, so that an export loads from any working directory: ``model_zoo`` as an
absolute path and ``model_zoo_relative`` relative to the export folder (tried first, so a tree copied or moved
with its zoo keeps working). Exports written before ``model_zoo_relative`` existed hold ``model_zoo`` as it was given
at export time, often relative to the folder the exporting command ran in; :func:`resolve_zoo` tries it against
the working directory, the export folder and the export's parent folders, in that order. That search is safe: the
fingerprint covers a digest of the zoo's weights, so a wrong zoo found this way is reported at load, not used
silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from models.blocks.codec_method import (
    CONFIG_FILE, ModelLoadError, check_export_version, read_export_config, write_export_config,
)
from models.blocks.lora import trainable_unet_state
from models.blocks.model_zoo import load_sd_components, missing_zoo_message
from models.blocks.state_dicts import state_dict_mismatch
from models.oscar.hyper_encoder import HyperEncoder
from models.oscar.options import ModelOptions
from utils.atomic import atomic_directory
from utils.options import build_options, options_to_dict

if TYPE_CHECKING:  # the model module imports this one
    from models.oscar.model import OSCARModel

METHOD_NAME = "oscar"
EXPORT_VERSION = 2  # 1: oscar_config.json with "format": "oscar-export"; 2: codec_config.json with "method"
LEGACY_CONFIGS = {"oscar_config.json": ("oscar-export", METHOD_NAME, 1)}
UNET_FILE = "unet_lora.safetensors"
PROMPT_FILE = "prompt_embedding.safetensors"
PRIORS_FILE = "index_priors.safetensors"
ZOO_KEY, ZOO_RELATIVE_KEY = "model_zoo", "model_zoo_relative"
FILES_KEY = "files"  # every weight file of the export, relative to its folder (absent in older exports)
HYPER_ENCODER_FILES = ("config.json", "diffusion_pytorch_model.safetensors")  # what diffusers writes per level


def hyper_encoder_dir(level: int) -> str:
    return f"hyper_encoders/level_{level}"


def required_files(num_levels: int) -> list[str]:
    """The files every OSCAR export holds (the index priors aside): each level's hyper-encoder, LoRA, prompt."""
    levels = [f"{hyper_encoder_dir(i)}/{name}" for i in range(num_levels) for name in HYPER_ENCODER_FILES]
    return [*levels, UNET_FILE, PROMPT_FILE]


def export_file_list(config: dict[str, Any], num_levels: int) -> tuple[list[str], str]:
    """The files an export must hold, and where that requirement comes from (for the messages).

    With a ``"files"`` list, that list (which must name every required file); without one (exports written
    before it existed), what the writer then always wrote: :func:`required_files` plus the index priors.
    """
    listed = config.get(FILES_KEY)
    if listed is None:
        return [*required_files(num_levels), PRIORS_FILE], "every export without a 'files' list has it"
    where = f"{config['config_path']}: {FILES_KEY!r}"
    if not isinstance(listed, list) or not all(isinstance(name, str) for name in listed):
        raise ModelLoadError(f"{where}: expected a list of file paths")
    for name in listed:
        parts = name.split("/")
        if not name or name.startswith("/") or "\\" in name or any(part in ("", ".", "..") for part in parts):
            raise ModelLoadError(f"{where}: {name!r} is not a plain path inside the export folder")
    unlisted = [name for name in required_files(num_levels) if name not in listed]
    if unlisted:
        raise ModelLoadError(f"{where}: does not name {', '.join(unlisted)}, which every OSCAR export holds")
    return list(dict.fromkeys(listed)), f"listed in {CONFIG_FILE}"


def check_export_files(model_dir: Path, config: dict[str, Any], num_levels: int) -> list[str]:
    """Check that every file of the export exists and is readable; return their names.

    Refuses with :class:`ModelLoadError`, one line per problem, each naming the export folder and the file (or
    the missing folder, once, when a whole folder such as ``hyper_encoders/level_3`` is gone).
    """
    names, origin = export_file_list(config, num_levels)
    problems: list[str] = []
    missing_folders: set[str] = set()
    for name in names:
        path = model_dir / name
        if not path.is_file():
            folder = next(
                (p for p in reversed(Path(name).parents) if p != Path(".") and not (model_dir / p).is_dir()), None
            )
            if folder is None:
                problems.append(f"{model_dir}: {name} missing ({origin})")
            elif folder.as_posix() not in missing_folders:
                missing_folders.add(folder.as_posix())
                problems.append(f"{model_dir}: {folder.as_posix()} missing ({origin})")
            continue
        problem = _unreadable(path)
        if problem:
            problems.append(f"{model_dir}: {name} cannot be loaded: {problem}")
    if problems:
        raise ModelLoadError("\n".join(problems))
    return names


def _unreadable(path: Path) -> str | None:
    """Why ``path`` cannot be read as what its suffix says (a safetensors file, a JSON object), else None."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:  # parses the header and checks it against the size
                f.keys()
        elif path.suffix == ".json" and not isinstance(json.loads(path.read_text(encoding="utf-8")), dict):
            return "expected a JSON object"
    except (OSError, UnicodeDecodeError) as err:
        return f"cannot be read ({_first_line(err)})"
    except json.JSONDecodeError as err:
        return f"invalid JSON ({err})"
    except (SafetensorError, ValueError, RuntimeError) as err:
        return f"not a valid safetensors file ({_first_line(err)})"
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def zoo_fields(zoo: str | os.PathLike[str], export_dir: str | os.PathLike[str]) -> dict[str, str]:
    """The zoo's location as stored in an export: absolute, and relative to the export folder (when there is one)."""
    absolute = Path(zoo).resolve()
    fields = {ZOO_KEY: str(absolute)}
    try:
        fields[ZOO_RELATIVE_KEY] = Path(os.path.relpath(absolute, Path(export_dir).resolve())).as_posix()
    except ValueError:  # another drive (Windows): no relative path exists
        pass
    return fields


def resolve_zoo(config: dict[str, Any], model_dir: Path, zoo_path: str | os.PathLike[str] | None = None) -> Path:
    """The SD zoo folder of an export: ``zoo_path`` when given, else the first stored location that exists.

    See the module docstring for the order; when none exists, :class:`ModelZooError` names the export and every
    folder tried.
    """
    from utils.errors import ModelZooError

    if zoo_path is not None:
        return Path(zoo_path)
    stored = Path(str(config[ZOO_KEY]))
    candidates: list[Path] = []
    relative = config.get(ZOO_RELATIVE_KEY)
    if isinstance(relative, str) and relative:
        candidates.append(model_dir / relative)
    if stored.is_absolute():
        candidates.append(stored)
    else:  # an older export: relative to wherever its export command ran
        candidates += [stored, model_dir / stored]
        candidates += [parent / stored for parent in model_dir.resolve().parents]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    tried = list(dict.fromkeys(str(c) for c in candidates[:4]))
    raise ModelZooError(
        f"{config['config_path']}: {missing_zoo_message(Path(tried[0]), 'folder not found')}"
        f" (tried {', '.join(tried)}{', ...' if len(candidates) > 4 else ''}; --zoo PATH or test.py's model_zoo "
        f"option point at it)"
    )


def save_export(model: OSCARModel, out_dir: str | os.PathLike[str], zoo_path: str | None = None) -> Path:
    """Write ``model``'s export; an existing export is replaced only once the new one is complete."""
    out = Path(out_dir)
    with atomic_directory(out) as tmp:
        for i, encoder in enumerate(model.hyper_encoders):
            encoder.save_pretrained(tmp / "hyper_encoders" / f"level_{i}", safe_serialization=True)
        unet_state = {k: v.detach().cpu().contiguous() for k, v in trainable_unet_state(model.unet).items()}
        save_file(unet_state, tmp / UNET_FILE)
        save_file({"prompt_embedding": model.prompt_embedding.detach().cpu().contiguous()}, tmp / PROMPT_FILE)
        save_file({f"level_{i}": c.cpu().contiguous() for i, c in enumerate(model.index_counts)}, tmp / PRIORS_FILE)
        written = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        fields = {
            "model": options_to_dict(model.config),
            **zoo_fields(zoo_path if zoo_path is not None else model.zoo_path, out),
            "fingerprint": f"{model.fingerprint():016x}",
            FILES_KEY: written,
        }
        write_export_config(tmp, METHOD_NAME, EXPORT_VERSION, fields)
    return out


def load_export(
    cls: type[OSCARModel],
    model_dir: str | os.PathLike[str],
    zoo_path: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> OSCARModel:
    """An fp32 ``cls`` on the CPU with the export's weights (the caller moves it)."""
    model_dir = Path(model_dir)
    config = read_export_config(model_dir, LEGACY_CONFIGS)
    check_export_version(config, METHOD_NAME, EXPORT_VERSION)
    for key in ("model", "model_zoo"):
        if key not in config:
            raise ModelLoadError(f"{config['config_path']}: key {key!r} missing")
    raw_model = dict(config["model"])
    raw_model.update(overrides or {})
    options = build_options(ModelOptions, raw_model, f"{config['config_path']}: model")
    files = check_export_files(model_dir, config, len(options.levels))
    sd = load_sd_components(resolve_zoo(config, model_dir, zoo_path), device="cpu", dtype=torch.float32)
    model = cls(sd, options)
    try:
        for i, encoder in enumerate(model.hyper_encoders):
            loaded = HyperEncoder.from_pretrained(model_dir / hyper_encoder_dir(i))
            encoder.load_state_dict(loaded.state_dict())
        load_unet_trainable(model.unet, load_file(model_dir / UNET_FILE), str(model_dir / UNET_FILE))
        model.prompt_embedding.data.copy_(load_file(model_dir / PROMPT_FILE)["prompt_embedding"])
        if PRIORS_FILE in files:  # an export that lists none has none: uniform priors
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
            f"{model_dir}: fingerprint {model.fingerprint():016x} differs from the exported {stored}: the model "
            f"loaded is not the one exported (the fingerprint covers the SD zoo's weight files, the export's weights "
            f"and index priors, and the model options; one of them changed); files written with the exported model "
            f"will be refused",
            stacklevel=3,
        )
    return model


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
