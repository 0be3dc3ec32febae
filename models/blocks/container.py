"""The file container shared by every codec method: a bit-packed header naming the method, then its payload.

At the lowest rates a file carries under 100 bytes of symbols, so every header bit counts: fields are packed
MSB first with no byte alignment (the method's payload continues in the same bit sequence), and the image size
uses a shared shift and length prefix. docs/bitstream.md is the specification; :data:`CONTAINER_LAYOUT` is
checked against its field table by the tests.

Version 2 (this code's writer)::

    magic 8 | version 4 | method 4 | fingerprint 16 | level 4 | size_shift 3 | size_bits 4 | width | height | payload…

Version 1 files predate the method field; they were all written by OSCAR, whose reader parses them itself
(:func:`peek_version` tells it which layout it holds).

Errors: every problem with a file raises a :class:`BitstreamError` subclass (a ``UserError``). Writing invalid
fields is a programming error and raises ``ValueError``.
"""

from __future__ import annotations

from dataclasses import dataclass

from utils.errors import UserError

MAGIC = 0xC5
FORMAT_VERSION = 2
MAX_SIDE = 1 << 16  # pixels per side
MAX_PIXELS = 1 << 28  # width x height; checked before anything is allocated
MAX_LEVELS = 16
MAX_SIZE_SHIFT = 7

# Field order and widths, as in the container table of docs/bitstream.md. Numeric widths are used by the code.
CONTAINER_LAYOUT: tuple[tuple[str, str], ...] = (
    ("magic", "8"),
    ("version", "4"),
    ("method", "4"),
    ("fingerprint", "16"),
    ("level", "4"),
    ("size_shift", "3"),
    ("size_bits", "4"),
    ("width", "size_bits + 1"),
    ("height", "size_bits + 1"),
    ("payload", "method-specific"),
    ("padding", "0-7"),
)
FIELD_BITS = {name: int(width) for name, width in CONTAINER_LAYOUT if width.isdigit()}
FINGERPRINT_MASK = (1 << FIELD_BITS["fingerprint"]) - 1

# The method field of each known method. Ids are part of the format: never reuse or renumber one.
METHOD_IDS: dict[str, int] = {"oscar": 0, "stablecodec": 1, "sodec": 2}


class BitstreamError(UserError):
    """The bytes are not a valid file for this model (base class of every file error)."""


class CorruptBitstreamError(BitstreamError):
    """A field holds a value the writer never produces, or the payload does not decode consistently."""


class TruncatedBitstreamError(BitstreamError):
    """The file ends before a field or the payload it announces."""


class BadMagicError(BitstreamError):
    """The file does not start with the magic byte: not a file of this project."""


class UnsupportedVersionError(BitstreamError):
    """The file was written by a format version this code cannot read."""


class WrongMethodError(BitstreamError):
    """The file was written by another codec method than the model's."""


class ModelMismatchError(BitstreamError):
    """The file was written by a model with different weights; decoding would give a wrong image."""


def register_method_id(name: str, method_id: int) -> None:
    """Reserve ``method_id`` for ``name`` (the registry calls this for every method class it registers)."""
    if not 0 <= method_id < 1 << FIELD_BITS["method"]:
        raise ValueError(f"method id {method_id} of {name!r} does not fit the {FIELD_BITS['method']}-bit method field")
    taken = {i: n for n, i in METHOD_IDS.items()}
    if METHOD_IDS.get(name, method_id) != method_id or taken.get(method_id, name) != name:
        raise ValueError(f"method id {method_id} of {name!r} clashes with {METHOD_IDS}")
    METHOD_IDS[name] = method_id


def method_name(method_id: int) -> str:
    for name, i in METHOD_IDS.items():
        if i == method_id:
            return name
    return f"an unknown method (id {method_id})"


# ------------------------------------------------------------------------------------------------ bit I/O


class BitWriter:
    """Accumulates MSB-first fields in one Python integer."""

    def __init__(self) -> None:
        self.value = 0
        self.bits = 0

    def write(self, value: int, bits: int) -> None:
        if not 0 <= value < (1 << bits) and not bits == 0 == value:
            raise ValueError(f"value {value} does not fit in {bits} bits")
        self.value = (self.value << bits) | value
        self.bits += bits

    def write_bytes(self, data: bytes, bits: int) -> None:
        """The first ``bits`` bits of ``data`` (an MSB-first bit string, zero padded to whole bytes)."""
        if bits:
            self.write(int.from_bytes(data, "big") >> (8 * len(data) - bits), bits)

    def to_bytes(self) -> bytes:
        pad = -self.bits % 8
        return (self.value << pad).to_bytes((self.bits + pad) // 8, "big")


class BitReader:
    """Reads MSB-first fields; running out of data raises :class:`TruncatedBitstreamError`."""

    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)
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

    def read_bytes(self, bits: int, field: str) -> bytes:
        """``bits`` bits left-aligned into bytes (zero padded): the inverse of :meth:`BitWriter.write_bytes`."""
        if bits == 0:
            return b""
        value = self.read(bits, field)
        pad = -bits % 8
        return (value << pad).to_bytes((bits + pad) // 8, "big")

    def finish(self) -> None:
        """Only zero padding (fewer than 8 bits) may follow the payload."""
        if self.remaining >= 8:
            raise CorruptBitstreamError(f"{self.remaining // 8} trailing bytes after the payload")
        if self.read(self.remaining, "padding"):
            raise CorruptBitstreamError("padding bits at the end of the file are not zero")


# ------------------------------------------------------------------------------------------------ header


@dataclass(frozen=True)
class ContainerHeader:
    """The fields every method's file starts with, readable without the model."""

    version: int
    method_id: int
    fingerprint: int  # the stored 16-bit tag
    level: int
    width: int
    height: int
    bits: int  # header length in bits

    @property
    def method(self) -> str:
        return method_name(self.method_id)


def fingerprint_tag(fingerprint: int) -> int:
    """The 16 bits stored: XOR of all 16-bit chunks, so every bit of the model's fingerprint counts."""
    if fingerprint < 0:
        raise ValueError(f"model fingerprint must be non-negative, got {fingerprint}")
    width = FIELD_BITS["fingerprint"]
    tag = 0
    while fingerprint:
        tag ^= fingerprint & FINGERPRINT_MASK
        fingerprint >>= width
    return tag


def size_fields(width: int, height: int) -> tuple[int, int]:
    """(shift, value bits): the largest shift <= 7 dividing both sides, then the fewest bits for side-1."""
    shift = 0
    while shift < MAX_SIZE_SHIFT and (width >> shift) % 2 == 0 and (height >> shift) % 2 == 0:
        shift += 1
    largest = max(width >> shift, height >> shift) - 1
    return shift, max(1, largest.bit_length())


def size_limits_problem(width: int, height: int) -> str | None:
    """Why an image of this size cannot be stored, or None."""
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE) or width * height > MAX_PIXELS:
        return (
            f"image size {width}x{height} is outside the format's limits "
            f"(sides 1..{MAX_SIDE}, at most 2^28 = {MAX_PIXELS} pixels)"
        )
    return None


def write_size(writer: BitWriter, width: int, height: int) -> None:
    shift, value_bits = size_fields(width, height)
    writer.write(shift, FIELD_BITS["size_shift"])
    writer.write(value_bits - 1, FIELD_BITS["size_bits"])
    writer.write((width >> shift) - 1, value_bits)
    writer.write((height >> shift) - 1, value_bits)


def read_size(reader: BitReader) -> tuple[int, int]:
    """(width, height), checked against the limits and the writer's canonical coding."""
    shift = reader.read(FIELD_BITS["size_shift"], "size_shift")
    value_bits = reader.read(FIELD_BITS["size_bits"], "size_bits") + 1
    width = (reader.read(value_bits, "width") + 1) << shift
    height = (reader.read(value_bits, "height") + 1) << shift
    problem = size_limits_problem(width, height)
    if problem:
        raise CorruptBitstreamError(problem)
    if size_fields(width, height) != (shift, value_bits):
        raise CorruptBitstreamError(f"image size {width}x{height} is not coded the way the writer codes it")
    return width, height


def size_bits(width: int, height: int) -> int:
    """Bits of the size fields for an image of this size."""
    _, value_bits = size_fields(width, height)
    return FIELD_BITS["size_shift"] + FIELD_BITS["size_bits"] + 2 * value_bits


def container_bits(width: int, height: int) -> int:
    """Bits of the version-2 container header (everything before the method's payload)."""
    fixed = sum(FIELD_BITS[name] for name in ("magic", "version", "method", "fingerprint", "level"))
    return fixed + size_bits(width, height)


def write_container(method_id: int, fingerprint: int, level: int, width: int, height: int) -> BitWriter:
    """A writer holding the version-2 header; the method appends its payload and calls ``to_bytes()``."""
    if not 0 <= level < MAX_LEVELS:
        raise ValueError(f"level {level} out of range: the format holds levels 0..{MAX_LEVELS - 1}")
    problem = size_limits_problem(width, height)
    if problem:
        raise ValueError(problem)
    writer = BitWriter()
    writer.write(MAGIC, FIELD_BITS["magic"])
    writer.write(FORMAT_VERSION, FIELD_BITS["version"])
    writer.write(method_id, FIELD_BITS["method"])
    writer.write(fingerprint_tag(fingerprint), FIELD_BITS["fingerprint"])
    writer.write(level, FIELD_BITS["level"])
    write_size(writer, width, height)
    return writer


def peek_version(data: bytes) -> int:
    """The format version of ``data`` after checking its magic byte."""
    reader = BitReader(data)
    magic = reader.read(FIELD_BITS["magic"], "magic")
    if magic != MAGIC:
        raise BadMagicError(f"not a codec file of this project: first byte is 0x{magic:02x}, expected 0x{MAGIC:02x}")
    return reader.read(FIELD_BITS["version"], "version")


def read_container(data: bytes, method_id: int, fingerprint: int | None = None) -> tuple[ContainerHeader, BitReader]:
    """Parse a version-2 header written for ``method_id`` (and a model of ``fingerprint``, when given).

    Returns the header and a reader positioned at the method's payload. A file of another method is refused by
    name (:class:`WrongMethodError`) before its fingerprint is compared.
    """
    version = peek_version(data)
    if version != FORMAT_VERSION:
        raise UnsupportedVersionError(f"bitstream format version {version}; this code reads version {FORMAT_VERSION}")
    reader = BitReader(data)
    reader.pos = FIELD_BITS["magic"] + FIELD_BITS["version"]
    found = reader.read(FIELD_BITS["method"], "method")
    if found != method_id:
        found_name = repr(method_name(found)) if found in METHOD_IDS.values() else method_name(found)
        raise WrongMethodError(f"file written by method {found_name}; this model is method {method_name(method_id)!r}")
    tag = reader.read(FIELD_BITS["fingerprint"], "fingerprint")
    if fingerprint is not None and tag != fingerprint_tag(fingerprint):
        raise ModelMismatchError(
            f"bitstream was written by another model (fingerprint tag 0x{tag:04x}, "
            f"this model 0x{fingerprint_tag(fingerprint):04x})"
        )
    level = reader.read(FIELD_BITS["level"], "level")
    width, height = read_size(reader)
    return ContainerHeader(version, found, tag, level, width, height, reader.pos), reader
