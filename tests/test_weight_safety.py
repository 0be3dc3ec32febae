"""Planted weight files cannot run code: a malicious pickle under each metric/loss network's file name is refused.

Each file of :mod:`utils.weights` is replaced by a torch.save pickle whose unpickling writes a marker file (a real
payload: :func:`test_the_payload_is_real` shows it runs under a plain ``torch.load``). The network is then built
the way the project builds it (``create_pyiqa_metric``, or ``MetricSuite`` for torchmetrics' FID Inception):

* as planted, the file fails the SHA-256 check before any library opens it (:class:`UnverifiedWeightsError`);
* registered as if it had passed that check (a forged hash prefix, or a stand-in), the library's own loading code
  reaches it, and the ``weights_only`` load refuses it (:class:`UnsafeWeightsError`).

In neither case does the marker appear. The other files a network needs are registered stand-ins (symlinked from
one folder written once for the module), so the build really reaches the planted file.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from tests.stand_in_weights import (
    registered_stand_in,
    torch_home,
    write_malicious_pickle,
    write_stand_in_weights,
)
from utils import weights
from utils.errors import UserError
from utils.weights import (
    UnsafeWeightsError,
    UnverifiedWeightsError,
    WeightFile,
    check_weights,
    create_pyiqa_metric,
    verified_loading,
)

STAND_IN_METRICS = ["lpips", "lpips-vgg", "dists", "clipiqa+"]


def build_metric_suite_fid() -> object:
    from utils.evaluation.metrics import MetricSuite

    return MetricSuite(["fid"], device="cpu")


def pyiqa(name: str) -> Callable[[], object]:
    return lambda: create_pyiqa_metric(name, device="cpu")


# Every registry file, with the project's way of building a network that loads it (the other files of that network
# are stand-ins, loaded first where the library loads several).
BUILDERS: dict[str, Callable[[], object]] = {
    weights.VGG16.name: pyiqa("dists"),
    weights.ALEXNET.name: pyiqa("lpips"),
    weights.LPIPS_ALEX.name: pyiqa("lpips"),
    weights.LPIPS_VGG.name: pyiqa("lpips-vgg"),
    weights.DISTS.name: pyiqa("dists"),
    weights.MUSIQ_KONIQ.name: pyiqa("musiq"),
    weights.CLIP_RN50.name: pyiqa("clipiqa"),
    weights.CLIPIQA_PLUS.name: pyiqa("clipiqa+"),
    weights.PYIQA_INCEPTION.name: pyiqa("fid"),
    weights.FIDELITY_INCEPTION.name: build_metric_suite_fid,
}
ENTRIES = {entry.name: entry for entry in weights.all_weight_files()}


def test_every_registry_file_is_covered() -> None:
    assert set(BUILDERS) == set(ENTRIES)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Registered stand-ins of the files that have writers, written once."""
    home = tmp_path_factory.mktemp("stand_ins")
    with torch_home(home):
        write_stand_in_weights(home, STAND_IN_METRICS)
    return home


@pytest.fixture
def home(tmp_path: Path, stand_ins: Path) -> Iterator[Path]:
    """A TORCH_HOME whose files are links to the stand-ins (tests plant their file in place of one link)."""
    root = tmp_path / "home"
    for source in (stand_ins / "hub").rglob("*"):
        if source.is_file():
            target = root / source.relative_to(stand_ins)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(source)
    with torch_home(root):
        yield root


def plant(entry: WeightFile, home: Path, marker: Path, legacy: bool = False) -> Path:
    path = home / "hub" / entry.folder / entry.name
    path.unlink(missing_ok=True)
    write_malicious_pickle(path, marker, legacy=legacy)
    return path


def test_the_payload_is_real(tmp_path: Path) -> None:
    """What the planted files do when a library unpickles them without protection."""
    for legacy in (False, True):
        marker = tmp_path / f"ran-{legacy}"
        write_malicious_pickle(tmp_path / "evil.pth", marker, legacy=legacy)
        torch.load(tmp_path / "evil.pth", weights_only=False)  # deliberately unsafe: the control that proves the attack
        assert marker.read_text() == "payload ran"


@pytest.mark.parametrize("name", list(BUILDERS))
def test_planted_pickle_fails_the_hash_check(name: str, home: Path, tmp_path: Path) -> None:
    entry = ENTRIES[name]
    marker = tmp_path / "ran"
    path = plant(entry, home, marker)
    with pytest.raises(UnverifiedWeightsError) as err:
        BUILDERS[name]()
    message = str(err.value)
    assert isinstance(err.value, UserError) and "\n" not in message
    assert str(path) in message and entry.expected_sha256 in message and entry.url in message
    assert not marker.exists()


@pytest.mark.parametrize("name", list(BUILDERS))
def test_planted_pickle_that_passes_the_hash_check_is_not_unpickled(name: str, home: Path, tmp_path: Path) -> None:
    """Registered as if its hash matched: the library's own loader gets to it, and the weights-only load refuses it."""
    entry = ENTRIES[name]
    marker = tmp_path / "ran"
    path = plant(entry, home, marker, legacy=entry is weights.VGG16)  # torchvision's real files are legacy-format
    with registered_stand_in(path), pytest.raises(UnsafeWeightsError) as err:
        BUILDERS[name]()
    message = str(err.value)
    assert "\n" not in message and str(path) in message and entry.url in message
    assert not marker.exists()


# pyiqa 0.1.16's CLIP loader falls back to torch.load on the handle torch.jit.load has already read to its end, so an
# unguarded pickle at RN50.pt fails with EOFError before it is unpickled; RN50 is guarded anyway (full SHA-256).
@pytest.mark.parametrize("name", [name for name in BUILDERS if name != weights.CLIP_RN50.name])
def test_without_the_guard_the_library_would_run_the_payload(
    name: str, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control for the test above: with the load guards switched off, the same build runs the payload, so the
    planted file really is what the library unpickles (the issue's attack), and the guard is what stops it."""
    entry = ENTRIES[name]
    marker = tmp_path / "ran"
    path = plant(entry, home, marker, legacy=entry is weights.VGG16)
    monkeypatch.setattr(weights, "_guarded_torch_load", lambda real: real)
    monkeypatch.setattr(weights, "_guarded_jit_load", lambda real: real)
    with registered_stand_in(path):
        try:
            BUILDERS[name]()
        except Exception:  # noqa: BLE001 - most libraries then fail on the state dict; what matters is the marker
            pass
    assert marker.read_text() == "payload ran"


def test_a_file_swapped_after_the_check_is_refused_at_load(home: Path, tmp_path: Path) -> None:
    """The guard hashes the very bytes it loads, so a swap between check and load is caught."""
    check_weights("dists")
    head = home / "hub" / "pyiqa" / weights.DISTS.name
    plant(weights.DISTS, home, tmp_path / "ran")
    with verified_loading(), pytest.raises(UnverifiedWeightsError, match=weights.DISTS.sha256 or "-"):
        torch.load(head, weights_only=False)  # as a library would call it: the guard loads weights-only
    assert not (tmp_path / "ran").exists()


def test_unregistered_files_and_wrong_loaders_are_refused(home: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.pth"
    torch.save({"w": torch.zeros(1)}, other)
    with verified_loading():
        with pytest.raises(UnverifiedWeightsError, match="not a file of the weight registry"):
            torch.load(other)
        with pytest.raises(UnverifiedWeightsError, match="not a file of the weight registry"):
            torch.load(io.BytesIO(other.read_bytes()))
        with pytest.raises(UnsafeWeightsError, match="weights-only pickle"):
            torch.jit.load(str(home / "hub" / "pyiqa" / weights.DISTS.name))
    assert torch.load(other, weights_only=True)["w"].shape == (1,)  # the guards are gone after the block


def test_torchscript_archive_under_a_pickle_name_is_refused(home: Path) -> None:
    """torch.load would hand a TorchScript archive to torch.jit.load; weights-only refuses instead."""
    path = home / "hub" / "pyiqa" / weights.DISTS.name
    path.unlink()
    torch.jit.save(torch.jit.script(torch.nn.Identity()), str(path))
    with registered_stand_in(path), verified_loading(), pytest.raises(UnsafeWeightsError, match="weights_only"):
        torch.load(path)


def test_stand_ins_load_weights_only(home: Path) -> None:
    """The registered stand-ins go through the same guard and load (that is how every metric test builds)."""
    with verified_loading():
        state = torch.load(home / "hub" / "pyiqa" / weights.DISTS.name, weights_only=False)  # as pyiqa calls it
    assert set(state) == {"alpha", "beta"}
