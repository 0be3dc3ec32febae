"""Tests for utils.evaluation.metrics: every metric runs on stand-in weights; PSNR and MS-SSIM against hand computations;
missing weights; the FID/KID patch protocol.

The networks are full-size with random weights (tests/stand_in_weights.py), so learned scores are meaningless here:
only properties that hold for any weights are checked (finite values, zero distance between identical images).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from scipy.signal import convolve2d

from tests.stand_in_weights import torch_home, write_stand_in_weights
from utils.evaluation import metrics
from utils.errors import UserError
from utils.evaluation.metrics import (
    FID_PATCHES,
    KID_STD,
    METRICS,
    MetricInputError,
    MetricSuite,
    UnknownMetricError,
    extract_patches,
    patch_counts,
    patch_grid,
)
from utils.weights import MissingWeightsError

ALL_WEIGHTS = ["lpips", "lpips-vgg", "dists", "musiq", "clipiqa+", "torchmetrics-fid"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run this module's networks on one intra-op thread: on a 2-core machine shared with other jobs, small
    convolutions on 2 threads spend most of their time waiting at OpenMP barriers (measured: 2-3x slower overall)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stand_in_home(tmp_path_factory: pytest.TempPathFactory):
    """A TORCH_HOME with (registered) stand-ins for every metric, active for the whole module."""
    home = tmp_path_factory.mktemp("torch_home")
    with torch_home(home):
        write_stand_in_weights(home, ALL_WEIGHTS)
        yield home


@pytest.fixture(scope="module")
def suite(stand_in_home: Path) -> MetricSuite:
    """Every metric, each network built once for the module."""
    return MetricSuite(None, device="cpu")


@pytest.fixture
def empty_home(tmp_path: Path):
    with torch_home(tmp_path) as home:
        yield home


def _smooth_image(height: int, width: int, seed: int) -> np.ndarray:
    """A (3, H, W) uint8 image with natural-looking structure (smoothed noise), so SSIM terms stay positive."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(3, height, width))
    smooth = np.stack([gaussian_filter(c, sigma=4) for c in noise])
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    return np.round(20 + 215 * smooth).astype(np.uint8)


def _to_model_range(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (3, H, W) -> (1, 3, H, W) in [-1, 1], as utils.image_io.load_image returns images."""
    return torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1.0).unsqueeze(0)


# ------------------------------------------------------------------------------------------ every metric


def test_all_metrics_resolved_with_stand_ins(suite: MetricSuite) -> None:
    assert suite.names == tuple(METRICS)
    assert suite.labels["lpips_vgg"] == "LPIPS (VGG)" and suite.labels["lpips_alex"] == "LPIPS (AlexNet)"
    assert suite.per_image_names == tuple(n for n in METRICS if n not in ("fid", "kid"))
    assert suite.dataset_names == ("fid", "kid")


def test_every_per_image_metric_runs(suite: MetricSuite) -> None:
    x = _smooth_image(192, 176, seed=1)
    noisy = np.clip(x.astype(int) + np.random.default_rng(2).integers(-12, 13, x.shape), 0, 255).astype(np.uint8)
    scores = suite.per_image(_to_model_range(noisy), _to_model_range(x))
    assert list(scores) == list(suite.per_image_names)
    assert all(math.isfinite(v) for v in scores.values()), scores
    assert 0 < scores["ms_ssim"] < 1
    assert 0 < scores["lpips_vgg"] and 0 < scores["lpips_alex"] and 0 < scores["dists"]
    assert 0 <= scores["clipiqa"] <= 1 and 0 <= scores["clipiqa_plus"] <= 1  # softmax probabilities


def test_fid_kid_run_on_protocol_patches(suite: MetricSuite) -> None:
    """One dataset_results() only: FID's 2048x2048 matrix square root takes seconds on a CPU."""
    x = _to_model_range(_smooth_image(384, 384, seed=3))  # one first-pass and one shifted patch
    x_hat = (x + 0.2 * torch.randn_like(x)).clamp(-1, 1)
    suite.reset()
    suite.update_dataset(x_hat, x)
    suite.update_dataset(x_hat[..., :256, :300], x[..., :256, :300])  # one more patch each, no shifted pass
    results = suite.dataset_results()
    assert results[FID_PATCHES] == 3
    assert set(results) == {"fid", "kid", KID_STD, FID_PATCHES}
    assert math.isfinite(results["fid"]) and results["fid"] > 0
    # KID's subset size is min(1000, 3 patches) (torchmetrics raises if it exceeds the sample count); with every
    # patch in every subset, all 100 subsets give the same value.
    assert math.isfinite(results["kid"]) and results[KID_STD] == pytest.approx(0, abs=1e-6)


def test_dataset_results_need_two_patches(suite: MetricSuite) -> None:
    suite.reset()
    small = torch.zeros(1, 3, 200, 300)  # under 256 px high: no patch at all
    suite.update_dataset(small, small)
    with pytest.warns(UserWarning, match="at least 2 patches"):
        results = suite.dataset_results()
    assert math.isnan(results["fid"]) and math.isnan(results["kid"]) and results[FID_PATCHES] == 0


def test_mismatched_or_batched_inputs_are_refused(suite: MetricSuite) -> None:
    with pytest.raises(MetricInputError, match="differ in shape"):
        suite.per_image(torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 64, 72))
    with pytest.raises(MetricInputError, match="one image at a time"):
        suite.per_image(torch.zeros(2, 3, 64, 64), torch.zeros(2, 3, 64, 64))
    with pytest.raises(MetricInputError, match="RGB"):
        suite.update_dataset(torch.zeros(1, 1, 64, 64), torch.zeros(1, 1, 64, 64))


# ---------------------------------------------------------------------------------------------- PSNR


@pytest.fixture(scope="module")
def pixel_suite() -> MetricSuite:
    """PSNR and MS-SSIM need no weights."""
    return MetricSuite(["psnr", "ms_ssim"], device="cpu")


@pytest.mark.filterwarnings("ignore:MS-SSIM needs")
def test_psnr_matches_hand_computation(pixel_suite: MetricSuite) -> None:
    x = np.random.default_rng(4).integers(10, 240, size=(3, 48, 40)).astype(np.uint8)
    shifted = x + 3  # every pixel of every channel off by 3 levels: MSE = 9
    psnr = pixel_suite.per_image(_to_model_range(shifted), _to_model_range(x))["psnr"]
    assert psnr == pytest.approx(10 * math.log10(255**2 / 9), abs=1e-9)

    one_channel = x.copy()
    one_channel[1] += 4  # green only: MSE = 16 / 3
    psnr = pixel_suite.per_image(_to_model_range(one_channel), _to_model_range(x))["psnr"]
    assert psnr == pytest.approx(10 * math.log10(255**2 / (16 / 3)), abs=1e-9)


@pytest.mark.filterwarnings("ignore:MS-SSIM needs")
def test_psnr_is_computed_on_8bit_pixels(pixel_suite: MetricSuite) -> None:
    """Deviations below half a level vanish when saved as PNG, so they must not lower PSNR."""
    x = _to_model_range(np.random.default_rng(5).integers(10, 240, size=(3, 32, 32)).astype(np.uint8))
    nudged = x + (0.4 / 127.5) * torch.sign(torch.randn_like(x))
    assert pixel_suite.per_image(nudged, x)["psnr"] == math.inf
    assert pixel_suite.per_image(x + 0.6 / 127.5, x)["psnr"] == pytest.approx(10 * math.log10(255**2), abs=1e-9)


# ------------------------------------------------------------------------------------------- MS-SSIM

_MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _reference_ms_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al.'s MS-SSIM, written from the paper: per channel, 11-px Gaussian (sigma 1.5) over valid positions,
    K = (0.01, 0.03), L = 255, contrast-structure at scales 1-4 and full SSIM at scale 5, 2x2 mean pooling between
    scales (even sizes only here); the channel values are averaged."""
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    window = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(img: np.ndarray) -> np.ndarray:
        return convolve2d(img, window, mode="valid")

    values = []
    for x, y in zip(a.astype(np.float64), b.astype(np.float64)):
        terms = []
        for scale in range(5):
            mu_x, mu_y = blur(x), blur(y)
            var_x, var_y = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2
            cov = blur(x * y) - mu_x * mu_y
            cs_map = (2 * cov + c2) / (var_x + var_y + c2)
            if scale < 4:
                terms.append(max(cs_map.mean(), 0.0))
                x = x.reshape(x.shape[0] // 2, 2, x.shape[1] // 2, 2).mean(axis=(1, 3))
                y = y.reshape(y.shape[0] // 2, 2, y.shape[1] // 2, 2).mean(axis=(1, 3))
            else:
                luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
                terms.append(max((luminance * cs_map).mean(), 0.0))
        values.append(np.prod([t**w for t, w in zip(terms, _MS_SSIM_WEIGHTS)]))
    return float(np.mean(values))


def test_ms_ssim_matches_reference_implementation(pixel_suite: MetricSuite) -> None:
    x = _smooth_image(192, 256, seed=6)  # 192x256 -> 96x128 -> 48x64 -> 24x32 -> 12x16: the window fits
    rng = np.random.default_rng(7)
    y = np.clip(x.astype(int) + rng.integers(-20, 21, x.shape), 0, 255).astype(np.uint8)
    expected = _reference_ms_ssim(y, x)
    assert 0.3 < expected < 0.99  # a non-trivial value
    got = pixel_suite.per_image(_to_model_range(y), _to_model_range(x))["ms_ssim"]
    assert got == pytest.approx(expected, abs=1e-6)


def test_ms_ssim_properties(pixel_suite: MetricSuite) -> None:
    x = _to_model_range(_smooth_image(176, 176, seed=8))
    assert pixel_suite.per_image(x, x)["ms_ssim"] == pytest.approx(1.0, abs=1e-9)
    worse = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    better = (x + 0.05 * torch.randn_like(x)).clamp(-1, 1)
    assert pixel_suite.per_image(worse, x)["ms_ssim"] < pixel_suite.per_image(better, x)["ms_ssim"] < 1


def test_ms_ssim_of_small_images_is_nan_with_a_warning(pixel_suite: MetricSuite) -> None:
    x = _to_model_range(_smooth_image(160, 400, seed=9))
    with pytest.warns(UserWarning, match="MS-SSIM needs both sides >= 161 px.*400x160"):
        scores = pixel_suite.per_image(x, x)
    assert math.isnan(scores["ms_ssim"]) and scores["psnr"] == math.inf
    smallest = _to_model_range(_smooth_image(161, 161, seed=10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pixel_suite.per_image(smallest, smallest)["ms_ssim"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------- weights


def test_missing_weights_name_the_file_and_folder(empty_home: Path) -> None:
    with pytest.raises(MissingWeightsError) as err:
        MetricSuite(["psnr", "dists", "fid"], device="cpu")
    message = str(err.value)
    assert isinstance(err.value, UserError)
    assert f"DISTS_weights-f5e65c96.pth in {empty_home / 'hub' / 'pyiqa'}" in message
    assert f"vgg16-397923af.pth in {empty_home / 'hub' / 'checkpoints'}" in message
    assert f"weights-inception-2015-12-05-6726825d.pth in {empty_home / 'hub' / 'checkpoints'}" in message


def test_skip_missing_drops_the_metric_with_a_warning(empty_home: Path) -> None:
    write_stand_in_weights(empty_home, ["lpips"])
    with pytest.warns(UserWarning, match=r"skipping metric 'lpips_vgg'.*LPIPS_v0\.1_vgg-a78928a0\.pth in .*pyiqa"):
        suite = MetricSuite(["lpips_vgg", "lpips_alex", "psnr"], device="cpu", skip_missing=True)
    assert suite.names == ("psnr", "lpips_alex")
    x = torch.zeros(1, 3, 32, 32)
    assert suite.per_image(x, x)["lpips_alex"] == pytest.approx(0.0, abs=1e-6)  # identical images: no distance


def test_default_names_are_the_metrics_with_weights(empty_home: Path) -> None:
    with pytest.warns(UserWarning, match="not computed: lpips_vgg, lpips_alex, dists"):
        suite = MetricSuite(None, device="cpu")
    assert suite.names == ("psnr", "ms_ssim")
    assert suite.dataset_results() == {}


def test_metric_names_and_aliases() -> None:
    assert metrics.canonical_name("LPIPS-VGG") == "lpips_vgg"
    assert metrics.canonical_name("clipiqa+") == "clipiqa_plus"
    with pytest.raises(UnknownMetricError, match="ambiguous"):
        metrics.canonical_name("lpips")
    with pytest.raises(UnknownMetricError, match="niqe"):
        MetricSuite(["niqe"], device="cpu")
    lower_better = {n for n, spec in METRICS.items() if not spec.higher_is_better}
    assert lower_better == {"lpips_vgg", "lpips_alex", "dists", "fid", "kid"}


# ------------------------------------------------------------------------------------ patch protocol


def test_patch_counts_of_kodak_sizes() -> None:
    # 768x512: first pass 3 x 2 = 6; shifted pass floor(640/256) x floor(384/256) = 2 x 1 = 2.
    assert patch_counts(512, 768) == (6, 2)
    assert patch_counts(768, 512) == (6, 2)  # portrait Kodak images
    first = 24 * 6
    shifted = 24 * 2
    assert (first, shifted, first + shifted) == (144, 48, 192)
    # metrics_protocol.md says "Kodak yields 192 patches in the first pass": 192 is the total of both passes;
    # the first pass alone gives 144.


def test_patch_grid_edges() -> None:
    assert patch_counts(255, 2000) == (0, 0)
    assert patch_counts(256, 256) == (1, 0)
    assert patch_counts(383, 1024) == (4, 0)  # shifted pass needs >= 384 px on both sides
    assert patch_counts(384, 384) == (1, 1)
    assert patch_counts(1356, 2040) == (5 * 7, 4 * 7)  # a DIV2K-sized image
    first, shifted = patch_grid(512, 768)
    assert first == [(0, 0), (0, 256), (0, 512), (256, 0), (256, 256), (256, 512)]
    assert shifted == [(128, 128), (128, 384)]


def test_extract_patches_takes_the_right_pixels() -> None:
    rows = torch.arange(512).view(1, 1, 512, 1).expand(2, 3, 512, 768)
    cols = torch.arange(768).view(1, 1, 1, 768).expand(2, 3, 512, 768)
    patches = extract_patches(rows * 1000 + cols)
    assert patches.shape == (2 * 8, 3, 256, 256)
    corners = [int(p[0, 0, 0]) for p in patches[:8]]
    assert corners == [0, 256, 512, 256_000, 256_256, 256_512, 128_128, 128_384]
    assert torch.equal(patches[8:], patches[:8])  # the second image: same grid
