"""Localization: the first tensor, in the reference's topological order, at which a candidate
diverges from its reference.

Both models run once more with every tensor they both compute (same name in each main graph)
exposed as an extra graph output, on the first run's inputs; each shared tensor is compared
with the rules of the outputs (:func:`.compare.compare`, the noise floor included). Tensors
only one model computes (a folded BN's input, renamed tensors) are skipped and counted. Works
for folds made by other tools (onnxruntime's optimizer and onnxslim keep most tensor names).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace
from typing import Any

import onnx

from ..report import Divergence
from ..storage.load import load_model
from .compare import compare
from .inputs import check_same_interface, interface
from .noise import noise_floors, touched_tensors
from .options import VerifyOptions
from .runner import check_provider, run_all


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Every tensor a node of ``graph`` computes, in node (topological) order, with its node."""
    found: dict[str, onnx.NodeProto] = {}
    for node in graph.node:
        for out in node.output:
            if out:
                found.setdefault(out, node)
    return found


def _exposing(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs ``names`` (their types left to onnxruntime)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    for name in names:
        if name not in present:
            copy.graph.output.append(onnx.ValueInfoProto(name=name))
    return copy


def _label(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def localize(
    reference: Any,
    candidate: Any,
    options: VerifyOptions | None = None,
    *,
    touched_nodes: Collection[str] | None = None,
) -> Divergence | None:
    """The first shared tensor that differs beyond tolerance, or None when none does (or
    onnxruntime cannot run a model with its intermediates exposed).

    Models are paths or anything :func:`bnfold.storage.load.load_model` accepts; both are loaded into
    memory, external data included, and copied: for models under protobuf's 2 GiB only.
    ``options`` as for :func:`bnfold.verify` (``runs`` is ignored: the first run's inputs are
    used); ``touched_nodes`` as for :func:`.verifier.verify_models`. Raises BadInput like it.
    """
    from .verifier import load_request, make_feeds

    options = options or VerifyOptions()
    options.check()
    ref_model, _, _ = load_model(reference, stream_external=False)
    cand_model, _, _ = load_model(candidate, stream_external=False)
    ref_if = interface(ref_model)
    check_same_interface(ref_if, interface(cand_model))
    given = load_request(ref_if, options)
    provider = check_provider(options.provider)
    options = replace(options, provider=provider, runs=1)
    feeds, _ = make_feeds(ref_if, options, given)
    ref_nodes, cand_nodes = _producers(ref_model.graph), _producers(cand_model.graph)
    shared = [name for name in ref_nodes if name in cand_nodes]
    skipped = len(ref_nodes) + len(cand_nodes) - 2 * len(shared)
    if not shared:
        return None
    ref_exposed = _exposing(ref_model, shared)
    try:
        (ref_values,) = run_all(ref_exposed, provider, feeds, shared, options.threads)
        (cand_values,) = run_all(_exposing(cand_model, shared), provider, feeds, shared, options.threads)
    except Exception:  # noqa: BLE001 - onnxruntime's own types: nothing can be localized
        return None
    del cand_model
    touched = None if touched_nodes is None else touched_tensors(ref_model, touched_nodes)
    floors = noise_floors(
        ref_exposed, touched, options.seed, provider, feeds, shared, [ref_values], options.threads
    )
    for i, name in enumerate(shared):
        check = compare(name, ref_values[i], cand_values[i], options.atol, options.rtol, floors[i])
        if not check.passed:
            return Divergence(
                tensor=name,
                ref_node=_label(ref_nodes[name]),
                cand_node=_label(cand_nodes[name]),
                max_abs_err=check.max_abs_err,
                max_rel_err=check.max_rel_err,
                compared=len(shared),
                skipped=skipped,
            )
    return None


def describe_divergence(divergence: Divergence | None) -> str:
    """One human line for a localization: where the candidate first diverges, or that it does
    not (``"first divergence: tensor 'bn2_out' (reference node bn2, candidate node conv2), max
    abs err 0.012, max rel err 0.034; 8 shared tensors compared, 4 skipped"``)."""
    if divergence is None:
        return "no intermediate tensor diverges"
    d = divergence
    return (
        f"first divergence: tensor '{d.tensor}' (reference node {d.ref_node}, candidate node {d.cand_node}), "
        f"max abs err {d.max_abs_err:.2g}, max rel err {d.max_rel_err:.2g}; "
        f"{d.compared} shared tensors compared, {d.skipped} skipped"
    )
