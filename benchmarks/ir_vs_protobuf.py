"""Why the pass works on raw protobuf: the cost of going through onnx_ir instead, measured.

For each benchmark model (built by ``make_models.py``, saved to a temporary file) this times, in
the same process, interleaved, median of ``--repeats``:

- ``protobuf``: ``onnx.load_model`` + bnfold's pass (``fold_model``) + ``SerializeToString``;
- ``onnx_ir``: ``onnx_ir.load`` + ``onnx_ir.to_proto`` + ``SerializeToString`` (the round trip
  alone, before any folding: the least a pass on the IR would cost on top of the fold);
- ``load only``: ``onnx.load_model`` (the floor both share).

Run: ``python benchmarks/ir_vs_protobuf.py --repeats 5``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import make_models  # noqa: E402
import onnx  # noqa: E402
import onnx_ir  # noqa: E402

from bnfold.onnx.driver import fold_model  # noqa: E402


def _protobuf(path: Path) -> None:
    model = onnx.load_model(str(path))
    fold_model(model)
    model.SerializeToString()


def _ir_round_trip(path: Path) -> None:
    model = onnx_ir.load(str(path))
    onnx_ir.to_proto(model).SerializeToString()


def _load_only(path: Path) -> None:
    onnx.load_model(str(path))


WAYS: dict[str, Callable[[Path], None]] = {
    "load only": _load_only,
    "protobuf (load+fold+serialize)": _protobuf,
    "onnx_ir (load+to_proto+serialize, no fold)": _ir_round_trip,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    models = {
        "ResNet-50 shape": make_models.resnet50_like(),
        "MobileNet-v2 shape": make_models.mobilenet_like(),
        "chain of 5000": make_models.chain(5000),
    }
    print(f"onnx {onnx.__version__}, onnx_ir {onnx_ir.__version__}; median of {args.repeats}, seconds")
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            path = Path(tmp) / "m.onnx"
            onnx.save_model(model, str(path))
            times: dict[str, list[float]] = {way: [] for way in WAYS}
            for _ in range(args.repeats):
                for way, run in WAYS.items():
                    start = time.perf_counter()
                    run(path)
                    times[way].append(time.perf_counter() - start)
            medians = {way: statistics.median(t) for way, t in times.items()}
            ratio = medians[list(WAYS)[2]] / medians[list(WAYS)[1]]
            cells = ", ".join(f"{way}: {m:.3f}" for way, m in medians.items())
            print(f"{name}: {cells}; onnx_ir round trip / bnfold fold = {ratio:.2f}x")


if __name__ == "__main__":
    main()
