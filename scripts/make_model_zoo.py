"""Write a diffusers-layout model zoo with seeded random weights (and optionally an untrained OSCAR export).

    python scripts/make_model_zoo.py --preset tiny --out model_zoo/tiny
    python scripts/make_model_zoo.py --preset sd21 --out model_zoo/sd21-random      # real architecture, ~3.5 GB
    python scripts/make_model_zoo.py --preset tiny --out ZOO --export-model runs/untrained

``tiny`` has the same classes and block types as SD-2.1 with a few channels (about 2 M parameters): for tests
and the demo. ``sd21`` is the real architecture (random weights): for benchmarks. Neither is Stable
Diffusion's trained model; the folder is marked as random in oscar_zoo.json.
"""

from __future__ import annotations

import argparse
import time

from utils.errors import exit_on_user_error
from models.blocks.model_zoo import PRESETS, load_sd_components, write_model_zoo
from models.oscar.model import RANDOM_TINY_OPTIONS as TINY_MODEL  # narrow hyper-encoders, rank-4 LoRA
from models.oscar.options import ModelOptions
from utils.options import load_options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--out", required=True, help="zoo folder to write (unet/, vae/, scheduler/)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--export-model", metavar="DIR", help="also write an untrained exported OSCAR model here")
    parser.add_argument(
        "--model-opt", metavar="FILE", help="JSON file of model options for --export-model (default: small for tiny, the release's for sd21)"
    )
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    out = write_model_zoo(args.preset, args.out, seed=args.seed)
    print(f"wrote {args.preset} model zoo (random weights) to {out} in {time.perf_counter() - start:.1f} s")
    if args.export_model:
        import torch

        from models.oscar.model import OSCARModel

        if args.model_opt:
            options = load_options(ModelOptions, args.model_opt)
        else:
            options = TINY_MODEL if args.preset == "tiny" else ModelOptions()
        torch.manual_seed(args.seed)
        model = OSCARModel(load_sd_components(out), options)
        model.save_pretrained(args.export_model, zoo_path=str(out))
        print(f"wrote untrained OSCAR model ({model.num_levels} levels, uniform index priors) to {args.export_model}")


if __name__ == "__main__":
    main()
