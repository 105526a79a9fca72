"""The verification options, as one object that travels from the API or the command line down to
the runner."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# user inputs: arrays by input name, or the path of an .npz archive of them
Inputs = Mapping[str, np.ndarray] | str | Path | None


@dataclass(frozen=True)
class VerifyOptions:
    """How to run and compare the models.

    ``inputs``: arrays by input name, or an ``.npz`` path (else seeded random inputs from ``seed``);
    ``shapes``: a shape per input name; ``dims``: a value per symbolic dimension; ``runs``: how many
    input sets; ``atol``/``rtol``: elementwise tolerances (default: derived from dtype and output
    magnitude); ``provider``: an onnxruntime execution provider (``"cpu"``/``"cuda"`` accepted);
    ``threads``: onnxruntime's intra-op threads (default: its own choice).
    """

    inputs: Inputs = None
    shapes: Mapping[str, Sequence[int]] | None = None
    dims: Mapping[str, int] | None = None
    seed: int = 0
    runs: int = 1
    atol: float | None = None
    rtol: float | None = None
    provider: str = "CPUExecutionProvider"
    threads: int | None = None
