"""Lossless coding of VQ token indices: a static per-level prior with rANS, or fixed-length packing.

Each rate level has a codebook whose entries are used unevenly; a prior measured on training data (usage
counts) lets rANS spend fewer bits on frequent entries. Whichever of rANS and plain fixed-length packing is
shorter is kept, so a file never pays more than the nominal ``tokens x ceil(log2 K)`` bits for its indices.

Safety of compressai's rANS (``compressai.ans``, 64-bit state, 16-bit precision) on untrusted input:

* Its decoder does no bounds checking. Our CDFs give the escape ("bypass") symbol zero frequency, so the
  decoder can never enter bypass mode; it then reads at most ``8 + 4 * count`` bytes, and we pad the payload
  with that many zero bytes, so garbage input cannot make it read past the buffer or loop.
* Its encoder writes into a buffer of one 32-bit word per symbol, which overflows the heap (observed: the
  process aborts) when a few symbols produce more words than that, the 8-byte flush included. Each symbol
  emits at most one word and on average at most 16 bits, so from ``RANS_MIN_SYMBOLS`` symbols on the buffer is
  large enough; shorter sequences always use fixed-length packing.
* Corruption is detected without spending a byte, in part: a valid payload is exactly what the encoder writes
  for the symbols it decodes to, so decoding and re-encoding must reproduce it bit for bit. Truncation and
  trailing bytes always fail that test, and so does a bit flip whose change of the coder state lasts to the
  flushed final state. A flip that only moves one symbol to another of the same quantized frequency at the same
  offset leaves the state unchanged and passes: symbols of frequency 1 (codebook entries the prior hardly saw)
  are stored as raw 16-bit slots, so such flips are common in files that use many of them. Measured rates and the
  campaign that measures them: docs/bitstream.md ("Measured single-bit-flip detection"). The quantization cannot
  change to avoid this without changing which bits every existing file holds (a new format version).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence

import numpy as np
import torch
from compressai.ans import RansDecoder, RansEncoder

from models.blocks.container import CorruptBitstreamError

PRECISION = 16  # compressai's fixed rANS probability precision
PROB_SCALE = 1 << PRECISION
MAX_CODEBOOK_SIZE = 1 << 15  # every entry needs a nonzero 16-bit frequency, with room left for the prior
RANS_MIN_SYMBOLS = 16  # below this compressai's encoder can overrun its output buffer (see module docstring)
_RANS_FLUSH_BYTES = 8


class CodingMode(enum.IntEnum):
    """How the indices of one image are coded (stored as one bit in the header)."""

    FIXED = 0  # ceil(log2 K) bits per index, MSB first
    RANS = 1  # rANS with the level's static prior


def bits_per_index(codebook_size: int) -> int:
    """Fixed-length code width: ceil(log2 K)."""
    return (codebook_size - 1).bit_length()


class IndexPrior:
    """Static distribution of one level's codebook indices, from usage counts measured on training data.

    All-zero counts mean "no measurement" and give the uniform prior. The counts are kept as given (int64)
    so they can be stored and reloaded; the 16-bit quantized frequencies are derived from them with exact
    integer arithmetic, so encoder and decoder agree bit for bit on every platform.
    """

    def __init__(self, counts: np.ndarray) -> None:
        counts = np.asarray(counts)
        if counts.ndim != 1:
            raise ValueError(f"prior counts must be 1-D, got shape {counts.shape}")
        if not np.issubdtype(counts.dtype, np.integer):
            raise ValueError(f"prior counts must be integers, got dtype {counts.dtype}")
        size = counts.shape[0]
        if not 2 <= size <= MAX_CODEBOOK_SIZE:
            raise ValueError(f"codebook size {size} outside the supported range [2, {MAX_CODEBOOK_SIZE}]")
        if (counts < 0).any():
            raise ValueError("prior counts must be non-negative")
        self._counts = counts.astype(np.int64)
        self._counts.flags.writeable = False
        self._cdf: list[int] | None = None

    @classmethod
    def uniform(cls, codebook_size: int) -> IndexPrior:
        return cls(np.zeros(codebook_size, dtype=np.int64))

    @classmethod
    def from_counts(
        cls, counts: Sequence[int] | np.ndarray | torch.Tensor | None, codebook_size: int | None = None
    ) -> IndexPrior:
        """Prior from usage counts; ``None`` (missing) needs ``codebook_size`` and gives the uniform prior."""
        if counts is None:
            if codebook_size is None:
                raise ValueError("a missing prior needs the codebook size")
            return cls.uniform(codebook_size)
        if isinstance(counts, torch.Tensor):
            counts = counts.detach().cpu().numpy()
        prior = cls(np.asarray(counts))
        if codebook_size is not None and prior.codebook_size != codebook_size:
            raise ValueError(f"prior has {prior.codebook_size} counts, codebook has {codebook_size} entries")
        return prior

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor) -> IndexPrior:
        """Inverse of :meth:`to_tensor`."""
        if tensor.dtype != torch.int64:
            raise ValueError(f"stored prior counts must be int64, got {tensor.dtype}")
        return cls.from_counts(tensor)

    def to_tensor(self) -> torch.Tensor:
        """Counts as an int64 tensor (for a safetensors file)."""
        return torch.from_numpy(self._counts.copy())

    @property
    def counts(self) -> np.ndarray:
        return self._counts

    @property
    def codebook_size(self) -> int:
        return int(self._counts.shape[0])

    @property
    def is_uniform(self) -> bool:
        return bool((self._counts == self._counts[0]).all())

    def frequencies(self) -> np.ndarray:
        """Quantized frequencies (each >= 1, summing to 2^16) as int64."""
        return np.diff(np.asarray(self.rans_cdf()[:-1], dtype=np.int64))

    def rans_cdf(self) -> list[int]:
        """compressai CDF: ``K + 2`` entries, the escape symbol (last) with zero frequency."""
        if self._cdf is None:
            self._cdf = _quantized_cdf(self._counts.tolist())
        return self._cdf

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IndexPrior) and np.array_equal(self._counts, other._counts)

    def __repr__(self) -> str:
        kind = "uniform" if self.is_uniform else f"{int(self._counts.sum())} counts"
        return f"IndexPrior(K={self.codebook_size}, {kind})"


def _quantized_cdf(counts: list[int]) -> list[int]:
    """Largest-remainder quantization to 2^16 with every symbol >= 1; exact integer math, deterministic."""
    size = len(counts)
    total = sum(counts)
    if total == 0:
        counts, total = [1] * size, size
    spare = PROB_SCALE - size  # one unit is reserved per symbol; these are shared out by the counts
    freqs = [1 + (c * spare) // total for c in counts]
    leftover = spare - sum(f - 1 for f in freqs)
    by_remainder = sorted(range(size), key=lambda i: (-((counts[i] * spare) % total), i))
    for i in by_remainder[:leftover]:
        freqs[i] += 1
    cdf = [0]
    for f in freqs:
        cdf.append(cdf[-1] + f)
    cdf.append(PROB_SCALE)  # escape symbol: zero frequency, so the decoder never enters bypass mode
    return cdf


def _as_index_array(indices: np.ndarray | torch.Tensor | Sequence[int]) -> np.ndarray:
    if isinstance(indices, torch.Tensor):
        indices = indices.detach().cpu().numpy()
    array = np.asarray(indices)
    if array.ndim != 1:
        raise ValueError(f"indices must be 1-D, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"indices must be integers, got dtype {array.dtype}")
    return array.astype(np.int64)


def pack_fixed(indices: np.ndarray, bits: int) -> bytes:
    """MSB-first packing of ``bits`` bits per index; the last byte is padded with zero bits."""
    if bits == 0 or indices.size == 0:
        return b""
    shifts = np.arange(bits - 1, -1, -1, dtype=np.int64)
    bit_matrix = ((indices[:, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(bit_matrix.reshape(-1)).tobytes()


def unpack_fixed(payload: bytes, count: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_fixed`; the caller has checked the length."""
    if bits == 0 or count == 0:
        return np.zeros(count, dtype=np.int64)
    flat = np.unpackbits(np.frombuffer(payload, dtype=np.uint8))
    if flat[count * bits :].any():
        raise CorruptBitstreamError("fixed-length payload: padding bits after the last index are not zero")
    bit_matrix = flat[: count * bits].reshape(count, bits).astype(np.int64)
    return bit_matrix @ (1 << np.arange(bits - 1, -1, -1, dtype=np.int64))


def _rans_encode(symbols: np.ndarray, prior: IndexPrior) -> bytes:
    count = int(symbols.size)
    if count < RANS_MIN_SYMBOLS:  # guard against compressai's output buffer overrun
        raise ValueError(f"rANS needs at least {RANS_MIN_SYMBOLS} symbols, got {count}")
    cdf = prior.rans_cdf()
    return RansEncoder().encode_with_indexes(symbols.tolist(), [0] * count, [cdf], [len(cdf)], [0])


def _rans_decode(payload: bytes, count: int, prior: IndexPrior) -> np.ndarray:
    # Zero padding covers the most the decoder can read (init + one word per symbol), so no read is out of bounds.
    padded = payload + bytes(_RANS_FLUSH_BYTES + 4 * count)
    cdf = prior.rans_cdf()
    decoded = RansDecoder().decode_with_indexes(padded, [0] * count, [cdf], [len(cdf)], [0])
    return np.asarray(decoded, dtype=np.int64)


def encode_indices(
    indices: np.ndarray | torch.Tensor | Sequence[int], prior: IndexPrior
) -> tuple[CodingMode, bytes]:
    """Code indices with rANS or fixed-length packing, whichever has fewer bits (ties: FIXED).

    FIXED is compared at its exact bit length (the file format packs it without byte padding).
    """
    symbols = _as_index_array(indices)
    size = prior.codebook_size
    if symbols.size and (symbols.min() < 0 or symbols.max() >= size):
        raise ValueError(f"indices must lie in [0, {size}), got range [{symbols.min()}, {symbols.max()}]")
    bits = bits_per_index(size)
    fixed = pack_fixed(symbols, bits)
    if symbols.size >= RANS_MIN_SYMBOLS:
        rans = _rans_encode(symbols, prior)
        if 8 * len(rans) < symbols.size * bits:
            return CodingMode.RANS, rans
    return CodingMode.FIXED, fixed


def check_rans_length(payload_bytes: int, count: int, bits: int) -> None:
    """Reject rANS payload lengths the encoder never produces, before any decoding work."""
    if count < RANS_MIN_SYMBOLS:
        raise CorruptBitstreamError(f"rANS mode for {count} indices (the encoder uses it from {RANS_MIN_SYMBOLS})")
    if payload_bytes < _RANS_FLUSH_BYTES or payload_bytes % 4:
        raise CorruptBitstreamError(
            f"rANS payload of {payload_bytes} bytes: must be a multiple of 4 and at least {_RANS_FLUSH_BYTES}"
        )
    if 8 * payload_bytes >= count * bits:
        raise CorruptBitstreamError(
            f"rANS payload of {payload_bytes} bytes is not shorter than fixed-length coding "
            f"({count * bits} bits); the encoder would have chosen FIXED"
        )


def decode_indices(mode: CodingMode | int, payload: bytes, count: int, prior: IndexPrior) -> torch.Tensor:
    """Exact inverse of :func:`encode_indices`; damaged payloads raise :class:`CorruptBitstreamError`."""
    if count < 0:
        raise ValueError(f"index count must be non-negative, got {count}")
    size = prior.codebook_size
    bits = bits_per_index(size)
    if mode == CodingMode.FIXED:
        expected = -(-count * bits // 8)
        if len(payload) != expected:
            raise CorruptBitstreamError(
                f"fixed-length payload is {len(payload)} bytes, expected {expected} for {count} indices"
            )
        symbols = unpack_fixed(payload, count, bits)
    elif mode == CodingMode.RANS:
        check_rans_length(len(payload), count, bits)
        symbols = _rans_decode(payload, count, prior)
        if symbols.size != count:
            raise CorruptBitstreamError(f"rANS decoder returned {symbols.size} indices, expected {count}")
    else:
        raise CorruptBitstreamError(f"unknown coding mode {int(mode)}")
    if symbols.size and (symbols.min() < 0 or symbols.max() >= size):
        raise CorruptBitstreamError(f"decoded index out of range [0, {size})")
    if mode == CodingMode.RANS and _rans_encode(symbols, prior) != payload:
        raise CorruptBitstreamError("rANS payload is damaged (it does not re-encode to itself)")
    return torch.from_numpy(symbols)


def measure_throughput(
    grid: tuple[int, int] = (64, 96), codebook_size: int = 256, repeats: int = 5, seed: int = 0
) -> dict[str, float]:
    """rANS encode/decode speed in symbols per second on a skewed (geometric-like) prior and matching data."""
    rng = np.random.default_rng(seed)
    weights = 0.97 ** np.arange(codebook_size)
    probs = weights / weights.sum()
    prior = IndexPrior.from_counts(np.round(probs * 1e6).astype(np.int64))
    count = grid[0] * grid[1]
    symbols = rng.choice(codebook_size, size=count, p=probs).astype(np.int64)
    payload = _rans_encode(symbols, prior)
    start = time.perf_counter()
    for _ in range(repeats):
        _rans_encode(symbols, prior)
    encode_s = (time.perf_counter() - start) / repeats
    start = time.perf_counter()
    for _ in range(repeats):
        decode_indices(CodingMode.RANS, payload, count, prior)  # includes the re-encode check
    decode_s = (time.perf_counter() - start) / repeats
    return {
        "symbols": float(count),
        "bits_per_symbol": 8 * len(payload) / count,
        "encode_symbols_per_s": count / encode_s,
        "decode_symbols_per_s": count / decode_s,
    }
