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


def _train_loop(model, opt, batch, steps, mon=None, before=None, before_opt_step=None, after=None):
    """The plain loop every test shares: ``steps`` times forward on one fixed ``(x, y)`` batch (a proxy-style
    ``model(x, y) -> (logits, loss)``), backward, ``opt.step()``, ``opt.zero_grad()``, ``mon.step(loss)``.

    Hooks, each called with the step index: ``before`` (before the forward), ``before_opt_step`` (after
    backward) and ``after`` (after ``mon.step``). Returns ``mon.step``'s return value per step (None
    without a Monitor).
    """
    x, y = batch
    out = []
    for i in range(steps):
        if before:
            before(i)
        _, loss = model(x, y)
        loss.backward()
        if before_opt_step:
            before_opt_step(i)
        opt.step()
        opt.zero_grad()
        out.append(mon.step(loss) if mon is not None else None)
        if after:
            after(i)
    return out


def _train_monitored(model, batch, steps, **monitor_kwargs):
    """AdamW(lr=1e-3) on one fixed batch for ``steps`` steps under ``Monitor(model, optimizer, **kw)``."""
    import stabilitylab as sl

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mon = sl.Monitor(model, optimizer=opt, **monitor_kwargs)
    _train_loop(model, opt, batch, steps, mon)
    return mon


@pytest.fixture
def train_loop():
    """The shared training loop ``(model, opt, batch, steps, mon=None, before=, before_opt_step=, after=)``."""
    return _train_loop


@pytest.fixture
def train_monitored():
    """The shared training loop ``(model, batch, steps, **monitor_kwargs) -> Monitor`` (not closed)."""
    return _train_monitored


def _attn_reference(q, k, allowed=None, scale=None, bias=None):
    """Float64 ground truth from the full score matrix: (max logit, mean row entropy, number of rows).

    ``allowed`` (bool, True = may attend) and ``bias`` (additive) broadcast to (B, H, Tq, Tk); key heads
    are repeated for grouped-query attention; rows with no allowed key are left out.
    """
    q, k = q.detach().double(), k.detach().double()
    k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if bias is not None:
        s = s + bias.double()
    allowed = torch.ones_like(s, dtype=torch.bool) if allowed is None else allowed.expand_as(s)
    rows = allowed.any(-1)
    s = s.masked_fill(~allowed, float("-inf"))[rows]
    p = torch.softmax(s, dim=-1)
    ent = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(-1)
    return s.max().item(), ent.mean().item(), int(rows.sum())


@pytest.fixture
def attn_reference():
    """The float64 attention reference ``(q, k, allowed=, scale=, bias=) -> (max, entropy, rows)``."""
    return _attn_reference


def _read_wandb_file(path) -> dict:
    """Parse an offline W&B run file (LevelDB-style log of protobuf ``Record`` messages, CRC-checked).

    Returns ``{"run": RunRecord, "history": [row dicts], "config": {...}, "metrics": [dicts],
    "alerts": [dicts], "summary": {...}, "run_dir": dir, "complete": bool}`` with values JSON-decoded;
    ``complete`` once wandb-core wrote the final ``exit`` record.
    """
    import json
    import struct
    import zlib

    from google.protobuf.json_format import MessageToDict
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"not a W&B run file: {path}"
    block, pos, chunks, buf = 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too small for a header: zero padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 or pos + 7 + length > len(data):  # end of the log, or a record still being written
            break
        payload = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc, f"CRC mismatch at {pos}"
        pos += 7 + length
        buf = payload if kind in (1, 2) else buf + payload  # FULL/FIRST start, MIDDLE/LAST continue
        if kind in (1, 4):
            chunks.append(buf)
    out = {"run": None, "history": [], "config": {}, "metrics": [], "alerts": [], "summary": {},
           "run_dir": os.path.dirname(path), "complete": False}

    def key(item):
        return "/".join(item.nested_key) if item.nested_key else item.key

    for raw in chunks:
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["run"] = rec.run
            out["config"].update({key(i): json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            out["config"].update({key(i): json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            out["history"].append({key(i): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            out["summary"].update({key(i): json.loads(i.value_json) for i in rec.summary.update})
        elif kind == "metric":
            out["metrics"].append(MessageToDict(rec.metric, preserving_proto_field_name=True))
        elif kind == "alert":
            out["alerts"].append(MessageToDict(rec.alert, preserving_proto_field_name=True))
        elif kind == "exit":
            out["complete"] = True
    return out


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B in offline mode writing under a temp dir; returns ``read()`` -> parsed runs, oldest first."""
    import glob

    wandb_dir = tmp_path / "wandb_dir"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)

    def read(timeout: float = 60.0) -> list[dict]:
        """Every finished run; waits for wandb-core to write each file's final ``exit`` record."""
        import time

        files = sorted(glob.glob(str(wandb_dir / "wandb" / "offline-run-*" / "run-*.wandb")))
        deadline = time.monotonic() + timeout
        while True:
            runs = [_read_wandb_file(f) for f in files]
            if all(r["complete"] for r in runs) or time.monotonic() > deadline:
                assert all(r["complete"] for r in runs), "a W&B run file has no exit record (run not finished?)"
                return runs
            time.sleep(0.2)

    import wandb

    wandb.teardown()  # wandb caches its settings (WANDB_DIR included) per process: start afresh
    yield read
    if wandb.run is not None:  # a test that failed mid-run must not leak its run into the next test
        wandb.run.finish()
    wandb.teardown()


@pytest.fixture(scope="session")
def tiny_sweep_store(tmp_path_factory):
    """A tiny real sweep: 3 proxy widths x 2 LRs, 12 steps, monitored every 2 steps, written as
    runs.parquet + history.parquet (what `stabilitylab demo` writes). Returns the folder."""
    import pandas as pd

    from stabilitylab.proxy import ProxyConfig, TrainConfig, train_one

    out = tmp_path_factory.mktemp("tiny_sweep")
    rows, hist = [], []
    for size, d in (("a", 16), ("b", 24), ("c", 32)):
        for lr in (1e-2, 3.0):
            cfg = TrainConfig(model=ProxyConfig(d_model=d, n_layers=1, head_dim=8, seq_len=16), lr=lr, steps=12,
                              batch_size=4, warmup_steps=2, eval_batches=2, check_every=1)
            rid = f"{size}-{lr:g}"
            r = train_one(cfg, monitor={"every": 2, "run_id": rid})
            rows.append({"run_id": rid, "size": size, "lr": lr, "variant": "baseline", "seed": 0, "steps": 12,
                         **r.to_row()})
            hist.append(r.history)
    pd.DataFrame(rows).to_parquet(out / "runs.parquet", index=False)
    pd.concat(hist, ignore_index=True).to_parquet(out / "history.parquet", index=False)
    return out
