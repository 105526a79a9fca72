"""The public entry point: ``bnfold.fold`` folds, verifies and returns a :class:`FoldResult`."""

from __future__ import annotations

import os
import tempfile
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from .errors import BadInput, VerificationFailed
from .onnx.driver import fold_model
from .report import FoldReport, Status, Verification
from .storage.embedded import Embedded, LayoutError, plan_embedded
from .storage.external_data import has_external_data
from .storage.load import open_model
from .storage.policy import DEFAULT_POLICY, StoragePolicy
from .storage.save import same_file, save_model_located
from .storage.spill import FileStore, Spill
from .verification.inputs import Dims, Inputs, Shapes
from .verification.options import VerifyOptions


class _CompleteModel:
    """The ``FoldResult.model`` field: a complete ModelProto whenever it is read.

    A large model file folded lazily (:func:`bnfold.storage.load.open_model`) keeps its untouched weights
    in the file and its folded ones in memory until saved; reading ``.model`` puts them all into
    the proto first (once). :meth:`FoldResult.save` writes without doing so.
    """

    def __get__(self, obj: Any, owner: Any = None) -> onnx.ModelProto:
        if obj is None:
            raise AttributeError("model")  # no class-level default: the field stays required
        model: onnx.ModelProto = obj.__dict__["_model"]
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
    # (the descriptor gives ``model`` no default: it stays a required field)
    report: FoldReport  # type: ignore[misc]
    verification: Verification | None = None
    source: Path | None = None
    base_dir: str = ""  # where the model's external data files are
    # folded tensors of an external-data model (a Spill), or the weights of a lazily loaded one
    # (an Embedded: untouched ones still in the input file, folded ones in memory)
    spill: Spill | Embedded | None = field(default=None, repr=False)
    input_files: tuple[Path, ...] = field(default=(), repr=False)  # the source's external data files
    storage_policy: StoragePolicy = field(default=DEFAULT_POLICY, repr=False)  # the thresholds of save()

    @property
    def passed(self) -> bool:
        """True unless verification ran and found a difference."""
        return self.verification is None or self.verification.status != "failed"

    def save(self, path: str | os.PathLike[str], *, force: bool = False) -> Path:
        """Write the folded model atomically; refuses a fold that failed verification unless ``force``."""
        if not self.passed and not force:
            raise VerificationFailed(
                f"not writing {path}: the folded model failed verification "
                f"({self.verification.message if self.verification else ''})",
                first_divergence=self.verification.first_divergence if self.verification else None,
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
            self.__dict__["_model"],
            target,
            self.base_dir,
            self.spill,
            external=self._external(),
            policy=self.storage_policy,
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
            try:
                size: int = plan_embedded(model, self.spill)[1]
                return size
            except LayoutError:
                pass
        return int(self.model.ByteSize())

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
        from .verification.compare import jsonable

        plain: dict[str, Any] = jsonable(
            {
                "source": str(self.source) if self.source else None,
                "report": self.report.to_dict(),
                "verification": self.verification.to_dict() if self.verification else None,
            }
        )
        return plain


def _folder_of(output: str | os.PathLike[str]) -> str | None:
    """The existing folder ``output`` would be written in, else None (the save reports it)."""
    folder = Path(output).parent
    return str(folder) if folder.is_dir() else None


def fold(
    model: Any,
    *,
    verify: bool = True,
    inputs: Inputs = None,
    shapes: Shapes | None = None,
    dims: Dims | None = None,
    seed: int = 0,
    runs: int = 1,
    atol: float | None = None,
    rtol: float | None = None,
    provider: str = "CPUExecutionProvider",
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
    stream_external: bool | None = None,
    bn_to_affine: bool = False,
    merge_branches: bool = False,
    lazy: bool = True,
    output: str | os.PathLike[str] | None = None,
    storage_policy: StoragePolicy | None = None,
) -> FoldResult:
    """Fold every foldable BatchNormalization of ``model`` and (by default) verify the result.

    ``model`` is a path, ``onnx.ModelProto``, ``onnx_ir.Model`` or ``torch.onnx.ONNXProgram``; it
    is never modified. Verification runs original and folded model in onnxruntime with graph
    optimizations off on seeded random inputs (or ``inputs``); see :func:`bnfold.verify`.
    ``progress``, if given, is called with the name of each long step as it starts
    (``"loading"``, ``"folding"``, ``"verifying"``). ``stream_external`` forces (True) or
    forbids (False) keeping external data on disk; by default only large data stays there.
    ``bn_to_affine`` rewrites BNs that cannot be folded as ``Mul`` + ``Add`` (off by default).
    ``merge_branches`` merges the parallel Conv / BN / identity branches of one input that an Add
    sums (RepVGG, MobileOne blocks) into one Conv first (off by default; the report counts the
    Convs removed in ``merged_convs``).
    ``lazy`` (default) leaves the big weights of a large model file (``embedded_threshold``)
    in the file until :meth:`FoldResult.save` copies them, and keeps folded ones in memory, so no
    copy of the whole model is ever built; ``result.model`` still is a complete ModelProto
    (read on first access). ``False`` reads the whole file first.
    ``output``: where the result will be saved, if known. Folded tensors of a model with
    external data are then kept in a temporary file beside it, which becomes the output's data
    file at that save (they are written once instead of being copied there).
    ``storage_policy``: the size thresholds of loading, spilling and saving (default
    :class:`~bnfold.storage.policy.StoragePolicy`), also used by :meth:`FoldResult.save`.
    Raises :class:`bnfold.BadInput` for unreadable models and unusable verification options.
    """
    options = (
        VerifyOptions(inputs, shapes, dims, seed, runs, atol, rtol, provider, threads) if verify else None
    )
    return fold_with(
        model,
        options,
        progress=progress,
        stream_external=stream_external,
        bn_to_affine=bn_to_affine,
        merge_branches=merge_branches,
        lazy=lazy,
        output=output,
        storage_policy=storage_policy,
    )


def fold_with(
    model: Any,
    options: VerifyOptions | None,
    *,
    progress: Callable[[str], None] | None = None,
    stream_external: bool | None = None,
    bn_to_affine: bool = False,
    merge_branches: bool = False,
    lazy: bool = True,
    output: str | os.PathLike[str] | None = None,
    storage_policy: StoragePolicy | None = None,
) -> FoldResult:
    """:func:`fold` with the verification options as one object (None: no verification)."""
    verify = options is not None
    step = progress or (lambda _name: None)
    policy = DEFAULT_POLICY if storage_policy is None else storage_policy
    step("loading")
    input_files: list[Path] = []
    # A large model file is read lazily: its big weights stay in the file (see FoldResult.model).
    folded, base_dir, path, embedded = open_model(
        model, stream_external, input_files, lazy=lazy, policy=policy
    )
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
        report = fold_model(
            folded,
            FileStore(base_dir, spill, policy),
            bn_to_affine=bn_to_affine,
            merge_branches=merge_branches,
        )
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
    result = FoldResult(folded, report, None, path, base_dir, spill, tuple(input_files), policy)
    if isinstance(spill, Spill):  # (an Embedded closes its file itself when it goes away)
        weakref.finalize(result, spill.close)
    if options is not None:
        reference: Path | onnx.ModelProto | None = None
        if report.changed:
            step("verifying")
            if isinstance(original, bytes):
                reference = onnx.ModelProto()
                reference.ParseFromString(original)
            else:
                reference = original
        del original  # (the snapshot's bytes are no longer needed)
        result.verification = _verify_fold(result, reference, options, external)
    return result


def _verify_fold(
    result: FoldResult, reference: Path | onnx.ModelProto | None, options: VerifyOptions, external: bool
) -> Verification:
    """Compare the folded model of ``result`` with ``reference`` (None: nothing was folded, only
    the options are checked)."""
    from .verification.inputs import check_request
    from .verification.runner import normalize_provider
    from .verification.verifier import verify_models

    folded = result.__dict__["_model"]
    if reference is None:
        # bad options are errors even with nothing to do
        check_request(folded, options.inputs, options.shapes, options.dims)
        return Verification(
            passed=True,
            status=Status.PASSED,
            message="nothing folded: the model is unchanged",
            runs=0,
            seed=options.seed,
            provider=normalize_provider(options.provider),
        )
    # the noise floor moves what the fold read: the folded layers' and BNs' parameters
    touched = {name for pair in result.report.folded for name in (pair.bn, pair.target)}
    if isinstance(result.spill, Embedded) or external:
        # onnxruntime needs the candidate's weights on disk: write it as the output would
        # be written, to a scratch folder (the model in memory is left as it was)
        with tempfile.TemporaryDirectory(prefix="bnfold-verify-") as scratch:
            target = Path(scratch) / "candidate.onnx"
            save_model_located(
                folded, target, result.base_dir, result.spill, durable=False, policy=result.storage_policy
            )
            return verify_models(reference, target, options, touched_nodes=touched)
    # a failed fold says where it broke: the first intermediate tensor that diverges
    verification = verify_models(reference, folded, options, touched_nodes=touched)
    if verification.status == "failed" and verification.outputs:
        from .verification.divergence import localize

        verification.first_divergence = localize(reference, folded, options, touched_nodes=touched)
    return verification
