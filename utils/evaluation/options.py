"""test.py's option schema: evaluate exported models of any method on image folders through real files."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from utils.image_io import DEFAULT_MAX_DECODE_PIXELS
from utils.option_sections import RuntimeOptions
from utils.options import option, required


@dataclass(kw_only=True)
class EvalOptions:
    """test.py: evaluate an exported model on image folders through real files."""

    name: str = option("test", help="run name; outputs go to <output_root>/<name>")
    output_root: str = option("runs")
    model_dir: str = required(help="exported model folder, any method (written by a training script or make_model_zoo)")
    datasets: list[str] = required(help="folders of test images")
    levels: list[int] | None = option(None, help="level indices to evaluate (null = all)")
    metrics: list[str] | None = option(None, help="metric names (null = every metric whose weights are present)")
    skip_missing_metrics: bool = option(False, help="skip a metric whose weights are missing instead of stopping")
    runtime: RuntimeOptions = option(default_factory=RuntimeOptions)
    model_zoo: str | None = option(None, help="base SD model folder (null = the one the exported model names)")
    model_overrides: dict[str, Any] = option(
        default_factory=dict,
        help="model options to override in the export, e.g. {\"latent_norms\": \"oracle\"} for OSCAR's reference "
        "comparison (results are then labelled as leaking side information)",
    )
    max_decode_pixels: int = option(
        DEFAULT_MAX_DECODE_PIXELS, min=1,
        help="refuse to decode a file declaring an image of more pixels than this (test images larger than this fail)",
    )
    fast_inference: bool = option(True, help="merged LoRA, SDPA, channels_last; runtime.precision for UNet/VAE decoder")
    anchors: str | None = option("options/anchors_published.json", help="published RD points to draw (or null)")
    bd_anchor: str | None = option(None, help="method name in the anchors file to compute BD-rates against")

    def check(self) -> tuple[str, str] | None:
        if not self.datasets:
            return "datasets", "expected at least one folder"
        return None
