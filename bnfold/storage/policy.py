"""The size thresholds of the storage layer as one object, handed down from where they are used."""

from __future__ import annotations

from dataclasses import dataclass

PROTOBUF_LIMIT = 2**31 - 1  # protobuf refuses to parse or serialize a message larger than this


@dataclass(frozen=True)
class StoragePolicy:
    """When weights stay on disk, are left in the model file, or go to a data file.

    The defaults are the product's; tests lower them to reach the large-model paths with small
    models.
    """

    stream_threshold: int = 512 * 2**20
    """External data at least this large (in total) stays on disk while folding."""
    embedded_threshold: int = 16 * 2**20
    """A model file at least this large keeps its big embedded weights in the file (lazy load)."""
    lazy_min_bytes: int = 16 * 1024
    """An initializer's raw_data at least this large is left in the file by a lazy load..."""
    lazy_min_fraction: float = 0.5
    """...and only if such tensors make up this share of the file."""
    external_threshold: int = 1024
    """Tensors at least this large go to the data file (or the spill file) in external data."""
    single_file_limit: int = PROTOBUF_LIMIT
    """A saved model larger than this is written with its weights in ``<name>.data``."""


DEFAULT_POLICY = StoragePolicy()
