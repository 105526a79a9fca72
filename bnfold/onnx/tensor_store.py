"""How the pass reads and writes tensor data: a :class:`TensorStore` handed to it by the caller.

The pass never opens files itself. :class:`MemoryStore` serves models whose data is all inside the
protobuf; the storage layer provides a store that also reads external data (safely, one tensor at a
time) and sends large new tensors to a spill file.
"""

from __future__ import annotations

import math
from typing import Protocol

import ml_dtypes
import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import BadInput


class TensorStore(Protocol):
    """Tensor data for the pass. ``spills`` is true when :meth:`write` may return a tensor whose
    data lives outside the protobuf (the bulk path of the pass is then not taken)."""

    @property
    def spills(self) -> bool: ...

    def read(self, tensor: onnx.TensorProto) -> np.ndarray:
        """The value of ``tensor`` (read-only where it is a view); raises BadInput if unreadable."""
        ...

    def write(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        """A new TensorProto named ``name`` holding ``array``."""
        ...


class MemoryStore:
    """Data inside the protobuf only: a tensor with external data is refused (BadInput)."""

    @property
    def spills(self) -> bool:
        return False

    def read(self, tensor: onnx.TensorProto) -> np.ndarray:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise BadInput(
                f"tensor '{tensor.name}' keeps its data in an external file, which this store cannot read"
            )
        if tensor.HasField("raw_data") and not tensor.HasField("segment"):
            return raw_to_array(tensor, tensor.raw_data)  # a read-only view: values are never mutated
        return np.asarray(numpy_helper.to_array(tensor))

    def write(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        return plain_tensor(array, name)


def plain_tensor(array: np.ndarray, name: str) -> onnx.TensorProto:
    """A TensorProto holding ``array`` in ``raw_data`` (the bytes numpy_helper.from_array writes)."""
    data_type = _PLAIN_TYPES.get(array.dtype)
    if data_type is None or not name:
        return numpy_helper.from_array(array, name)
    # what numpy_helper.from_array builds for these types, without its generic checks
    return onnx.TensorProto(dims=array.shape, data_type=data_type, name=name, raw_data=array.tobytes())


# Fixed-size numbers on a little-endian machine: raw_data is the array's own bytes.
_PLAIN_TYPES: dict[np.dtype, int] = (
    {
        np.dtype(t): onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t))
        for t in (
            np.float16,
            np.float32,
            np.float64,
            np.int8,
            np.uint8,
            np.int16,
            np.uint16,
            np.int32,
            np.uint32,
            np.int64,
            np.uint64,
        )
    }
    if np.little_endian
    else {}
)


def raw_to_array(tensor: onnx.TensorProto, raw: bytes) -> np.ndarray:
    """The value of ``tensor`` whose data bytes are ``raw`` (little-endian, as ONNX stores them).

    Fixed-size numeric types are viewed in place (no copy); other types go through numpy_helper.
    """
    dtype = _NATIVE.get(tensor.data_type)
    if dtype is not None:
        dims = tuple(tensor.dims)
        if len(raw) == math.prod(dims) * dtype.itemsize:
            return np.frombuffer(raw, dtype=dtype).reshape(dims)
    inline = onnx.TensorProto()
    inline.CopyFrom(tensor)
    del inline.external_data[:]
    inline.data_location = onnx.TensorProto.DEFAULT
    inline.raw_data = raw
    return np.asarray(numpy_helper.to_array(inline))


def _native_types() -> dict[int, np.dtype]:
    t = onnx.TensorProto
    types = {
        t.FLOAT: np.float32,
        t.FLOAT16: np.float16,
        t.DOUBLE: np.float64,
        t.BFLOAT16: ml_dtypes.bfloat16,
        t.INT8: np.int8,
        t.UINT8: np.uint8,
        t.INT16: np.int16,
        t.UINT16: np.uint16,
        t.INT32: np.int32,
        t.UINT32: np.uint32,
        t.INT64: np.int64,
        t.UINT64: np.uint64,
    }
    return {k: np.dtype(v).newbyteorder("<") for k, v in types.items()}


_NATIVE = _native_types()
