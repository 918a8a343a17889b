"""Crash-safe file writes shared by the parquet sink, the sweep store and the early-warning flight recorder."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pandas as pd


def atomic_write_parquet(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write ``df`` to ``path`` via a temp file in the same directory and ``os.replace``.

    Args:
        df: the table to write (its index is dropped).
        path: destination file; readers never see a partly written file there.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
