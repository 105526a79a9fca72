"""The public entry point: ``bnfold.fold`` folds, verifies and returns a :class:`FoldResult`."""

from __future__ import annotations

import os
import tempfile
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from .errors import BadInput, VerificationFailed
from .external import Embedded, FileStore, Spill
from .io import has_external_data, open_model, same_file, save_model_located
from .onnx.driver import fold_model
from .report import FoldReport, Verification
from .verification import Inputs


class _CompleteModel:
    """The ``FoldResult.model`` field: a complete ModelProto whenever it is read.

    A large model file folded lazily (:func:`bnfold.io.open_model`) keeps its untouched weights
    in the file and its folded ones in memory until saved; reading ``.model`` puts them all into
    the proto first (once). :meth:`FoldResult.save` writes without doing so.
    """

    def __get__(self, obj: Any, owner: Any = None) -> onnx.ModelProto:
        if obj is None:
            raise AttributeError("model")  # no class-level default: the field stays required
        model = obj.__dict__["_model"]
        spill = obj.__dict__.get("spill")
        if isinstance(spill, Embedded):
            spill.materialize(model)
            obj.spill = None
        return model

    def __set__(self, obj: Any, value: onnx.ModelProto) -> None:
        obj.__dict__["_model"] = value


@dataclass
class FoldResult:
    """A folded model, what was done to it, and how it compared with the original."""

    model: onnx.ModelProto = _CompleteModel()  # type: ignore[assignment]
    report: FoldReport
    verification: Verification | None = None
    source: Path | None = None
    base_dir: str = ""  # where the model's external data files are
    # folded tensors of an external-data model (a Spill), or the weights of a lazily loaded one
    # (an Embedded: untouched ones still in the input file, folded ones in memory)
    spill: Spill | Embedded | None = field(default=None, repr=False)
    input_files: tuple[Path, ...] = field(default=(), repr=False)  # the source's external data files

    @property
    def passed(self) -> bool:
        """True unless verification ran and found a difference."""
        return self.verification is None or self.verification.status != "failed"

    def save(self, path: str | os.PathLike[str], *, force: bool = False) -> Path:
        """Write the folded model atomically; refuses a fold that failed verification unless ``force``."""
        if not self.passed and not force:
            raise VerificationFailed(
                f"not writing {path}: the folded model failed verification "
                f"({self.verification.message if self.verification else ''})"
            )
        target = Path(path)
        if (
            self.source is not None
            and target.exists()
            and target.resolve() == self.source.resolve()
            and not force
        ):
            raise BadInput(f"{target}: refusing to overwrite the input model (pass force=True)")
        self._check_not_input_data(target)
        # the output keeps its weights in external data when the input did (or is over 2 GiB)
        saved, moved = save_model_located(
            self.__dict__["_model"], target, self.base_dir, self.spill, external=self._external()
        )
        if moved:  # saved over a data file it read from: its tensors now live beside the output
            self.base_dir = str(saved.resolve().parent)
        return saved

    def _external(self) -> bool | None:
        """Whether the output gets external data: yes when the input had it; no for a model read
        from a file without any (the pass adds none but through ``spill``); else look."""
        if self.input_files:
            return True
        if self.source is not None and self.spill is None:
            return False
        return None

    def byte_size(self) -> int:
        """The size in bytes of the model as :meth:`save` writes it in one file (its
        ``ByteSize()``), computed without reading the weights a lazily loaded model left in
        its file (``self.model.ByteSize()`` would first read them all)."""
        model = self.__dict__["_model"]
        if isinstance(self.spill, Embedded):
            from .external import _Layout, plan_embedded

            try:
                return plan_embedded(model, self.spill)[1]
            except _Layout:
                pass
        return self.model.ByteSize()

    def _check_not_input_data(self, target: Path) -> None:
        """Never write over the input's external data file (its model would point into the new
        data): as the output model, or as the output's ``<name>.data`` unless the input model
        itself is replaced (in place)."""
        if not self.input_files:
            return
        in_place = self.source is not None and same_file(target, self.source)
        data_target = target.with_name(f"{target.name}.data")  # written: the input had external data
        for f in self.input_files:
            if same_file(target, f):
                raise BadInput(
                    f"{target} holds the external data of the input model {self.source}; choose another "
                    "output name"
                )
            if not in_place and same_file(data_target, f):
                raise BadInput(
                    f"{target}: its data file {data_target} would replace the external data of the input "
                    f"model {self.source}; choose another output name"
                )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: non-finite numbers (an infinite relative error) become None."""
        from .verification import jsonable

        return jsonable(
            {
                "source": str(self.source) if self.source else None,
                "report": self.report.to_dict(),
                "verification": self.verification.to_dict() if self.verification else None,
            }
        )


def _folder_of(output: str | os.PathLike[str]) -> str | None:
    """The existing folder ``output`` would be written in, else None (the save reports it)."""
    folder = Path(output).parent
    return str(folder) if folder.is_dir() else None


def fold(
    model: Any,
    *,
    verify: bool = True,
    inputs: Inputs = None,
    shapes: Mapping[str, list[int] | tuple[int, ...]] | None = None,
    dims: Mapping[str, int] | None = None,
    seed: int = 0,
    runs: int = 1,
    atol: float | None = None,
    rtol: float | None = None,
    provider: str = "CPUExecutionProvider",
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
    stream_external: bool | None = None,
    bn_to_affine: bool = False,
    lazy: bool = True,
    output: str | os.PathLike[str] | None = None,
) -> FoldResult:
    """Fold every foldable BatchNormalization of ``model`` and (by default) verify the result.

    ``model`` is a path, ``onnx.ModelProto``, ``onnx_ir.Model`` or ``torch.onnx.ONNXProgram``; it
    is never modified. Verification runs original and folded model in onnxruntime with graph
    optimizations off on seeded random inputs (or ``inputs``); see :func:`bnfold.verify`.
    ``progress``, if given, is called with the name of each long step as it starts
    (``"loading"``, ``"folding"``, ``"verifying"``). ``stream_external`` forces (True) or
    forbids (False) keeping external data on disk; by default only large data stays there.
    ``bn_to_affine`` rewrites BNs that cannot be folded as ``Mul`` + ``Add`` (off by default).
    ``lazy`` (default) leaves the big weights of a large model file (``io.EMBEDDED_THRESHOLD``)
    in the file until :meth:`FoldResult.save` copies them, and keeps folded ones in memory, so no
    copy of the whole model is ever built; ``result.model`` still is a complete ModelProto
    (read on first access). ``False`` reads the whole file first.
    ``output``: where the result will be saved, if known. Folded tensors of a model with
    external data are then kept in a temporary file beside it, which becomes the output's data
    file at that save (they are written once instead of being copied there).
    Raises :class:`bnfold.BadInput` for unreadable models and unusable verification options.
    """
    step = progress or (lambda _name: None)
    step("loading")
    input_files: list[Path] = []
    # A large model file is read lazily: its big weights stay in the file (see FoldResult.model).
    folded, base_dir, path, embedded = open_model(model, stream_external, input_files, lazy=lazy)
    # a file whose model names no external data file has none (input_files lists them)
    external = (
        embedded is None and (bool(input_files) if path is not None else True) and has_external_data(folded)
    )
    # The reference for verification: the file itself when there is one (onnxruntime resolves its
    # external data), else a snapshot of the proto taken before folding.
    original: Path | bytes = path if path is not None else (folded.SerializeToString() if verify else b"")
    step("folding")
    where = f"{path}: " if path is not None else ""
    spill_dir = _folder_of(output) if external and output is not None else None
    try:
        try:
            spill = Spill(spill_dir) if external else embedded
        except OSError:
            if spill_dir is None:
                raise
            spill_dir = None  # not writable there: the save will say so; fold into the temp folder
            spill = Spill()
    except OSError as exc:
        raise BadInput(
            f"{where}cannot create a temporary file for folded tensors in {tempfile.gettempdir()} "
            f"({exc.strerror or exc}); set TMPDIR to a folder with space"
        ) from None
    try:
        report = fold_model(folded, FileStore(base_dir, spill), bn_to_affine=bn_to_affine)
    except OSError as exc:  # the spill file's disk is full, or external data became unreadable
        if spill is not None:
            spill.close()
        hint = (
            f" (folded tensors go to {tempfile.gettempdir()}; set TMPDIR to a folder with space)"
            if isinstance(spill, Spill) and spill_dir is None
            else ""
        )
        raise BadInput(f"{where}folding failed: {exc.strerror or exc}{hint}") from None
    except BaseException:
        if spill is not None:
            spill.close()  # no temporary file outlives a failed fold
        raise
    result = FoldResult(folded, report, None, path, base_dir, spill, tuple(input_files))
    if isinstance(spill, Spill):  # (an Embedded closes its file itself when it goes away)
        weakref.finalize(result, spill.close)
    if verify:
        from .verification import check_request, normalize_provider
        from .verification import verify as run_verify

        if not report.changed:
            check_request(folded, inputs, shapes, dims)  # bad options are errors even with nothing to do
            result.verification = Verification(
                passed=True,
                status="passed",
                message="nothing folded: the model is unchanged",
                runs=0,
                seed=seed,
                provider=normalize_provider(provider),
            )
        else:
            step("verifying")
            if isinstance(original, bytes):
                reference: Any = onnx.ModelProto()
                reference.ParseFromString(original)
                del original
            else:
                reference = original
            kwargs: dict[str, Any] = dict(
                inputs=inputs,
                shapes=shapes,
                dims=dims,
                seed=seed,
                runs=runs,
                atol=atol,
                rtol=rtol,
                provider=provider,
                threads=threads,
            )
            if embedded is not None or external:
                # onnxruntime needs the candidate's weights on disk: write it as the output would
                # be written, to a scratch folder (the model in memory is left as it was)
                with tempfile.TemporaryDirectory(prefix="bnfold-verify-") as scratch:
                    target = Path(scratch) / "candidate.onnx"
                    save_model_located(folded, target, base_dir, spill, durable=False)
                    result.verification = run_verify(reference, target, **kwargs)
            else:
                result.verification = run_verify(reference, folded, **kwargs)
    return result
