"""The protobuf wire format, walked by hand where parsing would copy large weights.

:func:`split_model` plans a *skeleton* of a serialized ModelProto: the main graph's initializers
with a large ``raw_data`` cut out of the bytes given to protobuf (see :mod:`bnfold.storage.embedded`).
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator

from ..onnx.tensor_store import _NATIVE
from .policy import DEFAULT_POLICY, StoragePolicy

Buffer = bytes | bytearray | memoryview | mmap.mmap
"""Serialized protobuf bytes, indexed byte by byte (an int each)."""
Piece = bytes | memoryview
"""A slice of a buffer, or new bytes (a length prefix)."""

RAW_TAG = bytes([(9 << 3) | 2])  # TensorProto.raw_data, length-delimited
# TensorProto fields (number -> allowed wire types) a tensor left in the file may have: anything
# else (segment 3, external_data 13, data_location 14, an unknown field, a known field with the
# wrong wire type) keeps it embedded, so that serializing its stub is exactly protobuf's own.
_TENSOR_WIRE = {
    1: (0, 2),
    2: (0,),
    4: (5, 2),
    5: (0, 2),
    6: (2,),
    7: (0, 2),
    8: (2,),
    9: (2,),
    10: (1, 2),
    11: (0, 2),
    12: (2,),
    16: (2,),
}


class WireError(Exception):
    """Bytes that are not the protobuf this module expects (the caller takes the plain path)."""


def varint(buf: Buffer, pos: int) -> tuple[int, int]:
    b = buf[pos]
    if b < 0x80:
        return b, pos + 1
    result, shift = b & 0x7F, 7
    while True:
        pos += 1
        b = buf[pos]
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos + 1
        shift += 7
        if shift > 63:
            raise WireError("varint too long")


def varint_bytes(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def fields(buf: Buffer, pos: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """``(number, wire type, field start, value start, value end)`` of each field in [pos, end);
    the value of a varint/fixed field is its encoded bytes. WireError on malformed data."""
    try:
        while pos < end:
            start = pos
            tag, pos = varint(buf, pos)
            wt = tag & 7
            if wt == 2:
                length, pos = varint(buf, pos)
                vstart, pos = pos, pos + length
            elif wt == 0:
                vstart = pos
                _, pos = varint(buf, pos)
            elif wt == 1:
                vstart, pos = pos, pos + 8
            elif wt == 5:
                vstart, pos = pos, pos + 4
            else:  # groups (3, 4) are not used by ONNX; 6, 7 are invalid
                raise WireError(f"wire type {wt}")
            if pos > end or tag >> 3 == 0:
                raise WireError("field past the end of its message")
            yield tag >> 3, wt, start, vstart, pos
    except IndexError:
        raise WireError("truncated") from None


def _raw_field(buf: Buffer, start: int, end: int, min_bytes: int) -> tuple[int, int, int] | None:
    """``(field start, data start, data end)`` of the raw_data of the TensorProto in [start, end)
    if it can stay in the file, else None."""
    raw: tuple[int, int, int] | None = None
    dtype: int | None = None
    for num, wt, fstart, vstart, vend in fields(buf, start, end):
        if wt not in _TENSOR_WIRE.get(num, ()):
            return None
        if num == 9:
            if raw is not None:
                return None  # twice: protobuf keeps the last; do not guess
            raw = (fstart, vstart, vend)
        elif num == 2:
            dtype, _ = varint(buf, vstart)
    if raw is None or dtype not in _NATIVE or raw[2] - raw[1] < min_bytes:
        return None
    return raw


def _large_initializers(buf: Buffer, pos: int, end: int, threshold: int) -> list[tuple[int, int, int, int]]:
    """``(initializer index, field start, value start, value end)`` of each initializer field
    (GraphProto field 5) of at least ``threshold`` bytes in the GraphProto bytes [pos, end).

    :func:`_fields` unrolled for speed (a graph may have tens of thousands of fields): one-byte
    tags and lengths below 16 KiB are decoded inline. WireError on malformed data.
    """
    found: list[tuple[int, int, int, int]] = []
    index = 0
    try:
        while pos < end:
            start = pos
            tag = buf[pos]
            if tag < 0x80:
                pos += 1
            else:
                tag, pos = varint(buf, pos)
            wt = tag & 7
            if wt == 2:
                b = buf[pos]
                if b < 0x80:
                    length = b
                    pos += 1
                else:
                    b2 = buf[pos + 1]
                    if b2 < 0x80:
                        length = (b & 0x7F) | (b2 << 7)
                        pos += 2
                    else:
                        length, pos = varint(buf, pos)
                vstart = pos
                pos += length
                if tag == 0x2A:  # field 5, length-delimited
                    if length >= threshold:
                        found.append((index, start, vstart, pos))
                    index += 1
            elif tag >> 3 == 5:
                raise WireError("initializer that is not a message")
            elif wt == 0:
                _, pos = varint(buf, pos)
            elif wt == 1:
                pos += 8
            elif wt == 5:
                pos += 4
            else:
                raise WireError(f"wire type {wt}")
            if tag >> 3 == 0:
                raise WireError("field number 0")
        if pos > end:
            raise WireError("field past the end of its message")
    except IndexError:
        raise WireError("truncated") from None
    return found


def split_model(
    buf: Buffer, size: int, policy: StoragePolicy = DEFAULT_POLICY
) -> tuple[list[Piece], list[tuple[int, int, int]]] | None:
    """Plan a skeleton of the serialized ModelProto ``buf[:size]``.

    Returns ``(pieces, cuts)``: the skeleton is ``b"".join(pieces)`` (slices of ``buf`` and new
    length prefixes) and ``cuts`` lists ``(initializer index, data offset, data length)`` for each
    main-graph initializer whose raw_data was cut out. None when nothing worth cutting was found
    or the bytes are anything but plain (a graph field twice, groups, malformed data): the caller
    then parses the whole file, which also gives the usual error for a corrupt one.
    """
    try:
        graph = None
        for num, wt, fstart, vstart, vend in fields(buf, 0, size):
            if num == 7:
                if graph is not None or wt != 2:
                    return None  # protobuf would merge the two
                graph = (fstart, vstart, vend)
        if graph is None:
            return None
        gstart, gv, gend = graph
        view = memoryview(buf)
        body: list[Piece] = []
        cuts: list[tuple[int, int, int]] = []
        last = gv
        removed = 0
        threshold = policy.lazy_min_bytes
        for index, fstart, vstart, vend in _large_initializers(buf, gv, gend, threshold):
            raw = _raw_field(buf, vstart, vend, threshold)
            if raw is not None:
                rstart, dstart, dend = raw
                new_len = (vend - vstart) - (dend - rstart)
                # the field's tag bytes as they were, a new length prefix, the fields around raw_data
                tag_end = varint(buf, fstart)[1]
                prefix = varint_bytes(new_len)
                body += [view[last:tag_end], prefix, view[vstart:rstart], view[dend:vend]]
                removed += (vend - fstart) - (tag_end - fstart + len(prefix) + new_len)
                last = vend
                cuts.append((index, dstart, dend - dstart))
        if not cuts or sum(c[2] for c in cuts) < policy.lazy_min_fraction * size:
            return None
        body.append(view[last:gend])
        tag_end = varint(buf, gstart)[1]
        pieces: list[Piece] = [view[:tag_end], varint_bytes((gend - gv) - removed), *body, view[gend:size]]
        return pieces, cuts
    except WireError:
        return None
