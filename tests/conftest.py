"""Shared test setup: make ``tests/onnx_builders.py`` importable and keep hypothesis quiet."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

try:
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "bnfold", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
    )
    settings.load_profile("bnfold")
except ImportError:  # hypothesis is a test extra
    pass
