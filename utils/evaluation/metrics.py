"""Image-quality metrics for codec evaluation: per-image full-/no-reference scores and dataset-level FID/KID.

Conventions (the same for every metric, so numbers are comparable with papers that score saved PNG files):

* Input: float tensors in **[-1, 1]** (the project's image convention, as ``utils.image_io.load_image`` and the
  codec produce them), shape ``(3, H, W)`` or ``(1, 3, H, W)``; uint8 tensors are taken as 8-bit pixels as they are.
* Both images are first **quantized to 8 bits** exactly as a PNG writer would (clamp, ``round((x + 1) * 127.5)``);
  every metric sees the quantized pixels, never the float output of the decoder.
* PSNR: RGB, on the 8-bit pixels, ``10 log10(255^2 / MSE)`` with the MSE over all pixels and channels of one image;
  ``inf`` for identical images. Not the Y channel (pyiqa's ``psnry``), not float images.
* MS-SSIM: RGB (not pyiqa's Y-channel default), pytorch_msssim's implementation as CompressAI's evaluation uses it:
  5 scales, 11-px Gaussian window (sigma 1.5), data range 255, per-channel value averaged over R, G, B. It needs both
  sides > 160 px (the window must fit at the 5th scale); a smaller image gives NaN and a warning instead of a value
  computed on fewer scales, which would not be comparable with anything published.
* LPIPS in both flavours, named apart: ``lpips_vgg`` (OSCAR's) and ``lpips_alex`` (StableCodec's), pyiqa v0.1 heads.
* DISTS (pyiqa), MUSIQ (pyiqa, KonIQ-10k head, on the reconstruction only), CLIP-IQA and CLIP-IQA+ (pyiqa, RN50,
  on the reconstruction only).
* FID / KID over the dataset, HiFiC / MS-ILLM patch protocol: every image (original and reconstruction alike) is cut
  into non-overlapping 256x256 patches, plus a second grid shifted by 128 px down and right when the image is at
  least 384 px on both sides; features of all patches of the dataset are pooled. Features: torchmetrics'
  ``NoTrainInceptionV3`` (torch-fidelity's FID Inception, pool3, 2048-d) with torch-fidelity's TF1-style resize to
  299 px; FID and KID are torchmetrics' ``FrechetInceptionDistance`` / ``KernelInceptionDistance`` fed with those
  features, computed once per patch and shared. KID's subset size is min(1000, number of patches) (100 subsets,
  seeded), since a small dataset such as Kodak has fewer patches than the usual 1000.

Weights are never downloaded: :class:`MetricSuite` checks every file first (``utils.weights``: present, and the
published file by its SHA-256) and either raises :class:`~utils.weights.MissingWeightsError` naming the file and
folder, or with ``skip_missing`` drops the metric with a warning saying the same. The networks are built inside
:func:`~utils.weights.verified_loading`, so the libraries load only those files, weights-only.
"""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from utils.errors import UserError
from utils.weights import MissingWeightsError, available, check_weights, create_pyiqa_metric, verified_loading

# ----------------------------------------------------------------------------------------------- names

PSNR = "psnr"
MS_SSIM = "ms_ssim"
LPIPS_VGG = "lpips_vgg"
LPIPS_ALEX = "lpips_alex"
DISTS = "dists"
MUSIQ = "musiq"
CLIPIQA = "clipiqa"
CLIPIQA_PLUS = "clipiqa_plus"
FID = "fid"
KID = "kid"
# Extra keys of dataset_results(): KID's standard deviation over subsets, and the number of patches per side.
KID_STD = "kid_std"
FID_PATCHES = "fid_patches"

Kind = Literal["full_reference", "no_reference", "dataset"]


@dataclass(frozen=True)
class MetricSpec:
    """What a metric name means: its plot/CSV label, direction, kind, and the weight files it needs."""

    name: str
    label: str
    higher_is_better: bool
    kind: Kind
    weights: str  # a utils.weights registry name (lists the files to check)
    pyiqa_name: str | None = None  # built with create_pyiqa_metric when set


METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec(PSNR, "PSNR (RGB, 8-bit) [dB]", True, "full_reference", "psnr"),
        MetricSpec(MS_SSIM, "MS-SSIM (RGB)", True, "full_reference", "ms_ssim"),
        MetricSpec(LPIPS_VGG, "LPIPS (VGG)", False, "full_reference", "lpips-vgg", "lpips-vgg"),
        MetricSpec(LPIPS_ALEX, "LPIPS (AlexNet)", False, "full_reference", "lpips", "lpips"),
        MetricSpec(DISTS, "DISTS", False, "full_reference", "dists", "dists"),
        MetricSpec(MUSIQ, "MUSIQ (KonIQ)", True, "no_reference", "musiq", "musiq"),
        MetricSpec(CLIPIQA, "CLIP-IQA", True, "no_reference", "clipiqa", "clipiqa"),
        MetricSpec(CLIPIQA_PLUS, "CLIP-IQA+", True, "no_reference", "clipiqa+", "clipiqa+"),
        MetricSpec(FID, "FID (256-px patches)", False, "dataset", "torchmetrics-fid"),
        MetricSpec(KID, "KID (256-px patches)", False, "dataset", "torchmetrics-kid"),
    )
}
LABELS: dict[str, str] = {name: spec.label for name, spec in METRICS.items()}

# Spellings people (and pyiqa) use for the same metrics. Bare "lpips" is refused: the two flavours differ a lot.
ALIASES: dict[str, str] = {
    "ms-ssim": MS_SSIM,
    "lpips-vgg": LPIPS_VGG,
    "lpips-alex": LPIPS_ALEX,
    "clipiqa+": CLIPIQA_PLUS,
    "clip-iqa": CLIPIQA,
    "clip-iqa+": CLIPIQA_PLUS,
}


class UnknownMetricError(UserError, ValueError):
    """A metric name this suite does not compute."""


class MetricInputError(UserError, ValueError):
    """Images that cannot be compared: not RGB, or reconstruction and original of different sizes."""


def canonical_name(name: str) -> str:
    """The suite's name for ``name`` (aliases accepted); :class:`UnknownMetricError` otherwise."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key in METRICS:
        return key
    if key == "lpips":
        raise UnknownMetricError(f"metric 'lpips' is ambiguous: say {LPIPS_VGG} (OSCAR) or {LPIPS_ALEX} (StableCodec)")
    raise UnknownMetricError(f"unknown metric {name!r}: expected one of {', '.join(METRICS)}")


def label(name: str) -> str:
    """Axis / column label of a metric name (the name itself for keys this module does not define)."""
    return LABELS.get(name, name)


# ----------------------------------------------------------------------------------------- weight resolution


def resolve_metric_names(names: Iterable[str] | None, *, skip_missing: bool = False) -> list[str]:
    """The metrics to compute, in the suite's order, after checking every weight file.

    ``None`` means every metric whose weights are on disk (a warning lists the others). Explicit names whose files
    are missing raise one :class:`MissingWeightsError` naming every missing file, before any network is built, unless
    ``skip_missing``, which drops them with a warning naming the files instead.
    """
    if names is None:
        chosen = [name for name, spec in METRICS.items() if available(spec.weights)]
        dropped = [name for name in METRICS if name not in chosen]
        if dropped:
            warnings.warn(
                f"metrics without local weights are not computed: {', '.join(dropped)} "
                "(ask for them by name to see which files are missing)",
                stacklevel=3,
            )
        return chosen
    wanted = {canonical_name(name) for name in names}
    ordered = [name for name in METRICS if name in wanted]
    problems: dict[str, str] = {}
    kinds: set[type[MissingWeightsError]] = set()
    for name in ordered:
        try:
            check_weights(METRICS[name].weights)
        except MissingWeightsError as err:
            problems[name] = str(err)
            kinds.add(type(err))
    if problems and not skip_missing:
        kind = kinds.pop() if len(kinds) == 1 else MissingWeightsError  # e.g. UnverifiedWeightsError: a wrong file
        raise kind("; ".join(problems.values()))
    for name, problem in problems.items():
        warnings.warn(f"skipping metric {name!r}: {problem}", stacklevel=3)
    return [name for name in ordered if name not in problems]


# ----------------------------------------------------------------------------------------------- pixels


def quantize(image: torch.Tensor) -> torch.Tensor:
    """An image in [-1, 1] (or already uint8) as the uint8 pixels a PNG of it holds, shape ``(N, 3, H, W)``."""
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[1] != 3:
        raise MetricInputError(f"expected RGB images (N, 3, H, W) or (3, H, W), got shape {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        return image
    return ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _pair(x_hat: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both images quantized, after checking they have the same shape."""
    x_hat_q, x_q = quantize(x_hat), quantize(x)
    if x_hat_q.shape != x_q.shape:
        raise MetricInputError(
            f"reconstruction {tuple(x_hat_q.shape)} and original {tuple(x_q.shape)} differ in shape: "
            "pair images by file name and crop reconstructions back to the original size"
        )
    return x_hat_q, x_q


def psnr_uint8(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    """PSNR in dB of two uint8 images, over all pixels and channels; ``inf`` when they are identical."""
    mse = (x_hat.double() - x.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


MS_SSIM_MIN_SIDE = 161  # pytorch_msssim asserts min(H, W) > (11 - 1) * 2**4


def ms_ssim_uint8(x_hat: torch.Tensor, x: torch.Tensor, *, stacklevel: int = 2) -> float:
    """RGB MS-SSIM of two uint8 images ``(1, 3, H, W)``; NaN (with a warning) below 161 px on the short side.

    ``stacklevel`` is passed to :func:`warnings.warn` so the warning points at the caller's caller when wrapped.
    """
    height, width = x.shape[-2:]
    if min(height, width) < MS_SSIM_MIN_SIDE:
        warnings.warn(
            f"MS-SSIM needs both sides >= {MS_SSIM_MIN_SIDE} px (5 scales, 11-px window); a {width}x{height} image "
            "is reported as NaN",
            stacklevel=stacklevel,
        )
        return math.nan
    from pytorch_msssim import ms_ssim

    value = ms_ssim(x_hat.double(), x.double(), data_range=255.0, size_average=False)
    return float(value.item())


# ------------------------------------------------------------------------------------- FID / KID patches

PATCH_SIZE = 256
PATCH_SHIFT = 128
SHIFTED_PASS_MIN_SIDE = 384


def patch_grid(height: int, width: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Top-left corners ``(top, left)`` of the first-pass patches and of the shifted-pass patches.

    First pass: the ``floor(H/256) x floor(W/256)`` grid from the top-left corner (the remainder at the bottom and
    right is not used). Shifted pass, only when ``H >= 384`` and ``W >= 384``: the same grid laid on the image
    cropped by 128 px at the top and left, i.e. ``floor((H-128)/256) x floor((W-128)/256)`` patches.
    """
    first = [(top, left) for top in _starts(height, 0) for left in _starts(width, 0)]
    shifted: list[tuple[int, int]] = []
    if height >= SHIFTED_PASS_MIN_SIDE and width >= SHIFTED_PASS_MIN_SIDE:
        shifted = [(top, left) for top in _starts(height, PATCH_SHIFT) for left in _starts(width, PATCH_SHIFT)]
    return first, shifted


def _starts(size: int, offset: int) -> range:
    return range(offset, size - PATCH_SIZE + 1, PATCH_SIZE)


def patch_counts(height: int, width: int) -> tuple[int, int]:
    """Number of (first-pass, shifted-pass) patches of one image; e.g. (6, 2) for Kodak's 768x512."""
    first, shifted = patch_grid(height, width)
    return len(first), len(shifted)


def extract_patches(images: torch.Tensor) -> torch.Tensor:
    """All protocol patches of a batch ``(N, C, H, W)`` as ``(P, C, 256, 256)``: per image, first pass then shift."""
    first, shifted = patch_grid(*images.shape[-2:])
    corners = first + shifted
    if not corners:
        return images.new_empty((0, images.shape[1], PATCH_SIZE, PATCH_SIZE))
    patches = [images[:, :, t : t + PATCH_SIZE, l : l + PATCH_SIZE] for t, l in corners]
    return torch.stack(patches, dim=1).flatten(0, 1)


class _PrecomputedFeatures(torch.nn.Module):
    """The "feature extractor" handed to torchmetrics: returns its input, because the Inception features are computed
    once outside and shared by FID and KID (each would otherwise run its own copy of the network on every patch)."""

    num_features = 2048

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


# ------------------------------------------------------------------------------------------------ suite


class MetricSuite:
    """The chosen metrics, with their networks built once; per-image scores and dataset-level FID/KID.

    ``names=None`` takes every metric whose weights are on disk. ``device`` is ``"auto"``, ``"cpu"``, ``"cuda:N"``
    or a :class:`torch.device`. Inputs are as described in the module docstring ([-1, 1], quantized to 8 bits).
    """

    def __init__(
        self,
        names: Sequence[str] | None = None,
        device: torch.device | str = "auto",
        skip_missing: bool = False,
        *,
        kid_subset_size: int = 1000,
        kid_subsets: int = 100,
        batch_size: int = 16,
        seed: int = 0,
    ) -> None:
        from utils.device import resolve_device

        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.names: tuple[str, ...] = tuple(resolve_metric_names(names, skip_missing=skip_missing))
        self.kid_subset_size = kid_subset_size
        self.kid_subsets = kid_subsets
        self.batch_size = batch_size
        self.seed = seed
        self._pyiqa: dict[str, Any] = {}
        with _quiet_loading():
            for name in self.names:
                spec = METRICS[name]
                if spec.pyiqa_name is not None:
                    self._pyiqa[name] = create_pyiqa_metric(spec.pyiqa_name, device=self.device)
            self._inception, self._fid, self._kid = self._build_dataset_metrics()
        self._patches = 0

    # -------------------------------------------------------------------------------------- description

    @property
    def per_image_names(self) -> tuple[str, ...]:
        return tuple(n for n in self.names if METRICS[n].kind != "dataset")

    @property
    def dataset_names(self) -> tuple[str, ...]:
        return tuple(n for n in self.names if METRICS[n].kind == "dataset")

    @property
    def labels(self) -> dict[str, str]:
        return {name: METRICS[name].label for name in self.names}

    # ---------------------------------------------------------------------------------------- per image

    def per_image(self, x_hat: torch.Tensor, x: torch.Tensor) -> dict[str, float]:
        """Every per-image metric of one reconstruction ``x_hat`` against its original ``x`` (no-reference ones on
        ``x_hat`` only), keyed by metric name in the suite's order."""
        x_hat_q, x_q = _pair(x_hat, x)
        if x_q.shape[0] != 1:
            raise MetricInputError(f"per_image scores one image at a time, got a batch of {x_q.shape[0]}")
        x_hat_q, x_q = x_hat_q.to(self.device), x_q.to(self.device)
        x_hat_unit, x_unit = x_hat_q.float() / 255.0, x_q.float() / 255.0  # what pyiqa expects: [0, 1]
        scores: dict[str, float] = {}
        with torch.no_grad():
            for name in self.per_image_names:
                if name == PSNR:
                    scores[name] = psnr_uint8(x_hat_q, x_q)
                elif name == MS_SSIM:
                    scores[name] = ms_ssim_uint8(x_hat_q, x_q, stacklevel=3)
                elif METRICS[name].kind == "full_reference":
                    scores[name] = float(self._pyiqa[name](x_hat_unit, x_unit).mean().item())
                else:
                    scores[name] = float(self._pyiqa[name](x_hat_unit).mean().item())
        return scores

    # ------------------------------------------------------------------------------------------ dataset

    def _build_dataset_metrics(self) -> tuple[Any, Any, Any]:
        if not self.dataset_names:
            return None, None, None
        from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
        from torchmetrics.image.kid import KernelInceptionDistance

        with verified_loading():
            inception = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"], antialias=False)
        inception = inception.to(self.device)
        fid = kid = None
        if FID in self.names:
            fid = FrechetInceptionDistance(feature=_PrecomputedFeatures()).to(self.device)
        if KID in self.names:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
                kid = KernelInceptionDistance(
                    feature=_PrecomputedFeatures(), subsets=self.kid_subsets, subset_size=self.kid_subset_size
                ).to(self.device)
        return inception, fid, kid

    def update_dataset(self, x_hat: torch.Tensor, x: torch.Tensor) -> None:
        """Add the protocol patches of reconstruction(s) ``x_hat`` and original(s) ``x`` to the FID/KID pools.

        Accepts one image or a batch of same-sized images; a no-op when the suite has neither FID nor KID.
        """
        if self._inception is None:
            return
        x_hat_q, x_q = _pair(x_hat, x)
        fake, real = extract_patches(x_hat_q), extract_patches(x_q)
        with torch.no_grad():
            for start in range(0, fake.shape[0], self.batch_size):
                for patches, is_real in ((real, True), (fake, False)):
                    features = self._inception(patches[start : start + self.batch_size].to(self.device))
                    for metric in (self._fid, self._kid):
                        if metric is not None:
                            metric.update(features, real=is_real)
        self._patches += fake.shape[0]

    def dataset_results(self) -> dict[str, float]:
        """FID and/or KID over every patch added since the last :meth:`reset`, plus ``kid_std`` and ``fid_patches``.

        NaN (with a warning) while fewer than 2 patches were seen: images under 256 px on a side give none.
        """
        if self._inception is None:
            return {}
        results: dict[str, float] = {}
        enough = self._patches >= 2
        if not enough:
            warnings.warn(
                f"FID/KID need at least 2 patches of {PATCH_SIZE} px, got {self._patches}: reported as NaN",
                stacklevel=2,
            )
        if self._fid is not None:
            results[FID] = float(self._fid.compute().item()) if enough else math.nan
        if self._kid is not None:
            mean, std = math.nan, math.nan
            if enough:
                self._kid.subset_size = min(self.kid_subset_size, self._patches)
                with torch.random.fork_rng(devices=[]):  # KID draws subsets with the global generator
                    torch.manual_seed(self.seed)
                    kid_mean, kid_std = self._kid.compute()
                mean, std = float(kid_mean.item()), float(kid_std.item())
            results[KID], results[KID_STD] = mean, std
        results[FID_PATCHES] = float(self._patches)
        return results

    def reset(self) -> None:
        """Forget the FID/KID patches seen so far (e.g. between rate levels); the networks are kept."""
        for metric in (self._fid, self._kid):
            if metric is not None:
                metric.reset()
        self._patches = 0


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """pyiqa prints "Loading pretrained model ..." to stdout; send it to stderr so stdout stays for results."""
    with contextlib.redirect_stdout(sys.stderr):
        yield
