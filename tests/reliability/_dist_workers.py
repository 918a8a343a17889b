"""Workers for the 2-process gloo tests (importable by spawned children) and the single-process reference.

Every run trains the same tiny proxy from the same seed on the same global batches; a data-parallel
rank gets its contiguous share of each global batch, so with mean losses over equal shares the
averaged (DDP) or reduce-scattered (FSDP2) gradient is the single-process gradient of the global batch.
"""

from __future__ import annotations

import os
import pickle
import socket
from pathlib import Path

import torch
import torch.distributed as dist

import stabilitylab as sl
from stabilitylab.proxy import ProxyConfig, ProxyTransformer

CFG = dict(d_model=32, n_layers=2, head_dim=16, seq_len=16)
GLOBAL_BATCH = 8
STEPS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batches(n: int = STEPS + 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    shape = (GLOBAL_BATCH, CFG["seq_len"])
    return [(torch.randint(0, 256, shape, generator=g), torch.randint(0, 256, shape, generator=g))
            for _ in range(n)]


def make_model() -> ProxyTransformer:
    torch.manual_seed(0)
    return ProxyTransformer(ProxyConfig(**CFG))


def grad_norm_f64(model: torch.nn.Module) -> float:
    """Independent reference: sqrt(sum g^2) over full gradients in float64 (DTensors gathered here only)."""
    total = 0.0
    for p in model.parameters():
        if p.grad is not None:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            total += float(g.double().pow(2).sum())
    return total ** 0.5


def train(model, module, opt, mon, data, rank=0, world=1, spike_at=None, nan_at=None):
    """Train; returns per-step Monitor values and independent grad norms (full-tensor, float64)."""
    steps, norms = [], []
    for i, (x, y) in enumerate(data):
        xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
        handle = None
        if i == nan_at and rank == world - 1:  # NaN activations on the last rank only
            handle = module.blocks[0].register_forward_hook(lambda m, a, out: out * float("nan"))
        _, loss = model(xs, ys)
        if i == spike_at and rank == world - 1:
            loss = loss * 50
        loss.backward()
        if handle is not None:
            handle.remove()
        norms.append(grad_norm_f64(module))
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps.append(mon.step(loss))
    return steps, norms


def reference(path: Path) -> dict:
    """Single process on the full global batches."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mon = sl.Monitor(model, optimizer=opt, every=1, run_id="ref")
    steps, norms = train(model, model, opt, mon, batches()[:STEPS])
    mon.close()
    return {"steps": steps, "norms": norms}


def _init(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    """DDP: values on clean steps, a loss spike and NaN activations on the last rank, sink modes."""
    _init(rank, world, port)
    out = Path(out)
    try:
        module = make_model()
        model = torch.nn.parallel.DistributedDataParallel(module)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        events = []
        mon = sl.Monitor(model, optimizer=opt, every=1, run_id="ddp", on_event=events.append,
                         sinks=[sl.sinks.Parquet(out / "rank0only")])
        dbg = sl.Monitor(model, optimizer=opt, every=1, probes=["optimizer"], run_id="dbg",
                         rank_zero_only=False, sinks=[sl.sinks.Parquet(out / "perrank")])
        data = batches(STEPS + 5)
        steps, norms = train(model, module, opt, mon, data[:STEPS], rank, world)
        for _ in range(STEPS):
            dbg.step()
        more, _ = train(model, module, opt, mon, data[STEPS:], rank, world, spike_at=3, nan_at=4)
        mon.close()
        dbg.close()
        result = {"steps": steps, "norms": norms, "more": more, "run_ids": (mon.run_id, dbg.run_id),
                  "events": [(e.step, e.kind, e.module, e.message, e.extra) for e in events]}
    except Exception as e:  # noqa: BLE001 - reported to the test
        result = {"error": repr(e)}
    (out / f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
    dist.destroy_process_group()


def fsdp_worker(rank: int, world: int, port: int, out: str) -> None:
    """FSDP2 (fully_shard per block and root): values on clean steps; then a tensor-parallel model is accepted."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    _init(rank, world, port)
    out = Path(out)
    try:
        model = make_model()
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        mon = sl.Monitor(model, optimizer=opt, every=1, run_id="fsdp")
        steps, norms = train(model, model, opt, mon, batches()[:STEPS], rank, world)
        mon.close()
        local_shapes = {n: tuple(p.to_local().shape) for n, p in model.named_parameters()}
        tp = make_model()
        mesh = init_device_mesh("cpu", (world,))
        parallelize_module(tp.blocks[0].mlp, mesh, {"c_fc": ColwiseParallel()})
        try:
            sl.Monitor(tp, optimizer=torch.optim.AdamW(tp.parameters()), every=1)
            tp_error = None
        except Exception as e:  # noqa: BLE001 - reported to the test
            tp_error = (type(e).__name__, str(e))
        result = {"steps": steps, "norms": norms, "local_shapes": local_shapes, "tp_error": tp_error}
    except Exception as e:  # noqa: BLE001 - reported to the test
        import traceback

        result = {"error": traceback.format_exc() + repr(e)}
    (out / f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
    dist.destroy_process_group()


def spawn(worker, out: Path, world: int = 2) -> list[dict]:
    """Run ``worker`` on ``world`` gloo ranks; the per-rank result dicts."""
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(world, free_port(), str(out)), nprocs=world, join=True)
    results = [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(world)]
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r}: {res['error']}"
    return results
