"""Convert the OSCAR authors' released checkpoint (``oscar.pkl``) into this project's export folder.

    python scripts/convert_release.py model_zoo/oscar.pkl --out runs/oscar_release --images datasets/DIV2K_train_HR -r
    python scripts/convert_release.py model_zoo/oscar.pkl --out runs/oscar_release            # uniform priors

The checkpoint is read safely (``torch.load(..., weights_only=True)``, every key and shape checked: see
:mod:`models.oscar.release`), loaded into an :class:`OSCARModel` on the SD-2.1 zoo, and written with
``save_pretrained`` (safetensors + JSON, no pickles), so that ``compress.py``, ``decompress.py`` and ``test.py``
use the released model directly. The entropy coder's index priors are measured on the images given with
``--images`` (codebook usage per level, :func:`models.oscar.priors.measure_index_counts`); without images they
are uniform, which the output says (files are then coded at fixed length, never larger than the nominal rate;
``scripts/index_priors.py`` can measure priors later).

Model options come from the checkpoint's shapes (hyper-encoder widths, LoRA rank); the rest are the release's:
its eight levels and pseudo timesteps and peft's default ``lora_alpha`` of 8 (``--lora-alpha`` for other
checkpoints). The release was trained with the reference's *oracle* latent norms (the original latent's
per-channel norms, not transmitted). ``--latent-norms transmit`` (default) sends them quantized in each file
(24 bits, counted in the rate); ``oracle`` reproduces the reference's decoding for test.py only (results are
labelled as leaking side information; compress.py refuses such a model); ``none`` uses no norms.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import torch

from models.blocks.codec_method import ModelLoadError
from models.blocks.model_zoo import DEFAULT_ZOO, check_zoo, load_sd_components
from models.oscar.options import HyperEncoderOptions, ModelOptions
from models.oscar.priors import measure_index_counts, prior_bits_per_token
from models.oscar.release import copy_release_into, read_release_checkpoint
from models.oscar.model import OSCARModel
from utils.device import resolve_device
from utils.errors import UserError, exit_on_user_error
from utils.image_io import list_images, readable_images

RELEASE_LORA_ALPHA = 8.0  # peft's default lora_alpha, which the reference code never changes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", metavar="OSCAR_PKL", help="the authors' released checkpoint (oscar.pkl)")
    parser.add_argument("--out", required=True, metavar="DIR", help="export folder to write")
    parser.add_argument("--zoo", default=DEFAULT_ZOO, metavar="PATH", help=f"SD-2.1 model zoo (default: {DEFAULT_ZOO})")
    parser.add_argument("--images", nargs="+", metavar="PATH", help="images (files or folders) to measure priors on")
    parser.add_argument("-r", "--recursive", action="store_true", help="also use images in subfolders of --images")
    parser.add_argument("--max-images", type=int, metavar="N", help="measure priors on at most N images")
    parser.add_argument(
        "--latent-norms", default="transmit", choices=("transmit", "none", "oracle"),
        help="latent norms at decoding (default transmit: quantized, counted in each file)",
    )  # fmt: skip
    parser.add_argument("--lora-alpha", type=float, default=RELEASE_LORA_ALPHA, help="LoRA alpha (release: 8)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export at --out")
    return parser.parse_args(argv)


def release_model_options(ckpt: dict, lora_alpha: float, latent_norms: str) -> ModelOptions:
    """The release's model options, with the widths and rank read from the checkpoint's shapes."""
    he = ckpt["hyper_encoders"]
    try:
        channels = int(he["0.backbone.0.weight"].shape[0])
        hyper_dim = int(he["0.backbone.13.weight"].shape[0])
        codebook_dim = int(he["0.quantizer._codebook.embed"].shape[-1])
    except (KeyError, AttributeError, IndexError) as err:
        raise ModelLoadError(f"hyper_encoders do not have the release layout (no {err})") from None
    defaults = HyperEncoderOptions()
    return ModelOptions(
        hyper_encoder=HyperEncoderOptions(
            channels=channels, hyper_dim=hyper_dim, codebook_dim=codebook_dim,
            ema_decay=defaults.ema_decay, commitment_weight=defaults.commitment_weight,
        ),
        lora_rank=int(ckpt["rank_unet"]),
        lora_alpha=lora_alpha,
        latent_norms=latent_norms,
    )  # fmt: skip


def prior_images(
    paths: list[str], recursive: bool, max_images: int | None, skipped: list[str]
) -> tuple[int, Iterator[torch.Tensor]]:
    """The number of image files and a generator of the decodable ones (unreadable files are named and counted)."""
    files = list_images(paths, recursive=recursive)[:max_images]
    if not files:
        raise UserError(f"no images found in {' '.join(paths)}")

    return len(files), readable_images(files, skipped)


def convert(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
    if args.max_images is not None and args.max_images < 1:
        raise UserError(f"--max-images {args.max_images}: expected at least 1")
    check_zoo(args.zoo)
    ckpt = read_release_checkpoint(args.checkpoint)
    options = release_model_options(ckpt, args.lora_alpha, args.latent_norms)
    device = resolve_device(args.device)
    model = OSCARModel(load_sd_components(args.zoo), options)
    copy_release_into(model, ckpt, str(args.checkpoint))
    del ckpt
    model.to(device).eval()

    if args.images:
        skipped: list[str] = []
        total, images = prior_images(args.images, args.recursive, args.max_images, skipped)
        model.index_counts = measure_index_counts(model, images, total=total, progress=True)
        used = total - len(skipped)
        priors = f"measured on {used} image{'s' if used != 1 else ''} from {' '.join(args.images)}"
        if skipped:
            priors += f" ({len(skipped)} unreadable skipped)"
    else:
        priors = (
            "UNIFORM (no --images given): indices are coded at fixed length; "
            "measure priors later with scripts/index_priors.py"
        )
    model.to("cpu")
    path = model.save_pretrained(out, zoo_path=str(args.zoo))

    print(f"converted {args.checkpoint} -> {path}")
    print(f"  levels: {', '.join(f'{p.label_bpp:g}' for p in model.rate_points)} bpp; timesteps {options.timesteps}")
    he = options.hyper_encoder
    print(
        f"  hyper-encoders: N={he.channels}, M={he.hyper_dim}, codes {he.codebook_dim}-d; "
        f"LoRA rank {options.lora_rank}, alpha {options.lora_alpha:g}"
    )
    print(f"  index priors: {priors}")
    if args.images:
        bits = ", ".join(f"{prior_bits_per_token(c):.2f}" for c in model.index_counts)
        print(f"  prior entropy per level (bits/token): {bits}")
    notes = {
        "transmit": "latent norms: transmitted (24 bits per file, counted in the rate); the release was trained with "
        "the reference's oracle norms, so decoding differs slightly from the reference's",
        "none": "latent norms: none (the hyper-decoded latent as it is; the release was trained with oracle norms)",
        "oracle": "latent norms: ORACLE (the reference's leak: the decoder gets the original latent's norms). "
        "test.py labels results as leaking side information; compress.py and decompress.py refuse this model",
    }
    print(f"  {notes[args.latent_norms]}")
    print(f"  fingerprint: {model.fingerprint():016x}")
    print("next:")
    print(f"  python compress.py --model {path} IMAGES -o coded/ --bpp 0.05")
    print(f"  python test.py --opt options/test.json --set model_dir={path} --set 'datasets=[\"datasets/kodak\"]'")
    return path


@exit_on_user_error
def main(argv: list[str] | None = None) -> Path:
    return convert(parse_args(argv))


if __name__ == "__main__":
    main()
