"""CI fuzzing of real files, one target per codec method: at least 10,000 mutants per run in total.

The files are not hand-made: each method's fixture builds a small model whose entropy priors were measured on
images, loads it with ``models.registry.load_codec`` as the file CLIs do, and writes files with its own
``compress`` (for OSCAR: the tiny random zoo, small hyper-encoders, index priors measured on two image crops, files
of other crops at every level, so both rANS and fixed-length payloads and the latent-norm side information occur).
Images are crops of Kodak when ``../shared/data/kodak`` is there, else generated images.

Each mutant (1-3 seeded random edits: bit flips, byte changes, insertions, deletions, truncation, the tail of
another file spliced in) is read back, and the test asserts:

* it either decodes or raises one of the project's file errors (``BitstreamError`` subclasses, or the
  ``DecodeLimitError`` a file declaring too many pixels gets) -- anything else fails the test with the mutant in hex;
* a decoded mutant is an image of the size its header declares, finite;
* no mutant takes more than ``HANG_LIMIT_S`` (a watchdog dumps the stacks and ends the run if one never returns);
* the process's peak resident memory grows by less than ``MEMORY_CAP_MB`` over the run.

How a mutant is read: ``model.decompress``, the whole decoder, until its (level, width, height) has been decoded
``FULL_DECODES_PER_SHAPE`` times; after that the method's entropy stages alone (``Stage.entropy``, the first
stages of ``decompress``, where a file is parsed and every accept/reject decision is made). A full decode of even a
tiny image costs ~80 ms on a CI core, and one mutant in eight or so is a valid file (fixed-length payloads accept
any bits), so decoding every mutant in full would take minutes; the synthesis stages see every shape the mutants
produce, and the parser sees every mutant.

Adding a method: write a fixture returning its :class:`FuzzTarget` and add the fixture's name to ``FUZZ_TARGETS``.
"""

from __future__ import annotations

import faulthandler
import math
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from models.blocks.codec_method import CodecMethod, DecodeLimitError
from models.blocks.container import BitstreamError
from models.registry import load_codec

TOTAL_MUTANTS = 10_000  # over all targets, per run
HANG_LIMIT_S = 10.0
MEMORY_CAP_MB = 256
FULL_DECODES_PER_SHAPE = 5
FILE_ERRORS = (BitstreamError, DecodeLimitError)
KODAK = Path(__file__).resolve().parents[2] / "shared" / "data" / "kodak"

# Fixture names, one per method; each returns a FuzzTarget.
FUZZ_TARGETS = ["oscar_fuzz_target"]


@dataclass
class FuzzTarget:
    export: Path  # an export folder, loaded with models.registry.load_codec
    files: list[bytes]  # valid files written by that model's compress


# ------------------------------------------------------------------------------------------------ targets


def fuzz_images(tmp: Path, count: int) -> list[torch.Tensor]:
    """``count`` real images (Kodak) or, without Kodak, generated ones, as (1, 3, H, W) in [-1, 1]."""
    from utils.image_io import load_image

    paths = sorted(KODAK.glob("*.png"))[:count] if KODAK.is_dir() else []
    if len(paths) < count:
        from utils.data import write_synthetic_images

        paths = write_synthetic_images(tmp, count, (256, 192), seed=7)
    return [load_image(path)[0] for path in paths]


@pytest.fixture(scope="module")
def oscar_fuzz_target(tmp_path_factory: pytest.TempPathFactory, tiny_zoo: Path) -> FuzzTarget:
    """OSCAR: priors measured on two crops, files of two other crops (64x64 and 40x72) at all eight levels."""
    from scripts.bitflip_campaign import tiny_oscar_export

    tmp = tmp_path_factory.mktemp("oscar_fuzz")
    images = fuzz_images(tmp / "images", 3)
    priors_from = [image[..., 40:104, 60:156] for image in images[:2]]
    export = tiny_oscar_export(tmp, priors_from, zoo=tiny_zoo)
    model = load_codec(export, device="cpu")
    crops = [images[2][..., 100:164, 100:164], images[2][..., 30:70, 150:222]]
    files = [model.compress(crop, level) for crop in crops for level in range(model.num_levels)]
    return FuzzTarget(export, files)


# ------------------------------------------------------------------------------------------------ mutants


def mutate(data: bytes, files: list[bytes], rng: random.Random) -> bytes:
    """1-3 random edits of ``data``."""
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        kind = rng.choice(("flip", "flip", "flip", "set", "insert", "delete", "truncate", "splice"))
        at = rng.randrange(len(out) + 1)
        if kind == "flip" and at < len(out):
            out[at] ^= 1 << rng.randrange(8)
        elif kind == "set" and at < len(out):
            out[at] = rng.choice((0, 0xFF, rng.randrange(256)))
        elif kind == "insert":
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.choice((1, 1, 4, 32))))
        elif kind == "delete":
            del out[at : at + rng.choice((1, 1, 4))]
        elif kind == "truncate":
            del out[at:]
        elif kind == "splice":
            other = rng.choice(files)
            out[at:] = other[rng.randrange(len(other) + 1) :]
    return bytes(out)


def entropy_reader(model: CodecMethod) -> Callable[[bytes], object]:
    from scripts.bitflip_campaign import entropy_reader as reader

    return reader(model)


# ------------------------------------------------------------------------------------------------ guards


def _status_kb(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM), where allowed, so the peak of the fuzz run alone can be read."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@pytest.fixture
def watchdog() -> Iterator[Callable[[], None]]:
    """Call the yielded function before each mutant: a mutant that never returns dumps every stack and ends the run."""

    def arm() -> None:
        faulthandler.dump_traceback_later(3 * HANG_LIMIT_S, exit=True, file=sys.stderr)

    yield arm
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ the test


@pytest.mark.parametrize("target_name", FUZZ_TARGETS)
def test_mutants_of_real_files(
    target_name: str, request: pytest.FixtureRequest, watchdog: Callable[[], None], one_thread: None
) -> None:
    target: FuzzTarget = request.getfixturevalue(target_name)
    model = load_codec(target.export, device="cpu")
    read_entropy = entropy_reader(model)
    for data in target.files:  # the originals decode, to the declared size
        _, width, height = model.level_header(data)
        assert tuple(model.decompress(data).shape) == (1, 3, height, width)

    rng = random.Random(f"{target_name}-fuzz")
    mutants = math.ceil(TOTAL_MUTANTS / len(FUZZ_TARGETS))
    outcomes: Counter[str] = Counter()
    full_decodes: Counter[tuple[int, int, int]] = Counter()
    slowest = 0.0
    peak_reset = _reset_peak_rss()
    rss_start = _status_kb("VmHWM" if peak_reset else "VmRSS") or 0
    rss_max = rss_start
    for number in range(mutants):
        mutant = mutate(target.files[number % len(target.files)], target.files, rng)
        watchdog()
        start = time.perf_counter()
        try:
            level, width, height = model.level_header(mutant)
            if full_decodes[(level, width, height)] < FULL_DECODES_PER_SHAPE:
                image = model.decompress(mutant)
                assert tuple(image.shape) == (1, 3, height, width), mutant.hex()
                assert bool(torch.isfinite(image).all()), mutant.hex()
                full_decodes[(level, width, height)] += 1
                outcomes["decoded in full"] += 1
            else:
                read_entropy(mutant)
                outcomes["accepted by the entropy stages"] += 1
        except FILE_ERRORS as err:
            assert str(err) and "\n" not in str(err), (type(err).__name__, str(err), mutant.hex())
            outcomes[type(err).__name__] += 1
        except Exception as err:  # noqa: BLE001 - the point of the test
            pytest.fail(f"mutant {number} of {target_name} raised {type(err).__name__}: {err}; bytes {mutant.hex()}")
        elapsed = time.perf_counter() - start
        slowest = max(slowest, elapsed)
        assert elapsed < HANG_LIMIT_S, f"mutant {number} took {elapsed:.1f} s: {mutant.hex()}"
        if number % 250 == 0 or number == mutants - 1:
            rss_max = max(rss_max, _status_kb("VmHWM" if peak_reset else "VmRSS") or 0)

    growth_mb = (rss_max - rss_start) / 1024
    print(
        f"{target_name}: {mutants} mutants, {sum(full_decodes.values())} decoded in full "
        f"({len(full_decodes)} shapes), slowest {slowest:.2f} s, peak memory +{growth_mb:.0f} MB; {dict(outcomes)}"
    )
    assert growth_mb < MEMORY_CAP_MB, f"memory grew by {growth_mb:.0f} MB over {mutants} mutants"
    assert outcomes["decoded in full"] > 0 and sum(v for k, v in outcomes.items() if k.endswith("Error")) > 0
