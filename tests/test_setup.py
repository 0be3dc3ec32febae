"""Set-up files agree with each other: the conda pins mirror requirements.txt, CI runs the README's commands."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pins(text: str) -> dict[str, str]:
    return dict(re.findall(r"^[\s-]*([A-Za-z0-9_.\-]+)==([^\s#]+)", text, flags=re.M))


def test_environment_yml_has_the_requirements_pins():
    required = pins((ROOT / "requirements.txt").read_text())
    conda = pins((ROOT / "environment.yml").read_text())
    assert required and conda == required


def test_torch_and_torchvision_are_a_matching_pair():
    required = pins((ROOT / "requirements.txt").read_text())
    torch_minor = int(required["torch"].split(".")[1])
    vision_minor = int(required["torchvision"].split(".")[1])
    assert vision_minor == torch_minor + 15, "torchvision 0.N pairs with torch 2.(N-15)"


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/setup.sh" in readme and "bash scripts/setup.sh" in ci
    assert "python -m pytest -q" in readme and "python -m pytest -q" in ci
