"""Fit each level's pseudo timestep from data, after stage 1, and write it into a stage-2 option file.

    python scripts/fit_timesteps.py --opt options/oscar/train_diff.json --images datasets/kodak \\
        --out-opt runs/fit/train_diff.json [--method cosine|snr] [--max-images 24]

It encodes every image with the VAE, passes the latent through each level's stage-1 hyper-encoder
(``hyper_encoder_checkpoints`` of the option file), measures how far the hyper-decoded latent is from the
original, and maps that to a timestep under the zoo's noise schedule (formulas: utils/timestep_fit.py and the
README). The resolved options with ``model.timesteps`` replaced go to ``--out-opt``; the measurements go to a
JSON report beside it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from models.oscar.hyper_encoder import HyperEncoder
from models.oscar.rate_table import rate_point
from utils.data import ValidationImages
from utils.device import resolve_device
from utils.errors import UserError, exit_on_user_error
from models.blocks.model_zoo import load_sd_components
from models.oscar.options import Stage2Options
from utils.options import add_option_arguments, options_from_args, save_options
from models.oscar.timestep_fit import METHODS, measure_levels


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_option_arguments(parser, default_opt="options/oscar/train_diff.json")
    parser.add_argument("--images", required=True, help="folder of images to measure on")
    parser.add_argument("--max-images", type=int, default=24)
    parser.add_argument("--method", choices=METHODS, default="cosine")
    parser.add_argument("--out-opt", required=True, help="option file to write, with the fitted timesteps")
    return parser.parse_args(argv)


def load_hyper_encoders(options: Stage2Options) -> list[HyperEncoder]:
    encoders = []
    for level, (bpp, folder) in enumerate(zip(options.model.levels, options.hyper_encoder_checkpoints)):
        if not (Path(folder) / "config.json").is_file():
            raise UserError(f"hyper_encoder_checkpoints[{level}]: {folder} is not a stage-1 checkpoint (no config.json)")
        encoder = HyperEncoder.from_pretrained(folder).eval()
        point = rate_point(bpp)
        if (encoder.config.codebook_size, encoder.config.downsamplings) != (point.codebook_size, point.downsamplings):
            raise UserError(
                f"hyper_encoder_checkpoints[{level}]: {folder} codes {encoder.config.codebook_size} codes with "
                f"{encoder.config.downsamplings} downsamplings, but level {level} is bpp {bpp} "
                f"({point.codebook_size} codes, {point.downsamplings} downsamplings)"
            )
        encoders.append(encoder)
    return encoders


@exit_on_user_error
def main(argv: list[str] | None = None) -> list:
    args = parse_args(argv)
    options = options_from_args(Stage2Options, args)
    device = resolve_device(options.runtime.device)
    images = ValidationImages(args.images, max_images=args.max_images)
    encoders = [e.to(device) for e in load_hyper_encoders(options)]
    sd = load_sd_components(options.model_zoo.path, device=device, with_unet=False)

    def image_to_latent(x: torch.Tensor) -> torch.Tensor:
        return sd.vae.encode(x.to(device)).latent_dist.mean * sd.vae.config.scaling_factor

    points = [rate_point(b) for b in options.model.levels]
    stream = tqdm((item.image[None] for item in images), total=len(images), desc="measuring", unit="img")
    fits = measure_levels(image_to_latent, encoders, points, stream, sd.scheduler.alphas_cumprod)
    options.model.timesteps = [fit.timestep(args.method) for fit in fits]
    out = save_options(options, args.out_opt)
    report = {"method": args.method, "images": args.images, "levels": [f.to_dict() for f in fits]}
    report_path = out.with_name(out.stem + "_timesteps.json")
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'level':>5} {'bpp':>7} {'cosine':>7} {'SNR':>8} {'MSE':>8} {'t(cos)':>6} {'t(snr)':>6}")
    for f in fits:
        print(f"{f.level:>5} {f.bpp:>7.4f} {f.cosine:>7.4f} {f.snr:>8.3f} {f.mse:>8.4f} {f.timestep_cosine:>6} {f.timestep_snr:>6}")
    print(f"timesteps ({args.method}): {options.model.timesteps}\nwrote {out} and {report_path}")
    return fits


if __name__ == "__main__":
    main()
