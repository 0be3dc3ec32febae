"""The built-in demo: the whole OSCAR pipeline end to end on a TINY random-weight model, on CPU, in minutes.

    bash scripts/demo.sh            # = set-up (if needed) + python -m scripts.demo (from the repository root)

1. generates training, validation and sample images (nothing is read from outside the repository);
2. writes a tiny Stable-Diffusion-shaped model zoo (no download) whose VAE is fitted briefly on those images as a
   stand-in for SD's trained VAE (a random VAE cannot reconstruct anything); the UNet stays random;
3. stage 1: trains the eight hyper-encoders briefly (train_hyper_enc.py);
4. fits each level's pseudo timestep from the measured latent distortion (scripts/fit_timesteps.py);
5. stage 2: trains the LoRA UNet, prompt and hyper-encoders for all levels briefly (train_diff.py), with L1, latent
   cosine and GAN losses (DISTS and the edge loss need VGG weights that cannot be downloaded here: switched off);
6. exports the model, compresses and decompresses the sample images at every level to real files and evaluates
   PSNR and MS-SSIM (test.py), printing the rate-distortion table and writing plots.

Everything goes to runs/demo/ (replaced on each run). The numbers describe a tiny untrained-scale model and say
nothing about OSCAR's quality; the README says how to run the real SD-2.1 pipeline.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

import test as evaluate_entry
import train_diff
import train_hyper_enc
from models.oscar.rate_table import DEFAULT_LEVEL_BPPS
from scripts import fit_timesteps
from utils.data import ImageFolderDataset, write_synthetic_images
from models.blocks.model_zoo import write_model_zoo

HYPER = {"channels": 32, "hyper_dim": 64, "codebook_dim": 16}


def sets(values: dict) -> list[str]:
    argv = []
    for key, value in values.items():
        argv += ["--set", f"{key}={json.dumps(value)}"]
    return argv


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="output folder (replaced)")
    parser.add_argument("--vae-steps", type=int, default=300, help="steps fitting the tiny VAE (a stand-in for SD's)")
    parser.add_argument("--stage1-steps", type=int, default=150, help="steps per hyper-encoder")
    parser.add_argument("--stage2-steps", type=int, default=300)
    parser.add_argument("--device", default="auto")
    return parser.parse_args(argv)


def banner(text: str) -> None:
    print(f"\n==== {text} ====", flush=True)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    start = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)
    banner("1/6 generated images")
    data = out / "data"
    write_synthetic_images(data / "train", count=32, size=(160, 128), seed=0)
    write_synthetic_images(data / "val", count=4, size=(128, 96), seed=1)
    write_synthetic_images(data / "samples", count=4, size=(256, 192), seed=2)
    banner(f"2/6 tiny model zoo (same classes as SD-2.1; its VAE fitted for {args.vae_steps} steps, the rest random)")
    crops = ImageFolderDataset([str(data / "train")], 64, seed=0)
    zoo = write_model_zoo(
        "tiny", out / "zoo", seed=0, fit_vae_images=torch.stack([crops[i % len(crops)] for i in range(128)]),
        fit_vae_steps=args.vae_steps,
    )
    common = {"model_zoo.path": str(zoo), "runtime.device": args.device}

    banner(f"3/6 stage 1: eight hyper-encoders, {args.stage1_steps} steps each")
    stage1 = []
    for bpp in DEFAULT_LEVEL_BPPS:
        run = train_hyper_enc.main(
            ["--opt", "options/oscar/train_hyper_enc.json"]
            + sets(common | {
                "name": f"hyper_enc_{bpp:.4f}", "output_root": str(out / "stage1"), "bpp": bpp,
                "hyper_encoder": HYPER | {"ema_decay": 0.8, "commitment_weight": 1.0},
                "data": {"train_roots": [str(data / "train")], "val_root": str(data / "val"), "patch_size": 64,
                         "batch_size": 8, "num_workers": 0, "max_val_images": 4},
                "optimizer.learning_rate": 1e-3,
                "train": {"max_steps": args.stage1_steps, "checkpoint_every": args.stage1_steps,
                          "validate_every": args.stage1_steps, "log_every": 25, "log_with": "none"},
            })
        )
        stage1.append(str(run / "final"))

    stage2 = common | {
        "name": "oscar", "output_root": str(out),
        "model.hyper_encoder": HYPER | {"ema_decay": 0.8, "commitment_weight": 1.0},
        "model.lora_rank": 4, "model.lora_alpha": 2.0,
        "hyper_encoder_checkpoints": stage1,
        "data": {"train_roots": [str(data / "train")], "val_root": str(data / "val"), "patch_size": 64,
                 "batch_size": 4, "num_workers": 0, "max_val_images": 2},
        "optimizer.learning_rate": 5e-4,
        "train": {"max_steps": args.stage2_steps, "checkpoint_every": args.stage2_steps,
                  "validate_every": args.stage2_steps, "log_every": 20, "log_with": "none"},
        "loss.dists": 0.0, "loss.edge": 0.0,
    }
    banner("4/6 timesteps fitted from the stage-1 latent distortion")
    fitted = out / "train_diff_fitted.json"
    fits = fit_timesteps.main(
        ["--opt", "options/oscar/train_diff.json", "--images", str(data / "val"), "--out-opt", str(fitted)] + sets(stage2)
    )

    banner(f"5/6 stage 2: one LoRA UNet for all levels, {args.stage2_steps} steps")
    run = train_diff.main(["--opt", str(fitted)])

    banner("6/6 compress -> file -> decompress at every level, metrics, RD plots")
    summary = evaluate_entry.main(
        ["--opt", "options/test.json"]
        + sets({
            "name": "test", "output_root": str(out), "model_dir": str(run / "final"),
            "datasets": [str(data / "samples")], "metrics": ["psnr", "ms_ssim"], "bd_anchor": None,
            "runtime.device": args.device,
        })
    )
    minutes = (time.perf_counter() - start) / 60
    print(
        f"\nDemo finished in {minutes:.1f} min. Fitted timesteps: {[f.timestep_cosine for f in fits]}.\n"
        f"Exported model: {run / 'final'} (use it with compress.py, decompress.py and test.py);\n"
        f"results: {out / 'test'} (per_image.csv, summary.csv, plots_samples/rd_*.png).\n"
        "This was a TINY model (random UNet, briefly fitted VAE) trained for minutes on generated images:\n"
        "its numbers say nothing about OSCAR's quality. For the real pipeline, put Stable Diffusion 2.1 in\n"
        "model_zoo/stable-diffusion-2-1 (see README, 'Model zoo') and run scripts/train_hyper_enc.sh,\n"
        "scripts/fit_timesteps.py, scripts/train.sh and scripts/test.sh with the shipped option files."
    )
    return summary


if __name__ == "__main__":
    main()
