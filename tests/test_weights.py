"""Tests for utils.weights: file registry vs the installed libraries, missing-file errors, offline creation."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch

from tests.stand_in_weights import WRITERS, registered_stand_in, torch_home, write_stand_in_weights
from utils import weights
from utils.errors import UserError
from utils.weights import (
    DownloadAttemptError,
    MissingWeightsError,
    UnknownWeightsError,
    available,
    check_weights,
    create_pyiqa_metric,
    no_downloads,
    required_weight_files,
)


@pytest.fixture
def empty_home(tmp_path: Path):
    with torch_home(tmp_path) as home:
        yield home


def test_files_are_under_torch_home(empty_home: Path) -> None:
    assert required_weight_files("dists") == [
        empty_home / "hub" / "checkpoints" / "vgg16-397923af.pth",
        empty_home / "hub" / "pyiqa" / "DISTS_weights-f5e65c96.pth",
    ]
    assert required_weight_files("clipiqa+") == [
        empty_home / "hub" / "clip" / "RN50.pt",
        empty_home / "hub" / "pyiqa" / "CLIP-IQA%2B_learned_prompts-603f3273.pth",  # sic: pyiqa keeps the %2B
    ]
    assert required_weight_files("psnr") == []


def test_torch_hub_set_dir_is_followed(empty_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    torch.hub.set_dir(str(tmp_path / "elsewhere"))
    assert required_weight_files("fid") == [tmp_path / "elsewhere" / "pyiqa" / "pt_inception-2015-12-05-6726825d.pth"]


def test_missing_files_are_named_with_folder_and_source(empty_home: Path) -> None:
    with pytest.raises(MissingWeightsError) as err:
        check_weights("lpips-vgg")
    message = str(err.value)
    assert isinstance(err.value, UserError) and "\n" not in message
    assert "'lpips-vgg'" in message
    assert f"vgg16-397923af.pth in {empty_home / 'hub' / 'checkpoints'}" in message
    assert f"LPIPS_v0.1_vgg-a78928a0.pth in {empty_home / 'hub' / 'pyiqa'}" in message
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in message
    assert not available("lpips-vgg")
    assert available("psnr")


def test_only_the_missing_file_is_named(empty_home: Path) -> None:
    write_stand_in_weights(empty_home, ["lpips"])
    head = required_weight_files("dists")[1]
    head.parent.mkdir(parents=True, exist_ok=True)
    WRITERS[head.name](head)  # DISTS head present (a registered stand-in), vgg16 absent
    with registered_stand_in(head), pytest.raises(MissingWeightsError) as err:
        check_weights("dists")
    assert type(err.value) is MissingWeightsError
    assert "vgg16-397923af.pth" in str(err.value) and "DISTS_weights" not in str(err.value)
    assert available("lpips")


def test_plus_spelled_file_gets_a_rename_hint(empty_home: Path) -> None:
    prompts = required_weight_files("clipiqa+")[1]
    prompts.parent.mkdir(parents=True)
    (prompts.parent / "CLIP-IQA+_learned_prompts-603f3273.pth").write_bytes(b"x")
    with pytest.raises(MissingWeightsError, match="rename .*CLIP-IQA\\+_learned.* to CLIP-IQA%2B_learned"):
        check_weights("clipiqa+")


def test_unknown_metric(empty_home: Path) -> None:
    with pytest.raises(UnknownWeightsError, match="niqe2"):
        check_weights("niqe2")


def test_clip_checkpoint_with_wrong_hash_is_refused(empty_home: Path) -> None:
    """pyiqa's CLIP loader re-downloads RN50.pt when its SHA-256 differs: a wrong file must fail up front."""
    rn50 = required_weight_files("clipiqa")[0]
    rn50.parent.mkdir(parents=True)
    rn50.write_bytes(b"not the real checkpoint")
    with pytest.raises(MissingWeightsError, match="SHA-256"):
        check_weights("clipiqa")


def test_registry_matches_the_installed_libraries() -> None:
    """Every name and URL here is the one pyiqa 0.1.16 / torchvision / torch-fidelity really load from."""
    import pyiqa.archs.inception as pyiqa_inception
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity
    from pyiqa.archs import clip_model, clipiqa_arch, dists_arch, lpips_arch, musiq_arch
    from torchvision.models import AlexNet_Weights, VGG16_Weights

    library_urls = {
        weights.VGG16: VGG16_Weights.IMAGENET1K_V1.url,  # what DISTS / LPIPS-vgg pass as weights="IMAGENET1K_V1"
        weights.ALEXNET: AlexNet_Weights.IMAGENET1K_V1.url,
        weights.LPIPS_ALEX: lpips_arch.default_model_urls["0.1_alex"],
        weights.LPIPS_VGG: lpips_arch.default_model_urls["0.1_vgg"],
        weights.DISTS: dists_arch.default_model_urls["url"],
        weights.MUSIQ_KONIQ: musiq_arch.default_model_urls["koniq10k"],
        weights.CLIP_RN50: clip_model._MODELS["RN50"],
        weights.CLIPIQA_PLUS: clipiqa_arch.default_model_urls["clipiqa+"],
        weights.PYIQA_INCEPTION: pyiqa_inception.FID_WEIGHTS_URL,
        weights.FIDELITY_INCEPTION: fidelity.URL_INCEPTION_V3,
    }
    for entry, url in library_urls.items():
        assert entry.url == url
        assert entry.name == os.path.basename(urlparse(url).path)  # how pyiqa and torch.hub name the cached file
    assert weights.CLIP_RN50.sha256 == clip_model._MODELS["RN50"].split("/")[-2]
    listed = {entry for files in weights.REGISTRY.values() for entry in files}
    assert listed == set(library_urls)


def test_no_downloads_refuses_and_restores(tmp_path: Path) -> None:
    original = torch.hub.download_url_to_file
    with no_downloads(), pytest.raises(DownloadAttemptError, match="example.invalid"):
        torch.hub.load_state_dict_from_url("https://example.invalid/w-0123abcd.pth", model_dir=str(tmp_path))
    assert torch.hub.download_url_to_file is original


def test_pyiqa_metric_is_created_offline_after_torch_home_changes(empty_home: Path) -> None:
    """pyiqa fixes its cache folder at import; create_pyiqa_metric must still use the current TORCH_HOME."""
    import pyiqa.utils.download_util as pyiqa_download

    with pytest.raises(MissingWeightsError, match="alexnet-owt-7be5be79.pth"):
        create_pyiqa_metric("lpips", device="cpu")
    write_stand_in_weights(empty_home, ["lpips"])
    pyiqa_download.DEFAULT_CACHE_DIR = "/nonexistent/import-time/pyiqa"  # as if imported under another home
    metric = create_pyiqa_metric("lpips", device="cpu")  # any download attempt would raise DownloadAttemptError
    x = torch.rand(1, 3, 32, 32)
    assert metric(x, x).abs().max() < 1e-6
    assert pyiqa_download.DEFAULT_CACHE_DIR == str(empty_home / "hub" / "pyiqa")


def test_every_file_has_a_hash_to_check() -> None:
    """Full published SHA-256 where known (consistent with the name's torch.hub prefix), else the prefix alone."""
    prefix_only = set()
    for entry in weights.all_weight_files():
        if entry.sha256 is None:
            prefix_only.add(entry)
            assert len(entry.expected_sha256) == 8 and entry.expected_sha256 in entry.name
            assert "prefix in its name" in entry.describe_hash()
        else:
            assert len(entry.sha256) == 64 and int(entry.sha256, 16) >= 0
            assert entry.name_hash_prefix is None or entry.sha256.startswith(entry.name_hash_prefix)
    assert prefix_only == {weights.MUSIQ_KONIQ, weights.CLIPIQA_PLUS}
    assert weights.CLIP_RN50.torchscript and weights.CLIP_RN50.sha256 in weights.CLIP_RN50.url
    with pytest.raises(ValueError, match="needs a full SHA-256 or a hash prefix"):
        weights.WeightFile("pyiqa", "no_hash.pth", "https://example.invalid/no_hash.pth")
    with pytest.raises(ValueError, match="starting with the name's prefix"):
        weights.WeightFile("pyiqa", "x-0123abcd.pth", "https://example.invalid/x-0123abcd.pth", "f" * 64)


def test_wrong_file_message_names_file_expected_hash_and_source(empty_home: Path) -> None:
    for metric, entry in (("fid", weights.PYIQA_INCEPTION), ("musiq", weights.MUSIQ_KONIQ)):
        path = entry.path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"some other file")
        with pytest.raises(weights.UnverifiedWeightsError) as err:
            check_weights(metric)
        message = str(err.value)
        assert "\n" not in message and str(path) in message and entry.url in message and "delete it" in message
        assert entry.expected_sha256 in message
        assert ("starting with e95806b9" in message) == (entry is weights.MUSIQ_KONIQ)
