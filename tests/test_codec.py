"""The codec interface of OSCARModel and utils.image_io on the tiny zoo: exact round trips, rate control, priors, every image kind."""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.oscar.model import OSCARModel
from tests.test_oscar import small_options
from models.oscar.bitstream import (
    CodingMode,
    ModelMismatchError,
    header_bits,
    read_bitstream,
    read_header,
    write_bitstream,
)
from models.blocks.codec_method import CodecError
from models.oscar.priors import measure_index_counts
from utils.image_io import (
    ImageReadError,
    InputPathError,
    list_images,
    load_image,
    output_paths,
    save_png,
    to_uint8,
    write_atomic,
)
from models.blocks.model_zoo import load_sd_components

SIZES = [(64, 64), (96, 128), (77, 45), (45, 77), (17, 5)]  # (h, w): square, landscape, odd portrait/landscape, tiny


def make_model(zoo: Path, seed: int = 0, **options) -> OSCARModel:
    torch.manual_seed(seed)
    return OSCARModel(load_sd_components(zoo), small_options(**options)).eval()


@pytest.fixture(scope="module")
def model(tiny_zoo) -> OSCARModel:
    return make_model(tiny_zoo)


def image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, h, w, generator=g) * 2 - 1


def max_file_bytes(model: OSCARModel, level: int, h: int, w: int) -> int:
    info = model.codec_info()
    head = header_bits(w, h, info.norm_count, info.norm_bits)
    return math.ceil((head + model.rate_points[level].nominal_bits(h, w)) / 8)


# ---------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("size", SIZES)
def test_files_carry_exactly_the_symbols_at_every_level(model, size):
    h, w = size
    x = image(h, w, seed=h * w)
    info = model.codec_info()
    for level in range(model.num_levels):
        data = model.compress(x, level)
        coded = model.encode(x, level)
        back = read_bitstream(data, info)
        assert torch.equal(back.indices, coded.indices) and back.norm_codes == coded.norm_codes
        assert (back.level, back.height, back.width) == (level, h, w)
        # Uniform priors: fixed-length coding, exactly header + nominal bits.
        assert len(data) == max_file_bytes(model, level, h, w)
        assert read_header(data).mode == CodingMode.FIXED


@pytest.mark.parametrize("size", [(64, 64), (17, 5), (45, 77)])
def test_decompress_gives_the_pixels_of_decode(model, size):
    h, w = size
    x = image(h, w, seed=7)
    levels = range(model.num_levels) if size == (64, 64) else (0, model.num_levels - 1)
    for level in levels:
        data = model.compress(x, level)
        y = model.decompress(data)
        assert y.shape == (1, 3, h, w) and y.dtype == torch.float32
        assert torch.equal(y, model.decode(model.encode(x, level)))
        assert torch.equal(model.decompress(data), y)  # same file, same pixels


def test_codec_info_describes_the_model_and_is_cached(model, tiny_zoo):
    info = model.codec_info()
    assert info is model.codec_info()
    assert info.fingerprint == model.fingerprint()
    assert info.levels == [(p.downsamplings, p.codebook_size) for p in model.rate_points]
    assert (info.norm_count, info.norm_bits) == (model.latent_channels, model.config.norm_bits)
    assert all(p.is_uniform for p in info.priors)
    plain = make_model(tiny_zoo, latent_norms="none")
    plain_info = plain.codec_info()
    assert (plain_info.norm_count, plain_info.norm_bits) == (0, 0)
    x = image(40, 56)
    data = plain.compress(x, 1)
    assert torch.equal(plain.decompress(data), plain.decode(plain.encode(x, 1)))
    with pytest.raises(ModelMismatchError):  # latent_norms is in the fingerprint
        model.decompress(data)


def test_oracle_models_cannot_write_files(tiny_zoo):
    oracle = make_model(tiny_zoo, latent_norms="oracle")
    with pytest.raises(CodecError, match="oracle"):
        oracle.compress(image(32, 32), 0)


def test_another_model_is_refused(model, tiny_zoo):
    other = make_model(tiny_zoo, seed=1)
    data = model.compress(image(64, 64), 3)
    with pytest.raises(ModelMismatchError, match="another model"):
        other.decompress(data)


def test_image_outside_the_format_is_a_user_error(model):
    with pytest.raises(CodecError, match="70000x1"):
        model.compress(torch.zeros(1, 3, 1, 70000), 0)
    with pytest.raises(CodecError, match="level 9"):
        model.compress(image(8, 8), 9)


# ---------------------------------------------------------------------------------------------- rate control


@pytest.mark.parametrize("size", [(64, 64), (512, 768), (17, 5)])
def test_level_for_bpp_is_the_highest_nominal_rate_not_above(model, size):
    h, w = size
    rates = sorted({model.nominal_bpp(lv, h, w) for lv in range(model.num_levels)})
    for target in [*rates, *(r * 1.01 for r in rates)]:
        level = model.level_for_bpp(h, w, target)
        best = max(r for r in rates if r <= target)
        assert model.nominal_bpp(level, h, w) == best
    with pytest.raises(CodecError, match=f"no level reaches .* {w}x{h}"):
        model.level_for_bpp(h, w, rates[0] * 0.99)
    assert model.levels_by_rate(h, w)[0] == max(range(model.num_levels), key=lambda lv: model.nominal_bpp(lv, h, w))


def test_level_for_max_bytes_picks_the_largest_file_that_fits(model):
    x = image(64, 96, seed=2)
    sizes = {level: len(model.compress(x, level)) for level in range(model.num_levels)}
    for budget in sorted(set(sizes.values())) + [max(sizes.values()) + 100]:
        level, data = model.compress_to_max_bytes(x, budget)
        fitting = [lv for lv in model.levels_by_rate(64, 96) if sizes[lv] <= budget]
        assert level == fitting[0] and len(data) == sizes[level] <= budget
    with pytest.raises(CodecError, match="no level fits"):
        model.compress_to_max_bytes(x, min(sizes.values()) - 1)


def test_size_bounds_hold(model):
    for h, w in SIZES:
        for level in range(model.num_levels):
            low, high = model.file_size_bounds(level, h, w)
            assert low == high == max_file_bytes(model, level, h, w)  # uniform priors: FIXED, size known


# ---------------------------------------------------------------------------------------------- priors


def synthetic_batch(count: int, h: int, w: int) -> list[torch.Tensor]:
    """Smooth images: a narrow part of the input space, so codebook usage is skewed."""
    out = []
    for i in range(count):
        g = torch.Generator().manual_seed(100 + i)
        low = torch.rand(1, 3, 4, 4, generator=g) * 2 - 1
        out.append(torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False))
    return out


def test_measured_priors_shrink_files_and_still_decode_exactly(tiny_zoo):
    skewed = make_model(tiny_zoo, seed=3)
    h, w = 48, 64
    *train, test = synthetic_batch(4, h, w)
    counts = measure_index_counts(skewed, train)
    for level, c in enumerate(counts):
        assert c.dtype == torch.int64 and int(c.sum()) == 3 * math.prod(skewed.rate_points[level].token_grid(h, w))
    uniform = skewed.codec_info()
    coded = [skewed.encode(test, level) for level in range(skewed.num_levels)]
    fixed = [write_bitstream(c, uniform) for c in coded]

    skewed.index_counts = counts  # deliberately without invalidate_fingerprint: codec_info must notice
    info = skewed.codec_info()
    assert info.fingerprint != uniform.fingerprint and not info.priors[0].is_uniform
    files = [skewed.compress(test, level) for level in range(skewed.num_levels)]
    for level, (data, old) in enumerate(zip(files, fixed)):
        assert len(data) <= len(old) == max_file_bytes(skewed, level, h, w)
        assert torch.equal(read_bitstream(data, info).indices, coded[level].indices)
        low, high = skewed.file_size_bounds(level, h, w)
        assert low <= len(data) <= high
    best = max(range(skewed.num_levels), key=lambda lv: len(fixed[lv]) - len(files[lv]))
    assert len(files[best]) < len(fixed[best]) and read_header(files[best]).mode == CodingMode.RANS
    assert torch.equal(skewed.decompress(files[best]), skewed.decode(coded[best]))
    with pytest.raises(ModelMismatchError):  # the priors are part of the model's identity
        skewed.decompress(fixed[best])
    # Rate control now has to encode for real: file sizes depend on the content.
    order = skewed.levels_by_rate(h, w)
    for budget in (len(files[best]), len(files[order[0]]) - 1):
        level, data = skewed.compress_to_max_bytes(test, budget)
        assert level == next(lv for lv in order if len(files[lv]) <= budget) and data == files[level]


def test_measure_index_counts_selected_levels_and_errors(model):
    counts = measure_index_counts(model, synthetic_batch(1, 32, 32), levels=[1])
    assert [int(c.sum()) > 0 for c in counts] == [lv == 1 for lv in range(model.num_levels)]
    with pytest.raises(CodecError, match="no images"):
        measure_index_counts(model, [])
    with pytest.raises(CodecError, match="level 42"):
        measure_index_counts(model, synthetic_batch(1, 16, 16), levels=[42])


# ---------------------------------------------------------------------------------------------- image files


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_image_kinds(folder: Path) -> dict[str, tuple[int, int]]:
    """One file per kind of input; returns file name -> expected (height, width) after EXIF rotation."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = _rgb(50, 70)
    Image.fromarray(rgb).save(folder / "rgb.png")
    Image.fromarray(rgb).convert("L").save(folder / "gray.png")
    Image.fromarray(rgb).convert("LA").save(folder / "gray_alpha.png")
    rgba = np.dstack([rgb, np.linspace(0, 255, 70, dtype=np.uint8)[None].repeat(50, 0)])
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(folder / "palette.png")
    deep = (np.arange(50 * 70, dtype=np.uint32).reshape(50, 70) * 18).astype(np.uint16)
    Image.fromarray(deep).save(folder / "deep16.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    rotated = Image.fromarray(_rgb(40, 72, seed=1))
    exif = rotated.getexif()
    exif[0x0112] = 6  # stored landscape 72x40, displayed portrait 40x72
    rotated.save(folder / "exif_rotated.jpg", exif=exif, quality=95)
    Image.fromarray(_rgb(5, 17, seed=2)).save(folder / "tiny.bmp")
    return {
        "rgb.png": (50, 70), "gray.png": (50, 70), "gray_alpha.png": (50, 70), "rgba.png": (50, 70),
        "palette.png": (50, 70), "deep16.png": (50, 70), "cmyk.jpg": (50, 70), "exif_rotated.jpg": (72, 40),
        "tiny.bmp": (5, 17),
    }  # fmt: skip


def test_load_image_every_kind(tmp_path):
    expected = write_image_kinds(tmp_path)
    notes = {}
    for name, (h, w) in expected.items():
        x, info = load_image(tmp_path / name)
        assert x.shape == (1, 3, h, w) and x.dtype == torch.float32, name
        assert -1 <= float(x.min()) and float(x.max()) <= 1, name
        assert (info.height, info.width) == (h, w) and info.path == tmp_path / name
        notes[name] = " ".join(info.notes)
    assert "EXIF orientation 6" in notes["exif_rotated.jpg"]
    assert "alpha" in notes["rgba.png"] and "alpha" in notes["gray_alpha.png"]
    assert "full precision" in notes["deep16.png"] and "CMYK" in notes["cmyk.jpg"] and "palette" in notes["palette.png"]
    gray, _ = load_image(tmp_path / "gray.png")
    assert torch.equal(gray[:, 0], gray[:, 2])
    deep, _ = load_image(tmp_path / "deep16.png")  # 16-bit steps survive (8 bits would merge neighbours)
    assert len(torch.unique(deep[0, 0, 0, :20])) == 20
    rgba, _ = load_image(tmp_path / "rgba.png")  # transparent pixels composited on white
    assert torch.allclose(rgba[0, :, 10, 0], torch.ones(3))


@pytest.mark.parametrize("content", [b"", b"not an image at all", "truncated"])
def test_unreadable_images_raise_one_line_naming_the_file(tmp_path, content):
    path = tmp_path / "bad.png"
    if content == "truncated":
        Image.fromarray(_rgb(64, 64)).save(path)
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(content)
    with pytest.raises(ImageReadError) as err:
        load_image(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)
    with pytest.raises(ImageReadError, match="no such file"):
        load_image(tmp_path / "missing.png")


def test_save_png_is_exact_and_atomic(tmp_path, monkeypatch):
    x = torch.from_numpy(_rgb(9, 13)).permute(2, 0, 1)[None].float() / 127.5 - 1
    path = save_png(x, tmp_path / "out" / "a.png")
    assert np.array_equal(np.asarray(Image.open(path)), _rgb(9, 13))
    assert np.array_equal(to_uint8(x), _rgb(9, 13))
    assert stat.S_IMODE(path.stat().st_mode) & 0o044  # readable by others as with open(), not mkstemp's 0600

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(tmp_path / "out" / "b.oscar", b"data")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png"]  # no partial or temporary file


def test_list_images_and_output_paths(tmp_path):
    write_image_kinds(tmp_path / "a")
    write_image_kinds(tmp_path / "a" / "sub")
    (tmp_path / "a" / "notes.txt").write_text("x")
    Image.fromarray(_rgb(4, 4)).save(tmp_path / "a" / ".hidden.png")
    flat = list_images([tmp_path / "a"])
    assert [f.relative.as_posix() for f in flat] == sorted(write_image_kinds(tmp_path / "x"))
    deep = list_images([tmp_path / "a", tmp_path / "a" / "rgb.png"], recursive=True)
    assert len(deep) == 18 and deep[-1].relative.as_posix() == "sub/tiny.bmp"  # the file is not listed twice
    outs = output_paths(deep, tmp_path / "o", ".oscar")
    assert outs[0] == tmp_path / "o" / "cmyk.oscar" and outs[-1] == tmp_path / "o" / "sub" / "tiny.oscar"
    with pytest.raises(InputPathError, match="no such file or folder"):
        list_images([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputPathError, match="no images"):
        list_images([tmp_path / "empty"])
    Image.fromarray(_rgb(4, 4)).save(tmp_path / "a" / "rgb.jpg")
    with pytest.raises(InputPathError, match="both be written"):
        output_paths(list_images([tmp_path / "a"]), tmp_path / "o", ".oscar")


def smooth_4k() -> Image.Image:
    """A 3840x2160 gradient (random pixels would make the PNG slow to write and read)."""
    ramp = np.linspace(0, 255, 3840, dtype=np.float32)[None, :, None] * np.ones((2160, 1, 3), np.float32)
    return Image.fromarray(ramp.astype(np.uint8))


def test_4k_image_loads_and_plans_without_running_the_model(model, tmp_path):
    smooth_4k().save(tmp_path / "big.png")
    x, info = load_image(tmp_path / "big.png")
    assert x.shape == (1, 3, 2160, 3840) and (info.width, info.height) == (3840, 2160)
    level = model.level_for_bpp(2160, 3840, 0.05)
    assert model.nominal_bpp(level, 2160, 3840) <= 0.05
    low, high = model.file_size_bounds(level, 2160, 3840)
    assert low == high == max_file_bytes(model, level, 2160, 3840)


@pytest.mark.slow
def test_4k_image_encodes_with_vae_tiling(tiny_zoo, tmp_path):
    """Encoder side only: the UNet (decoder side) runs on the whole latent, far too slow for a CPU test."""
    big = make_model(tiny_zoo, vae_tiling="on")
    big.vae.tile_sample_min_size, big.vae.tile_latent_min_size = 512, 64  # the tiny VAE's 64-pixel tiles: 3600 calls
    smooth_4k().save(tmp_path / "big.png")
    x, _ = load_image(tmp_path / "big.png")
    data = big.compress(x, 0)
    assert len(data) == max_file_bytes(big, 0, 2160, 3840)
    coded = read_bitstream(data, big.codec_info())
    assert (coded.height, coded.width) == (2160, 3840) and tuple(coded.indices.shape) == (34, 60)
