"""Byte-level text data for the proxy, from files present on every machine.

By default the corpus is the Python standard library's ``.py`` sources (sorted paths, concatenated,
first ``max_bytes`` bytes), so every machine with the same Python builds the same data without a
download. Pass ``path`` (a text file or a directory of text files) to use your own.
"""

from __future__ import annotations

import functools
import os
import sysconfig
from pathlib import Path

import torch


@functools.lru_cache(maxsize=8)
def load_corpus(path: str | None = None, max_bytes: int = 8_000_000) -> torch.Tensor:
    """All bytes of the corpus as a uint8 tensor (cached per process)."""
    if path is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)
    else:
        p = Path(path)
        if not p.exists():
            raise ValueError(f"data path {path!r} does not exist; pass a text file or a directory of text files")
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    chunks, total = [], 0
    for f in files:
        try:
            b = f.read_bytes()
        except OSError:
            continue
        chunks.append(b)
        total += len(b)
        if total >= max_bytes:
            break
    data = b"".join(chunks)[:max_bytes]
    if len(data) < 10_000:
        raise ValueError(f"data path {path!r} holds only {len(data)} bytes; the proxy needs at least 10,000")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


class ByteData:
    """Train / held-out split of a byte corpus and random fixed-length batches.

    Args:
        seq_len: tokens per sequence (targets are inputs shifted by one).
        path: text file or directory (default: the Python standard library sources).
        holdout: fraction of the corpus (its tail) kept for evaluation.
        max_bytes: corpus size cap.
    """

    def __init__(self, seq_len: int, path: str | os.PathLike | None = None, holdout: float = 0.1,
                 max_bytes: int = 8_000_000):
        if not 0 < holdout < 1:
            raise ValueError(f"ByteData(holdout={holdout}): must be in (0, 1)")
        data = load_corpus(None if path is None else str(path), max_bytes)
        n_val = int(len(data) * holdout)
        self.seq_len = seq_len
        self.train = data[:-n_val]
        self.val = data[-n_val:]

    def batch(self, split: str, batch_size: int, generator: torch.Generator, device: str | torch.device = "cpu"):
        """``(x, y)`` int64 of shape ``(batch_size, seq_len)`` from random offsets of ``split``."""
        data = self.train if split == "train" else self.val
        ix = torch.randint(len(data) - self.seq_len - 1, (batch_size,), generator=generator)
        idx = ix[:, None] + torch.arange(self.seq_len + 1)
        chunk = data[idx].long()
        x, y = chunk[:, :-1], chunk[:, 1:]
        return x.to(device), y.to(device)
