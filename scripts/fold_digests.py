"""SHA-256 of the folded bytes of every model in ``models/onnx`` and of the benchmark models.

A refactor must not change what bnfold writes. Record the digests on the commit before the change
and compare after it::

    python scripts/fold_digests.py --write build/digests-before.json      # on the old commit
    python scripts/fold_digests.py --compare build/digests-before.json    # on the new one

Each model is folded by ``bnfold.fold(..., verify=False)`` through a file (the path the command
line takes: lazy loading, external data) and the bytes of ``result.save`` are hashed, with and
without ``bn_to_affine``. The external-data benchmark model is built small (the fold path is the
same as for the 2.4 GB one, forced with ``stream_external=True``). Exit status 1 on any difference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _fold_file(src: Path, work: Path, **options: object) -> str:
    import bnfold

    out = work / "out"
    out.mkdir()
    try:
        result = bnfold.fold(src, verify=False, output=out / "folded.onnx", **options)  # type: ignore[arg-type]
        result.save(out / "folded.onnx")
        return _digest(out)
    except bnfold.BnfoldError as e:
        return f"error: {type(e).__name__}: {e}"
    finally:
        for p in out.iterdir():
            p.unlink()
        out.rmdir()


def digests() -> dict[str, str]:
    import onnx

    from benchmarks import make_models

    found: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sources = sorted((ROOT / "models" / "onnx").glob("*.onnx"))
        bench = work / "bench"
        bench.mkdir()
        for name, model in {
            "chain500": make_models.chain(500),
            "resnet50_like": make_models.resnet50_like(),
            "mobilenet_like": make_models.mobilenet_like(),
        }.items():
            onnx.save(model, bench / f"{name}.onnx")
            sources.append(bench / f"{name}.onnx")
        ext = work / "external"
        ext.mkdir()
        ext_model = make_models.big_external(ext, layers=4, channels=64)
        for src in sources:
            key = src.relative_to(ROOT).as_posix() if src.is_relative_to(ROOT) else f"benchmark/{src.name}"
            found[key] = _fold_file(src, work)
            found[key + " bn_to_affine"] = _fold_file(src, work, bn_to_affine=True)
        found["benchmark/big_external stream"] = _fold_file(Path(ext_model), work, stream_external=True)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", type=Path, help="write the digests to this JSON file")
    group.add_argument("--compare", type=Path, help="compare with digests written before")
    args = parser.parse_args()
    now = digests()
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
        print(f"{len(now)} digests written to {args.write}")
        return 0
    before = json.loads(args.compare.read_text())
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    for key in changed:
        print(f"CHANGED {key}: {before.get(key, '-')[:16]} -> {now.get(key, '-')[:16]}")
    print(
        f"{'FAILED' if changed else 'PASSED'} {len(now) - len(changed)}/{len(now)} folded outputs identical"
    )
    return 1 if changed else 0


if __name__ == "__main__":
    raise SystemExit(main())
