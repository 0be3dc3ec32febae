"""Hardening: decode pixel limit, option validation, resuming past damaged checkpoints, exports usable from anywhere.

Each group is one item of the hardening issue:

* decompression bombs: a file may declare up to 2^28 pixels in a few bytes; decoding refuses more than
  ``max_decode_pixels`` (default 100 million) from the header alone, for every method (``CodecMethod.decompress``),
  with a flag in decompress.py and an option in test.py;
* options: NaN / Infinity, integers beyond 64 bits (and seeds beyond numpy's 2^32 - 1) and deep nesting are one-line
  option errors at every entry point, not tracebacks or silent NaN training;
* resume: ``--resume latest`` skips a damaged checkpoint (truncated, overwritten, or holding a pickle that is more
  than plain data) and says why; every checkpoint load error is one line; random states are restored or refused;
* exports: the SD zoo's location is stored so that the CLIs work from any working directory;
* complete exports: every file an export lists must be present and readable, or the load is refused with one line
  per problem (no silent fall-back to uniform priors);
* contained outputs: no output is written through a symlinked folder or a ``..`` name, and an output folder that
  is a file fails once, before the model loads.

New names are imported inside the tests, so that on code without them each test fails on its own.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import compress as compress_cli
import decompress as decompress_cli
import test as test_entry
import train_diff
import train_hyper_enc
from models.blocks.codec_method import CodecError, CodecMethod, LevelInfo, Stage
from models.blocks.container import read_container, write_container
from models.oscar.options import Stage1Options, Stage2Options
from tests.test_cli_codec import smooth_images
from tests.test_codec import make_model
from tests.test_training_stage1 import _Numbers
from utils.errors import OptionsError, UserError
from utils.evaluation.options import EvalOptions
from utils.options import load_options

ROOT = Path(__file__).resolve().parents[1]
CPU = ["--device", "cpu"]


# ============================================================================================ decode pixel limit


class RecordingCodec(nn.Module, CodecMethod):
    """A codec that only reads the container: it records whether any decode stage ran."""

    method_name = "recording"
    method_id = 14
    export_version = 1
    file_suffix = ".rec"

    def __init__(self) -> None:
        super().__init__()
        self.stages_run: list[str] = []

    @property
    def levels(self) -> list[LevelInfo]:
        return [LevelInfo("only", 1.0)]

    def nominal_bpp(self, level: int, height: int, width: int) -> float:
        return 1.0

    def encode_stages(self, level: int) -> list[Stage]:
        raise NotImplementedError

    def decode_stages(self) -> list[Stage]:
        def parse(data: bytes) -> Any:
            self.stages_run.append("parse")
            header, _ = read_container(data, self.method_id)
            return header

        def allocate(header: Any) -> torch.Tensor:  # what a real decoder does with the declared size
            self.stages_run.append("allocate")
            return torch.zeros(1, 3, 1, 1).expand(1, 3, header.height, header.width)

        return [Stage("parse", "parse", "decode", parse, True), Stage("allocate", "alloc", "decode", allocate)]

    def level_header(self, data: bytes) -> tuple[int, int, int]:
        header, _ = read_container(data, self.method_id)
        return header.level, header.width, header.height

    def fingerprint(self) -> int:
        return 1

    def freeze_fingerprint(self) -> int:
        return 1

    def prepare_for_inference(self, precision: str | None = "fp32", *, fast_encoder: bool = True, **kwargs: Any):
        return self

    def save_pretrained(self, out_dir: Any, **kwargs: Any) -> Path:
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, model_dir: Any, zoo_path: Any = None, device: Any = "cpu", overrides: Any = None):
        raise NotImplementedError


def declared_file(method_id: int, width: int, height: int, fingerprint: int = 1, payload_bits: int = 8) -> bytes:
    """A valid container header declaring ``width`` x ``height``, then a few zero payload bits."""
    writer = write_container(method_id, fingerprint, 0, width, height)
    writer.write(0, payload_bits)
    return writer.to_bytes()


def test_decode_limit_is_checked_from_the_header_before_any_decode_stage() -> None:
    from models.blocks.codec_method import DEFAULT_MAX_DECODE_PIXELS, DecodeLimitError

    assert DEFAULT_MAX_DECODE_PIXELS <= 100_000_000
    codec = RecordingCodec()
    assert codec.max_decode_pixels == DEFAULT_MAX_DECODE_PIXELS
    bomb = declared_file(codec.method_id, 16384, 16384)  # 268 M pixels in 13 bytes
    assert len(bomb) < 20
    with pytest.raises(DecodeLimitError) as info:
        codec.decompress(bomb)
    message = str(info.value)
    assert "16384x16384" in message and "268,435,456 pixels" in message and "max_decode_pixels" in message
    assert "\n" not in message and isinstance(info.value, UserError)
    assert codec.stages_run == []  # refused before any stage: nothing parsed, nothing allocated

    codec.set_decode_limit(300_000_000, "--max-pixels N")
    assert codec.decompress(bomb).shape == (1, 3, 16384, 16384)  # raised on purpose: decoded (as a view)
    assert codec.stages_run == ["parse", "allocate"]
    codec.set_decode_limit(1000, "--max-pixels N")
    with pytest.raises(DecodeLimitError, match=r"40x30 image \(1,200 pixels\).*limit of 1,000 pixels.*--max-pixels N"):
        codec.decompress(declared_file(codec.method_id, 40, 30))
    codec.set_decode_limit(None)
    assert codec.decompress(declared_file(codec.method_id, 40, 30)).shape[-2:] == (30, 40)
    with pytest.raises(CodecError, match="positive number of pixels"):
        codec.set_decode_limit(0)


def test_oscar_refuses_a_bomb_before_the_network_runs(tiny_export: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from models.blocks.codec_method import DecodeLimitError
    from models.oscar.bitstream import METHOD_ID
    from models.oscar.model import OSCARModel

    model = OSCARModel.from_pretrained(tiny_export)
    monkeypatch.setattr(model, "decode_stages", lambda: pytest.fail("a decode stage was built for a refused file"))
    with pytest.raises(DecodeLimitError, match=r"12000x9000 image \(108,000,000 pixels\)"):
        model.decompress(declared_file(METHOD_ID, 12000, 9000, fingerprint=model.fingerprint()))


def test_decompress_cli_has_a_pixel_limit_flag(
    tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from models.oscar.bitstream import METHOD_ID

    coded = tmp_path / "coded"
    coded.mkdir()
    (coded / "bomb.oscar").write_bytes(declared_file(METHOD_ID, 12000, 9000))
    assert decompress_cli.main(["--model", str(tiny_export), str(coded), "-o", str(tmp_path / "out"), *CPU]) == 1
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "bomb.oscar" in x)
    assert line.startswith("error: ") and "12000x9000" in line and "108,000,000 pixels" in line
    assert "--max-pixels" in line and "100,000,000" in line
    assert not (tmp_path / "out" / "bomb.png").exists()

    # Raised above the declared size, the file goes on to the decoder (and fails there: its payload is empty).
    argv = ["--model", str(tiny_export), str(coded), "-o", str(tmp_path / "out"), *CPU, "--max-pixels", "200000000"]
    assert decompress_cli.main(argv) == 1
    assert "--max-pixels" not in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        decompress_cli.main(["--model", str(tiny_export), str(coded), "-o", str(tmp_path / "out"), "--max-pixels", "0"])
    assert exc.value.code == 2


def test_test_py_has_a_decode_limit_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.test_registry import BlockMeanCodec  # registered by that module

    options = load_options(EvalOptions, ROOT / "options" / "test.json")
    assert options.max_decode_pixels == 100_000_000
    export = BlockMeanCodec().save_pretrained(tmp_path / "export")
    images = tmp_path / "images"
    smooth_images(images, 1, h=70, w=90)
    argv = [
        "--set",
        f"model_dir={export}",
        "--set",
        f"datasets={json.dumps([str(images)])}",
        "--set",
        f"output_root={tmp_path}",
        "--set",
        "name=eval",
        "--set",
        'metrics=["psnr"]',
        "--set",
        "runtime.device=cpu",
        "--set",
        "bd_anchor=null",
    ]
    with pytest.raises(SystemExit) as exc:
        test_entry.main([*argv, "--set", "max_decode_pixels=1000"])
    assert exc.value.code == 2
    err = capsys.readouterr().err  # the progress bar, then the error
    assert err.count("error: ") == 1
    err = err[err.index("error: ") :].strip()
    assert (
        "\n" not in err
        and "img0.png" in err
        and "90x70 image (6,300 pixels)" in err
        and "--set max_decode_pixels=N" in err
    )
    assert test_entry.main([*argv, "--set", "max_decode_pixels=6300"])["levels"]


# ============================================================================================ option validation


STAGE1 = ['data.train_roots=["a"]']
STAGE2 = ['data.train_roots=["a"]', f"hyper_encoder_checkpoints={json.dumps([f'h{i}' for i in range(8)])}"]
DEEP = "[" * 30_000 + "]" * 30_000


@pytest.mark.parametrize(
    "schema,assignment,expected",
    [
        (
            Stage1Options,
            "optimizer.learning_rate=Infinity",
            "optimizer.learning_rate: expected a finite number, got Infinity",
        ),
        (Stage1Options, "optimizer.learning_rate=NaN", "optimizer.learning_rate: expected a finite number, got NaN"),
        (
            Stage1Options,
            "optimizer.learning_rate=1e999",
            "optimizer.learning_rate: expected a finite number, got Infinity",
        ),
        (Stage1Options, "optimizer.max_grad_norm=-Infinity", "optimizer.max_grad_norm: expected a finite number"),
        (Stage1Options, "optimizer.betas=[NaN, 0.9]", "optimizer.betas[0]: expected a finite number, got NaN"),
        (Stage2Options, "loss.l1=NaN", "loss.l1: expected a finite number, got NaN"),
        (Stage2Options, "loss.gan=Infinity", "loss.gan: expected a finite number, got Infinity"),
        (Stage1Options, "optimizer.learning_rate=" + "9" * 400, "optimizer.learning_rate: expected a finite number"),
        (Stage1Options, "runtime.seed=99999999999999999999999999", "runtime.seed: expected a value <= 4294967295"),
        (Stage1Options, "runtime.seed=4294967296", "runtime.seed: expected a value <= 4294967295, got 4294967296"),
        (
            Stage1Options,
            "train.max_steps=99999999999999999999999",
            "train.max_steps: expected an integer that fits 64 bits",
        ),
        (
            Stage1Options,
            "optimizer.learning_rate=" + "9" * 5000,
            "optimizer.learning_rate: invalid value: an integer of more",
        ),
        (Stage1Options, "data.train_roots=" + DEEP, "data.train_roots: invalid value: nested more than 32 levels deep"),
        (Stage1Options, "data.train_roots=" + "[" * 40 + "]" * 40, "nested more than 32 levels deep (at [0][0]"),
        (Stage1Options, "a." * 40 + "b=1", "key path nested more than 32 levels deep"),
    ],
)
def test_bad_numbers_and_nesting_are_one_line_option_errors(schema: type, assignment: str, expected: str) -> None:
    base = STAGE2 if schema is Stage2Options else STAGE1
    with pytest.raises(OptionsError) as info:
        load_options(schema, None, [*base, assignment])
    message = str(info.value)
    assert expected in message and "\n" not in message and len(message) < 400


def test_option_files_nested_too_deep_are_refused(tmp_path: Path) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text('{"data": {"train_roots": ' + DEEP + "}}")
    with pytest.raises(OptionsError, match=rf"^{deep}: nested more than 32 levels deep$"):
        load_options(Stage1Options, deep)
    nested = tmp_path / "nested.json"
    nested.write_text('{"data": {"x": ' + '{"a": ' * 40 + "1" + "}" * 40 + "}}")
    with pytest.raises(OptionsError, match=r"nested more than 32 levels deep \(at data\.x\.a\.a"):
        load_options(Stage1Options, nested)
    nan = tmp_path / "nan.json"
    nan.write_text('{"data": {"train_roots": ["a"]}, "optimizer": {"weight_decay": NaN}}')
    with pytest.raises(OptionsError, match=rf"^{nan}: optimizer.weight_decay: expected a finite number, got NaN$"):
        load_options(Stage1Options, nan)
    # The largest seed numpy takes is fine, and so is a number written in a file as 1e-4.
    assert load_options(Stage1Options, None, [*STAGE1, "runtime.seed=4294967295"]).runtime.seed == 2**32 - 1


def test_a_field_may_allow_non_finite_numbers() -> None:
    from dataclasses import dataclass

    from utils.options import build_options, option

    @dataclass
    class Schema:
        limit: float = option(math.inf, finite=False)
        scale: float = option(1.0)

    assert build_options(Schema, {"limit": float("-inf")}).limit == -math.inf
    with pytest.raises(OptionsError, match="scale: expected a finite number"):
        build_options(Schema, {"scale": float("inf")})


@pytest.mark.parametrize(
    "entry", [train_hyper_enc, train_diff, test_entry], ids=["train_hyper_enc", "train_diff", "test"]
)
@pytest.mark.parametrize(
    "assignment", ["runtime.seed=99999999999999999999999999", "runtime.seed=" + DEEP], ids=["seed", "deep"]
)
def test_entry_points_report_bad_options_in_one_line(
    entry: Any, assignment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    deep_file = tmp_path / "deep.json"
    deep_file.write_text('{"runtime": ' + DEEP + "}")
    for argv in (["--set", assignment], ["--opt", str(deep_file)]):
        with pytest.raises(SystemExit) as exc:
            entry.main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err


# ============================================================================================ resume past damage


class Evil:
    """A pickle that would run code when loaded without ``weights_only``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def toy_run(run_dir: Path, resume: str | None, max_steps: int = 6) -> dict[str, torch.Tensor]:
    """A linear model trained by the shared loop, checkpointed every 2 steps; ``resume`` as on the command line."""
    from utils.data import make_dataloader
    from utils.option_sections import OptimizerOptions, TrainLoopOptions
    from utils.training import (
        CheckpointManager,
        ResumableBatches,
        RunDir,
        TrainState,
        build_lr_scheduler,
        build_optimizer,
        make_accelerator,
        optimizer_step,
        register_checkpoint_modules,
        resolve_resume,
        run_training_loop,
    )

    run = RunDir(run_dir)
    resume_from = resolve_resume(run, resume)
    train = TrainLoopOptions(
        max_steps=max_steps, checkpoint_every=2, checkpoints_total_limit=3, log_every=2, log_with="none"
    )
    accelerator = make_accelerator(train, run_dir, seed=0, device="cpu")
    model = nn.Linear(8, 8)
    optimizer = build_optimizer(model.parameters(), OptimizerOptions(learning_rate=1e-2))
    scheduler = build_lr_scheduler(optimizer, OptimizerOptions(lr_scheduler="cosine", lr_warmup_steps=2), max_steps)
    raw = make_dataloader(_Numbers(10), batch_size=3, num_workers=0, seed=0)
    model_p, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, raw, scheduler)
    register_checkpoint_modules(accelerator, {"toy": model})
    manager = CheckpointManager(accelerator, run.checkpoints, train.checkpoints_total_limit)
    state = manager.load(resume_from) if resume_from else TrainState()

    def step_fn(x: torch.Tensor, state: TrainState) -> dict[str, torch.Tensor]:
        loss = (model_p(x) - x + 0.1 * torch.randn(x.shape)).pow(2).mean()  # global RNG: must be restored exactly
        accelerator.backward(loss)
        optimizer_step(accelerator, optimizer, scheduler, model.parameters(), max_grad_norm=1.0)
        return {"loss": loss.detach()}

    run_training_loop(
        accelerator,
        batches=ResumableBatches(loader, state, 3),
        models=[model_p],
        step_fn=step_fn,
        train=train,
        checkpoints=manager,
    )
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """An uninterrupted toy run of 6 steps (checkpoints 2, 4, 6) and its final weights."""
    run_dir = tmp_path_factory.mktemp("toy") / "run"
    return run_dir, toy_run(run_dir, None)


def copy_run(finished_run: tuple[Path, Any], tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run[0], run_dir)
    return run_dir


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def rewrite_manifest(checkpoint: Path, drop: bool = False) -> None:
    """What a forger (or a checkpoint written before the manifest existed) leaves: a matching or no file list."""
    from utils.training.checkpoints import file_manifest

    state_file = checkpoint / "training_state.json"
    state = json.loads(state_file.read_text())
    if drop:
        state.pop("files", None)
    else:
        state["files"] = file_manifest(checkpoint)
    state_file.write_text(json.dumps(state))


def damage_cases(marker: Path) -> dict[str, Any]:
    def evil_pickle(name: str, drop: bool) -> Any:
        def damage(ck: Path) -> None:
            torch.save({"state": Evil(marker)}, ck / name)
            rewrite_manifest(ck, drop=drop)

        return damage

    def not_random_states(ck: Path) -> None:
        torch.save({"x": torch.zeros(2)}, ck / "random_states_0.pkl")
        rewrite_manifest(ck)

    return {
        "truncated optimizer.bin": (lambda ck: truncate(ck / "optimizer.bin"), "optimizer.bin has"),
        "truncated safetensors": (lambda ck: truncate(ck / "toy" / "model.safetensors"), "toy/model.safetensors has"),
        "truncated optimizer.bin, old checkpoint": (
            lambda ck: (truncate(ck / "optimizer.bin"), rewrite_manifest(ck, drop=True)),
            "optimizer.bin: damaged or not a torch file (PytorchStreamReader failed reading zip archive",
        ),
        "truncated safetensors, old checkpoint": (
            lambda ck: (truncate(ck / "toy" / "model.safetensors"), rewrite_manifest(ck, drop=True)),
            "toy/model.safetensors: damaged (",
        ),
        "flipped byte": (
            lambda ck: (ck / "scheduler.bin").write_bytes(
                bytes([(ck / "scheduler.bin").read_bytes()[0] ^ 1]) + (ck / "scheduler.bin").read_bytes()[1:]
            ),
            "scheduler.bin differs from the saved file (SHA-256 mismatch)",
        ),
        "malicious optimizer.bin": (evil_pickle("optimizer.bin", drop=False), "optimizer.bin: refused: holds more"),
        "malicious random states": (evil_pickle("random_states_0.pkl", drop=True), "random_states_0.pkl: refused"),
        "not random states": (not_random_states, "random_states_0.pkl: not random states"),
        "training state": (
            lambda ck: (ck / "training_state.json").write_text(DEEP),
            "training_state.json: not a valid",
        ),
    }


CASES = list(damage_cases(Path("unused")))


@pytest.mark.parametrize("case", CASES)
def test_resume_latest_skips_a_damaged_checkpoint_and_says_why(
    case: str, finished_run: tuple[Path, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from utils.training import CheckpointManager, RunDir, TrainingError, make_accelerator, resolve_resume
    from utils.option_sections import TrainLoopOptions

    marker = tmp_path / "code-ran"
    damage, expected = damage_cases(marker)[case]
    run = RunDir(copy_run(finished_run, tmp_path))
    damage(run.checkpoint(6))
    with caplog.at_level(logging.WARNING):
        assert resolve_resume(run, "latest") == run.checkpoint(4)
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skipped) == 1 and "checkpoint-6" in skipped[0] and expected in skipped[0], skipped

    # Named explicitly, or loaded directly, the damaged checkpoint is one line; no code in it ever runs.
    with pytest.raises(TrainingError) as info:
        resolve_resume(run, str(run.checkpoint(6)))
    assert expected in str(info.value) and "\n" not in str(info.value)
    accelerator = make_accelerator(TrainLoopOptions(log_with="none"), tmp_path / "other", seed=0, device="cpu")
    with pytest.raises(TrainingError) as info:
        CheckpointManager(accelerator, run.checkpoints, 3).load(run.checkpoint(6))
    assert expected in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


def test_resuming_from_the_fallback_ends_like_an_uninterrupted_run(
    finished_run: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    run_dir = copy_run(finished_run, tmp_path)
    truncate(run_dir / "checkpoints" / "checkpoint-6" / "optimizer.bin")
    resumed = toy_run(run_dir, "latest")
    assert all(torch.equal(resumed[k], finished_run[1][k]) for k in resumed)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
    ]


def test_no_loadable_checkpoint_is_one_line(finished_run: tuple[Path, Any], tmp_path: Path) -> None:
    from utils.training import RunDir, TrainingError, resolve_resume

    run = RunDir(copy_run(finished_run, tmp_path))
    for step in (2, 4, 6):
        truncate(run.checkpoint(step) / "optimizer.bin")
    with pytest.raises(TrainingError) as info:
        resolve_resume(run, "latest")
    message = str(info.value)
    assert "\n" not in message and "no checkpoint" in message
    assert all(f"checkpoint-{s}: optimizer.bin has" in message for s in (2, 4, 6))


def test_random_states_are_restored_or_refused(finished_run: tuple[Path, Any], tmp_path: Path) -> None:
    """accelerate passes over random states it cannot apply; the checkpoint manager does not."""
    from utils.option_sections import TrainLoopOptions
    from utils.training import CheckpointManager, RunDir, TrainingError, make_accelerator
    from utils.training.checkpoints import load_pickle

    run = RunDir(copy_run(finished_run, tmp_path))
    states = load_pickle(run.checkpoint(6) / "random_states_0.pkl")  # weights-only, as the manager reads it
    states["torch_manual_seed"] = torch.zeros(3, dtype=torch.uint8)  # loads as plain data, cannot be applied
    torch.save(states, run.checkpoint(6) / "random_states_0.pkl")
    rewrite_manifest(run.checkpoint(6))
    accelerator = make_accelerator(TrainLoopOptions(log_with="none"), tmp_path / "other", seed=0, device="cpu")
    with pytest.raises(TrainingError, match=r"random_states_0.pkl: not valid random states") as info:
        CheckpointManager(accelerator, run.checkpoints, 3).load(run.checkpoint(6))
    assert "\n" not in str(info.value)


def test_stage1_cli_resumes_from_the_last_good_checkpoint(
    tiny_zoo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    from utils.data import write_synthetic_images

    write_synthetic_images(tmp_path / "train", count=4, size=(72, 72), seed=0)
    sets = [
        f"model_zoo.path={tiny_zoo}",
        f"data.train_roots={json.dumps([str(tmp_path / 'train')])}",
        "data.val_root=null",
        "data.patch_size=64",
        "data.batch_size=2",
        "data.num_workers=0",
        "hyper_encoder.channels=16",
        "hyper_encoder.hyper_dim=32",
        "hyper_encoder.codebook_dim=8",
        "train.log_with=none",
        f"output_root={tmp_path}",
        "name=r",
        "train.max_steps=3",
        "train.checkpoint_every=1",
    ]
    argv = ["--opt", str(ROOT / "options" / "oscar" / "train_hyper_enc.json")]
    for assignment in sets:
        argv += ["--set", assignment]
    train_hyper_enc.main([*argv, "--stop-at", "2"])
    checkpoint = tmp_path / "r" / "checkpoints" / "checkpoint-2"
    truncate(checkpoint / "optimizer.bin")
    with caplog.at_level(logging.INFO):
        train_hyper_enc.main([*argv, "--resume", "latest"])
    messages = [r.getMessage() for r in caplog.records]
    assert any("skipping" in m and "checkpoint-2" in m and "optimizer.bin has" in m for m in messages), messages
    assert any("resuming from" in m and "checkpoint-1" in m for m in messages), messages
    assert (tmp_path / "r" / "final").is_dir()


# ============================================================================================ export zoo location


@pytest.fixture(scope="module")
def relative_export(tiny_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An export written, like the demo's, from a working directory with a relative zoo path (``runs/zoo``)."""
    project = tmp_path_factory.mktemp("project")
    shutil.copytree(tiny_zoo, project / "runs" / "zoo")
    cwd = os.getcwd()
    os.chdir(project)
    try:
        model = make_model(Path("runs/zoo"))
        model.save_pretrained("runs/export", zoo_path="runs/zoo")
    finally:
        os.chdir(cwd)
    return project


def test_export_stores_the_zoo_absolute_and_relative_to_itself(relative_export: Path) -> None:
    config = json.loads((relative_export / "runs" / "export" / "codec_config.json").read_text())
    assert config["model_zoo"] == str((relative_export / "runs" / "zoo").resolve())
    assert config["model_zoo_relative"] == "../zoo"


def test_file_clis_work_from_another_folder(
    relative_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    smooth_images(elsewhere / "images", 1)
    monkeypatch.chdir(elsewhere)
    export = relative_export / "runs" / "export"
    assert compress_cli.main(["--model", str(export), "images", "-o", "coded", "--level", "0", *CPU]) == 0
    assert decompress_cli.main(["--model", str(export), "coded", "-o", "decoded", *CPU]) == 0
    assert (elsewhere / "decoded" / "img0.png").is_file()
    summary = test_entry.main(
        [
            "--set",
            f"model_dir={export}",
            "--set",
            'datasets=["images"]',
            "--set",
            "output_root=runs",
            "--set",
            "name=eval",
            "--set",
            'metrics=["psnr"]',
            "--set",
            "levels=[0]",
            "--set",
            "runtime.device=cpu",
            "--set",
            "bd_anchor=null",
        ]
    )
    assert summary["levels"]


def test_moved_and_older_exports_find_their_zoo(
    relative_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from models.oscar.model import OSCARModel
    from utils.errors import ModelZooError

    moved = tmp_path / "moved"
    shutil.copytree(relative_export / "runs", moved / "runs")
    monkeypatch.chdir(tmp_path)
    export = moved / "runs" / "export"
    config_file = export / "codec_config.json"
    config = json.loads(config_file.read_text())
    config["model_zoo"] = "/nonexistent/zoo"  # the old absolute location is gone; the relative one still holds
    config_file.write_text(json.dumps(config))
    assert OSCARModel.from_pretrained(export).zoo_path.resolve() == (moved / "runs" / "zoo").resolve()

    # An export written before the relative location existed: "runs/zoo" relative to where it was exported.
    config.pop("model_zoo_relative")
    config["model_zoo"] = "runs/zoo"
    config_file.write_text(json.dumps(config))
    assert OSCARModel.from_pretrained(export).zoo_path.resolve() == (moved / "runs" / "zoo").resolve()

    shutil.rmtree(moved / "runs" / "zoo")
    with pytest.raises(ModelZooError) as info:
        OSCARModel.from_pretrained(export)
    assert str(config_file) in str(info.value) and "--zoo" in str(info.value) and "\n" not in str(info.value)


# ============================================================================ complete exports, contained outputs
#
# Two more items of the hardening issue: an export is complete or refused (every file its config lists must be
# there and readable; no silent fall-back to uniform priors), and outputs never land outside the output folder
# (no writing through a symlinked folder; an ``-o`` that is a file fails once, before the model loads).


def copy_export(tiny_export: Path, tmp_path: Path) -> Path:
    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    return export


def test_export_lists_every_file_it_wrote(tiny_export: Path) -> None:
    files = json.loads((tiny_export / "codec_config.json").read_text())["files"]
    assert {"unet_lora.safetensors", "prompt_embedding.safetensors", "index_priors.safetensors"} <= set(files)
    assert "hyper_encoders/level_0/config.json" in files
    assert "hyper_encoders/level_0/diffusion_pytorch_model.safetensors" in files
    written = {p.relative_to(tiny_export).as_posix() for p in tiny_export.rglob("*") if p.is_file()}
    assert set(files) == written - {"codec_config.json"}


def test_an_export_without_its_index_priors_is_refused(
    tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from models.blocks.codec_method import ModelLoadError
    from models.oscar.model import OSCARModel

    export = copy_export(tiny_export, tmp_path)
    (export / "index_priors.safetensors").unlink()
    with pytest.raises(ModelLoadError) as info:
        OSCARModel.from_pretrained(export)
    assert str(info.value) == f"{export}: index_priors.safetensors missing (listed in codec_config.json)"

    smooth_images(tmp_path / "images", 1)
    with pytest.raises(SystemExit) as code:
        compress_cli.main(["--model", str(export), str(tmp_path / "images"), "-o", str(tmp_path / "coded"), *CPU])
    assert code.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {export}: index_priors.safetensors missing (listed in codec_config.json)" in err
    assert "model zoo" not in err and not (tmp_path / "coded").exists()


def test_every_problem_of_an_export_is_one_line_naming_the_file(tiny_export: Path, tmp_path: Path) -> None:
    from models.blocks.codec_method import ModelLoadError
    from models.oscar.model import OSCARModel

    export = copy_export(tiny_export, tmp_path)
    shutil.rmtree(export / "hyper_encoders" / "level_3")
    unet = export / "unet_lora.safetensors"
    unet.write_bytes(unet.read_bytes()[:-100])  # truncated
    (export / "hyper_encoders" / "level_1" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError) as info:
        OSCARModel.from_pretrained(export)
    lines = str(info.value).splitlines()
    assert len(lines) == 3, lines
    assert f"{export}: hyper_encoders/level_1/config.json cannot be loaded: invalid JSON (" in lines[0]
    assert lines[1] == f"{export}: hyper_encoders/level_3 missing (listed in codec_config.json)"
    assert lines[2].startswith(f"{export}: unet_lora.safetensors cannot be loaded: not a valid safetensors file (")
    assert "huggingface" not in str(info.value)


def test_older_exports_without_a_file_list_must_have_their_priors(tiny_export: Path, tmp_path: Path) -> None:
    from models.blocks.codec_method import ModelLoadError
    from models.oscar.model import OSCARModel

    export = copy_export(tiny_export, tmp_path)
    config_file = export / "codec_config.json"
    config = json.loads(config_file.read_text())
    config.pop("files")  # as written before the list existed
    config_file.write_text(json.dumps(config))
    expected = [c.clone() for c in OSCARModel.from_pretrained(tiny_export).index_counts]
    loaded = OSCARModel.from_pretrained(export)
    assert all(torch.equal(a, b) for a, b in zip(loaded.index_counts, expected))
    (export / "index_priors.safetensors").unlink()
    with pytest.raises(ModelLoadError) as info:
        OSCARModel.from_pretrained(export)
    expected = f"{export}: index_priors.safetensors missing (every export without a 'files' list has it)"
    assert str(info.value) == expected


def test_only_an_export_that_lists_no_priors_codes_with_uniform_ones(tiny_export: Path, tmp_path: Path) -> None:
    from models.oscar.model import OSCARModel

    export = copy_export(tiny_export, tmp_path)
    config_file = export / "codec_config.json"
    config = json.loads(config_file.read_text())
    config["files"].remove("index_priors.safetensors")
    config_file.write_text(json.dumps(config))
    (export / "index_priors.safetensors").unlink()
    model = OSCARModel.from_pretrained(export)  # (the tiny export's priors are uniform: same fingerprint)
    assert all(not c.any() for c in model.index_counts)


def test_the_fingerprint_warning_says_what_can_differ(tiny_export: Path, tmp_path: Path) -> None:
    from models.oscar.model import OSCARModel

    export = copy_export(tiny_export, tmp_path)
    config_file = export / "codec_config.json"
    config = json.loads(config_file.read_text())
    config["fingerprint"] = "0123456789abcdef"
    config_file.write_text(json.dumps(config))
    with pytest.warns(UserWarning) as record:
        OSCARModel.from_pretrained(export)
    text = " ".join(str(w.message) for w in record)
    assert "another model zoo" not in text
    assert "SD zoo's weight files" in text and "index priors" in text and "model options" in text


def test_outputs_are_never_written_through_a_symlinked_folder(
    tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    smooth_images(tmp_path / "images", 1)
    smooth_images(tmp_path / "images" / "sub", 1)
    outside = tmp_path / "outside"
    outside.mkdir()
    coded = tmp_path / "coded"
    coded.mkdir()
    (coded / "sub").symlink_to(outside, target_is_directory=True)
    images = str(tmp_path / "images")
    assert compress_cli.main(["--model", str(tiny_export), "-r", images, "-o", str(coded), "--level", "0", *CPU]) == 1
    assert list(outside.iterdir()) == []
    assert (coded / "img0.oscar").is_file()
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors[0] == (
        f"error: {tmp_path / 'images' / 'sub' / 'img0.png'}: {coded / 'sub'}: refused: a symbolic link; outputs are "
        f"written only inside {coded}, never through linked folders"
    )
    assert len(errors) == 2 and errors[1] == "error: 1 of 2 image(s) failed"

    # decompress.py: the same for PNGs
    (tmp_path / "files" / "sub").mkdir(parents=True)
    shutil.copy(coded / "img0.oscar", tmp_path / "files" / "img0.oscar")
    shutil.copy(coded / "img0.oscar", tmp_path / "files" / "sub" / "img0.oscar")
    decoded = tmp_path / "decoded"
    decoded.mkdir()
    (decoded / "sub").symlink_to(outside, target_is_directory=True)
    files = str(tmp_path / "files")
    assert decompress_cli.main(["--model", str(tiny_export), "-r", files, "-o", str(decoded), *CPU]) == 1
    assert list(outside.iterdir()) == [] and (decoded / "img0.png").is_file()
    assert f"{decoded / 'sub'}: refused: a symbolic link" in capsys.readouterr().err


def test_atomic_writes_with_a_root_refuse_dot_dot_and_linked_folders(tmp_path: Path) -> None:
    from utils.atomic import OutputPathError, write_atomic

    root = tmp_path / "out"
    assert write_atomic(root / "a" / "b.bin", b"x", root=root).read_bytes() == b"x"
    with pytest.raises(OutputPathError, match=r"leaves the output folder"):
        write_atomic(root / "a" / ".." / ".." / "escaped.bin", b"x", root=root)
    (tmp_path / "elsewhere").mkdir()
    (root / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OutputPathError, match=r"a symbolic link"):
        write_atomic(root / "link" / "deep" / "c.bin", b"x", root=root)
    assert not (tmp_path / "escaped.bin").exists() and list((tmp_path / "elsewhere").iterdir()) == []


@pytest.mark.parametrize("cli", [compress_cli, decompress_cli])
def test_an_output_folder_that_is_a_file_fails_once_before_the_model_loads(
    cli: Any, tiny_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    smooth_images(tmp_path / "images", 2)
    for i in range(2):  # decompress.py's inputs (the header is never read: the model must not load)
        (tmp_path / "images" / f"img{i}.oscar").write_bytes(b"x")
    target = tmp_path / "out.txt"
    target.write_text("keep me")

    def no_model(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli, "codec_from_args", no_model)
    with pytest.raises(SystemExit) as code:
        cli.main(["--model", str(tiny_export), str(tmp_path / "images"), "-o", str(target), *CPU])
    assert code.value.code == 2
    assert capsys.readouterr().err == f"error: -o {target}: exists and is not a folder; give a folder for the outputs\n"
    assert target.read_text() == "keep me"


def test_test_py_refuses_an_output_root_that_is_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "runs"
    target.write_text("keep me")

    def no_metrics(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("metrics were set up")

    monkeypatch.setattr(test_entry, "MetricSuite", no_metrics)
    with pytest.raises(SystemExit) as code:
        test_entry.main(["--set", f"output_root={target}", "--set", "runtime.device=cpu", "--set", 'metrics=["psnr"]'])
    assert code.value.code == 2
    expected = f"error: output_root {target}: exists and is not a folder; give a folder for the outputs\n"
    assert capsys.readouterr().err == expected


@pytest.mark.parametrize("entry", [train_hyper_enc, train_diff, test_entry], ids=["stage1", "stage2", "test"])
def test_default_option_files_are_found_from_another_folder(entry, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    opt = Path(entry.parse_args([]).opt)
    assert opt.is_absolute() and opt.is_file()
