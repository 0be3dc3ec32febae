#!/usr/bin/env bash
# One-command set-up: a virtual environment with the pinned packages of requirements.txt.
#
#   bash scripts/setup.sh            # creates ./.venv (git-ignored)
#   VENV=/path/to/env bash scripts/setup.sh   # any other location
#   PYTHON=python3.11 bash scripts/setup.sh   # another interpreter (3.10-3.12)
#
# Re-running is fast: nothing is installed when requirements.txt, pyproject.toml and the checkout's location have not changed since the last success.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$root/.venv}"
python="${PYTHON:-python3}"
stamp="$venv/.oscar-requirements.sha256"
want="$(cat "$root/requirements.txt" "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)"
want="$want:$root"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
    echo "set-up: $venv is up to date with requirements.txt"
    exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
    echo "set-up: creating virtual environment $venv"
    "$python" -m venv "$venv"
fi
# Some machines' pip configuration lists extra local indexes that lack most packages; pip warns once per package.
quiet_pip() { "$venv/bin/python" -m pip "$@" 2> >(grep -v -e "is ignored: it is neither a file nor a directory" >&2); }
quiet_pip install --quiet --upgrade pip
echo "set-up: installing pinned packages (first run takes a few minutes)"
quiet_pip install --quiet -r "$root/requirements.txt"
# This checkout itself, editable: `models` and `utils` then import from scripts/ and tests alike.
quiet_pip install --quiet --no-deps --no-build-isolation -e "$root" > /dev/null
# Fail here, not in the first experiment, if torch and torchvision do not match.
"$venv/bin/python" -c "import torch, torchvision, diffusers, peft, compressai, pyiqa, lpips; \
torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5); \
print(f'set-up: torch {torch.__version__}, torchvision {torchvision.__version__}, diffusers {diffusers.__version__}')" \
    2> >(grep -v -E 'Warning|warnings.warn|kernels' >&2)
echo "$want" > "$stamp"
echo "set-up: done. Activate with: source ${venv}/bin/activate"
