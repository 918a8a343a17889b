"""Byte-level data: deterministic, held-out split disjoint, user files, clear errors."""

from __future__ import annotations

import pytest
import torch

from stabilitylab.proxy import ByteData


@pytest.fixture
def two_part_file(tmp_path):
    """First 90% letters a..m, last 10% letters n..z: any byte tells which split it came from."""
    n = 20_000
    train = bytes(ord("a") + i % 13 for i in range(n - n // 10))
    val = bytes(ord("n") + i % 13 for i in range(n // 10))
    f = tmp_path / "corpus.txt"
    f.write_bytes(train + val)
    return f


def test_held_out_split_is_disjoint_tail(two_part_file):
    data = ByteData(16, two_part_file, holdout=0.1)
    assert len(data.train) + len(data.val) == 20_000
    assert bytes(data.train.tolist()).isalpha() and max(data.train.tolist()) < ord("n")
    assert min(data.val.tolist()) >= ord("n")
    g = torch.Generator().manual_seed(0)
    for split, ok in (("train", lambda b: b < ord("n")), ("val", lambda b: b >= ord("n"))):
        x, y = data.batch(split, 64, g)
        assert x.shape == y.shape == (64, 16) and x.dtype == torch.int64
        assert ok(torch.cat([x, y])).all(), split
        torch.testing.assert_close(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one


def test_default_corpus_is_deterministic():
    a, b = ByteData(32), ByteData(32)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    xa, ya = a.batch("train", 4, torch.Generator().manual_seed(5))
    xb, yb = b.batch("train", 4, torch.Generator().manual_seed(5))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert len(a.val) > 0 and len(a.train) > 9 * len(a.val) - 10


def test_directory_of_text_files(tmp_path, two_part_file):
    d = tmp_path / "dir"
    d.mkdir()
    (d / "b.txt").write_bytes(two_part_file.read_bytes())
    (d / "a.txt").write_bytes(b"z" * 5000)
    data = ByteData(8, d)
    assert len(data.train) + len(data.val) == 25_000
    assert data.train[:5000].tolist() == [ord("z")] * 5000  # sorted file order


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="does_not_exist"):
        ByteData(8, tmp_path / "does_not_exist")
    small = tmp_path / "small.txt"
    small.write_text("tiny")
    with pytest.raises(ValueError, match="10,000"):
        ByteData(8, small)
    with pytest.raises(ValueError, match="holdout"):
        ByteData(8, holdout=1.5)
