"""OSCAR's payload in the file container: coding mode, latent-norm side information, then the token indices.

The container (:mod:`models.blocks.container`) holds magic, version, method, fingerprint tag, level and image
size; OSCAR's payload follows in the same bit sequence. The token grid is not stored: it follows from the size
and the level. docs/bitstream.md is the specification; :data:`PAYLOAD_LAYOUT` and :data:`V1_LAYOUT` are checked
against its tables by the tests. Version-1 files (OSCAR's format before the container had a method field) are
still read.

Errors: every problem with a file raises a :class:`BitstreamError` subclass (a ``UserError``). Writing
invalid symbols is a programming error and raises ``ValueError``.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.blocks.container import (
    FIELD_BITS,
    METHOD_IDS,
    BitReader,
    BitstreamError,
    ContainerHeader,
    CorruptBitstreamError,
    ModelMismatchError,
    TruncatedBitstreamError,
    UnsupportedVersionError,
    container_bits,
    fingerprint_tag,
    peek_version,
    read_container,
    read_size,
    size_limits_problem,
    write_container,
)
from models.blocks.index_coder import (
    CodingMode,
    IndexPrior,
    bits_per_index,
    check_rans_length,
    decode_indices,
    encode_indices,
)
from models.oscar.coded_image import CodedImage
from models.oscar.rate_table import LATENT_FACTOR

METHOD_ID = METHOD_IDS["oscar"]

# OSCAR's payload after the version-2 container, as in docs/bitstream.md.
PAYLOAD_LAYOUT: tuple[tuple[str, str], ...] = (
    ("mode", "1"),
    ("norm_codes", "norm_count x norm_bits"),
    ("indices", "count x ceil(log2 K) (FIXED) or 32 x words (RANS)"),
)
# The whole version-1 file (read only).
V1_LAYOUT: tuple[tuple[str, str], ...] = (
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
    ("indices", "count x ceil(log2 K) (FIXED) or 32 x words (RANS)"),
    ("padding", "0-7"),
)
MODE_BITS = 1


@dataclass
class CodecInfo:
    """What the format needs from the model.

    Attributes:
        fingerprint: non-negative integer identifying the weights; 16 bits of it (see
            :func:`models.blocks.container.fingerprint_tag`) are stored.
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
        if not 1 <= len(self.levels) <= 1 << FIELD_BITS["level"]:
            raise ValueError(f"the format holds 1 to {1 << FIELD_BITS['level']} levels, model has {len(self.levels)}")
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


def header_bits(width: int, height: int, norm_count: int = 0, norm_bits: int = 0) -> int:
    """Bits before the indices for an image of this size: container, mode and side information."""
    return container_bits(width, height) + MODE_BITS + norm_count * norm_bits


def _validate(coded: CodedImage, info: CodecInfo) -> tuple[int, int]:
    if not 0 <= coded.level < len(info.levels):
        raise ValueError(f"level {coded.level} out of range: the model has {len(info.levels)} levels")
    problem = size_limits_problem(coded.width, coded.height)
    if problem:
        raise ValueError(problem)
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
    writer = write_container(METHOD_ID, info.fingerprint, coded.level, coded.width, coded.height)
    writer.write(int(mode), MODE_BITS)
    for code in coded.norm_codes or ():
        writer.write(int(code), info.norm_bits)
    payload_bits = count * bits_per_index(prior.codebook_size) if mode == CodingMode.FIXED else 8 * len(payload)
    writer.write_bytes(payload, payload_bits)
    return writer.to_bytes()


@dataclass(frozen=True)
class Header:
    """The header fields of an OSCAR file (container fields and the coding mode), readable without the model."""

    version: int
    fingerprint: int  # the stored 16-bit tag
    level: int
    mode: CodingMode
    width: int
    height: int


def _read_fields(data: bytes) -> tuple[ContainerHeader, CodingMode, BitReader]:
    """Container fields and mode of a version-1 or -2 file; the reader stops after the mode (v2) or size (v1)."""
    version = peek_version(data)
    reader = BitReader(data)
    if version == 1:
        reader.pos = FIELD_BITS["magic"] + FIELD_BITS["version"]
        tag = reader.read(FIELD_BITS["fingerprint"], "fingerprint")
        level = reader.read(FIELD_BITS["level"], "level")
        mode = reader.read(MODE_BITS, "mode")
        width, height = read_size(reader)
        container = ContainerHeader(1, METHOD_ID, tag, level, width, height, reader.pos)
    elif version == 2:
        container, reader = read_container(data, METHOD_ID)
        mode = reader.read(MODE_BITS, "mode")
    else:
        raise UnsupportedVersionError(f"bitstream format version {version}; this code reads versions 1 and 2")
    return container, CodingMode(mode), reader


def read_header(data: bytes) -> Header:
    """The header of a version-1 or version-2 OSCAR file, without the model."""
    c, mode, _ = _read_fields(bytes(data))
    return Header(c.version, c.fingerprint, c.level, mode, c.width, c.height)


def read_bitstream(data: bytes, info: CodecInfo) -> CodedImage:
    """Parse and decode a file written by :func:`write_bitstream` (or a version-1 file) for the same model.

    Raises a :class:`BitstreamError` subclass for anything that is not such a file: never another exception,
    never a large allocation before the size is validated.
    """
    data = bytes(data)
    header, mode, reader = _read_fields(data)
    expected = fingerprint_tag(info.fingerprint)
    if header.fingerprint != expected:
        raise ModelMismatchError(
            f"bitstream was written by another model (fingerprint tag 0x{header.fingerprint:04x}, "
            f"this model 0x{expected:04x})"
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
    if mode == CodingMode.FIXED:
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
    payload = reader.read_bytes(payload_bits, "payload")
    reader.finish()
    indices = decode_indices(mode, payload, count, prior).reshape(grid)
    return CodedImage(header.level, header.height, header.width, indices, norm_codes)


__all__ = [
    "BitstreamError",
    "CodecInfo",
    "CodingMode",
    "CorruptBitstreamError",
    "Header",
    "PAYLOAD_LAYOUT",
    "V1_LAYOUT",
    "header_bits",
    "read_bitstream",
    "read_header",
    "write_bitstream",
]
