"""``verify``: run a reference and a candidate model in onnxruntime on the same seeded inputs and
compare every output. Works for any pair of models with the same interface, including folds
made by other tools."""

from __future__ import annotations

import os
import time
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..report import OutputCheck, Status, Verification
from ..storage.load import load_model, open_model
from .compare import NOISE_FLOORS, compare, worst
from .inputs import (
    Dims,
    Inputs,
    Interface,
    Shapes,
    check_same_interface,
    interface,
    load_inputs,
    make_inputs,
    validate_request,
)
from .noise import file_noise_floors, noise_floors, touched_tensors
from .options import VerifyOptions
from .runner import Feeds, ModelSource, check_provider, one_line, run_all


def verify(
    reference: Any,
    candidate: Any,
    *,
    inputs: Inputs = None,
    shapes: Shapes | None = None,
    dims: Dims | None = None,
    seed: int = 0,
    runs: int = 1,
    atol: float | None = None,
    rtol: float | None = None,
    provider: str = "CPUExecutionProvider",
    threads: int | None = None,
    localize: bool = False,
) -> Verification:
    """Run ``reference`` and ``candidate`` on the same seeded inputs and compare every output.

    Each output's ``noise_floor`` is measured on ``reference`` with every float parameter
    nudged by at most one ulp; unless ``atol`` is given, the tolerance is at least ten floors.
    ``localize`` also finds the first intermediate tensor that diverges
    (``first_divergence``, see :func:`bnfold.verification.localize`).

    Models may be paths, ``onnx.ModelProto`` or anything :func:`bnfold.storage.load.load_model` accepts.
    ``provider`` is an onnxruntime execution provider (``"cpu"``/``"cuda"`` are accepted as
    short names); ``threads`` caps onnxruntime's intra-op threads (default: onnxruntime's choice).

    Raises BadInput when a model cannot be read, the models do not share an interface, the
    provider is unavailable, or the inputs/shapes/dims given do not fit the model (wrong names,
    dtypes, ranks or static dimensions). Returns status ``"error"`` when onnxruntime cannot run
    the reference (nothing can be said about the candidate) and ``"failed"`` when it runs the
    reference but not the candidate, or the outputs differ.
    """
    options = VerifyOptions(inputs, shapes, dims, seed, runs, atol, rtol, provider, threads)
    return verify_models(reference, candidate, options, localize=localize)


def load_request(model_interface: Interface, options: VerifyOptions) -> dict[str, np.ndarray]:
    """The user's arrays, checked with ``shapes`` and ``dims`` against the names of the model's
    inputs and dimensions (BadInput)."""
    given = load_inputs(options.inputs)
    shapes, dims = options.shapes or {}, options.dims or {}
    validate_request(model_interface.inputs, model_interface.optional, shapes, dims, given)
    return given


def make_feeds(
    model_interface: Interface, options: VerifyOptions, given: dict[str, np.ndarray]
) -> tuple[list[Feeds], dict[str, int]]:
    """One feed per run for ``model_interface`` (BadInput when the options do not fit it), and
    the dimensions assumed."""
    shapes, dims = options.shapes or {}, options.dims or {}
    assumed: dict[str, int] = {}
    feeds = [
        make_inputs(
            model_interface.inputs,
            np.random.default_rng([options.seed, run]),
            shapes,
            dims,
            given,
            assumed,
            model_interface.optional,
            run,
        )
        for run in range(options.runs)
    ]
    return feeds, assumed


def verify_models(
    reference: Any,
    candidate: Any,
    options: VerifyOptions,
    *,
    touched_nodes: Collection[str] | None = None,
    localize: bool = False,
) -> Verification:
    """:func:`verify` with its options as one object.

    The noise floor of each output is measured on ``reference`` with the parameters of the
    nodes named ``touched_nodes`` nudged (a fold passes the layers and BNs it folded; None:
    every float parameter), see :mod:`.noise`. ``localize``: also set ``first_divergence``
    when both models ran (in-memory models only, see :func:`.divergence.localize`).
    """
    start = time.perf_counter()
    options.check()
    ref_model, ref_path = _interface_model(reference)
    cand_model, cand_path = _interface_model(candidate)
    ref_if = interface(ref_model)
    check_same_interface(ref_if, interface(cand_model))
    given = load_request(ref_if, options)
    provider = check_provider(options.provider)
    options = replace(options, provider=provider)
    feeds, assumed = make_feeds(ref_if, options, given)
    names = [n for n, _ in ref_if.outputs]
    result = Verification(
        passed=False,
        status=Status.ERROR,
        runs=options.runs,
        seed=options.seed,
        provider=provider,
        input_shapes={k: [int(d) for d in v.shape] for k, v in feeds[0].items()},
        assumed_dims=assumed,
    )
    # Files go to onnxruntime by path, so it finds their external data beside them.
    ref_source: ModelSource = ref_path if ref_path is not None else ref_model
    cand_source: ModelSource = cand_path if cand_path is not None else cand_model
    del ref_model, cand_model
    try:
        ref_out = run_all(ref_source, provider, feeds, names, options.threads)
    except Exception as exc:  # onnxruntime raises its own exception types  # noqa: BLE001 - reported, never raised
        result.message = f"onnxruntime cannot run the reference model: {one_line(exc)}"
        result.seconds = time.perf_counter() - start
        return result
    try:
        cand_out = run_all(cand_source, provider, feeds, names, options.threads)
    except Exception as exc:  # noqa: BLE001 - reported, never raised
        result.status = Status.FAILED
        result.message = f"onnxruntime cannot run the candidate model: {one_line(exc)}"
        result.seconds = time.perf_counter() - start
        return result
    floors = _noise_floors(ref_source, feeds, names, ref_out, options, touched_nodes)
    result.outputs = _checks(names, ref_out, cand_out, options, floors)
    result.passed = all(c.passed for c in result.outputs)
    result.status = Status.PASSED if result.passed else Status.FAILED
    if not result.passed:
        bad = [c.name for c in result.outputs if not c.passed]
        result.message = f"outputs differ beyond tolerance: {', '.join(bad)}"
    elif options.atol is None:
        noisy = _noise_dominated(result.outputs, ref_out)
        if noisy:
            result.message = (
                f"outputs {', '.join(noisy)} are rounding noise of the original: {NOISE_FLOORS:g} noise "
                "floors reach their largest value, so this comparison cannot tell a correct fold from "
                "a broken one"
            )
    if localize:
        from .divergence import localize as find_divergence

        result.first_divergence = find_divergence(reference, candidate, options, touched_nodes=touched_nodes)
    result.seconds = time.perf_counter() - start
    return result


def _noise_dominated(checks: list[OutputCheck], ref_out: list[list[np.ndarray]]) -> list[str]:
    """The outputs whose noise-floor tolerance (``NOISE_FLOORS`` floors) is as large as the
    largest magnitude of the output itself: a pass there proves nothing."""
    noisy = []
    for i, check in enumerate(checks):
        floor = check.noise_floor
        if floor is None or not floor > 0 or not np.isfinite(floor):
            continue
        finite = [np.abs(run[i][np.isfinite(run[i])]) for run in ref_out if run[i].size]
        largest = max((float(a.max()) for a in finite if a.size), default=0.0)
        if NOISE_FLOORS * floor >= largest:
            noisy.append(check.name)
    return noisy


def _checks(
    names: list[str],
    ref_out: list[list[np.ndarray]],
    cand_out: list[list[np.ndarray]],
    options: VerifyOptions,
    floors: list[float | None],
) -> list[OutputCheck]:
    """One check per output, the worst over the runs."""
    checks: list[OutputCheck] = []
    for i, name in enumerate(names):
        check: OutputCheck | None = None
        for ref_run, cand_run in zip(ref_out, cand_out, strict=True):
            c = compare(name, ref_run[i], cand_run[i], options.atol, options.rtol, floors[i])
            check = c if check is None else worst(check, c)
        assert check is not None
        checks.append(check)
    return checks


def _noise_floors(
    reference: ModelSource,
    feeds: list[Feeds],
    names: list[str],
    ref_out: list[list[np.ndarray]],
    options: VerifyOptions,
    touched_nodes: Collection[str] | None,
) -> list[float | None]:
    """The noise floor of each output (None where it cannot be measured)."""
    if isinstance(reference, Path):
        return file_noise_floors(
            reference, touched_nodes, options.seed, options.provider, feeds, names, ref_out, options.threads
        )
    if isinstance(reference, onnx.ModelProto):
        model = reference
    else:
        return [None] * len(names)
    touched = None if touched_nodes is None else touched_tensors(model, touched_nodes)
    return noise_floors(
        model, touched, options.seed, options.provider, feeds, names, ref_out, options.threads
    )


def _interface_model(source: Any) -> tuple[onnx.ModelProto, Path | None]:
    """The model (for its interface) and its path. A file goes to onnxruntime by path, so its
    weights are not read here: external data stays on disk and large embedded weights in the
    file (validated all the same, like any load)."""
    if isinstance(source, (str, os.PathLike)):
        model, _, path, embedded = open_model(source, stream_external=True, lazy=True)
        if embedded is not None:
            embedded.close()
        return model, path
    model, _, path = load_model(source)
    return model, path
