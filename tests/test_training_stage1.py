"""Stage-1 training (train_hyper_enc.py) and the shared training infrastructure (utils/training/).

Everything runs on the CPU with the tiny random-weight zoo, generated images and a narrow hyper-encoder, with
``main([...])`` called in-process. The central property: a run that is stopped (or interrupted by a signal) and
resumed ends with bit-identical weights to an uninterrupted run with the same seed.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import train_hyper_enc
from models.oscar.hyper_encoder import HyperEncoder
from utils.data import make_dataloader, write_synthetic_images
from models.oscar.options import Stage1Options
from utils.option_sections import OptimizerOptions, TrainLoopOptions
from utils.options import load_options
from utils.training import (
    CheckpointManager,
    GracefulInterrupt,
    ModuleCheckpoint,
    ResumableBatches,
    RunDir,
    TrainingError,
    TrainState,
    build_lr_scheduler,
    build_optimizer,
    derived_generator,
    list_checkpoints,
    make_accelerator,
    optimizer_step,
    read_metrics,
    register_checkpoint_modules,
    run_training_loop,
)

OPT_FILE = Path(__file__).resolve().parents[1] / "options" / "oscar" / "train_hyper_enc.json"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """12 training images (3 batches of 4 per epoch, so stops land mid-epoch) and 2 validation images."""
    root = tmp_path_factory.mktemp("images")
    write_synthetic_images(root / "train", count=12, size=(96, 80), seed=0)
    write_synthetic_images(root / "val", count=2, size=(100, 70), seed=1)
    return {"train": root / "train", "val": root / "val"}


def stage1_argv(zoo: Path, images: dict[str, Path], out: Path, name: str, *sets: str) -> list[str]:
    """A small stage-1 run: hyper-encoder 16/32/8 at 0.0313 bpp, 64-pixel patches, batch 4, no tracker."""
    base = [
        f"model_zoo.path={zoo}",
        f"data.train_roots={json.dumps([str(images['train'])])}",
        f"data.val_root={images['val']}",
        "data.patch_size=64",
        "data.batch_size=4",
        "data.num_workers=0",
        "hyper_encoder.channels=16",
        "hyper_encoder.hyper_dim=32",
        "hyper_encoder.codebook_dim=8",
        "optimizer.learning_rate=1e-3",
        "train.log_every=1",
        "train.log_with=none",
        f"output_root={out}",
        f"name={name}",
        *sets,
    ]
    argv = ["--opt", str(OPT_FILE)]
    for s in base:
        argv += ["--set", s]
    return argv


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "diffusion_pytorch_model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different[:5]}"


def kept_steps(run: Path) -> list[int]:
    return [step for step, _ in list_checkpoints(run / "checkpoints")]


# --------------------------------------------------------------------------------------------- stage 1 end to end


def test_training_lowers_the_loss(tiny_zoo: Path, images: dict[str, Path], tmp_path: Path) -> None:
    steps = 200
    argv = stage1_argv(
        tiny_zoo, images, tmp_path, "loss",
        f"train.max_steps={steps}", "train.log_every=10", "train.checkpoint_every=1000",
        f"train.validate_every={steps}", "data.val_root=null",
    )
    run = train_hyper_enc.main(argv)

    losses = [r["loss"] for r in read_metrics(run / "logs" / "metrics.jsonl") if "loss" in r]
    assert len(losses) == steps // 10
    start, end = sum(losses[:3]) / 3, sum(losses[-3:]) / 3  # windows of 30 steps each
    # Measured: about -0.17 -> -0.45 (negative cosine; -1 is a perfect match). Require a clear, robust drop.
    assert end < start - 0.1, (start, end)
    assert HyperEncoder.from_pretrained(run / "final").config.codebook_size == 256


@pytest.mark.parametrize("accumulation", [1, 2])
def test_stop_and_resume_is_bit_exact(
    tiny_zoo: Path, images: dict[str, Path], tmp_path: Path, accumulation: int
) -> None:
    sets = (
        "train.max_steps=10", "train.checkpoint_every=4", "train.checkpoints_total_limit=2",
        "train.validate_every=5", f"train.gradient_accumulation_steps={accumulation}",
    )
    whole = train_hyper_enc.main(stage1_argv(tiny_zoo, images, tmp_path, "whole", *sets))

    # Step 5 is mid-epoch in both settings (3 batches per epoch; with accumulation 2 an epoch is 2 steps, the
    # second one forced short by the end of the data).
    parts = tmp_path / "parts"
    train_hyper_enc.main(stage1_argv(tiny_zoo, images, tmp_path, "parts", *sets) + ["--stop-at", "5"])
    assert kept_steps(parts) == [4, 5]
    assert not (parts / "final").exists()
    state = json.loads((parts / "checkpoints" / "checkpoint-5" / "training_state.json").read_text())
    assert state["step"] == 5 and 0 < state["samples_in_epoch"] < 12
    if accumulation == 1:  # a kill after step 5 that lost checkpoint-5: continue from the periodic checkpoint-4
        killed = train_hyper_enc.main(
            stage1_argv(tiny_zoo, images, tmp_path, "killed", *sets)
            + ["--resume", str(parts / "checkpoints" / "checkpoint-4")]
        )
        assert_same_weights(final_weights(whole), final_weights(killed))
    train_hyper_enc.main(stage1_argv(tiny_zoo, images, tmp_path, "parts", *sets) + ["--resume", "latest"])

    assert_same_weights(final_weights(whole), final_weights(parts))
    assert kept_steps(whole) == kept_steps(parts) == [8, 10]  # checkpoints_total_limit=2
    assert not [p for p in (parts / "checkpoints").iterdir() if p.name.endswith((".tmp", ".old"))]
    assert sorted(p.name for p in (parts / "validation").iterdir()) == ["step-10.json", "step-5.json"]
    assert (parts / "checkpoints" / "checkpoint-10" / "hyper_encoder" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list((parts / "checkpoints" / "checkpoint-10").glob("model*.safetensors"))  # no duplicate by accelerate


def test_resume_after_finishing_keeps_the_result(tiny_zoo: Path, images: dict[str, Path], tmp_path: Path) -> None:
    argv = stage1_argv(tiny_zoo, images, tmp_path, "done", "train.max_steps=3", "train.checkpoint_every=2")
    run = train_hyper_enc.main(argv)
    before = final_weights(run)
    train_hyper_enc.main(argv + ["--resume", "latest"])  # nothing left to do: final/ is written again, unchanged
    assert_same_weights(before, final_weights(run))
    assert kept_steps(run) == [2, 3]


def test_options_json_is_written_and_reloads(tiny_zoo: Path, images: dict[str, Path], tmp_path: Path) -> None:
    argv = stage1_argv(tiny_zoo, images, tmp_path, "opts", "train.max_steps=2", "train.log_with=tensorboard")
    run = train_hyper_enc.main(argv)

    written = load_options(Stage1Options, run / "options.json")
    assert written == load_options(Stage1Options, OPT_FILE, argv[1::2][1:])
    assert written.hyper_encoder.channels == 16 and written.train.max_steps == 2
    assert list((run / "logs").rglob("events.out.tfevents.*"))
    assert json.loads((run / "validation" / "step-2.json").read_text())["images"].keys() == {
        "synthetic_0000", "synthetic_0001"
    }
    assert (run / "final" / "config.json").is_file()


# --------------------------------------------------------------------------------------------- user errors


ERROR_CASES = {  # override -> a phrase the one-line message must contain
    "missing dataset": ('data.train_roots=["{tmp}/nope"]', "does not exist"),
    "empty dataset": ('data.train_roots=["{tmp}/empty"]', "no images"),
    "missing zoo": ("model_zoo.path={tmp}/no_zoo", "model zoo"),
    "missing val_root": ("data.val_root={tmp}/no_val", "validation folder"),
    "too few images": ("data.batch_size=64", "fewer than one batch"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_user_errors_exit_2_before_writing(
    tiny_zoo: Path, images: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    (tmp_path / "empty").mkdir()
    override, phrase = ERROR_CASES[case]
    with pytest.raises(SystemExit) as exc:
        train_hyper_enc.main(stage1_argv(tiny_zoo, images, tmp_path / "out", "bad", override.format(tmp=tmp_path)))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and phrase in err[0], err
    assert not (tmp_path / "out").exists()


def test_occupied_run_folder_and_bad_resume_target(
    tiny_zoo: Path, images: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = stage1_argv(tiny_zoo, images, tmp_path, "busy", "train.max_steps=1")
    run = train_hyper_enc.main(argv)
    before = final_weights(run)
    capsys.readouterr()
    for extra in ([], ["--resume", str(tmp_path / "nowhere")], ["--resume", str(run)]):
        with pytest.raises(SystemExit) as exc:
            train_hyper_enc.main(argv + extra)
        assert exc.value.code == 2
        assert capsys.readouterr().err.strip().startswith("error: ")
    assert_same_weights(before, final_weights(run))


# --------------------------------------------------------------------------------------------- shared infrastructure


class _Numbers(torch.utils.data.Dataset):
    """Deterministic per-(epoch, index) samples, like ImageFolderDataset, for a model-free loop test."""

    def __init__(self, n: int) -> None:
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.randn(8, generator=derived_generator(7, self.epoch, i))


def _toy_run(run_dir: Path, resume: Path | None, signal_at: int | None = None, max_steps: int = 9):
    """A linear model trained through run_training_loop; optionally SIGINT to ourselves during step ``signal_at``."""
    train = TrainLoopOptions(max_steps=max_steps, checkpoint_every=3, checkpoints_total_limit=2, log_every=2,
                             log_with="none")
    accelerator = make_accelerator(train, run_dir, seed=0, device="cpu")
    model = nn.Linear(8, 8)
    optimizer = build_optimizer(model.parameters(), OptimizerOptions(learning_rate=1e-2))
    scheduler = build_lr_scheduler(optimizer, OptimizerOptions(lr_scheduler="cosine", lr_warmup_steps=2), max_steps)
    raw = make_dataloader(_Numbers(10), batch_size=3, num_workers=0, seed=0)
    model_p, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, raw, scheduler)
    register_checkpoint_modules(accelerator, {"toy": model})
    manager = CheckpointManager(accelerator, RunDir(run_dir).checkpoints, train.checkpoints_total_limit)
    state = manager.load(resume) if resume else TrainState()

    def step_fn(x: torch.Tensor, state: TrainState) -> dict[str, torch.Tensor]:
        noise = torch.randn(x.shape, generator=derived_generator(1, state.epoch, state.samples_in_epoch))
        loss = (model_p(x) - x + 0.1 * noise).pow(2).mean()
        accelerator.backward(loss)
        optimizer_step(accelerator, optimizer, scheduler, model.parameters(), max_grad_norm=1.0)
        if signal_at is not None and state.step + 1 == signal_at:
            os.kill(os.getpid(), signal.SIGINT)  # handled by GracefulInterrupt: finish the step, save, stop
        return {"loss": loss.detach()}

    result = run_training_loop(accelerator, batches=ResumableBatches(loader, state, 3), models=[model_p],
                               step_fn=step_fn, train=train, checkpoints=manager)
    return result, {k: v.clone() for k, v in model.state_dict().items()}


def test_sigint_saves_a_checkpoint_and_resume_matches(tmp_path: Path) -> None:
    handler = signal.getsignal(signal.SIGINT)
    whole, weights_whole = _toy_run(tmp_path / "whole", None)
    assert whole.status == "finished" and whole.state.step == 9

    cut, _ = _toy_run(tmp_path / "cut", None, signal_at=5)
    assert cut.status == "interrupted" and cut.state.step == 5
    assert kept_steps(tmp_path / "cut") == [3, 5]
    resumed, weights_resumed = _toy_run(tmp_path / "cut", cut.checkpoint)
    assert resumed.status == "finished"
    assert_same_weights(weights_whole, weights_resumed)
    assert signal.getsignal(signal.SIGINT) is handler  # handlers restored


def test_second_sigint_aborts_at_once() -> None:
    with GracefulInterrupt() as interrupt:
        os.kill(os.getpid(), signal.SIGINT)
        assert interrupt.requested and interrupt.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_checkpoints_restore_rng_states_and_ignore_partial_saves(tmp_path: Path) -> None:
    accelerator = make_accelerator(TrainLoopOptions(log_with="none"), tmp_path, seed=3, device="cpu")
    manager = CheckpointManager(accelerator, tmp_path / "checkpoints", total_limit=1)
    (tmp_path / "checkpoints" / "checkpoint-99.tmp").mkdir(parents=True)  # a save cut short by a crash
    assert list_checkpoints(tmp_path / "checkpoints") == []

    path = manager.save(TrainState(step=1, epoch=0, samples_in_epoch=4))
    expected = torch.rand(4)
    torch.rand(100)
    state = manager.load(path)
    assert torch.equal(torch.rand(4), expected)  # accelerate's weights_only load of the RNG pickle worked
    assert state == TrainState(step=1, epoch=0, samples_in_epoch=4)

    manager.save(TrainState(step=2))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["checkpoint-2"]  # pruned, tmp removed


def test_module_checkpoint_refuses_another_architecture(tmp_path: Path) -> None:
    small = HyperEncoder(channels=16, hyper_dim=32, codebook_dim=8)
    ModuleCheckpoint(small).save(small, tmp_path / "he")
    other = HyperEncoder(channels=32, hyper_dim=32, codebook_dim=8)
    with pytest.raises(TrainingError, match="channels=16"):
        ModuleCheckpoint(other).load(other, tmp_path / "he")


def test_derived_generator_depends_only_on_keys() -> None:
    a = torch.rand(3, generator=derived_generator(0, 1, 2))
    torch.rand(10)
    assert torch.equal(a, torch.rand(3, generator=derived_generator(0, 1, 2)))
    assert not torch.equal(a, torch.rand(3, generator=derived_generator(0, 1, 3)))


def test_rewinding_to_an_older_checkpoint_drops_the_abandoned_ones(tmp_path: Path) -> None:
    accelerator = make_accelerator(TrainLoopOptions(log_with="none"), tmp_path, seed=0, device="cpu")
    manager = CheckpointManager(accelerator, tmp_path / "checkpoints", total_limit=3)
    for step in (1, 2, 3):
        manager.save(TrainState(step=step))
    state = manager.load(tmp_path / "checkpoints" / "checkpoint-1")
    state.step = 2
    manager.save(state)  # the new step 2 replaces the old one; step 3 belonged to the abandoned continuation
    assert kept_steps(tmp_path) == [1, 2]
