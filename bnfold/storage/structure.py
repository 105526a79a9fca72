"""The structural check every model passes on load: what no runtime can load and no pass can
reason about is refused with a one-line :class:`bnfold.BadInput`."""

from __future__ import annotations

from collections.abc import Iterable

import onnx

from ..errors import BadInput
from ..onnx.index import may_have_subgraphs


def check_structure(model: onnx.ModelProto) -> None:
    """Refuse a model no runtime can load and no pass can reason about (BadInput, one line).

    Checked in one scan of every graph, subgraph and function: an IR version or default-domain
    opset newer than the installed onnx knows (the semantics of BatchNormalization there are
    unknown); a value defined twice (graph inputs, initializers, node outputs); a node input or
    graph output that nothing defines (in its graph or an enclosing one); a cycle. Nodes need not
    be in topological order (onnxruntime sorts them itself).
    """
    known_ir = onnx.IR_VERSION
    if model.ir_version > known_ir:
        raise BadInput(
            f"IR version {model.ir_version} is newer than the installed onnx {onnx.__version__} knows "
            f"(up to {known_ir}); upgrade onnx"
        )
    known_opset = onnx.defs.onnx_opset_version()
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version > known_opset:
            raise BadInput(
                f"opset {imp.version} is newer than the installed onnx {onnx.__version__} knows "
                f"(up to {known_opset}), so the meaning of its operators is unknown; upgrade onnx"
            )
    domains = {("" if imp.domain == "ai.onnx" else imp.domain) for imp in model.opset_import}
    domains.update(f.domain for f in model.functions)
    _check_graph(model.graph, frozenset(), "", domains)
    for f in model.functions:
        where = f" in function '{f.domain}:{f.name}'" if f.domain else f" in function '{f.name}'"
        _check_body(list(f.input), [], f.node, list(f.output), frozenset(), where, "function input", None)


_GRAPH, _GRAPHS = onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS


def _check_graph(
    graph: onnx.GraphProto, outer: frozenset[str], where: str, domains: set[str] | None
) -> set[str]:
    """Check one graph (recursively); returns the names it uses from enclosing scopes."""
    inits = [t.name for t in graph.initializer] + [t.values.name for t in graph.sparse_initializer]
    seen: set[str] = set()
    for name in inits:
        if name in seen:
            raise BadInput(
                f"initializer '{name}' is defined twice{where}; every value needs exactly one definition"
            )
        seen.add(name)
    return _check_body(
        [v.name for v in graph.input],
        inits,
        graph.node,
        [v.name for v in graph.output],
        outer,
        where,
        "graph input",
        domains,
    )


def _check_body(
    inputs: list[str],
    inits: list[str],
    body_nodes: Iterable[onnx.NodeProto],
    outputs: list[str],
    outer: frozenset[str],
    where: str,
    input_kind: str,
    domains: set[str] | None,
) -> set[str]:
    """Definitions, references, domains (``None``: not checked, as in functions) and cycles of
    one graph or function body."""
    defined: dict[str, int] = {}  # name -> producing node index, or -1 (input), -2 (initializer)
    for name in inputs:
        if name in defined:
            raise BadInput(f"{input_kind} '{name}' is declared twice{where}")
        defined[name] = -1
    for name in inits:
        defined.setdefault(name, -2)  # an initializer may also be listed as an input
    nodes = list(body_nodes)
    for i, node in enumerate(nodes):
        for name in node.output:
            if not name:
                continue
            if name in defined:
                j = defined[name]
                other = (
                    input_kind if j == -1 else "initializer" if j == -2 else f"output of {_node(nodes[j])}"
                )
                raise BadInput(
                    f"'{name}' is defined twice{where}: output of {_node(node)} and {other}; "
                    "every value needs exactly one definition"
                )
            defined[name] = i
    inner_scope: frozenset[str] | None = None
    free: set[str] = set()
    in_order = True  # every input produced by an earlier node: acyclic without sorting
    inner_uses: dict[int, list[str]] = {}  # node index -> names its subgraphs read from outside
    get = defined.get
    for i, node in enumerate(nodes):
        if domains is not None:
            domain = node.domain
            if domain not in domains and not (domain == "ai.onnx" and "" in domains):
                label = f"'{domain}'" if domain else "'' (ai.onnx)"
                raise BadInput(
                    f"{_node(node)}{where} uses the operator domain {label}, which the model's opset_import "
                    "does not list; the model is invalid (add the opset import or re-export it)"
                )
        uses: Iterable[str] = node.input
        if may_have_subgraphs(node):
            extra: list[str] = []
            for attr in node.attribute:
                kind = attr.type
                if kind != _GRAPH and kind != _GRAPHS:
                    continue
                if inner_scope is None:
                    inner_scope = outer | frozenset(defined)
                for g in [attr.g] if kind == _GRAPH else attr.graphs:
                    extra.extend(
                        _check_graph(
                            g, inner_scope, f"{where} in subgraph '{attr.name}' of {_node(node)}", domains
                        )
                    )
            if extra:
                inner_uses[i] = extra
                uses = [*uses, *extra]
        for name in uses:
            producer = get(name)
            if producer is not None:
                if producer >= i:
                    in_order = False
            elif name:
                if name not in outer:
                    raise BadInput(
                        f"{_node(node)}{where} reads '{name}', which no {input_kind}, initializer or node "
                        "defines; the model is incomplete"
                    )
                free.add(name)
    for name in outputs:
        if name not in defined:
            if name not in outer:
                raise BadInput(f"output '{name}'{where} is not produced by anything")
            free.add(name)
    if not in_order:  # only now the producer -> consumer edges are needed
        deps = []
        for i, node in enumerate(nodes):
            mine: set[int] = set()
            for name in (*node.input, *inner_uses.get(i, ())):
                producer = get(name)
                if producer is not None and producer >= 0:
                    mine.add(producer)
            deps.append(mine)
        _check_acyclic(nodes, deps, where)
    return free


def _node(node: onnx.NodeProto) -> str:
    return f"node '{node.name}' ({node.op_type})" if node.name else f"a {node.op_type} node"


def _check_acyclic(nodes: list[onnx.NodeProto], deps: list[set[int]], where: str) -> None:
    """Kahn's algorithm over producer -> consumer edges; BadInput naming a node on a cycle."""
    n = len(deps)
    users: list[list[int]] = [[] for _ in range(n)]
    missing = [0] * n
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
        missing[i] = len(d)
    ready = [i for i in range(n) if missing[i] == 0]
    done = 0
    while ready:
        i = ready.pop()
        done += 1
        for u in users[i]:
            missing[u] -= 1
            if missing[u] == 0:
                ready.append(u)
    if done < n:
        stuck = next(i for i in range(n) if missing[i] > 0)
        visited: set[int] = set()
        while stuck not in visited:  # walk back along unresolved inputs until a node repeats
            visited.add(stuck)
            stuck = next(j for j in deps[stuck] if missing[j] > 0)
        raise BadInput(
            f"the graph{where} has a cycle through {_node(nodes[stuck])}; ONNX graphs must be acyclic"
        )
