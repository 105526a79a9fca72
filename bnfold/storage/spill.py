"""Where the pass puts the tensors it makes: :class:`FileStore` (the pass's tensor store for a model
read from a folder) and :class:`Spill` (a temporary file that holds large folded tensors, so they
never accumulate in memory).
"""

from __future__ import annotations

import io
import os
import tempfile
import weakref
from pathlib import Path

import numpy as np
import onnx

from ..errors import BadInput
from ..onnx.tensor_store import MemoryStore, raw_to_array
from .atomic import signals_deferred
from .embedded import Embedded
from .external_data import ALIGN, copy_range, entries, is_external, read_external, set_external
from .policy import DEFAULT_POLICY, StoragePolicy


class Spill:
    """A temporary file that holds folded tensors until the model is saved.

    Created in the folder the result will be saved to, it becomes the output's data file at the
    first save there (:meth:`adopt`): the folded tensors are then written once, not copied.
    Tensors stored here keep referring to it by its first name (:meth:`holds`); reads go through
    the open file, so they stay right whatever later happens to the name.
    """

    def __init__(self, folder: str | os.PathLike[str] | None = None) -> None:
        with signals_deferred():  # the file is removed when this object goes away, whatever happens
            fd, name = tempfile.mkstemp(prefix=".bnfold-spill-", suffix=".data", dir=folder)
            self.path = Path(name)
            self._file = os.fdopen(fd, "w+b")
            self._cleanup: weakref.finalize[..., object] = weakref.finalize(
                self, _remove, self._file, self.path
            )
        self._location = name  # what stored tensors name as their location
        self.adopted = False
        self.size = 0

    def store_array(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        """A tensor named ``name`` whose value ``array`` is written here, never into a proto."""
        tensor = onnx.TensorProto(
            name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype), dims=list(array.shape)
        )
        data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).data.cast("B")
        pad = (-self.size) % ALIGN
        self._file.write(b"\0" * pad)
        offset = self.size + pad
        self._file.write(data)
        self.size = offset + len(data)
        set_external(tensor, self._location, offset, len(data))
        return tensor

    def holds(self, tensor: onnx.TensorProto) -> bool:
        """True if ``tensor``'s data was moved to this spill file."""
        return is_external(tensor) and entries(tensor).get("location") == self._location

    def read(self, tensor: onnx.TensorProto) -> np.ndarray:
        """The value of a tensor stored here."""
        e = entries(tensor)
        self._file.flush()
        offset, length = int(e["offset"]), int(e["length"])
        raw = os.pread(self._file.fileno(), length, offset)
        if len(raw) != length:
            raise BadInput(f"the data of folded tensor '{tensor.name}' is truncated")
        return raw_to_array(tensor, raw)

    def write_to(self, tensor: onnx.TensorProto, fd: int) -> int:
        """Append the data of a tensor stored here to fd ``fd``; returns its length."""
        e = entries(tensor)
        self._file.flush()
        length = int(e["length"])
        copy_range(self._file.fileno(), fd, int(e["offset"]), length)
        return length

    def can_adopt(self, folder: Path) -> bool:
        """True if this file may become a data file in ``folder`` (it is there, not yet adopted)."""
        if self.adopted:
            return False
        try:
            return os.path.samefile(self.path.parent, folder)
        except OSError:
            return False

    def fileno(self) -> int:
        self._file.flush()
        return self._file.fileno()

    def adopt(self, target: Path) -> None:
        """Rename this file to ``target``: it is an output data file from now on, never removed
        here (its tensors stay readable through the open file)."""
        os.replace(self.path, target)
        self._cleanup.detach()
        self._cleanup = weakref.finalize(self, self._file.close)
        self.path = target
        self.adopted = True

    def close(self) -> None:
        self._cleanup()


def _remove(file: io.BufferedRandom, path: Path) -> None:
    if not file.closed:
        file.close()
    try:
        path.unlink()
    except FileNotFoundError:
        pass


class FileStore(MemoryStore):
    """The pass's tensor store for a model read from ``base_dir``: external data is read one tensor
    at a time (never outside that folder); while ``spill`` is set (a :class:`Spill`, or the
    :class:`Embedded` weights of a lazily loaded file), tensors it holds are read from it and new
    tensors of ``policy.external_threshold`` bytes or more are written to it instead of the
    protobuf."""

    def __init__(
        self, base_dir: str, spill: Spill | Embedded | None = None, policy: StoragePolicy = DEFAULT_POLICY
    ) -> None:
        self.base_dir = base_dir
        self.spill = spill
        self.policy = policy

    @property
    def spills(self) -> bool:
        return self.spill is not None

    def read(self, tensor: onnx.TensorProto) -> np.ndarray:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            if self.spill is not None and self.spill.holds(tensor):
                return self.spill.read(tensor)
            return read_external(tensor, self.base_dir)
        return super().read(tensor)

    def write(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        if self.spill is not None and array.nbytes >= self.policy.external_threshold:
            return self.spill.store_array(name, array)
        return super().write(name, array)
