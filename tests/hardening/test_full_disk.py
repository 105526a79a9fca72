"""A full disk or a read-only file system while writing: a clear error, temporary files removed, the old file kept.

See tests/hardening_helpers.py for the shared checks."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import pytest
from cli_runner import invoke
from hardening_helpers import assert_one_line_error, base_model, external_model, snapshot

import bnfold
from bnfold.errors import BadInput
from bnfold.testing import conv_bn_model

# ------------------------------------------------------------------------------------------------
# full disk


class _FullDisk:
    """Writes go through until ``budget`` bytes, then fail with ENOSPC (as a full disk does)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget

    def take(self, n: int) -> int:
        if self.budget <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = min(n, self.budget)
        self.budget -= n
        return n


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """Make every ``os.write`` and file-object write fail with ENOSPC after a byte budget."""
    import io as _io

    def install(budget: int) -> None:
        disk = _FullDisk(budget)
        real_write = os.write
        real_fdopen = os.fdopen

        def write(fd: int, data: Any) -> int:
            n = disk.take(len(data))
            return real_write(fd, bytes(memoryview(data)[:n]))

        class Writer(_io.RawIOBase):
            def __init__(self, fd: int) -> None:
                self.fd = fd

            def writable(self) -> bool:
                return True

            def write(self, data: Any) -> int:
                return write(self.fd, data)

            def fileno(self) -> int:
                return self.fd

            def close(self) -> None:
                if not self.closed:
                    os.close(self.fd)
                super().close()

        def fdopen(fd: int, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if "w" in mode:
                return _io.BufferedWriter(Writer(fd))
            return real_fdopen(fd, mode, *args, **kwargs)

        def no_copy_file_range(*args: Any) -> int:
            raise OSError(errno.EXDEV, "not here")  # forces the write() fallback

        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(os, "fdopen", fdopen)
        monkeypatch.setattr(os, "copy_file_range", no_copy_file_range)

    return install


@pytest.mark.parametrize("budget", [0, 1000, 20000])
def test_full_disk_while_writing(tmp_path: Path, full_disk: Callable[[int], None], budget: int) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(blocks=3, channels=32), str(src))
    old = tmp_path / "m.folded.onnx"
    old.write_bytes(b"previous output")
    before = snapshot(tmp_path)
    full_disk(budget)
    result = invoke(src)
    assert_one_line_error(result.exit_code, result.stdout, result.stderr, "No space left on device")
    assert snapshot(tmp_path) == before  # previous output kept, no temporary file
    result = invoke(src, "--in-place")
    assert_one_line_error(result.exit_code, result.stdout, result.stderr, "No space left on device")
    assert snapshot(tmp_path) == before


def test_read_only_file_system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The folder looks writable but the file system refuses (EROFS): exit 2, nothing written."""
    import tempfile

    src = tmp_path / "m.onnx"
    onnx.save(base_model(), str(src))
    before = snapshot(tmp_path)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    for args in ([src], [src, "--in-place"], [src, "--json", tmp_path / "r.json", "--dry-run"]):
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        errors = [ln for ln in result.stderr.splitlines() if ln.startswith("bnfold: error: ")]
        assert len(errors) == 1 and "Read-only file system" in errors[0], result.stderr
        assert "Traceback" not in result.stderr
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("budget", [0, 5000, 12000])
def test_full_disk_while_writing_external_data(
    tmp_path: Path, full_disk: Callable[[int], None], budget: int
) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    src = external_model(folder)
    result = bnfold.fold(src, stream_external=True)
    (out_dir / "f.onnx").write_bytes(b"previous")
    (out_dir / "f.onnx.data").write_bytes(b"previous data")
    before = snapshot(tmp_path)
    full_disk(budget)
    with pytest.raises(BadInput, match="No space left on device"):
        result.save(out_dir / "f.onnx")
    assert snapshot(tmp_path) == before


def test_failed_external_save_can_be_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A save that fails half-way leaves the in-memory model pointing at its old data."""
    folder = tmp_path / "m"
    folder.mkdir()
    src = external_model(folder)
    result = bnfold.fold(src, stream_external=True)
    real_write = os.write
    calls = {"n": 0}

    def failing_write(fd: int, data: Any) -> int:
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    with monkeypatch.context() as m:
        m.setattr(os, "write", failing_write)
        m.setattr(os, "copy_file_range", lambda *a: (_ for _ in ()).throw(OSError(errno.EXDEV, "no")))
        with pytest.raises(BadInput, match="No space left on device"):
            result.save(tmp_path / "f.onnx")
    assert calls["n"] > 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    result.save(tmp_path / "f.onnx")
    bnfold.testing.assert_models_close(src, tmp_path / "f.onnx")


def test_a_saved_result_does_not_depend_on_what_it_wrote(tmp_path: Path) -> None:
    """After ``save``, overwriting or deleting the written files must not change what the next
    ``save`` of the same result writes (found with the kill test: saves of two results to one
    path alternated, and the third save copied the second's data)."""
    results = []
    for i in range(2):
        folder = tmp_path / f"src{i}"
        folder.mkdir()
        path = folder / "m.onnx"
        onnx.save(
            conv_bn_model(blocks=2, channels=32, seed=i),
            str(path),
            save_as_external_data=True,
            location="m.data",
            size_threshold=0,
        )
        results.append((path, bnfold.fold(path, stream_external=True, verify=False)))
    out = tmp_path / "out.onnx"
    (a_src, a), (b_src, b) = results
    a.save(out)
    b.save(out)
    a.save(out)
    bnfold.testing.assert_models_close(a_src, out)
    (tmp_path / "out.onnx.data").unlink()
    a.save(tmp_path / "again.onnx")
    bnfold.testing.assert_models_close(a_src, tmp_path / "again.onnx")


def test_full_temp_folder_while_folding_external_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Folded tensors of a large model spill to a temporary file; a full disk there is a clear error."""
    import bnfold.storage.spill

    folder = tmp_path / "m"
    folder.mkdir()
    src = external_model(folder)
    spills = tmp_path / "tmp"
    spills.mkdir()
    monkeypatch.setenv("TMPDIR", str(spills))
    monkeypatch.setattr("tempfile.tempdir", None)

    def full(self: Any, name: str, array: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(bnfold.storage.spill.Spill, "store_array", full)
    with pytest.raises(BadInput, match="No space left on device.*TMPDIR"):
        bnfold.fold(src, stream_external=True)
    assert list(spills.iterdir()) == []  # the spill file is gone
