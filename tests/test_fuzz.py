"""Fuzz: mutated models never crash bnfold, and a fold it returns computes what the original did.

Hypothesis takes a small valid model (Conv/ConvTranspose/Gemm -> BN, fp16, IR 3, an ``If`` body,
a local function, a Constant-node weight) and mutates it: drops node or graph inputs, deletes
initializers, changes, removes or adds attributes, reshapes or retypes initializers (with and
without matching data), writes NaN/Inf/negative values into weights and statistics, changes the
opset or a graph input's type, renames references (cycles, undefined names), reorders nodes, and
flips or truncates bytes of the serialized protobuf.

The property (``check_case``): ``bnfold.fold`` either refuses with :class:`bnfold.BadInput`, or
returns a report whose skips carry known reason codes; it never raises anything else and never
modifies its input. When it folds and onnxruntime can run the original, the folded model is run
here (onnxruntime, every optimization off, our own inputs and tolerances, not ``bnfold.verify``)
and must match; bnfold's own verification must not report a failure either. The command-line path
(``process_model``, without onnxruntime) must end with exit code 0, 1 or 2, never 3, and what it
writes must load.

CI runs 300 examples (derandomized, about 2 s). A long run, outside CI::

    BNFOLD_FUZZ_EXAMPLES=5000 python -m pytest tests/test_fuzz.py -q      # stops at the first failure
    python scripts/fuzz.py --examples 5000                                 # counts outcomes and failures
"""

from __future__ import annotations

import os
from typing import Any

from fuzz_cases import EXAMPLES, bases, check_case, mutate
from fuzz_external_cases import check_external_case
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize="BNFOLD_FUZZ_EXAMPLES" not in os.environ,
)
@given(st.data())
def test_mutated_models_fold_correctly_or_are_refused(data: Any) -> None:
    event(check_case(mutate(data)))  # outcome counts: pytest --hypothesis-show-statistics


def test_bases_fold() -> None:
    for raw in bases():
        assert check_case(raw) == "folded, outputs match"


@settings(
    max_examples=max(EXAMPLES // 3, 50),
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize="BNFOLD_FUZZ_EXAMPLES" not in os.environ,
)
@given(st.data())
def test_hostile_external_data_is_refused_or_folded_correctly(data: Any) -> None:
    event(check_external_case(data))
