"""Long fuzz run of bnfold outside CI: the property of tests/test_fuzz.py on many more cases.

    python scripts/fuzz.py --examples 5000 [--seed 1] [--max-failures 20]

Both properties of tests/test_fuzz.py run: mutated models (``--examples``) and hostile external
data (``--external``, default a third of that). Unlike the pytest form (which stops and shrinks at
the first failure), this keeps going, counts each outcome (refused as BadInput, unchanged, folded
and checked in onnxruntime, ...) and prints every failure: the mutated model is saved under
``--save DIR`` (default ``fuzz-failures/``) as ``<n>.onnx`` with its traceback in ``<n>.txt``.
Exit code 1 if any case failed.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.simplefilter("ignore", RuntimeWarning)  # numpy on garbage weights; outcomes say what happened
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--external",
        type=int,
        default=None,
        help="cases of the external-data property (default: a third of --examples)",
    )
    parser.add_argument("--max-failures", type=int, default=50, help="stop after this many failures")
    parser.add_argument("--save", type=Path, default=Path("fuzz-failures"))
    args = parser.parse_args(argv)
    if args.external is None:
        args.external = args.examples // 3

    import fuzz_cases
    import fuzz_external_cases
    from hypothesis import HealthCheck, Phase, given, seed, settings
    from hypothesis import strategies as st

    outcomes: collections.Counter[str] = collections.Counter()
    failures: list[tuple[bytes, str]] = []
    start = time.perf_counter()

    def record(kind: str, check: object, raw: bytes) -> None:
        try:
            outcomes[f"{kind}: {check()}"] += 1  # type: ignore[operator]
        except Exception:  # noqa: BLE001 - a property violation or a crash: record and go on
            outcomes[f"{kind}: FAILED"] += 1
            failures.append((raw, traceback.format_exc()))
            if len(failures) >= args.max_failures:
                raise SystemExit("too many failures") from None

    def property_run(examples: int, body: object) -> None:
        @seed(args.seed)
        @settings(
            max_examples=examples,
            deadline=None,
            phases=[Phase.generate],
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(st.data())
        def run(data: object) -> None:
            body(data)  # type: ignore[operator]

        run()

    def mutated_model(data: object) -> None:
        raw = fuzz_cases.mutate(data)
        record("model", lambda: fuzz_cases.check_case(raw), raw)

    def external(data: object) -> None:
        record("external data", lambda: fuzz_external_cases.check_external_case(data), b"")

    try:
        property_run(args.examples, mutated_model)
        if args.external:
            property_run(args.external, external)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
    seconds = time.perf_counter() - start
    total = sum(outcomes.values())
    print(f"{total} cases in {seconds:.1f} s ({total / max(seconds, 1e-9):.0f}/s), {len(failures)} failures")
    for name, n in outcomes.most_common():
        print(f"  {n:6d}  {name}")
    if failures:
        args.save.mkdir(parents=True, exist_ok=True)
        for i, (raw, tb) in enumerate(failures):
            if raw:  # external-data cases are reproduced from the traceback's hypothesis draws
                (args.save / f"{i}.onnx").write_bytes(raw)
            (args.save / f"{i}.txt").write_text(tb)
            last = [ln for ln in tb.strip().splitlines() if ln.strip()][-1]
            print(f"failure {i}: {last[:300]}  ({args.save / f'{i}.onnx'})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
