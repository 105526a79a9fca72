"""The verification options, as one object that travels from the API or the command line down to
the runner."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import BadInput
from .inputs import Dims, Inputs, Shapes


@dataclass(frozen=True)
class VerifyOptions:
    """How to run and compare the models.

    ``inputs``: arrays by input name, or an ``.npz`` path (else seeded random inputs from ``seed``);
    ``shapes``: a shape per input name; ``dims``: a value per symbolic dimension; ``runs``: how many
    input sets; ``atol``/``rtol``: elementwise tolerances (default: derived from dtype, output
    magnitude and noise floor); ``provider``: an onnxruntime execution provider (``"cpu"``/``"cuda"``
    accepted); ``threads``: onnxruntime's intra-op threads (default: its own choice).
    """

    inputs: Inputs = None
    shapes: Shapes | None = None
    dims: Dims | None = None
    seed: int = 0
    runs: int = 1
    atol: float | None = None
    rtol: float | None = None
    provider: str = "CPUExecutionProvider"
    threads: int | None = None

    def check(self) -> None:
        """BadInput for values no model can accept (``runs`` < 1, a negative or non-finite tolerance)."""
        if self.runs < 1:
            raise BadInput("runs must be at least 1")
        for label, value in (("atol", self.atol), ("rtol", self.rtol)):
            if value is not None and not (value >= 0 and math.isfinite(value)):
                raise BadInput(f"{label} must be a finite number >= 0, got {value}")
