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

import pytest
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


def test_the_noise_allowance_still_rejects_a_wrong_fold() -> None:
    """The property's widening for ill-conditioned originals (``NOISE_ALLOWANCE`` times the test's
    own noise estimate) passes a correct fold of a well-conditioned model without it, and still
    rejects a fold with one weight 1 % off."""
    import numpy as np
    from fuzz_cases import _feeds, _ort_session, assert_same_outputs
    from noise_checks import own_floor
    from onnx import numpy_helper

    import bnfold
    from bnfold.testing import conv_bn_model

    original = conv_bn_model(blocks=2, seed=3)
    feeds = _feeds(original)
    assert feeds is not None
    ref = [np.asarray(o) for o in _ort_session(original).run(None, feeds)]
    folded = bnfold.fold(original, verify=False).model
    got = [np.asarray(o) for o in _ort_session(folded).run(None, feeds)]
    assert not assert_same_outputs(ref, got, noise=lambda: own_floor(original, feeds))
    w = next(t for t in folded.graph.initializer if numpy_helper.to_array(t).ndim == 4)
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * np.float32(1.01), w.name))
    broken = [np.asarray(o) for o in _ort_session(folded).run(None, feeds)]
    with pytest.raises(AssertionError, match=r"own noise floor \d"):
        assert_same_outputs(ref, broken, noise=lambda: own_floor(original, feeds))
