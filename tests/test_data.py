"""Tests for utils.data: listing, decoding, crops and modes, bad files, determinism, validation images."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from utils.data import (
    DatasetError,
    ImageFolderDataset,
    UnreadableImageWarning,
    ValidationImages,
    apply_mode,
    list_images,
    load_image,
    make_dataloader,
    write_synthetic_images,
)

P = 32  # patch size used throughout: small keeps the tests fast


def _save(path: Path, size: tuple[int, int] = (60, 50), seed: int = 0, mode: str = "RGB") -> Path:
    """A random image of ``size`` (w, h) saved at ``path`` (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(array).convert(mode).save(path)
    return path


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_images(root, count=8, size=(72, 56), seed=3)
    return root


# ---------------------------------------------------------------------------------------------- listing


def test_listing_across_nested_roots_and_formats(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    names_a = ["z.png", "sub/deeper/x.JPG", "sub/y.jpeg", "m.bmp", "n.webp", "o.tif", "p.tiff", "q.ppm"]
    for i, name in enumerate(names_a):
        _save(a / name, seed=i)
    _save(b / "k.png", seed=20)
    (a / "notes.txt").write_text("not an image")
    _save(a / ".hidden.png", seed=21)
    _save(a / ".cache" / "c.png", seed=22)

    files = list_images([a, b])

    expected_a = sorted(names_a, key=lambda n: n)  # relative posix paths, sorted within the root
    assert [f.relative_to(a).as_posix() for f in files[:-1]] == expected_a
    assert files[-1] == b / "k.png"
    assert list_images([a, b]) == files  # deterministic
    assert len(list_images([a, a])) == len(names_a)  # a file reached twice is listed once


def test_missing_root_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match="nowhere"):
        ImageFolderDataset([tmp_path, missing], patch_size=P)


def test_empty_folder_names_roots_and_extensions(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(DatasetError) as err:
        ImageFolderDataset([tmp_path], patch_size=P)
    assert str(tmp_path) in str(err.value) and ".png" in str(err.value) and ".webp" in str(err.value)


# ---------------------------------------------------------------------------------------------- decoding


def test_load_image_converts_modes_to_rgb(tmp_path: Path) -> None:
    gray = _save(tmp_path / "gray.png", mode="L")
    palette = _save(tmp_path / "palette.png", mode="P")
    for path in (gray, palette):
        x = load_image(path)
        assert x.shape == (3, 50, 60) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert torch.equal(load_image(gray)[0], load_image(gray)[2])

    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red, fully transparent except the first pixel
    rgba[0, 0, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    x = load_image(tmp_path / "rgba.png")
    assert torch.allclose(x[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(x[:, 1, 1], torch.ones(3))  # transparent -> white background


def test_load_image_keeps_16_bit_precision(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    x = load_image(tmp_path / "deep.png")
    assert torch.allclose(x[0, 0], torch.tensor(values[0] / 65535.0, dtype=torch.float32), atol=1e-6)


def test_load_image_applies_exif_orientation(tmp_path: Path) -> None:
    array = np.random.default_rng(1).integers(0, 256, (10, 20, 3), dtype=np.uint8)
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(tmp_path / "rotated.png", exif=exif)
    x = load_image(tmp_path / "rotated.png")
    expected = np.rot90(array, k=-1)  # clockwise quarter turn
    assert x.shape == (3, 20, 10)
    assert torch.allclose(x, torch.from_numpy(expected.copy()).permute(2, 0, 1).float() / 255)


# ---------------------------------------------------------------------------------------------- patches


def test_patch_shape_and_range(synthetic_root: Path) -> None:
    dataset = ImageFolderDataset([synthetic_root], patch_size=P, seed=1)
    assert len(dataset) == 8
    for i in range(len(dataset)):
        x = dataset[i]
        assert x.shape == (3, P, P) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1


def _numpy_mode(x: np.ndarray, mode: int) -> np.ndarray:
    """Independent definition of the 8 dihedral modes on an [H, W, ...] array."""
    if mode >= 4:
        x = np.fliplr(x)
    return np.rot90(x, mode % 4)


def test_apply_mode_gives_the_8_flips_and_rotations() -> None:
    x = torch.arange(2 * 5 * 5, dtype=torch.float32).view(2, 5, 5)
    outputs = [apply_mode(x, m) for m in range(8)]
    assert len({tuple(o.flatten().tolist()) for o in outputs}) == 8  # all distinct: the whole dihedral group
    for m, out in enumerate(outputs):
        expected = _numpy_mode(x.permute(1, 2, 0).numpy(), m)
        assert torch.equal(out, torch.from_numpy(expected.copy()).permute(2, 0, 1))
    with pytest.raises(ValueError):
        apply_mode(x, 8)


def test_crops_follow_the_reference_recipe(synthetic_root: Path) -> None:
    """Every sample equals: (P+8) crop at (top, left) -> mode -> P crop at the inner offset, rebuilt by hand."""
    dataset = ImageFolderDataset([synthetic_root], patch_size=P, seed=5)
    modes, inner = set(), set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            image = load_image(dataset.paths[i]).permute(1, 2, 0).numpy()
            params = dataset.crop_params(i, image.shape[0], image.shape[1])
            modes.add(params.mode)
            inner.add((params.inner_top, params.inner_left))
            c = P + 8
            big = image[params.top : params.top + c, params.left : params.left + c]
            big = _numpy_mode(big, params.mode)
            expected = big[params.inner_top : params.inner_top + P, params.inner_left : params.inner_left + P]
            expected_t = torch.from_numpy(expected.copy()).permute(2, 0, 1) * 2 - 1
            assert torch.allclose(dataset[i], expected_t, atol=1e-6)
    assert modes == set(range(8))
    assert (4, 4) in inner and len(inner) > 5  # centre about half the time, random otherwise


def test_augment_false_keeps_orientation(synthetic_root: Path) -> None:
    dataset = ImageFolderDataset([synthetic_root], patch_size=P, augment=False)
    assert {dataset.crop_params(i, 56, 72).mode for i in range(40)} == {0}


# ---------------------------------------------------------------------------------------------- small and bad files


def test_small_images_are_padded(tmp_path: Path) -> None:
    _save(tmp_path / "small.png", size=(30, 20))
    _save(tmp_path / "tiny.png", size=(3, 2))  # too small to reflect: replicated
    dataset = ImageFolderDataset([tmp_path], patch_size=P)
    assert len(dataset) == 2
    for i in range(2):
        x = dataset[i]
        assert x.shape == (3, P, P) and x.min() >= -1 and x.max() <= 1
    tiny = load_image(tmp_path / "tiny.png") * 2 - 1
    colours = {tuple(c) for c in tiny.flatten(1).t().tolist()}
    assert {tuple(c) for c in dataset[1].flatten(1).t().tolist()} <= colours


def test_small_images_are_skipped_with_a_count(tmp_path: Path) -> None:
    _save(tmp_path / "big.png", size=(64, 64))
    _save(tmp_path / "small1.png", size=(30, 20))
    _save(tmp_path / "small2.png", size=(64, 39))  # 39 < P + 8
    with pytest.warns(UserWarning, match="skipped 2 of 3"):
        dataset = ImageFolderDataset([tmp_path], patch_size=P, small_images="skip")
    assert [p.name for p in dataset.paths] == ["big.png"]


def test_corrupt_file_is_skipped_and_named(tmp_path: Path) -> None:
    _save(tmp_path / "a.png", size=(64, 64), seed=1)
    (tmp_path / "b_garbage.png").write_bytes(b"this is not a png at all" * 10)
    _save(tmp_path / "c.png", size=(64, 64), seed=2)
    with pytest.warns(UnreadableImageWarning, match="b_garbage.png"):
        dataset = ImageFolderDataset([tmp_path], patch_size=P)
    assert [p.name for p in dataset.paths] == ["a.png", "c.png"]


def test_truncated_file_falls_back_to_the_next_image(tmp_path: Path) -> None:
    """A file whose header reads but whose data is cut short is replaced, deterministically, by the next index."""
    _save(tmp_path / "a.png", size=(64, 64), seed=1)
    good = _save(tmp_path / "b.png", size=(64, 64), seed=2)
    _save(tmp_path / "c.png", size=(64, 64), seed=3)
    good.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    dataset = ImageFolderDataset([tmp_path], patch_size=P, seed=4)
    assert len(dataset) == 3
    with pytest.warns(UnreadableImageWarning, match="b.png"):
        replaced = dataset[1]
    assert torch.equal(replaced, dataset[2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once: no second warning
        dataset[1]


def test_all_files_unreadable_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"garbage")
    with pytest.warns(UnreadableImageWarning), pytest.raises(DatasetError, match="no usable images"):
        ImageFolderDataset([tmp_path], patch_size=P)


# ---------------------------------------------------------------------------------------------- determinism


def test_same_seed_epoch_index_gives_same_tensor(synthetic_root: Path) -> None:
    first = ImageFolderDataset([synthetic_root], patch_size=P, seed=7)
    second = ImageFolderDataset([synthetic_root], patch_size=P, seed=7)
    first.set_epoch(3)
    second.set_epoch(3)
    assert all(torch.equal(first[i], second[i]) for i in range(len(first)))
    second.set_epoch(4)
    assert not all(torch.equal(first[i], second[i]) for i in range(len(first)))
    other_seed = ImageFolderDataset([synthetic_root], patch_size=P, seed=8)
    other_seed.set_epoch(3)
    assert not all(torch.equal(first[i], other_seed[i]) for i in range(len(first)))


def _epoch_batches(root: Path, num_workers: int, epoch: int) -> list[torch.Tensor]:
    dataset = ImageFolderDataset([root], patch_size=P, seed=11)
    dataset.set_epoch(epoch)
    loader = make_dataloader(dataset, batch_size=3, num_workers=num_workers, seed=11)
    return list(loader)


def test_worker_count_does_not_change_batches(synthetic_root: Path) -> None:
    serial = _epoch_batches(synthetic_root, num_workers=0, epoch=2)
    parallel = _epoch_batches(synthetic_root, num_workers=2, epoch=2)
    assert len(serial) == 2  # 8 images, batch 3, drop_last
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel, strict=True))


def test_order_depends_on_seed_and_epoch_only(synthetic_root: Path) -> None:
    dataset = ImageFolderDataset([synthetic_root], patch_size=P, seed=0)
    loader = make_dataloader(dataset, batch_size=2, num_workers=0, seed=5)
    orders = []
    for epoch in (0, 1, 0):
        dataset.set_epoch(epoch)
        orders.append(list(loader.sampler))
    assert orders[0] == orders[2] and orders[0] != orders[1]
    assert sorted(orders[0]) == list(range(len(dataset)))
    unshuffled = make_dataloader(dataset, batch_size=2, num_workers=0, seed=5, shuffle=False)
    assert list(unshuffled.sampler) == list(range(len(dataset)))


def test_resume_mid_epoch_skips_to_the_same_batches(synthetic_root: Path) -> None:
    full = _epoch_batches(synthetic_root, num_workers=0, epoch=1)
    dataset = ImageFolderDataset([synthetic_root], patch_size=P, seed=11)
    dataset.set_epoch(1)
    loader = make_dataloader(dataset, batch_size=3, num_workers=0, seed=11)
    loader.sampler.skip_next(3)  # one batch already trained on
    resumed = list(loader)
    assert len(resumed) == 1 and torch.equal(resumed[0], full[1])
    assert len(list(loader)) == 2  # the skip applies to one pass only


def test_dataloader_rejects_a_dataset_smaller_than_a_batch(synthetic_root: Path) -> None:
    dataset = ImageFolderDataset([synthetic_root], patch_size=P)
    with pytest.raises(DatasetError, match="fewer than one batch"):
        make_dataloader(dataset, batch_size=9, num_workers=0, seed=0)


# ---------------------------------------------------------------------------------------------- validation, synthetic


def test_validation_images_whole_sorted_named(tmp_path: Path) -> None:
    _save(tmp_path / "kodim02.png", size=(40, 30), seed=2)
    _save(tmp_path / "kodim01.png", size=(30, 40), seed=1)
    _save(tmp_path / "nested" / "kodim00.png", seed=0)  # not directly inside: ignored
    images = ValidationImages(tmp_path)
    assert [v.name for v in images] == ["kodim01", "kodim02"]
    first = images[0]
    assert first.image.shape == (3, 40, 30) and first.image.min() >= -1 and first.image.max() <= 1
    assert torch.allclose(first.image, load_image(tmp_path / "kodim01.png") * 2 - 1)
    assert len(ValidationImages(tmp_path, max_images=1)) == 1
    with pytest.raises(DatasetError, match="missing"):
        ValidationImages(tmp_path / "missing")


def test_synthetic_images_are_reproducible_and_varied(tmp_path: Path) -> None:
    first = write_synthetic_images(tmp_path / "a", count=4, size=64, seed=9)
    second = write_synthetic_images(tmp_path / "b", count=4, size=64, seed=9)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    arrays = [np.asarray(Image.open(p)) for p in first]
    assert all(a.shape == (64, 64, 3) for a in arrays)
    assert all(a.std() > 10 for a in arrays)  # not flat
    assert len({a.tobytes() for a in arrays}) == 4
