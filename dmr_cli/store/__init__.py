"""The content-addressed model store (DMR's on-disk layout)."""

from dmr_cli.store.model import IndexEntry, Model
from dmr_cli.store.store import DiskUsage, Store

__all__ = ["DiskUsage", "IndexEntry", "Model", "Store"]
