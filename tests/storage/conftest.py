"""Fixtures of the storage tests."""

from __future__ import annotations

import pytest

from bnfold.storage.policy import StoragePolicy


@pytest.fixture
def force_lazy() -> StoragePolicy:
    """Every file read lazily, every raw_data initializer left in it, every folded tensor in memory."""
    return StoragePolicy(embedded_threshold=0, lazy_min_bytes=1, lazy_min_fraction=0.0, external_threshold=1)
