"""Static prior quantization and index coding: exact round trips, mode choice, and safety on garbage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.blocks.index_coder import (
    MAX_CODEBOOK_SIZE,
    PROB_SCALE,
    RANS_MIN_SYMBOLS,
    CodingMode,
    IndexPrior,
    bits_per_index,
    decode_indices,
    encode_indices,
    measure_throughput,
)
from models.blocks.container import BitstreamError, CorruptBitstreamError
from utils.errors import UserError

CODEBOOK_SIZES = (16, 32, 64, 128, 256, 1024, 2048, 8192)


def skewed(size: int, decay: float = 0.95, seed: int = 0, count: int = 0) -> tuple[IndexPrior, np.ndarray]:
    """A geometric-like prior and, if ``count``, indices drawn from it."""
    probs = decay ** np.arange(size)
    probs /= probs.sum()
    prior = IndexPrior.from_counts(np.round(probs * 1e7).astype(np.int64))
    data = np.random.default_rng(seed).choice(size, size=count, p=probs) if count else np.zeros(0, np.int64)
    return prior, data


def test_error_hierarchy() -> None:
    assert issubclass(CorruptBitstreamError, BitstreamError)
    assert issubclass(BitstreamError, UserError)


@pytest.mark.parametrize("size", CODEBOOK_SIZES + (2, 3, 1000, MAX_CODEBOOK_SIZE))
def test_quantized_frequencies_are_valid(size: int) -> None:
    for prior in (IndexPrior.uniform(size), skewed(size, decay=0.5)[0]):
        freqs = prior.frequencies()
        assert freqs.shape == (size,)
        assert freqs.min() >= 1 and int(freqs.sum()) == PROB_SCALE
        cdf = prior.rans_cdf()
        assert len(cdf) == size + 2 and cdf[0] == 0 and cdf[-2] == cdf[-1] == PROB_SCALE


def test_uniform_prior_is_exactly_uniform_for_powers_of_two() -> None:
    assert set(IndexPrior.uniform(256).frequencies().tolist()) == {256}
    assert IndexPrior.from_counts(None, 256) == IndexPrior.uniform(256)
    assert IndexPrior.from_counts(np.zeros(256, np.int64)).is_uniform


def test_quantization_is_deterministic_and_follows_counts() -> None:
    counts = np.array([1000, 10, 0, 1, 5000] + [0] * 11, dtype=np.int64)
    a, b = IndexPrior.from_counts(counts), IndexPrior.from_counts(counts.copy())
    assert a.rans_cdf() == b.rans_cdf()
    freqs = a.frequencies()
    assert freqs[4] > freqs[0] > freqs[1] >= freqs[3] >= freqs[2] == 1


def test_huge_counts_do_not_overflow() -> None:
    counts = np.array([2**62, 1, 2**40, 0], dtype=np.int64)
    freqs = IndexPrior.from_counts(counts).frequencies()
    assert freqs.min() >= 1 and int(freqs.sum()) == PROB_SCALE


def test_tensor_storage_round_trip() -> None:
    prior = skewed(1024)[0]
    tensor = prior.to_tensor()
    assert tensor.dtype == torch.int64 and tensor.shape == (1024,)
    assert IndexPrior.from_tensor(tensor) == prior
    assert IndexPrior.from_tensor(IndexPrior.uniform(64).to_tensor()) == IndexPrior.uniform(64)
    with pytest.raises(ValueError, match="int64"):
        IndexPrior.from_tensor(tensor.float())


@pytest.mark.parametrize(
    "counts, message",
    [(np.zeros((2, 2), np.int64), "1-D"), (np.array([1.0, 2.0]), "integers"), (np.array([1, -1]), "non-negative"),
     (np.array([5]), "codebook size")],
)
def test_bad_counts_are_rejected(counts: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        IndexPrior.from_counts(counts)


def test_missing_counts_need_a_size() -> None:
    with pytest.raises(ValueError, match="codebook size"):
        IndexPrior.from_counts(None)
    with pytest.raises(ValueError, match="codebook has 32"):
        IndexPrior.from_counts(np.ones(16, np.int64), codebook_size=32)


@pytest.mark.parametrize("size", CODEBOOK_SIZES)
@pytest.mark.parametrize("count", [0, 1, RANS_MIN_SYMBOLS - 1, RANS_MIN_SYMBOLS, 96, 6144])
def test_round_trip_both_priors(size: int, count: int) -> None:
    rng = np.random.default_rng(size + count)
    uniform_data = rng.integers(0, size, size=count)
    prior, skewed_data = skewed(size, count=count, seed=count)
    for p, data in ((IndexPrior.uniform(size), uniform_data), (prior, skewed_data)):
        mode, payload = encode_indices(torch.from_numpy(data), p)
        decoded = decode_indices(mode, payload, count, p)
        assert decoded.dtype == torch.int64
        assert torch.equal(decoded, torch.from_numpy(data.astype(np.int64)))
        nominal_bits = count * bits_per_index(size)
        if mode == CodingMode.FIXED:
            assert len(payload) == -(-nominal_bits // 8)
        else:
            assert 8 * len(payload) < nominal_bits and count >= RANS_MIN_SYMBOLS


@pytest.mark.parametrize("size", CODEBOOK_SIZES)
def test_uniform_prior_chooses_fixed(size: int) -> None:
    data = np.random.default_rng(1).integers(0, size, size=6144)
    mode, _ = encode_indices(data, IndexPrior.uniform(size))
    assert mode == CodingMode.FIXED


@pytest.mark.parametrize("size", CODEBOOK_SIZES)
def test_skewed_prior_chooses_shorter_rans(size: int) -> None:
    prior, data = skewed(size, decay=0.9, count=1536)
    mode, payload = encode_indices(data, prior)
    assert mode == CodingMode.RANS
    assert 8 * len(payload) < data.size * bits_per_index(size)


def test_fixed_packing_is_msb_first() -> None:
    mode, payload = encode_indices([1, 2, 3], IndexPrior.uniform(16))
    assert mode == CodingMode.FIXED and payload == bytes([0x12, 0x30])


def test_encode_rejects_out_of_range_indices() -> None:
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        encode_indices([0, 16], IndexPrior.uniform(16))
    with pytest.raises(ValueError, match="1-D"):
        encode_indices(np.zeros((2, 2), np.int64), IndexPrior.uniform(16))


def test_fixed_decode_rejects_bad_length_padding_and_range() -> None:
    prior = IndexPrior.uniform(10)  # 4 bits per index, values 10..15 invalid
    with pytest.raises(CorruptBitstreamError, match="expected 2"):
        decode_indices(CodingMode.FIXED, b"\x12", 3, prior)
    with pytest.raises(CorruptBitstreamError, match="padding"):
        decode_indices(CodingMode.FIXED, b"\x12\x31", 3, prior)
    with pytest.raises(CorruptBitstreamError, match="out of range"):
        decode_indices(CodingMode.FIXED, b"\x1f\x30", 3, prior)


def test_rans_decode_rejects_impossible_lengths() -> None:
    prior, data = skewed(256, count=512)
    mode, payload = encode_indices(data, prior)
    assert mode == CodingMode.RANS
    for bad in (payload[:-1], payload[:4], b"", payload + b"\0", payload + bytes(4)):
        with pytest.raises(CorruptBitstreamError):
            decode_indices(CodingMode.RANS, bad, 512, prior)
    with pytest.raises(CorruptBitstreamError, match="from 16"):
        decode_indices(CodingMode.RANS, payload, 8, prior)
    with pytest.raises(CorruptBitstreamError, match="unknown coding mode"):
        decode_indices(7, payload, 512, prior)


def test_rans_detects_every_single_byte_change() -> None:
    prior, data = skewed(256, count=300, seed=3)
    mode, payload = encode_indices(data, prior)
    assert mode == CodingMode.RANS
    for offset in range(len(payload)):
        damaged = bytearray(payload)
        damaged[offset] ^= 0x5A
        with pytest.raises(CorruptBitstreamError):
            decode_indices(CodingMode.RANS, bytes(damaged), 300, prior)


@settings(max_examples=1500, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.sampled_from(CODEBOOK_SIZES),
    words=st.integers(2, 64),
    count=st.integers(RANS_MIN_SYMBOLS, 4000),
    seed=st.integers(0, 2**32 - 1),
)
def test_rans_garbage_never_crashes(size: int, words: int, count: int, seed: int) -> None:
    """Random payloads (which compressai alone would read out of bounds on) only ever raise our error."""
    prior = skewed(size, decay=0.97)[0]
    payload = np.random.default_rng(seed).bytes(4 * words)
    try:
        decoded = decode_indices(CodingMode.RANS, payload, count, prior)
    except CorruptBitstreamError:
        return
    assert decoded.shape == (count,) and int(decoded.min()) >= 0 and int(decoded.max()) < size


def test_measure_throughput_reports_rates() -> None:
    result = measure_throughput(grid=(16, 16), repeats=1)
    assert result["encode_symbols_per_s"] > 0 and result["decode_symbols_per_s"] > 0
    assert result["bits_per_symbol"] < 8
