"""The file format: exact round trips, size bounds, the documented layout, and robustness to bad files."""

from __future__ import annotations

import math
import re
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.oscar.coded_image import CodedImage
from models.blocks.index_coder import IndexPrior, bits_per_index
from models.oscar.rate_table import RATE_TABLE
from models.blocks.container import (
    CONTAINER_LAYOUT,
    FORMAT_VERSION,
    MAGIC,
    MAX_PIXELS,
    METHOD_IDS,
    BadMagicError,
    BitstreamError,
    CorruptBitstreamError,
    ModelMismatchError,
    TruncatedBitstreamError,
    UnsupportedVersionError,
    WrongMethodError,
    fingerprint_tag,
)
from models.oscar.bitstream import (
    PAYLOAD_LAYOUT,
    V1_LAYOUT,
    CodecInfo,
    CodingMode,
    header_bits,
    read_bitstream,
    read_header,
    write_bitstream,
)
from utils.errors import UserError

DOC = Path(__file__).resolve().parents[1] / "docs" / "bitstream.md"
SIZES = ((17, 5), (768, 512), (512, 768), (1000, 333), (64, 64))  # (width, height)
FINGERPRINT = 0x1234_5678_9ABC_DEF0
LEVELS = [(p.downsamplings, p.codebook_size) for p in RATE_TABLE]  # all 12 rate points of the table


def skewed_prior(size: int, decay: float = 0.9) -> tuple[IndexPrior, np.ndarray]:
    probs = decay ** np.arange(size)
    probs /= probs.sum()
    return IndexPrior.from_counts(np.round(probs * 1e7).astype(np.int64)), probs


def make_info(skewed: bool, norm: bool, levels: list[tuple[int, int]] = LEVELS) -> CodecInfo:
    priors = [skewed_prior(size)[0] if skewed else IndexPrior.uniform(size) for _, size in levels]
    return CodecInfo(FINGERPRINT, levels, priors, norm_count=4 if norm else 0, norm_bits=6 if norm else 0)


def make_image(info: CodecInfo, level: int, width: int, height: int, skewed: bool, seed: int = 0) -> CodedImage:
    rng = np.random.default_rng(seed)
    grid = info.grid(level, height, width)
    size = info.levels[level][1]
    if skewed:
        indices = rng.choice(size, size=grid, p=skewed_prior(size)[1])
    else:
        indices = rng.integers(0, size, size=grid)
    norm = tuple(int(v) for v in rng.integers(0, 1 << info.norm_bits, size=info.norm_count)) or None
    return CodedImage(level, height, width, torch.from_numpy(indices.astype(np.int64)), norm)


def assert_same(a: CodedImage, b: CodedImage) -> None:
    assert (a.level, a.height, a.width, a.norm_codes) == (b.level, b.height, b.width, b.norm_codes)
    assert a.indices.dtype == b.indices.dtype == torch.int64
    assert torch.equal(a.indices, b.indices)


# ---------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("skewed", [False, True], ids=["uniform", "skewed"])
@pytest.mark.parametrize("norm", [False, True], ids=["no_side", "side"])
@pytest.mark.parametrize("width, height", SIZES)
def test_round_trip_every_level(width: int, height: int, norm: bool, skewed: bool) -> None:
    info = make_info(skewed, norm)
    for level, (_, size) in enumerate(LEVELS):
        coded = make_image(info, level, width, height, skewed, seed=level)
        data = write_bitstream(coded, info)
        header = read_header(data)
        assert (header.level, header.width, header.height) == (level, width, height)
        assert_same(read_bitstream(data, info), coded)

        count = coded.indices.numel()
        prefix = header_bits(width, height, info.norm_count, info.norm_bits)
        nominal = count * bits_per_index(size)
        assert len(data) <= math.ceil((prefix + nominal) / 8)  # never worse than fixed-length coding
        if header.mode == CodingMode.FIXED:
            assert len(data) == math.ceil((prefix + nominal) / 8)
        else:
            assert count >= 16 and (len(data) - math.ceil(prefix / 8)) * 8 < nominal
        if not skewed:
            assert header.mode == CodingMode.FIXED
        elif count >= 1024:
            assert header.mode == CodingMode.RANS


def test_round_trip_accepts_bytearray_and_memoryview() -> None:
    info = make_info(True, True)
    coded = make_image(info, 3, 100, 80, True)
    data = write_bitstream(coded, info)
    assert_same(read_bitstream(bytearray(data), info), coded)
    assert_same(read_bitstream(memoryview(data), info), coded)


def test_size_coding_extremes() -> None:
    info = make_info(False, False, levels=[(3, 256)])
    for width, height in ((1, 1), (65536, 1), (1, 65536), (16384, 16384), (65536, 4096), (640, 65535)):
        coded = make_image(info, 0, width, height, False)
        assert_same(read_bitstream(write_bitstream(coded, info), info), coded)


# ---------------------------------------------------------------------------------------------- the document


def doc_table(marker: str) -> list[list[str]]:
    text = DOC.read_text()
    match = re.search(rf"<!-- {marker}:begin -->\n(.*?)<!-- {marker}:end -->", text, re.DOTALL)
    assert match, f"docs/bitstream.md lacks the {marker} table"
    rows = [line.strip().strip("|").split("|") for line in match.group(1).strip().splitlines()]
    return [[cell.strip() for cell in row] for row in rows[2:]]  # skip header and separator


@pytest.mark.parametrize(
    "marker, layout",
    [("container-fields", CONTAINER_LAYOUT), ("oscar-payload-fields", PAYLOAD_LAYOUT), ("oscar-v1-fields", V1_LAYOUT)],
)
def test_doc_field_tables_match_code(marker: str, layout: tuple[tuple[str, str], ...]) -> None:
    documented = [(row[0], row[1]) for row in doc_table(marker)]
    assert documented == list(layout)
    assert f"`0x{MAGIC:02X}`" in DOC.read_text() and f"version {FORMAT_VERSION}" in DOC.read_text()


def test_doc_method_ids_match_code() -> None:
    documented = {row[0].strip("`"): int(row[1]) for row in doc_table("method-ids")}
    assert documented == {name: i for name, i in METHOD_IDS.items() if name in documented}
    assert {"oscar", "stablecodec", "sodec"} <= set(documented)


def test_doc_sizes_match_code() -> None:
    for image, side, bits, fixed_file, rans_file in doc_table("header-sizes"):
        width, height = (int(v) for v in image.split("x"))
        norm = side != "none"
        assert int(bits) == header_bits(width, height, 4 if norm else 0, 6 if norm else 0)
        info = make_info(False, norm, levels=[(3, 256)])
        written = write_bitstream(make_image(info, 0, width, height, False), info)
        assert fixed_file == f"{len(written)} bytes"
        assert rans_file == f"payload + {math.ceil(int(bits) / 8)} bytes"


def test_header_size_for_kodak() -> None:
    """Version 2 adds the 4-bit method field to version 1's 46 bits (70 with the latent norms)."""
    assert header_bits(768, 512) == 50 and header_bits(768, 512, 4, 6) == 74


# ---------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def files() -> dict[str, tuple[bytes, CodecInfo]]:
    """Small valid files: FIXED and RANS, with and without side info."""
    out = {}
    for skewed in (False, True):
        for norm in (False, True):
            info = make_info(skewed, norm)
            coded = make_image(info, 7, 200, 136, skewed, seed=5)  # k=1, K=256: 9 x 13 tokens
            data = write_bitstream(coded, info)
            assert read_header(data).mode == (CodingMode.RANS if skewed else CodingMode.FIXED)
            out[f"{'rans' if skewed else 'fixed'}-{'side' if norm else 'plain'}"] = (data, info)
    return out


def test_errors_are_user_errors() -> None:
    for error in (TruncatedBitstreamError, BadMagicError, UnsupportedVersionError, ModelMismatchError,
                  CorruptBitstreamError, WrongMethodError):
        assert issubclass(error, BitstreamError) and issubclass(error, UserError)


def test_truncated_at_every_offset(files: dict[str, tuple[bytes, CodecInfo]]) -> None:
    for name, (data, info) in files.items():
        prefix_bytes = header_bits(200, 136, info.norm_count, info.norm_bits) // 8
        for end in range(len(data)):
            expected = (
                TruncatedBitstreamError
                if end <= prefix_bytes or name.startswith("fixed")
                else (TruncatedBitstreamError, CorruptBitstreamError)
            )
            with pytest.raises(expected):
                read_bitstream(data[:end], info)


def test_empty_file_is_truncated() -> None:
    with pytest.raises(TruncatedBitstreamError, match="magic"):
        read_header(b"")


def test_wrong_magic(files: dict[str, tuple[bytes, CodecInfo]]) -> None:
    data, info = files["fixed-plain"]
    for bad in (b"\x89PNG\r\n\x1a\n" + data[8:], bytes([data[0] ^ 1]) + data[1:]):
        with pytest.raises(BadMagicError, match="not a codec file of this project"):
            read_bitstream(bad, info)


def test_wrong_version(files: dict[str, tuple[bytes, CodecInfo]]) -> None:
    data, info = files["fixed-plain"]
    for version in (0, 3, 15):
        bad = bytes([data[0], (version << 4) | (data[1] & 0x0F)]) + data[2:]
        with pytest.raises(UnsupportedVersionError, match=f"version {version}"):
            read_bitstream(bad, info)


def test_wrong_model(files: dict[str, tuple[bytes, CodecInfo]]) -> None:
    data, info = files["rans-side"]
    other = CodecInfo(FINGERPRINT ^ (1 << 40), info.levels, info.priors, info.norm_count, info.norm_bits)
    assert fingerprint_tag(other.fingerprint) != fingerprint_tag(FINGERPRINT)
    with pytest.raises(ModelMismatchError, match="another model"):
        read_bitstream(data, other)


def test_level_beyond_model(files: dict[str, tuple[bytes, CodecInfo]]) -> None:
    data, info = files["fixed-plain"]
    few = CodecInfo(FINGERPRINT, info.levels[:4], info.priors[:4])
    with pytest.raises(CorruptBitstreamError, match="level 7 out of range"):
        read_bitstream(data, few)


def raw_header(width_value: int, height_value: int, shift: int, value_bits: int, tail: bytes = b"") -> bytes:
    """A hand-made header (fields as in the doc), to claim sizes the writer refuses to produce."""
    fields = [(MAGIC, 8), (FORMAT_VERSION, 4), (METHOD_IDS["oscar"], 4), (fingerprint_tag(FINGERPRINT), 16), (0, 4),
              (shift, 3), (value_bits - 1, 4), (width_value, value_bits), (height_value, value_bits), (0, 1)]
    value, bits = 0, 0
    for field, width in fields:
        value, bits = (value << width) | field, bits + width
    pad = -bits % 8
    return (value << pad).to_bytes((bits + pad) // 8, "big") + tail


@pytest.mark.parametrize(
    "width_value, height_value, shift, value_bits",
    [
        (3124, 3124, 5, 12),  # 100000 x 100000
        (65535, 65535, 0, 16),  # 65536 x 65536 = 2^32 pixels
        (65535, 65535, 7, 16),  # 2^23 per side
        (16384, 16383, 0, 15),  # 16385 x 16384: just over 2^28 pixels
    ],
)
def test_absurd_dimensions_fail_fast(width_value: int, height_value: int, shift: int, value_bits: int) -> None:
    data = raw_header(width_value, height_value, shift, value_bits, tail=bytes(64))
    info = make_info(False, False, levels=[(0, 16)])
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(CorruptBitstreamError, match="outside the format's limits"):
        read_bitstream(data, info)
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < 0.5 and peak < 1 << 20


def test_largest_allowed_size_is_accepted_by_header() -> None:
    header = read_header(raw_header(127, 127, 7, 7))  # 16384 x 16384 = 2^28 pixels
    assert header.width * header.height == MAX_PIXELS


def test_non_canonical_size_coding_is_rejected() -> None:
    with pytest.raises(CorruptBitstreamError, match="not coded the way"):
        read_header(raw_header(5, 3, 6, 3))  # 768x512 with shift 6 instead of 7
    with pytest.raises(CorruptBitstreamError, match="not coded the way"):
        read_header(raw_header(5, 3, 7, 4))  # one bit wider than needed


def test_trailing_garbage(files: dict[str, tuple[bytes, CodecInfo]]) -> None:
    for data, info in files.values():
        for tail in (b"\0", b"\xff", bytes(4), b"garbage!", bytes(range(256))):
            with pytest.raises(CorruptBitstreamError):
                read_bitstream(data + tail, info)


def test_nonzero_padding(files: dict[str, tuple[bytes, CodecInfo]]) -> None:
    for data, info in files.values():
        after_prefix = 8 * len(data) - header_bits(200, 136, info.norm_count, info.norm_bits)
        used = 117 * 8 if read_header(data).mode == CodingMode.FIXED else after_prefix - after_prefix % 8
        assert 0 < after_prefix - used < 8, "fixture should have padding bits"
        bad = data[:-1] + bytes([data[-1] | 1])
        with pytest.raises(CorruptBitstreamError, match="padding"):
            read_bitstream(bad, info)


def test_byte_flips_in_header_and_rans_payload(files: dict[str, tuple[bytes, CodecInfo]]) -> None:
    """Every byte change in the fixed-width header fields or a RANS payload is caught.

    Not checked, by design (see docs/bitstream.md): FIXED payloads, side information, and size bits whose
    change keeps the token grid (e.g. the lowest width bit).
    """
    for name, (data, info) in files.items():
        header_end = 5  # bytes 0-4 hold magic .. the first size_bits bit (the fixed fields take 43 bits)
        assert header_bits(1, 1) == 8 * header_end + 3 + 2 + 1  # 1x1: size_bits' rest, two 1-bit sizes, mode
        end = len(data) if name.startswith("rans") else header_end
        for offset in range(end):
            if info.norm_count and offset >= header_end:
                continue  # side information carries no redundancy
            for mask in (0x01, 0x80, 0xFF):
                bad = bytearray(data)
                bad[offset] ^= mask
                try:
                    decoded = read_bitstream(bytes(bad), info)
                except BitstreamError:
                    continue
                # The documented exception: a size change that keeps the token grid (same symbols, other crop).
                original = read_bitstream(data, info)
                assert (decoded.width, decoded.height) != (original.width, original.height), (offset, mask)
                assert torch.equal(decoded.indices, original.indices), (offset, mask)


def test_write_validates(files: dict[str, tuple[bytes, CodecInfo]]) -> None:
    info = make_info(False, True)
    good = make_image(info, 7, 200, 136, False)
    cases = [
        (CodedImage(12, 136, 200, good.indices, good.norm_codes), "level 12 out of range"),
        (CodedImage(7, 136, 300, good.indices, good.norm_codes), r"expected \(9, 19\)"),
        (CodedImage(7, 136, 200, good.indices + 256, good.norm_codes), r"\[0, 256\)"),
        (CodedImage(7, 136, 200, good.indices, None), "expected 4 norm codes"),
        (CodedImage(7, 136, 200, good.indices, (1, 2, 3)), "expected 4 norm codes"),
        (CodedImage(7, 136, 200, good.indices, (1, 2, 3, 64)), r"\[0, 64\)"),
        (CodedImage(7, 136, 70000, torch.zeros(9, 4375, dtype=torch.int64), good.norm_codes), "limits"),
    ]
    for coded, message in cases:
        with pytest.raises(ValueError, match=message):
            write_bitstream(coded, info)
    with pytest.raises(ValueError, match="no norm codes"):
        write_bitstream(good, make_info(False, False))


def test_codec_info_validates() -> None:
    with pytest.raises(ValueError, match="prior has 16 entries"):
        CodecInfo(1, [(0, 32)], [IndexPrior.uniform(16)])
    with pytest.raises(ValueError, match="1 to 16 levels"):
        CodecInfo(1, [(0, 16)] * 17, [IndexPrior.uniform(16)] * 17)
    with pytest.raises(ValueError, match="non-negative"):
        CodecInfo(-1, [(0, 16)], [IndexPrior.uniform(16)])
    with pytest.raises(ValueError, match="side information"):
        CodecInfo(1, [(0, 16)], [IndexPrior.uniform(16)], norm_count=4, norm_bits=0)


def test_fingerprint_tag_folds_all_bits() -> None:
    assert fingerprint_tag(0) == 0 and fingerprint_tag(0xBEEF) == 0xBEEF
    assert fingerprint_tag(1 << 96) == 1 and fingerprint_tag(0xABCD_ABCD) == 0


# ---------------------------------------------------------------------------------------------- fuzzing

MUTATIONS = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("set"), st.integers(0, 10**6), st.integers(0, 255)),
)


def mutate(data: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    out = bytearray(data)
    for kind, position, value in mutations:
        at = position % (len(out) + 1)
        if kind == "flip" and at < len(out):
            out[at] ^= 1 << value
        elif kind == "truncate":
            del out[at:]
        elif kind == "insert":
            out.insert(at, value)
        elif kind == "delete" and at < len(out):
            del out[at]
        elif kind == "set" and at < len(out):
            out[at] = value
    return bytes(out)


FUZZ_SETTINGS = settings(
    max_examples=5000, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


def check_read(data: bytes, info: CodecInfo) -> None:
    try:
        coded = read_bitstream(data, info)
    except BitstreamError:
        return
    grid = info.grid(coded.level, coded.height, coded.width)
    assert tuple(coded.indices.shape) == grid
    assert int(coded.indices.min()) >= 0 and int(coded.indices.max()) < info.levels[coded.level][1]


@FUZZ_SETTINGS
@given(name=st.sampled_from(["fixed-plain", "fixed-side", "rans-plain", "rans-side"]),
       mutations=st.lists(MUTATIONS, min_size=1, max_size=4))
def test_mutated_files_raise_only_bitstream_errors(
    files: dict[str, tuple[bytes, CodecInfo]], name: str, mutations: list[tuple[str, int, int]]
) -> None:
    data, info = files[name]
    check_read(mutate(data, mutations), info)


@settings(max_examples=2000, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=st.binary(min_size=0, max_size=12), tail=st.binary(min_size=0, max_size=200))
def test_random_bytes_after_a_valid_prefix(
    files: dict[str, tuple[bytes, CodecInfo]], prefix: bytes, tail: bytes
) -> None:
    """Random headers (magic and version kept half the time, so parsing gets past them) and random payloads."""
    data, info = files["rans-plain"]
    check_read(bytes(prefix) + tail, info)
    check_read(data[:2] + prefix + tail, info)
    check_read(data[:5] + tail, info)


# ---------------------------------------------------------------------------------------------- versions and methods


def write_v1(coded: CodedImage, info: CodecInfo) -> bytes:
    """The version-1 writer (OSCAR's format before the container had a method field), kept here to make old files."""
    from models.blocks.container import BitWriter, size_fields
    from models.blocks.index_coder import encode_indices

    grid = info.grid(coded.level, coded.height, coded.width)
    prior = info.priors[coded.level]
    mode, payload = encode_indices(coded.indices.reshape(-1), prior)
    writer = BitWriter()
    for value, bits in ((MAGIC, 8), (1, 4), (fingerprint_tag(info.fingerprint), 16), (coded.level, 4), (int(mode), 1)):
        writer.write(value, bits)
    shift, value_bits = size_fields(coded.width, coded.height)
    for value, bits in ((shift, 3), (value_bits - 1, 4), ((coded.width >> shift) - 1, value_bits),
                        ((coded.height >> shift) - 1, value_bits)):
        writer.write(value, bits)
    for code in coded.norm_codes or ():
        writer.write(int(code), info.norm_bits)
    fixed = mode == CodingMode.FIXED
    writer.write_bytes(payload, grid[0] * grid[1] * bits_per_index(prior.codebook_size) if fixed else 8 * len(payload))
    return writer.to_bytes()


@pytest.mark.parametrize("skewed", [False, True], ids=["fixed", "rans"])
@pytest.mark.parametrize("width, height", SIZES)
def test_version_1_files_still_decode(width: int, height: int, skewed: bool) -> None:
    info = make_info(skewed, True)
    for level in (0, 5, 11):
        coded = make_image(info, level, width, height, skewed, seed=level)
        old = write_v1(coded, info)
        assert old[1] >> 4 == 1
        header = read_header(old)
        assert (header.version, header.level, header.width, header.height) == (1, level, width, height)
        assert_same(read_bitstream(old, info), coded)
        new = write_bitstream(coded, info)
        assert new[1] >> 4 == 2 and len(new) <= len(old) + 1  # the method field costs at most one byte


def test_file_of_another_method_is_refused_by_name(files: dict[str, tuple[bytes, CodecInfo]]) -> None:
    data, info = files["fixed-plain"]
    as_stablecodec = bytes([data[0], (data[1] & 0xF0) | METHOD_IDS["stablecodec"]]) + data[2:]
    with pytest.raises(WrongMethodError, match="method 'stablecodec'; this model is method 'oscar'"):
        read_bitstream(as_stablecodec, info)
    unknown = bytes([data[0], (data[1] & 0xF0) | 13]) + data[2:]
    with pytest.raises(WrongMethodError, match=r"unknown method \(id 13\)"):
        read_bitstream(unknown, info)
