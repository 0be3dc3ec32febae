"""Option files: comments, validation with one-line errors, overrides, round trip of resolved options."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from utils.errors import OptionsError
from models.oscar.options import Stage1Options, Stage2Options
from utils.evaluation.options import EvalOptions
from utils.options import load_options, save_options, strip_json_comments

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = [
    ("options/oscar/train_hyper_enc.json", Stage1Options),
    ("options/oscar/train_diff.json", Stage2Options),
    ("options/oscar/train_hyper_enc_reference.json", Stage1Options),
    ("options/oscar/train_diff_reference.json", Stage2Options),
    ("options/test.json", EvalOptions),
]


def test_strip_comments_keeps_strings_and_lines():
    text = '{"url": "http://x//y", // comment\n /* block\n */ "a": "/* not */"}'
    stripped = strip_json_comments(text)
    assert json.loads(stripped) == {"url": "http://x//y", "a": "/* not */"}
    assert stripped.count("\n") == text.count("\n")


@pytest.mark.parametrize("path,schema", SHIPPED)
def test_shipped_option_files_load_and_round_trip(path, schema, tmp_path):
    options = load_options(schema, ROOT / path)
    saved = save_options(options, tmp_path / "resolved.json")
    assert load_options(schema, saved) == options


def test_reference_defaults():
    options = load_options(Stage2Options, ROOT / "options/oscar/train_diff.json")
    assert options.model.timesteps == [500, 400, 310, 280, 210, 190, 170, 150]
    assert options.model.lora_rank == 16 and options.model.lora_alpha == 8.0
    assert options.optimizer.learning_rate == 5e-5 and options.data.batch_size == 8
    stage1 = load_options(Stage1Options, ROOT / "options/oscar/train_hyper_enc.json")
    assert stage1.data.batch_size == 64 and stage1.train.max_steps == 10_000


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "opt.json"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text,expected",
    [
        ('{"data": {"train_roots": ["a"]}, "lr": 1}', "lr: unknown key in the top level"),
        ('{"data": {"train_roots": ["a"], "batch_size": "8"}}', "data.batch_size: expected an integer, got \"8\""),
        ('{"data": {"train_roots": ["a"], "batch_size": 0}}', "data.batch_size: expected a value >= 1, got 0"),
        ('{"data": {"train_roots": ["a"]}, "bpp": 0.2}', "bpp: expected one of"),
        ('{"data": {"batch_size": 4}}', "data.train_roots: required key is missing"),
        ('{"data": {"train_roots": "a"}}', "data.train_roots: expected list of string"),
        ('{"data": {"train_roots": ["a"]}, "train": {"gradient_checkpointing": 1}}', "expected true or false"),
        ('{"data": {"train_roots": ["a"]}, "optimizer": {"betas": [0.9]}}', "optimizer.betas: expected two numbers"),
        ('{"data": {"train_roots": ["a"]} // fine\n,}', "invalid JSON at line 2"),
    ],
)
def test_bad_files_name_file_key_and_expectation(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(OptionsError) as info:
        load_options(Stage1Options, path)
    message = str(info.value)
    assert message.startswith(str(path)) and expected in message and "\n" not in message


def test_overrides(tmp_path):
    path = write(tmp_path, '{"data": {"train_roots": ["a"]}}')
    options = load_options(Stage1Options, path, ["train.max_steps=5", "data.train_roots=[\"x\", \"y\"]", "name=run 1"])
    assert options.train.max_steps == 5 and options.data.train_roots == ["x", "y"] and options.name == "run 1"
    with pytest.raises(OptionsError, match=r"\(with --set\): train.max_step: unknown key"):
        load_options(Stage1Options, path, ["train.max_step=5"])
    with pytest.raises(OptionsError, match="expected KEY.PATH=VALUE"):
        load_options(Stage1Options, path, ["train.max_steps"])
    with pytest.raises(OptionsError, match=r"\(with --set\): name: expected a string"):
        load_options(Stage1Options, path, ["name.x=1"])
    with pytest.raises(OptionsError, match="data.batch_size is a value, not a section"):
        load_options(Stage1Options, path, ["data.batch_size=2", "data.batch_size.x=1"])


def test_stage2_cross_checks(tmp_path):
    path = ROOT / "options/oscar/train_diff.json"
    with pytest.raises(OptionsError, match="model.timesteps: expected one timestep per level"):
        load_options(Stage2Options, path, ["model.timesteps=[1]"])
    with pytest.raises(OptionsError, match="hyper_encoder_checkpoints: expected one folder per level"):
        load_options(Stage2Options, path, ["hyper_encoder_checkpoints=[\"a\"]"])
    with pytest.raises(OptionsError, match=r"model.levels\[1\]: bpp 0.5: not a rate point"):
        load_options(Stage2Options, path, ["model.levels=[0.0019, 0.5]", "model.timesteps=[1, 2]"])


def test_missing_file():
    with pytest.raises(OptionsError, match="option file not found"):
        load_options(Stage1Options, "does/not/exist.json")
