"""Stage 2 of OSCAR: one LoRA-fine-tuned SD-2.1 UNet that decodes every bit-rate in one step.

    python train_diff.py --opt options/oscar/train_diff.json
    python train_diff.py --opt ... --resume latest                 # continue an interrupted run
    accelerate launch --multi_gpu --num_processes 8 train_diff.py --opt ...
    bash scripts/train.sh [options.json] [--set ...]

Trainable: the UNet's LoRA adapters (encoder/decoder/other groups) and its ``conv_in``, the prompt embedding and the
hyper-encoders of all levels (initialised from stage 1's ``final/`` folders). Each optimizer step draws one level
(the same on every process); the loss is L1 + DISTS + edge (DISTS between Sobel magnitudes) + 2 x latent cosine
+ GAN generator term, each weight in ``loss``; a weight of 0 switches its term off (``loss.gan = 0`` also removes
the discriminator). The latent discriminator (a second SD UNet's down and mid blocks with their own LoRA and a conv
head, on latents noised to t in ``disc_timestep_range``) has its own AdamW. At the end, ``final/`` is an exported
model (with codebook-usage priors measured on training crops) that test.py, compress.py and decompress.py load.

Where the reference code trains differently, an option switches to its behaviour (value "reference", or
``sample_posterior: true``): ``loss.latent_form``, ``loss.latent_input``, ``loss.edge_form``, ``gan.mode``,
``gan.head``, ``gan.lora_targets``, ``gan.prompt``, ``conv_in_training``, ``data.crop_fallback`` and
``model.latent_norms = "oracle"``; options/oscar/train_diff_reference.json sets them all (README, "Where this code
differs from the reference").
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from diffusers.training_utils import cast_training_params

from models.oscar.discriminator import LatentDiscriminator, discriminator_loss, generator_loss
from models.oscar.hyper_encoder import HyperEncoder
from models.oscar.losses import DistsLoss, ReconstructionLoss
from models.oscar.model import OSCARModel, OSCAROutput
from models.oscar.priors import measure_index_counts
from utils.data import ImageFolderDataset, ValidationImages, make_dataloader
from utils.device import resolve_dtype
from utils.errors import UserError, exit_on_user_error
from utils.evaluation.metrics import psnr_uint8, quantize
from utils.image_io import save_png
from models.blocks.model_zoo import check_zoo, load_sd_components
from models.oscar.options import LossOptions, Stage2Options
from utils.options import add_option_arguments, options_from_args
from utils.training.accelerator import make_accelerator
from utils.training.batches import ResumableBatches, derived_generator
from utils.training.checkpoints import CheckpointManager, ModuleCheckpoint, TrainState, register_checkpoint_modules
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
from utils.weights import check_weights

log = logging.getLogger("train_diff")
METRICS_FILE = "metrics.jsonl"
PRIOR_PATCHES = 256  # training crops on which the exported model's codebook-usage priors are measured
LEAK_NOTE = " (the reference's leak: decoding uses the original latent's norms)"
PSNR_CAP_DB = 100.0  # an identical reconstruction (infinite PSNR) counts as 100 dB in the validation mean


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_option_arguments(parser, default_opt="options/oscar/train_diff.json", checkout=Path(__file__).resolve().parent)
    add_training_arguments(parser)
    return parser.parse_args(argv)


def check_stage1_checkpoints(options: Stage2Options) -> list[Path]:
    """Each level's stage-1 folder must exist and hold a hyper-encoder of that level's rate point and width."""
    folders = []
    for level, (bpp, folder) in enumerate(zip(options.model.levels, options.hyper_encoder_checkpoints)):
        path = Path(folder)
        if not (path / "config.json").is_file():
            raise UserError(
                f"hyper_encoder_checkpoints[{level}] (bpp {bpp}): {path} is not a stage-1 checkpoint (no config.json); "
                f"train it with `python train_hyper_enc.py --set bpp={bpp}` and point here at its final/ folder"
            )
        folders.append(path)
    return folders


def load_stage1_into(model: OSCARModel, folders: list[Path]) -> None:
    for level, folder in enumerate(folders):
        loaded = HyperEncoder.from_pretrained(folder)
        target = model.hyper_encoders[level]
        keys = ("codebook_size", "downsamplings", "channels", "hyper_dim", "codebook_dim")
        got = {k: loaded.config[k] for k in keys}
        want = {k: target.config[k] for k in keys}
        if got != want:
            diff = ", ".join(f"{k} {got[k]} (expected {want[k]})" for k in keys if got[k] != want[k])
            raise UserError(f"hyper_encoder_checkpoints[{level}]: {folder} does not fit level {level}: {diff}")
        target.load_state_dict(loaded.state_dict())


def generator_parameters(model: OSCARModel, conv_in_training: str = "full") -> list[torch.nn.Parameter]:
    """LoRA + conv_in + prompt embedding + all hyper-encoders; everything else stays frozen.

    ``conv_in_training="reference"`` leaves conv_in's base weights frozen (only its LoRA trains), as the
    reference code does: it hands conv_in to the optimizer, but peft has switched its gradients off.
    """
    if conv_in_training == "full":
        for name, p in model.unet.named_parameters():
            if name.startswith("conv_in.") and "lora_" not in name:
                p.requires_grad_(True)
    elif conv_in_training != "reference":
        raise ValueError(f"conv_in_training={conv_in_training!r}: expected 'full' or 'reference'")
    model.hyper_encoders.requires_grad_(True)
    model.prompt_embedding.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def build_reconstruction_loss(
    loss_opts: LossOptions, device: torch.device | str, dists: DistsLoss | None = None
) -> ReconstructionLoss:
    """L1 + DISTS + edge + latent cosine with the weights and forms of ``loss_opts`` (``dists`` may be shared)."""
    return ReconstructionLoss(
        l1_weight=loss_opts.l1,
        dists_weight=loss_opts.dists,
        edge_weight=loss_opts.edge,
        latent_weight=loss_opts.latent_cosine,
        device=device,
        edge_form=loss_opts.edge_form,
        latent_over="space" if loss_opts.latent_form == "reference" else "channels",
        dists=dists,
    )


def reconstruction_terms(
    recon: ReconstructionLoss, loss_opts: LossOptions, out: OSCAROutput, images: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The reconstruction terms of one training output; ``loss.latent_input`` picks the latent compared with z."""
    z_hat = out.latent_decoded if loss_opts.latent_input == "reference" else out.latent_hat
    return recon(out.x_hat.float(), images.float(), z_hat=z_hat.float(), z=out.latent.float())


class Validator:
    """Compress -> decompress the validation images at the lowest and highest level; PSNR, bpp and PNGs per step.

    Each image goes through the model's real coding path (:meth:`OSCARModel.roundtrip`: file bytes in memory), so
    ``latent_norms="oracle"`` works too (the decoder is handed the original latent's norms, as in evaluation).
    PSNR is the evaluation's: 8-bit RGB (:func:`utils.evaluation.metrics.psnr_uint8` on quantized images), so
    validation, test.py and the benchmark report the same number for the same reconstruction.
    """

    def __init__(self, images: ValidationImages, out_dir: Path) -> None:
        self.images = images
        self.out_dir = out_dir

    @torch.no_grad()
    def __call__(self, model: OSCARModel, step: int) -> dict[str, float]:
        was_training = model.training
        model.eval()
        scores: dict[str, float] = {}
        folder = self.out_dir / f"step-{step}"
        try:
            for level in sorted({0, model.num_levels - 1}):
                psnrs, bpps = [], []
                for item in self.images:
                    x = item.image[None].to(model.device)
                    sizes: list[int] = []

                    def keep(data: bytes) -> bytes:
                        sizes.append(len(data))
                        return data

                    y = model.roundtrip(x, level, keep)
                    psnrs.append(min(psnr_uint8(quantize(y.cpu()), quantize(x.cpu())), PSNR_CAP_DB))
                    bpps.append(8 * sizes[0] / (x.shape[-2] * x.shape[-1]))
                    save_png(y, folder / f"{item.name}_level{level}.png")
                scores[f"val/psnr_level{level}"] = sum(psnrs) / len(psnrs)
                scores[f"val/bpp_level{level}"] = sum(bpps) / len(bpps)
        finally:
            model.train(was_training)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "scores.json").write_text(json.dumps({"step": step, **scores}, indent=2) + "\n")
        return scores


@exit_on_user_error
def main(argv: list[str] | None = None) -> Path:
    """Train the multi-rate model; returns the run folder. User errors surface before anything is written."""
    args = parse_args(argv)
    options = options_from_args(Stage2Options, args)
    run = RunDir.of(options.output_root, options.name)
    resume_from = resolve_resume(run, args.resume)
    seed = options.runtime.seed
    loss_opts = options.loss

    # Everything a user can get wrong is checked before the run folder is touched.
    check_zoo(options.model_zoo.path)
    stage1 = check_stage1_checkpoints(options)
    if loss_opts.dists > 0 or loss_opts.edge > 0:
        check_weights("dists")
    data = options.data
    train_set = ImageFolderDataset(
        data.train_roots, data.patch_size, data.small_images, augment=True, seed=seed, crop_fallback=data.crop_fallback
    )
    val_set = ValidationImages(data.val_root, data.max_val_images) if data.val_root else None
    raw_loader = make_dataloader(train_set, data.batch_size, data.num_workers, seed)

    # One level per step leaves the other levels' hyper-encoders without gradients: DDP must allow that.
    accelerator = make_accelerator(
        options.train, run.root, seed, device=options.runtime.device, find_unused_parameters=True
    )
    device = accelerator.device
    frozen_dtype = resolve_dtype(options.runtime.precision, device)
    model = OSCARModel(load_sd_components(options.model_zoo.path, dtype=frozen_dtype), options.model)
    load_stage1_into(model, stage1)
    model.to(device)
    model.vae.to(frozen_dtype)
    params = generator_parameters(model, options.conv_in_training)
    # Frozen weights may be bf16/fp16 (runtime.precision); what is trained stays fp32 (use train.mixed_precision
    # for autocast), as in diffusers' LoRA examples.
    cast_training_params(model, dtype=torch.float32)
    model.train()
    model.vae.eval()

    use_gan = loss_opts.gan > 0
    gan_opts = options.gan
    reference_gan = gan_opts.mode == "reference"
    own_prompt = gan_opts.prompt == "reference"
    disc = None
    if use_gan:
        disc = LatentDiscriminator.from_zoo(
            options.model_zoo.path,
            lora_rank=options.model.lora_rank,
            lora_alpha=options.model.lora_alpha,
            timestep_range=tuple(options.disc_timestep_range),
            device=device,
            dtype=frozen_dtype,
            head=gan_opts.head,
            lora_targets=gan_opts.lora_targets,
            own_prompt=own_prompt,
            detach_features=reference_gan,
        )
        disc.head.float()
        if disc.prompt_embedding is not None:
            disc.prompt_embedding.data = disc.prompt_embedding.data.float()
    if options.train.gradient_checkpointing:
        enable_gradient_checkpointing(model.unet, *( [disc.unet] if disc is not None else []))
    recon = build_reconstruction_loss(loss_opts, device)

    optimizer = build_optimizer(params, options.optimizer)
    lr_scheduler = build_lr_scheduler(optimizer, options.optimizer, options.train.max_steps, accelerator.num_processes)
    prepared = [model, optimizer, raw_loader, lr_scheduler]
    if disc is not None:
        disc_params = disc.trainable_parameters()
        disc_optimizer = build_optimizer(disc_params, options.optimizer)
        disc_scheduler = build_lr_scheduler(disc_optimizer, options.optimizer, options.train.max_steps, accelerator.num_processes)
        prepared += [disc, disc_optimizer, disc_scheduler]
    prepared = accelerator.prepare(*prepared)
    wrapped, optimizer, loader, lr_scheduler = prepared[:4]
    if disc is not None:
        wrapped_disc, disc_optimizer, disc_scheduler = prepared[4:]
    modules = {"generator": ModuleCheckpoint.trainable_only(model)}
    if disc is not None:
        modules["discriminator"] = ModuleCheckpoint.trainable_only(disc)
    register_checkpoint_modules(accelerator, modules)
    checkpoints = CheckpointManager(accelerator, run.checkpoints, options.train.checkpoints_total_limit)

    state = start_or_resume(accelerator, run, options, checkpoints, resume_from)

    global_batch = data.batch_size * accelerator.num_processes
    batches = ResumableBatches(loader, state, global_batch, sampler=raw_loader.sampler)
    log_training_summary(
        accelerator,
        num_examples=len(train_set),
        batch_size=data.batch_size,
        max_steps=options.train.max_steps,
        trainable_parameters=count_parameters(model) + (count_parameters(disc) if disc is not None else 0),
        start_step=state.step,
        **{
            "Levels": ", ".join(f"{b} bpp @ t={t}" for b, t in zip(options.model.levels, options.model.timesteps)),
            "Loss terms": ", ".join(recon.enabled + ([f"gan ({gan_opts.mode})"] if use_gan else [])),
            "Latent norms": options.model.latent_norms + (LEAK_NOTE if options.model.latent_norms == "oracle" else ""),
            "Num epochs (approx.)": epochs_for(
                options.train.max_steps, len(train_set), global_batch, accelerator.gradient_accumulation_steps
            ),
            "Run folder": run.root,
        },
    )

    def train_step(images: torch.Tensor, state: TrainState) -> dict[str, torch.Tensor | float]:
        # The level is drawn from the batch's place in the data order: the same on every process, and after a resume.
        level_rng = derived_generator(seed, state.epoch, state.samples_in_epoch)
        level = int(torch.randint(model.num_levels, (1,), generator=level_rng))
        # Posterior noise (sample_posterior) seeded like the level: identical after a resume, distinct per process.
        posterior_rng = derived_generator(
            seed, state.epoch, state.samples_in_epoch, accelerator.process_index, 2, device=accelerator.device
        )
        out = wrapped(images, level, sample_posterior=options.sample_posterior, generator=posterior_rng)
        terms = reconstruction_terms(recon, loss_opts, out, images)
        loss = terms["total"]
        values: dict[str, torch.Tensor | float] = {f"loss/{k}": v.detach() for k, v in terms.items() if k != "total"}
        values["level"] = float(level)
        disc_prompt = None if own_prompt else model.prompt_embedding
        if disc is not None:
            if reference_gan:
                # The reference's generator term: its value joins the loss, but no gradient reaches anything.
                with torch.no_grad():
                    g_loss = generator_loss(disc(out.x0_latent.float(), disc_prompt, generator=level_rng))
            else:
                # Gradients reach the generator only (the discriminator's own parameters are switched off).
                disc.set_trainable(False)
                try:
                    g_loss = generator_loss(disc(out.x0_latent.float(), disc_prompt, generator=level_rng))
                finally:
                    disc.set_trainable(True)
            loss = loss + loss_opts.gan * g_loss
            values["loss/gan_generator"] = g_loss.detach()
        accelerator.backward(loss)
        optimizer_step(accelerator, optimizer, lr_scheduler, params, options.optimizer.max_grad_norm)
        values["loss/total"] = loss.detach()
        if disc is not None:
            disc_rng = derived_generator(seed, state.epoch, state.samples_in_epoch, accelerator.process_index, 1)
            real_latent = out.latent
            if reference_gan:
                # The reference encodes the real image again for the discriminator (a second posterior sample).
                with torch.no_grad():
                    real_latent = model.image_to_latent(
                        images, sample=options.sample_posterior, generator=posterior_rng
                    )
            real = wrapped_disc(real_latent.float(), disc_prompt, generator=disc_rng)
            fake = wrapped_disc(out.x0_latent.detach().float(), disc_prompt, generator=disc_rng)
            d_loss = loss_opts.discriminator * discriminator_loss(real, fake)
            accelerator.backward(d_loss)
            optimizer_step(accelerator, disc_optimizer, disc_scheduler, disc_params, options.optimizer.max_grad_norm)
            values["loss/discriminator"] = d_loss.detach()
        values["lr"] = lr_scheduler.get_last_lr()[0]
        return values

    validate = None
    if val_set is not None:
        validator = Validator(val_set, run.validation)

        def validate(step: int) -> dict[str, float] | None:
            return validator(model, step) if accelerator.is_main_process else None

    result = run_training_loop(
        accelerator,
        batches=batches,
        models=[wrapped] + ([wrapped_disc] if disc is not None else []),
        step_fn=train_step,
        train=options.train,
        checkpoints=checkpoints,
        validate=validate,
        stop_at=args.stop_at,
        description="OSCAR stage 2",
        metrics_file=run.logs / METRICS_FILE,
    )
    if result.status == "finished" and accelerator.is_main_process:
        export_model(model, train_set, options, run.final)
        log.info("exported the trained model to %s", run.final)
    finish_run(accelerator, result)
    return run.root


def export_model(model: OSCARModel, train_set: ImageFolderDataset, options: Stage2Options, out: Path) -> Path:
    """Measure codebook-usage priors on training crops, then write the exported model (safetensors + JSON)."""
    model.eval()
    count = min(PRIOR_PATCHES, len(train_set))
    crops = (train_set[i][None].to(model.device) for i in range(count))
    model.index_counts = measure_index_counts(model, crops, total=count, progress=True)  # resets the fingerprint
    return model.save_pretrained(out, zoo_path=options.model_zoo.path)


if __name__ == "__main__":
    configure_logging("train_diff")
    main()
