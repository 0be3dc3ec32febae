"""The OSCAR file format: a bit-packed header, optional side information, then the coded token indices.

At the lowest rate a 768x512 image carries 96 bytes of indices, so every header bit counts: fields are packed
MSB first with no byte alignment between them (the payload too), and the image size uses a shared shift and
length prefix. The token grid is not stored; it follows from the size and the level. docs/bitstream.md is
the specification; :data:`HEADER_LAYOUT` is checked against its field table by the tests.

Errors: every problem with a file raises a :class:`BitstreamError` subclass (a ``UserError``). Writing
invalid symbols is a programming error and raises ``ValueError``.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.oscar.coded_image import CodedImage
from models.blocks.index_coder import (
    BitstreamError,
    CodingMode,
    CorruptBitstreamError,
    IndexPrior,
    bits_per_index,
    check_rans_length,
    decode_indices,
    encode_indices,
)
from models.oscar.rate_table import LATENT_FACTOR

__all__ = [
    "FORMAT_VERSION",
    "HEADER_LAYOUT",
    "MAGIC",
    "MAX_PIXELS",
    "MAX_SIDE",
    "BadMagicError",
    "BitstreamError",
    "CodecInfo",
    "CodingMode",
    "CorruptBitstreamError",
    "Header",
    "ModelMismatchError",
    "TruncatedBitstreamError",
    "UnsupportedVersionError",
    "fingerprint_tag",
    "header_bits",
    "read_bitstream",
    "read_header",
    "write_bitstream",
]

MAGIC = 0xC5
FORMAT_VERSION = 1
MAX_SIDE = 1 << 16  # pixels per side
MAX_PIXELS = 1 << 28  # width x height; checked before anything is allocated
MAX_LEVELS = 16
MAX_SIZE_SHIFT = 7

# Field order and widths, as in the table of docs/bitstream.md. Widths that are numbers are used by the code.
HEADER_LAYOUT: tuple[tuple[str, str], ...] = (
    ("magic", "8"),
    ("version", "4"),
    ("fingerprint", "16"),
    ("level", "4"),
    ("mode", "1"),
    ("size_shift", "3"),
    ("size_bits", "4"),
    ("width", "size_bits + 1"),
    ("height", "size_bits + 1"),
    ("norm_codes", "norm_count x norm_bits"),
    ("payload", "count x ceil(log2 K) (FIXED) or 32 x words (RANS)"),
    ("padding", "0-7"),
)
_BITS = {name: int(width) for name, width in HEADER_LAYOUT if width.isdigit()}
_FIXED_FIELDS = ("magic", "version", "fingerprint", "level", "mode", "size_shift", "size_bits")
FINGERPRINT_MASK = (1 << _BITS["fingerprint"]) - 1


class TruncatedBitstreamError(BitstreamError):
    """The file ends before a field or the payload it announces."""


class BadMagicError(BitstreamError):
    """The file does not start with the OSCAR magic byte: not an OSCAR bitstream."""


class UnsupportedVersionError(BitstreamError):
    """The file was written by a format version this code cannot read."""


class ModelMismatchError(BitstreamError):
    """The file was written by a model with different weights; decoding would give a wrong image."""


@dataclass
class CodecInfo:
    """What the format needs from the model.

    Attributes:
        fingerprint: non-negative integer identifying the weights; 16 bits of it (see :func:`fingerprint_tag`)
            are stored.
        levels: ``(downsamplings, codebook_size)`` per rate level, lowest rate first (at most 16).
        priors: the static index prior of each level.
        norm_count, norm_bits: side information per image, ``norm_count`` codes of ``norm_bits`` bits
            (``norm_count == 0``: none).
    """

    fingerprint: int
    levels: list[tuple[int, int]]
    priors: list[IndexPrior]
    norm_count: int = 0
    norm_bits: int = 0

    def __post_init__(self) -> None:
        if self.fingerprint < 0:
            raise ValueError(f"model fingerprint must be non-negative, got {self.fingerprint}")
        if not 1 <= len(self.levels) <= MAX_LEVELS:
            raise ValueError(f"the format holds 1 to {MAX_LEVELS} levels, model has {len(self.levels)}")
        if len(self.priors) != len(self.levels):
            raise ValueError(f"{len(self.priors)} priors for {len(self.levels)} levels")
        for level, ((downsamplings, size), prior) in enumerate(zip(self.levels, self.priors)):
            if downsamplings < 0:
                raise ValueError(f"level {level}: negative downsampling count {downsamplings}")
            if prior.codebook_size != size:
                raise ValueError(f"level {level}: prior has {prior.codebook_size} entries, codebook {size}")
        if self.norm_count < 0 or (self.norm_count > 0 and not 1 <= self.norm_bits <= 32):
            raise ValueError(f"bad side information layout: {self.norm_count} codes of {self.norm_bits} bits")

    def grid(self, level: int, height: int, width: int) -> tuple[int, int]:
        """Token grid of a ``height x width`` image at ``level``."""
        stride = LATENT_FACTOR * 2 ** self.levels[level][0]
        return -(-height // stride), -(-width // stride)


@dataclass(frozen=True)
class Header:
    """Fields of a file's header, readable without the model."""

    version: int
    fingerprint: int  # the stored 16-bit tag
    level: int
    mode: CodingMode
    width: int
    height: int
    bits: int  # header length in bits, side information excluded


def fingerprint_tag(fingerprint: int) -> int:
    """The 16 bits stored: XOR of all 16-bit chunks, so every bit of the model's fingerprint counts."""
    if fingerprint < 0:
        raise ValueError(f"model fingerprint must be non-negative, got {fingerprint}")
    width = _BITS["fingerprint"]
    tag = 0
    while fingerprint:
        tag ^= fingerprint & FINGERPRINT_MASK
        fingerprint >>= width
    return tag


def _size_fields(width: int, height: int) -> tuple[int, int]:
    """(shift, value bits): the largest shift <= 7 dividing both sides, then the fewest bits for side-1."""
    shift = 0
    while shift < MAX_SIZE_SHIFT and (width >> shift) % 2 == 0 and (height >> shift) % 2 == 0:
        shift += 1
    largest = max(width >> shift, height >> shift) - 1
    return shift, max(1, largest.bit_length())


def _check_size(width: int, height: int) -> None:
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE) or width * height > MAX_PIXELS:
        raise CorruptBitstreamError(
            f"image size {width}x{height} is outside the format's limits "
            f"(sides 1..{MAX_SIDE}, at most 2^28 = {MAX_PIXELS} pixels)"
        )


def header_bits(width: int, height: int, norm_count: int = 0, norm_bits: int = 0) -> int:
    """Bits before the payload for an image of this size: header plus side information."""
    _, value_bits = _size_fields(width, height)
    fixed = sum(_BITS[name] for name in _FIXED_FIELDS)
    return fixed + 2 * value_bits + norm_count * norm_bits


class _BitWriter:
    """Accumulates MSB-first fields in one Python integer."""

    def __init__(self) -> None:
        self.value = 0
        self.bits = 0

    def write(self, value: int, bits: int) -> None:
        if not 0 <= value < (1 << bits) and not bits == 0 == value:
            raise ValueError(f"value {value} does not fit in {bits} bits")
        self.value = (self.value << bits) | value
        self.bits += bits

    def to_bytes(self) -> bytes:
        pad = -self.bits % 8
        return (self.value << pad).to_bytes((self.bits + pad) // 8, "big")


class _BitReader:
    """Reads MSB-first fields; running out of data raises :class:`TruncatedBitstreamError`."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def remaining(self) -> int:
        return 8 * len(self.data) - self.pos

    def read(self, bits: int, field: str) -> int:
        if bits > self.remaining:
            raise TruncatedBitstreamError(
                f"file ends inside the {field} field ({len(self.data)} bytes, needs at least "
                f"{-(-(self.pos + bits) // 8)})"
            )
        if bits == 0:
            return 0
        first, end = self.pos // 8, self.pos + bits
        last = -(-end // 8)
        chunk = int.from_bytes(self.data[first:last], "big")
        self.pos = end
        return (chunk >> (8 * last - end)) & ((1 << bits) - 1)


def _read_header(reader: _BitReader) -> Header:
    if reader.read(_BITS["magic"], "magic") != MAGIC:
        raise BadMagicError(f"not an OSCAR bitstream: first byte is 0x{reader.data[0]:02x}, expected 0x{MAGIC:02x}")
    version = reader.read(_BITS["version"], "version")
    if version != FORMAT_VERSION:
        raise UnsupportedVersionError(f"bitstream format version {version}; this code reads version {FORMAT_VERSION}")
    fingerprint = reader.read(_BITS["fingerprint"], "fingerprint")
    level = reader.read(_BITS["level"], "level")
    mode = CodingMode(reader.read(_BITS["mode"], "mode"))
    shift = reader.read(_BITS["size_shift"], "size_shift")
    value_bits = reader.read(_BITS["size_bits"], "size_bits") + 1
    width_value = reader.read(value_bits, "width")
    height_value = reader.read(value_bits, "height")
    width, height = (width_value + 1) << shift, (height_value + 1) << shift
    _check_size(width, height)
    if _size_fields(width, height) != (shift, value_bits):
        raise CorruptBitstreamError(f"image size {width}x{height} is not coded the way the writer codes it")
    return Header(FORMAT_VERSION, fingerprint, level, mode, width, height, reader.pos)


def read_header(data: bytes) -> Header:
    """Parse and sanity-check the header fields without the model (for inspection and tools)."""
    return _read_header(_BitReader(bytes(data)))


def _validate(coded: CodedImage, info: CodecInfo) -> tuple[int, int]:
    if not 0 <= coded.level < len(info.levels):
        raise ValueError(f"level {coded.level} out of range: the model has {len(info.levels)} levels")
    try:
        _check_size(coded.width, coded.height)
    except CorruptBitstreamError as err:
        raise ValueError(str(err)) from None
    grid = info.grid(coded.level, coded.height, coded.width)
    if tuple(coded.indices.shape) != grid:
        raise ValueError(
            f"indices have shape {tuple(coded.indices.shape)}, expected {grid} for a "
            f"{coded.width}x{coded.height} image at level {coded.level}"
        )
    if info.norm_count == 0:
        if coded.norm_codes is not None:
            raise ValueError("the model transmits no norm codes, but the coded image has some")
    else:
        codes = coded.norm_codes
        if codes is None or len(codes) != info.norm_count:
            raise ValueError(f"expected {info.norm_count} norm codes, got {None if codes is None else len(codes)}")
        if any(not 0 <= int(c) < (1 << info.norm_bits) for c in codes):
            raise ValueError(f"norm codes must lie in [0, {1 << info.norm_bits}), got {tuple(codes)}")
    return grid


def write_bitstream(coded: CodedImage, info: CodecInfo) -> bytes:
    """Serialise one coded image; the result is never longer than header + side info + nominal payload."""
    grid = _validate(coded, info)
    count = grid[0] * grid[1]
    prior = info.priors[coded.level]
    mode, payload = encode_indices(coded.indices.reshape(-1), prior)

    writer = _BitWriter()
    writer.write(MAGIC, _BITS["magic"])
    writer.write(FORMAT_VERSION, _BITS["version"])
    writer.write(fingerprint_tag(info.fingerprint), _BITS["fingerprint"])
    writer.write(coded.level, _BITS["level"])
    writer.write(int(mode), _BITS["mode"])
    shift, value_bits = _size_fields(coded.width, coded.height)
    writer.write(shift, _BITS["size_shift"])
    writer.write(value_bits - 1, _BITS["size_bits"])
    writer.write((coded.width >> shift) - 1, value_bits)
    writer.write((coded.height >> shift) - 1, value_bits)
    for code in coded.norm_codes or ():
        writer.write(int(code), info.norm_bits)
    payload_bits = count * bits_per_index(prior.codebook_size) if mode == CodingMode.FIXED else 8 * len(payload)
    if payload_bits:
        writer.write(int.from_bytes(payload, "big") >> (8 * len(payload) - payload_bits), payload_bits)
    return writer.to_bytes()


def _payload_bytes(reader: _BitReader, bits: int) -> bytes:
    """``bits`` bits from the reader's position, left-aligned into bytes (zero padded)."""
    if bits == 0:
        return b""
    value = reader.read(bits, "payload")
    pad = -bits % 8
    return (value << pad).to_bytes((bits + pad) // 8, "big")


def read_bitstream(data: bytes, info: CodecInfo) -> CodedImage:
    """Parse and decode a file written by :func:`write_bitstream` for the same model.

    Raises a :class:`BitstreamError` subclass for anything that is not such a file: never another exception,
    never a large allocation before the size is validated.
    """
    data = bytes(data)
    reader = _BitReader(data)
    header = _read_header(reader)
    expected_tag = fingerprint_tag(info.fingerprint)
    if header.fingerprint != expected_tag:
        raise ModelMismatchError(
            f"bitstream was written by another model (fingerprint tag 0x{header.fingerprint:04x}, "
            f"this model 0x{expected_tag:04x})"
        )
    if header.level >= len(info.levels):
        raise CorruptBitstreamError(f"level {header.level} out of range: the model has {len(info.levels)} levels")
    norm_codes = None
    if info.norm_count:
        norm_codes = tuple(reader.read(info.norm_bits, "norm_codes") for _ in range(info.norm_count))

    grid = info.grid(header.level, header.height, header.width)
    count = grid[0] * grid[1]
    prior = info.priors[header.level]
    bits = bits_per_index(prior.codebook_size)
    if header.mode == CodingMode.FIXED:
        payload_bits = count * bits
        if reader.remaining < payload_bits:
            raise TruncatedBitstreamError(
                f"file is {len(data)} bytes, the fixed-length payload needs {-(-(reader.pos + payload_bits) // 8)}"
            )
    else:
        payload_bits = reader.remaining - reader.remaining % 8
        if payload_bits == 0:
            raise TruncatedBitstreamError(f"file ends before the rANS payload ({len(data)} bytes)")
        check_rans_length(payload_bits // 8, count, bits)  # bounds the work before decoding
    payload = _payload_bytes(reader, payload_bits)
    if reader.remaining >= 8:
        raise CorruptBitstreamError(f"{reader.remaining // 8} trailing bytes after the payload")
    if reader.read(reader.remaining, "padding"):
        raise CorruptBitstreamError("padding bits at the end of the file are not zero")

    indices = decode_indices(header.mode, payload, count, prior).reshape(grid)
    return CodedImage(header.level, header.height, header.width, indices, norm_codes)
