"""scripts/convert_release.py: a release-layout checkpoint -> an export that decodes as load_release_checkpoint does."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.blocks.model_zoo import load_sd_components
from models.oscar.model import OSCARModel
from models.oscar.priors import measure_index_counts
from models.oscar.release import load_release_checkpoint
from tests.release_fixture import release_dict_from_model
from tests.test_oscar import image, small_options
from utils.data import write_synthetic_images
from utils.image_io import load_image, list_images

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    """scripts/ is not a package: load the script as a module from its file."""
    spec = importlib.util.spec_from_file_location("convert_release_script", ROOT / "scripts" / "convert_release.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


convert_main = _load_script().main


@pytest.fixture(scope="module")
def release_file(tiny_zoo, tmp_path_factory) -> Path:
    """A synthetic oscar.pkl in the release's layout, with non-zero LoRA B so every trained tensor matters."""
    torch.manual_seed(3)
    model = OSCARModel(load_sd_components(tiny_zoo), small_options()).eval()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in model.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    path = tmp_path_factory.mktemp("release") / "oscar.pkl"
    torch.save(release_dict_from_model(model), path)
    return path


@pytest.fixture(scope="module")
def reference_model(release_file, tiny_zoo) -> OSCARModel:
    return load_release_checkpoint(release_file, load_sd_components(tiny_zoo), options=small_options()).eval()


def convert(release_file: Path, zoo: Path, out: Path, *extra: str) -> Path:
    argv = [str(release_file), "--out", str(out), "--zoo", str(zoo), "--lora-alpha", "1.0", "--device", "cpu"]
    return convert_main(argv + list(extra))


def test_export_decodes_as_the_loaded_release(release_file, reference_model, tiny_zoo, tmp_path, capsys):
    out = convert(release_file, tiny_zoo, tmp_path / "export")
    printed = capsys.readouterr().out
    assert "index priors: UNIFORM" in printed and str(out) in printed
    exported = OSCARModel.from_pretrained(out)
    assert exported.config.hyper_encoder == small_options().hyper_encoder
    assert exported.config.lora_rank == 2 and exported.config.latent_norms == "transmit"
    assert all(int(c.sum()) == 0 for c in exported.index_counts)
    x = image(64, 96, seed=1)
    for level in range(exported.num_levels):
        coded = reference_model.encode(x, level)
        assert torch.equal(exported.encode(x, level).indices, coded.indices)
        assert torch.equal(exported.decode(coded), reference_model.decode(coded))
    # Through a real file as well.
    via_file = exported.decompress(exported.compress(x, 7))
    assert torch.equal(via_file, reference_model.decode(reference_model.encode(x, 7)))


def test_priors_measured_on_the_given_images(release_file, reference_model, tiny_zoo, tmp_path, capsys):
    write_synthetic_images(tmp_path / "imgs", count=2, size=64, seed=5)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png")
    out = convert(release_file, tiny_zoo, tmp_path / "export", "--images", str(tmp_path / "imgs"))
    captured = capsys.readouterr()
    assert "measured on 2 images" in captured.out and "1 unreadable skipped" in captured.out
    files = [f for f in list_images([tmp_path / "imgs"]) if f.path.name != "broken.png"]
    expected = measure_index_counts(reference_model, (load_image(f.path)[0] for f in files))
    exported = OSCARModel.from_pretrained(out)
    assert all(torch.equal(a, b) for a, b in zip(exported.index_counts, expected))
    assert all(int(c.sum()) > 0 for c in exported.index_counts)


def test_oracle_export_reproduces_the_reference_decoding(release_file, tiny_zoo, tmp_path):
    out = convert(release_file, tiny_zoo, tmp_path / "export", "--latent-norms", "oracle")
    exported = OSCARModel.from_pretrained(out)
    reference = load_release_checkpoint(
        release_file, load_sd_components(tiny_zoo), options=small_options(latent_norms="oracle")
    ).eval()
    x = image(64, 64, seed=2)
    rms = reference.latent_rms(x, 3)
    mine = exported.decode(exported.encode(x, 3), oracle_rms=rms)
    assert torch.equal(mine, reference.decode(reference.encode(x, 3), oracle_rms=rms))
    assert exported.side_information_leak


def test_refusals_are_one_line(release_file, tiny_zoo, tmp_path, capsys):
    out = tmp_path / "export"
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(SystemExit):
        convert(release_file, tiny_zoo, out)
    assert "already exists" in capsys.readouterr().err
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"\0" * 100)
    with pytest.raises(SystemExit):
        convert(garbage, tiny_zoo, tmp_path / "other")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a readable torch checkpoint" in err[0]
    assert not (tmp_path / "other").exists()


def test_compress_and_decompress_run_on_the_converted_release(release_file, tiny_zoo, tmp_path):
    """The README's promise: convert, then the file CLIs work on the released model."""
    out = convert(release_file, tiny_zoo, tmp_path / "export")
    write_synthetic_images(tmp_path / "imgs", count=1, size=64, seed=6)
    run = lambda *a: subprocess.run([sys.executable, *a], cwd=ROOT, capture_output=True, text=True)  # noqa: E731
    coded, decoded = tmp_path / "coded", tmp_path / "decoded"
    done = run("compress.py", "--model", str(out), str(tmp_path / "imgs"), "-o", str(coded), "--level", "2",
               "--device", "cpu")  # fmt: skip
    assert done.returncode == 0, done.stderr
    done = run("decompress.py", "--model", str(out), str(coded), "-o", str(decoded), "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "decoded").glob("*.png"))) == 1
