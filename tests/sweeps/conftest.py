"""Tiny sweep fixtures: a 16-wide 1-layer proxy on a small deterministic text file (fast to load)."""

from __future__ import annotations

import random

import pytest

TINY = {"d_model": 16, "n_layers": 1, "head_dim": 8}


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    rng = random.Random(0)
    words = ["def", "return", "self", "import", "lambda", "class", "for", "in", "if", "else", "(", ")", ":"]
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(12_000)))
    return str(path)


@pytest.fixture
def tiny(text_file):
    """Keyword arguments of a tiny, fast SweepSpec (add lrs, sizes, ...)."""
    return dict(sizes=[TINY], steps=6, batch_size=2, seq_len=8, every=3, data_path=text_file,
                train={"eval_batches": 1})
