"""Benchmark data: readers for CUHK-SYSU and PRW, the shared annotation table and its cache.

``load_annotations(dataset, root)`` is the entry point; it parses the MATLAB files once and then
reads the Parquet cache. The heavy modules (scipy, pyarrow, PIL) load on first use, so importing
this package stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from .annotations import Annotations, GalleryProtocol, ImageTable, QueryTable

_LAZY = {
    "load_annotations": "cache",
    "default_cache_dir": "cache",
    "parse_cuhk_sysu": "cuhk_sysu",
    "parse_prw": "prw",
    "DatasetError": "matlab",
    "validate_dataset": "validate",
    "ValidationReport": "report",
    "Problem": "report",
}

__all__ = ["Annotations", "GalleryProtocol", "ImageTable", "QueryTable", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
