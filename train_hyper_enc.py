"""Stage 1 of OSCAR: train the hyper-encoder of one bit-rate on the frozen SD-2.1 VAE.

    python train_hyper_enc.py --opt options/oscar/train_hyper_enc.json --set bpp=0.0019 --set name=hyper_enc_0.0019
    python train_hyper_enc.py --opt ... --resume latest            # continue an interrupted run
    accelerate launch --multi_gpu --num_processes 4 train_hyper_enc.py --opt ...
    bash scripts/train_hyper_enc.sh                                # all eight levels, one run each

Recipe (the reference's): z = VAE latent of a training crop (a posterior sample, or the mean with
``sample_posterior=false``) times the VAE scaling factor; z_hat = hyper-encoder(z); loss = negative cosine similarity
between z and z_hat per latent position over channels (after L2 normalisation) + ``vq_commitment_weight`` x the VQ
commitment loss (0 by default, as in the reference). Validation: mean cosine similarity per whole image (padded to the
token grid). Outputs go to ``<output_root>/<name>/``; ``final/`` is the folder stage 2's ``hyper_encoder_checkpoints``
points at.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from models.oscar.hyper_encoder import HyperEncoder
from models.oscar.losses import latent_cosine_loss
from models.oscar.rate_table import LATENT_FACTOR, RatePoint, rate_point
from utils.atomic import atomic_directory
from utils.data import ImageFolderDataset, ValidationImages, make_dataloader
from utils.device import resolve_dtype
from utils.errors import exit_on_user_error
from models.blocks.model_zoo import check_zoo, load_sd_components
from models.oscar.options import Stage1Options
from utils.options import add_option_arguments, options_from_args
from models.blocks.padding import pad_to_multiple
from utils.training.accelerator import make_accelerator
from utils.training.batches import ResumableBatches, derived_generator
from utils.training.checkpoints import CheckpointManager, TrainState, register_checkpoint_modules
from utils.training.cli import (
    add_training_arguments,
    configure_logging,
    epochs_for,
    finish_run,
    log_training_summary,
    start_or_resume,
)
from utils.training.loop import run_training_loop
from utils.training.optim import (
    build_lr_scheduler,
    build_optimizer,
    count_parameters,
    enable_gradient_checkpointing,
    optimizer_step,
)
from utils.training.run_dir import RunDir, resolve_resume

log = logging.getLogger("train_hyper_enc")
METRICS_FILE = "metrics.jsonl"  # under logs/: every logged value, readable without tensorboard


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_option_arguments(parser, default_opt="options/oscar/train_hyper_enc.json", checkout=Path(__file__).resolve().parent)
    add_training_arguments(parser)
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------- components


def build_hyper_encoder(options: Stage1Options, point: RatePoint) -> HyperEncoder:
    h = options.hyper_encoder
    return HyperEncoder.from_rate_point(
        point,
        channels=h.channels,
        hyper_dim=h.hyper_dim,
        codebook_dim=h.codebook_dim,
        ema_decay=h.ema_decay,
        commitment_weight=h.commitment_weight,
    )


@torch.no_grad()
def vae_latent(
    vae: torch.nn.Module, images: torch.Tensor, sample: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Scaled fp32 latent of images in [-1, 1]: a posterior sample (drawn with ``generator``) or the posterior mean."""
    dist = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist
    z = dist.sample(generator) if sample else dist.mean
    return (z * vae.config.scaling_factor).float()


def codebook_usage(indices: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Fraction of the codebook used by a batch, as a tensor (no host sync per step, unlike ``unique()``)."""
    used = torch.zeros(codebook_size, device=indices.device)
    return used.index_fill_(0, indices.flatten(), 1.0).mean()


class LatentCosineValidator:
    """Mean cosine similarity between z and z_hat per validation image (whole images, padded to the token grid).

    The images are padded at the bottom/right to a multiple of 8 * 2^k pixels (never resized), encoded once with the
    posterior mean (the frozen VAE makes these latents constant, so they are cached) and compared on the latent
    positions that cover the original image.
    """

    def __init__(self, images: ValidationImages, vae: torch.nn.Module, point: RatePoint, out_dir: Path) -> None:
        self.images = images
        self.vae = vae
        self.point = point
        self.out_dir = out_dir
        self._latents: list[tuple[str, torch.Tensor, int, int]] | None = None

    def _cached_latents(self) -> list[tuple[str, torch.Tensor, int, int]]:
        if self._latents is None:
            self._latents = []
            for item in self.images:
                h, w = item.image.shape[-2:]
                x = pad_to_multiple(item.image[None], self.point.pixel_stride)
                z = vae_latent(self.vae, x, sample=False).cpu()
                self._latents.append((item.name, z, -(-h // LATENT_FACTOR), -(-w // LATENT_FACTOR)))
        return self._latents

    @torch.no_grad()
    def __call__(self, model: HyperEncoder, step: int) -> dict[str, float]:
        was_training = model.training
        model.eval()  # no EMA codebook update, no gradient
        device = next(model.parameters()).device
        scores = {}
        try:
            for name, z, lh, lw in self._cached_latents():
                z = z.to(device)
                z_hat = model(z).latent_hat.float()
                cos = torch.nn.functional.cosine_similarity(z[..., :lh, :lw], z_hat[..., :lh, :lw], dim=1)
                scores[name] = float(cos.mean())
        finally:
            model.train(was_training)
        mean = sum(scores.values()) / len(scores)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        report = {"step": step, "bpp": self.point.label_bpp, "mean_cosine": mean, "images": scores}
        (self.out_dir / f"step-{step}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        return {"val/cosine": mean}


# --------------------------------------------------------------------------------------------- main


@exit_on_user_error
def main(argv: list[str] | None = None) -> Path:
    """Train one hyper-encoder; returns the run folder. User errors surface before anything is written."""
    args = parse_args(argv)
    options = options_from_args(Stage1Options, args)
    run = RunDir.of(options.output_root, options.name)
    resume_from = resolve_resume(run, args.resume)
    point = rate_point(options.bpp)
    seed = options.runtime.seed

    # Everything a user can get wrong is checked here, before the run folder is touched.
    check_zoo(options.model_zoo.path)
    data = options.data
    train_set = ImageFolderDataset(
        data.train_roots, data.patch_size, data.small_images, augment=True, seed=seed, crop_fallback=data.crop_fallback
    )
    val_set = ValidationImages(data.val_root, data.max_val_images) if data.val_root else None
    raw_loader = make_dataloader(train_set, data.batch_size, data.num_workers, seed)

    accelerator = make_accelerator(options.train, run.root, seed, device=options.runtime.device)
    vae_dtype = resolve_dtype(options.runtime.precision, accelerator.device)
    vae = load_sd_components(options.model_zoo.path, accelerator.device, vae_dtype, with_unet=False).vae
    hyper_encoder = build_hyper_encoder(options, point).to(accelerator.device).train()
    if options.train.gradient_checkpointing:
        enable_gradient_checkpointing(hyper_encoder)
    params = [p for p in hyper_encoder.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, options.optimizer)
    lr_scheduler = build_lr_scheduler(optimizer, options.optimizer, options.train.max_steps, accelerator.num_processes)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(hyper_encoder, optimizer, raw_loader, lr_scheduler)
    register_checkpoint_modules(accelerator, {"hyper_encoder": hyper_encoder})
    checkpoints = CheckpointManager(accelerator, run.checkpoints, options.train.checkpoints_total_limit)

    state = start_or_resume(accelerator, run, options, checkpoints, resume_from)

    global_batch = data.batch_size * accelerator.num_processes
    batches = ResumableBatches(loader, state, global_batch, sampler=raw_loader.sampler)
    log_training_summary(
        accelerator,
        num_examples=len(train_set),
        batch_size=data.batch_size,
        max_steps=options.train.max_steps,
        trainable_parameters=count_parameters(hyper_encoder),
        start_step=state.step,
        **{
            "Rate point": f"{point.label_bpp} bpp ({point.downsamplings} downsamplings, {point.codebook_size} codes)",
            "Num epochs (approx.)": epochs_for(
                options.train.max_steps, len(train_set), global_batch, accelerator.gradient_accumulation_steps
            ),
            "Run folder": run.root,
        },
    )

    def train_step(images: torch.Tensor, state: TrainState) -> dict[str, torch.Tensor | float]:
        # Posterior noise seeded by the batch's place in the data order: identical after a resume, distinct per process.
        generator = derived_generator(
            seed, state.epoch, state.samples_in_epoch, accelerator.process_index, device=accelerator.device
        )
        z = vae_latent(vae, images, options.sample_posterior, generator)
        out = model(z)
        cosine_loss = latent_cosine_loss(z, out.latent_hat.float(), over="channels")
        loss = cosine_loss + options.vq_commitment_weight * out.vq_loss
        accelerator.backward(loss)
        grad_norm = optimizer_step(accelerator, optimizer, lr_scheduler, params, options.optimizer.max_grad_norm)
        values: dict[str, torch.Tensor | float] = {
            "loss": loss.detach(),
            "vq_loss": out.vq_loss.detach(),
            "codes_used": codebook_usage(out.indices, point.codebook_size),
            "lr": lr_scheduler.get_last_lr()[0],
        }
        if grad_norm is not None:
            values["grad_norm"] = grad_norm
        return values

    validate = None
    if val_set is not None:
        validator = LatentCosineValidator(val_set, vae, point, run.validation)

        def validate(step: int) -> dict[str, float] | None:
            if not accelerator.is_main_process:
                return None
            return validator(hyper_encoder, step)

    result = run_training_loop(
        accelerator,
        batches=batches,
        models=[model],
        step_fn=train_step,
        train=options.train,
        checkpoints=checkpoints,
        validate=validate,
        stop_at=args.stop_at,
        description=f"hyper-encoder {point.label_bpp} bpp",
        metrics_file=run.logs / METRICS_FILE,
    )
    if result.status == "finished" and accelerator.is_main_process:
        with atomic_directory(run.final) as tmp:
            hyper_encoder.save_pretrained(tmp, safe_serialization=True)
        log.info("trained hyper-encoder (%s bpp, %d steps) saved to %s", point.label_bpp, result.state.step, run.final)
    finish_run(accelerator, result)
    return run.root


if __name__ == "__main__":
    configure_logging("train_hyper_enc")
    main()
