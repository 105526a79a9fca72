"""Loading models from every accepted source and writing them atomically."""

from __future__ import annotations

import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import onnx
from google.protobuf.message import DecodeError, EncodeError

from .errors import BadInput


def to_model_proto(obj: Any) -> onnx.ModelProto | None:
    """Convert in-memory models (ModelProto, onnx_ir.Model, torch.onnx.ONNXProgram, bytes)."""
    if isinstance(obj, onnx.ModelProto):
        return obj
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return _parse(bytes(obj), "the given data")
    model_proto = getattr(obj, "model_proto", None)  # torch.onnx.ONNXProgram
    if isinstance(model_proto, onnx.ModelProto):
        return model_proto
    module = type(obj).__module__ or ""
    if module.startswith("onnx_ir") or module.startswith("onnxscript.ir"):
        import onnx_ir

        return onnx_ir.serde.serialize_model(obj)
    return None


def _parse(data: bytes, what: str) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError):
        kind = _sniff(data)
        detail = (
            f"it looks like {kind}"
            if kind
            else "the protobuf data is corrupt: truncated, or another kind of file"
        )
        raise BadInput(f"{what} is not an ONNX model ({detail}); pass an .onnx file") from None
    if not model.HasField("graph"):
        kind = _sniff(data)
        raise BadInput(f"{what} is not an ONNX model (no graph{'; it looks like ' + kind if kind else ''})")
    return model


_MAGIC = (
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"PK\x03\x04", "a zip archive (a PyTorch .pt/.pth checkpoint or an .npz?)"),
    (b"\x89HDF", "an HDF5 file (a Keras model?)"),
    (b"\x93NUMPY", "a NumPy .npy array"),
    (b"\x80\x02", "a Python pickle (a PyTorch checkpoint?)"),
    (b"\x80\x04", "a Python pickle (a PyTorch checkpoint?)"),
    (b"\x1f\x8b", "a gzip file (decompress it first)"),
    (b"%PDF", "a PDF document"),
    (b"\x7fELF", "an executable"),
)


def _sniff(data: bytes) -> str:
    """What a file that is not an ONNX model seems to be, from its first bytes ('' if unknown)."""
    for magic, kind in _MAGIC:
        if data.startswith(magic):
            return kind
    if len(data) >= 8 and data[4:8] == b"TFL3":
        return "a TensorFlow Lite model"
    head = data[:512]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return ""
    if text and all(c.isprintable() or c in "\r\n\t" for c in text):
        stripped = text.lstrip()
        if stripped.startswith(("{", "[")):
            return "a JSON/text file"
        if stripped.startswith("<"):
            return "an XML/HTML file"
        return "a text file"
    return ""


STREAM_THRESHOLD = 512 * 2**20  # external data at least this large stays on disk while folding
EMBEDDED_THRESHOLD = 16 * 2**20  # a model file at least this large keeps its big weights on disk (lazy)


def load_model(
    source: Any, stream_external: bool | None = None, external_files: list[Path] | None = None
) -> tuple[onnx.ModelProto, str, Path | None]:
    """Return ``(model, base_dir, path)`` for a path or an in-memory model.

    External data is loaded into the model when it is smaller than STREAM_THRESHOLD (or
    ``stream_external`` is False); otherwise (or when True) it stays on disk, is read tensor by
    tensor by the pass and streamed when saving.

    The returned model is always a complete fresh copy the caller may modify. Raises BadInput
    with a one-line message for anything that is not a readable ONNX model. ``external_files``, if
    given, receives the external data files the model on disk refers to (a save must not
    overwrite them).
    """
    model, base_dir, path, _ = open_model(source, stream_external, external_files)
    return model, base_dir, path


def open_model(
    source: Any,
    stream_external: bool | None = None,
    external_files: list[Path] | None = None,
    lazy: bool = False,
) -> tuple[onnx.ModelProto, str, Path | None, Any]:
    """:func:`load_model`, plus (with ``lazy``) large embedded weights left in the file.

    With ``lazy``, a model file of at least EMBEDDED_THRESHOLD bytes whose big initializers are
    plain ``raw_data`` is parsed without them (see :mod:`bnfold.external`, "Embedded weights"):
    the fourth item is then a :class:`bnfold.external.Embedded` through which those tensors are
    read, folded tensors stored, and the model saved or completed; otherwise it is None and the
    model is complete, as from :func:`load_model`.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise BadInput(f"{path}: no such file")
        if path.is_dir():
            raise BadInput(f"{path}: is a directory, not an ONNX file")
        if not path.is_file():
            raise BadInput(
                f"{path}: not a regular file (a device, pipe or socket); save the model to a file first"
            )
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise BadInput(f"{path}: cannot read ({exc.strerror})") from None
        if size > PROTOBUF_LIMIT:
            raise BadInput(
                f"{path}: {size} bytes is over protobuf's 2 GiB limit, so it is not an ONNX model file "
                "(larger models keep their weights in external data files)"
            )
        if lazy and size >= EMBEDDED_THRESHOLD:
            opened = _open_lazy(path, size)
            if opened is not None:
                return opened[0], str(path.resolve().parent), path, opened[1]
        model = _read_model(path)
        base_dir = str(path.resolve().parent)
        if has_external_data(model):
            from .external import check_locations, external_bytes

            try:
                check_locations(model, base_dir)
            except BadInput as exc:
                raise BadInput(f"{path}: {exc}") from None
            if external_files is not None:
                external_files.extend(data_files(model, base_dir))
            if not stream_external and (
                stream_external is not None or external_bytes(model) < STREAM_THRESHOLD
            ):
                _load_external(model, base_dir, path)
            # else external data stays on disk: the pass reads only the tensors it folds.
        return model, base_dir, path, None
    proto = to_model_proto(source)
    if proto is None:
        raise BadInput(
            f"cannot fold a {type(source).__name__}: pass a path, onnx.ModelProto, "
            "onnx_ir.Model or torch.onnx.ONNXProgram"
        )
    check_structure(proto)
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return copy, "", None, None


def _read_model(path: Path) -> onnx.ModelProto:
    """Read and parse a whole model file, and check its structure (BadInput, one line)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadInput(f"{path}: cannot read ({exc.strerror})") from None
    if not data:
        raise BadInput(f"{path}: empty file")
    model = _parse(data, str(path))
    del data
    try:
        check_structure(model)
    except BadInput as exc:
        raise BadInput(f"{path}: {exc}") from None
    return model


def _open_lazy(path: Path, size: int) -> tuple[onnx.ModelProto, Any] | None:
    """Parse the model at ``path`` without its large initializers (they stay in the file).

    None (the caller reads the whole file, which also reports any error in the usual words)
    when the file cannot be mapped, has nothing worth leaving out, is not plain protobuf, or has
    real external data.
    """
    import mmap

    from .external import Embedded, split_model

    if not hasattr(os, "pread"):  # (not on Windows) the weights are read with pread
        return None

    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            size = min(size, len(mm))
            plan = split_model(mm, size)
            if plan is None:
                return None
            pieces, cuts = plan
            skeleton = b"".join(pieces)
            del plan, pieces  # views of the map: released before it closes
            embedded = Embedded(path)
            if os.fstat(embedded.fd).st_ino != os.fstat(f.fileno()).st_ino:
                return None  # replaced meanwhile
    except (OSError, ValueError, BufferError):
        return None
    model = onnx.ModelProto()
    try:
        model.ParseFromString(skeleton)
    except (DecodeError, RuntimeError, ValueError):
        return None
    del skeleton
    inits = model.graph.initializer
    if not model.HasField("graph") or len(inits) <= cuts[-1][0]:
        return None
    for index, offset, length in cuts:
        t = inits[index]
        if t.HasField("raw_data") or t.external_data or t.HasField("data_location"):
            return None  # not what split_model saw
        embedded.mark(t, offset, length)
    try:
        check_structure(model)
    except BadInput as exc:
        raise BadInput(f"{path}: {exc}") from None
    if any(is_external_data(t) and not embedded.holds(t) for t in _iter_tensors(model)):
        return None  # also real external data: the usual path checks and streams it
    return model, embedded


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
    nodes: Any,
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
    nodes = list(nodes)
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
    from .onnx.index import may_have_subgraphs  # graph imports this module's helpers through external

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
        uses: Any = node.input
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
            j = get(name)
            if j is not None:
                if j >= i:
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
                j = get(name)
                if j is not None and j >= 0:
                    mine.add(j)
            deps.append(mine)
        _check_acyclic(nodes, deps, where)
    return free


def _node(node: onnx.NodeProto) -> str:
    return f"node '{node.name}' ({node.op_type})" if node.name else f"a {node.op_type} node"


def _check_acyclic(nodes: Any, deps: list[set[int]], where: str) -> None:
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


def _load_external(model: onnx.ModelProto, base_dir: str, path: Path) -> None:
    from onnx.external_data_helper import load_external_data_for_model

    try:
        load_external_data_for_model(model, base_dir)
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise BadInput(f"{path}: cannot read external data ({exc})") from None


def data_files(model: onnx.ModelProto, base_dir: str) -> list[Path]:
    """The distinct files (resolved) that hold the model's external data."""
    from .external import _entries, is_external, iter_tensors, resolve_location

    files: dict[Path, None] = {}
    for t in iter_tensors(model):
        if is_external(t):
            files.setdefault(resolve_location(base_dir, _entries(t).get("location", "")))
    return list(files)


def same_file(a: Path, b: Path) -> bool:
    """True if both paths name one existing file (symlinks and hard links included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def is_external_data(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def _iter_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    from .external import iter_tensors

    return iter_tensors(model)


def has_external_data(model: onnx.ModelProto) -> bool:
    """True if any tensor of the model keeps its data in an external file."""
    from .external import is_external, iter_tensors

    return any(is_external(t) for t in iter_tensors(model))


PROTOBUF_LIMIT = 2**31 - 1


def save_model(
    model: onnx.ModelProto, path: str | os.PathLike[str], base_dir: str = "", spill: Any = None
) -> Path:
    """Write ``model`` to ``path`` atomically: a temporary file in the same folder, then rename.

    A model with external data (read from ``base_dir``, or from ``spill`` for folded tensors), or
    one over protobuf's 2 GiB limit, is written as ``path`` plus ``<name>.data`` beside it, with
    the data streamed rather than loaded. An interrupted write leaves the previous file (or none),
    never a partial one. Raises BadInput (nothing written) when the folder is missing or not
    writable. ``model`` is left as it was, unless the write replaced a data file it reads from
    (saving in place): then its tensors refer to the new ``<name>.data`` beside ``path``.
    """
    return save_model_located(model, path, base_dir, spill)[0]


def save_model_located(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    base_dir: str = "",
    spill: Any = None,
    durable: bool = True,
    external: bool | None = None,
) -> tuple[Path, bool]:
    """:func:`save_model`, also saying whether ``model`` now reads its data from beside ``path``.

    ``spill`` may be a :class:`bnfold.external.Embedded` (a model from :func:`open_model` with
    ``lazy``): the file is then written in pieces, never serialized whole in memory, with the
    bytes a complete model would have. ``durable=False`` skips fsync (scratch copies).
    ``external``: True writes ``<name>.data`` even for a model whose data is all in memory (its
    input kept its weights in external data); False says the caller knows no tensor refers to
    external data (a model read from a file without any); None (default) checks.
    """
    path = Path(path)
    from .external import Embedded

    if isinstance(spill, Embedded) and not external:
        written = _save_embedded(model, path, spill, durable)
        if written is not None:
            return written, False
        # over protobuf's limit: the data goes to <name>.data below, read through ``spill``
    data = None
    if external is False or (external is None and not has_external_data(model)):
        try:
            data = model.SerializeToString()  # one pass; ByteSize() first would cost another
        except (ValueError, EncodeError):
            data = None  # over protobuf's 2 GiB limit: write external data instead
        if data is not None and len(data) > PROTOBUF_LIMIT:
            data = None
    if data is None:
        from .external import save_external

        folder = path.parent if str(path.parent) else Path(".")
        if not folder.is_dir():
            raise BadInput(f"{path}: folder {folder} does not exist")
        try:
            moved = save_external(model, path, base_dir, spill)
        except OSError as exc:
            raise BadInput(f"{path}: write failed ({exc.strerror or exc})") from None
        return path, moved
    return write_atomic(data, path, durable=durable), False


def _save_embedded(model: onnx.ModelProto, path: Path, embedded: Any, durable: bool) -> Path | None:
    """Write a lazily loaded model as one file, in pieces; None if it is over protobuf's limit."""
    from .external import _Layout, plan_embedded, write_pieces

    try:
        pieces, total = plan_embedded(model, embedded)
    except _Layout:  # protobuf laid the skeleton out unexpectedly: serialize a complete copy
        full = onnx.ModelProto()
        full.CopyFrom(model)
        embedded.materialize(full)
        data = full.SerializeToString()
        del full
        return write_atomic(data, path, durable=durable)
    if total > PROTOBUF_LIMIT:
        return None
    return write_atomic(lambda fd: write_pieces(fd, pieces, embedded.fd), path, durable=durable)


def write_atomic(
    data: bytes | str | Callable[[int], None], path: str | os.PathLike[str], durable: bool = True
) -> Path:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` via a temporary file and a rename.

    ``data`` may also be a function that writes to the file descriptor it is given. The
    temporary file lives in the target folder (so the rename is atomic), is fsync'ed before the
    rename (unless ``durable`` is False) and is removed on any failure, including
    KeyboardInterrupt. An existing file keeps its permission bits.
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise BadInput(f"{path}: folder {folder} does not exist")
    if path.is_dir():
        raise BadInput(f"{path}: is a directory")
    tmp = ""
    try:
        with signals_deferred():  # a Ctrl-C cannot land between creating the file and noting its name
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise BadInput(f"{path}: cannot write in {folder} ({exc.strerror or exc})") from None
    except BaseException:
        if tmp:
            os.unlink(tmp)
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f.fileno())
            else:
                f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise BadInput(f"{path}: write failed ({exc.strerror or exc})") from None
        raise
    return path


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM (delivered to Python handlers) until the block ends, then act on them.

    Python runs signal handlers in the main thread between bytecodes, so the handlers are
    swapped for recorders (main thread only: elsewhere no handler can interrupt the block).
    SIGKILL cannot be held (see :func:`bnfold.external.save_external`).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    saved: dict[int, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if handler is None:
            continue
        try:
            signal.signal(sig, lambda signum, frame: pending.append(signum))
        except (ValueError, OSError):  # pragma: no cover
            continue
        saved[sig] = handler
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        for sig in pending:
            handler = saved[sig]
            if callable(handler):
                handler(sig, None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), sig)
