"""Shared tiny fixtures. Tests run on CPU in float32 (float64 where a reference needs it)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture
def tiny_cfg():
    from stabilitylab.proxy import ProxyConfig

    return ProxyConfig(d_model=32, n_layers=2, head_dim=16, seq_len=16)


@pytest.fixture
def tiny_model(tiny_cfg):
    from stabilitylab.proxy import ProxyTransformer

    torch.manual_seed(0)
    return ProxyTransformer(tiny_cfg)


@pytest.fixture
def tiny_batch(tiny_cfg):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, tiny_cfg.vocab_size, (4, tiny_cfg.seq_len), generator=g)
    y = torch.randint(0, tiny_cfg.vocab_size, (4, tiny_cfg.seq_len), generator=g)
    return x, y
