"""Workers for the tensor-parallel gloo tests: a tiny Llama-style model, torchtitan-like plans, and the
single-process reference.

Every run builds the same model from the same seed and trains it on the same global batches. A
data-parallel rank takes its contiguous share of each batch (tensor-parallel ranks share the batch and
split heads, MLP units and, with the vocabulary-parallel output, the vocabulary), so the single-process
run on the whole batch is the reference for every metric.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as nnf
from torch import nn

import stabilitylab as sl
from stabilitylab.probes import ActivationProbe, AttentionProbe, HealthProbe, LogitsProbe, OptimizerProbe

VOCAB, DIM, HEADS, LAYERS, SEQ, HIDDEN = 64, 32, 4, 2, 8, 48
GLOBAL_BATCH = 4
STEPS = 3
#: Modules whose outputs the activation probe watches: the blocks (plain local tensors) and the norms
#: (DTensors sharded on the sequence under SequenceParallel).
WATCHED = [f"layers.{i}" for i in range(LAYERS)] + [f"layers.{i}.{n}" for i in range(LAYERS)
                                                     for n in ("attention_norm", "ffn_norm")] + ["norm"]


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head_dim = DIM // HEADS
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(DIM, DIM, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        # -1 heads: under tensor parallel each rank holds HEADS / tp of them (its local q, k, v columns).
        q, k, v = (w(x).view(b, t, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        out = nnf.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Linear(DIM, HIDDEN, bias=False)
        self.w2 = nn.Linear(HIDDEN, DIM, bias=False)
        self.w3 = nn.Linear(DIM, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(nnf.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(DIM)
        self.attention = Attention()
        self.ffn_norm = nn.RMSNorm(DIM)
        self.feed_forward = FeedForward()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x))
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    """Embedding, ``LAYERS`` pre-norm blocks (RMSNorm, SDPA attention, SwiGLU MLP), RMSNorm, output Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = nn.RMSNorm(DIM)
        self.output = nn.Linear(DIM, VOCAB, bias=False)
        with torch.no_grad():  # non-trivial norm weights, so their gradients and updates are not uniform
            for m in self.modules():
                if isinstance(m, nn.RMSNorm):
                    m.weight.uniform_(0.5, 1.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.output(self.norm(h))


def make_model() -> Llama:
    torch.manual_seed(0)
    return Llama()


def batches(n: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    shape = (GLOBAL_BATCH, SEQ)
    return [(torch.randint(0, VOCAB, shape, generator=g), torch.randint(0, VOCAB, shape, generator=g))
            for _ in range(n)]


def probes() -> list:
    return [OptimizerProbe(), LogitsProbe(), ActivationProbe(modules=WATCHED), AttentionProbe(), HealthProbe()]


def tp_plan(model: Llama, mesh, sequence_parallel: bool, loss_parallel: bool) -> None:
    """torchtitan's Llama plan on the 1-D tensor-parallel ``mesh``."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    seq = Shard(1) if sequence_parallel else Replicate()
    top = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq),
        "output": ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                  use_local_output=not loss_parallel),
    }
    if sequence_parallel:
        top["norm"] = SequenceParallel()
    parallelize_module(model, mesh, top)
    for block in model.layers:
        plan = {
            "attention": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=seq),
            "feed_forward": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=seq),
            "feed_forward.w3": ColwiseParallel(),
        }
        if sequence_parallel:
            plan["attention_norm"] = SequenceParallel()
            plan["ffn_norm"] = SequenceParallel()
        parallelize_module(block, mesh, plan)


def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nnf.cross_entropy(logits.flatten(0, 1), y.flatten())


def train(model, opt, mon, data, dp_rank=0, dp=1, loss_parallel=False):
    """Train on each rank's share of the global batches; per-step Monitor values."""
    import contextlib

    from torch.distributed.tensor.parallel import loss_parallel as lp

    out = []
    for x, y in data:
        xs, ys = x.chunk(dp)[dp_rank], y.chunk(dp)[dp_rank]
        with lp() if loss_parallel else contextlib.nullcontext():
            loss = loss_fn(model(xs), ys)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        local = loss.to_local() if hasattr(loss, "to_local") else loss
        out.append(mon.step(local.detach()))
    return out


def reference(dp: int = 1, seq_split: int = 1) -> tuple[list[dict], list[dict]]:
    """Single process on the whole global batches: per-step Monitor values, and the per-forward statistics
    the ranks report (computed here by hand from the full outputs).

    ``logits.lse_std`` and ``act.batch_entropy`` are statistics of one forward (not sums over tokens): a
    rank reports them over the tokens it holds (its ``1 / dp`` of the batch; for the watched modules also
    its ``1 / seq_split`` of the sequence under sequence parallelism) and the Monitor takes their
    token-weighted mean, here a plain mean over the equal shares.
    """
    from stabilitylab import functional as F
    from stabilitylab import metrics as M

    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mon = sl.Monitor(model, optimizer=opt, every=1, probes=probes(), run_id="ref")
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, o.detach()))
             for n in [*WATCHED, ""]]
    per_forward = []

    class Recorder:  # the Monitor's step, plus this step's per-forward reference values
        def step(self, loss):
            out = {(M.LOGITS_LSE_STD, ""): sum(float(F.lse_stats(c)[1]) for c in seen[""].chunk(dp)) / dp}
            for n in WATCHED:
                shards = [s for c in seen[n].chunk(dp) for s in c.chunk(seq_split, dim=1)]
                out[(M.ACT_BATCH_ENTROPY, n)] = sum(float(F.batch_entropy(s)) for s in shards) / len(shards)
            per_forward.append(out)
            return mon.step(loss)

    steps = train(model, opt, Recorder(), batches())
    for h in hooks:
        h.remove()
    mon.close()
    return steps, per_forward


def tp_worker(rank: int, world: int, port: int, out: str, dp: int, sequence_parallel: bool,
              loss_parallel: bool) -> None:
    """``dp`` x ``world // dp`` mesh: FSDP2 over ``dp`` (when > 1), tensor parallel over the rest."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out = Path(out)
    try:
        tp = world // dp
        mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
        model = make_model()
        tp_plan(model, mesh["tp"], sequence_parallel, loss_parallel)
        if dp > 1:
            for block in model.layers:
                fully_shard(block, mesh=mesh["dp"])
            fully_shard(model, mesh=mesh["dp"])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        mon = sl.Monitor(model, optimizer=opt, every=1, probes=probes(), run_id="tp")
        steps = train(model, opt, mon, batches(), mesh["dp"].get_local_rank(), dp, loss_parallel)
        mon.close()
        placements = {n: tuple(str(pl) for pl in p.placements) for n, p in model.named_parameters()
                      if hasattr(p, "placements")}
        result = {"steps": steps, "placements": placements, "partial_error": _partial_parameter_error(mesh["tp"]),
                  "events": [(e.kind, e.module, e.message) for e in mon.events]}
    except Exception:  # noqa: BLE001 - reported to the test
        import traceback

        result = {"error": traceback.format_exc()}
    (out / f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
    dist.destroy_process_group()


def _partial_parameter_error(mesh) -> tuple[str, str] | None:
    """What ``Monitor`` raises for a parameter with a ``Partial`` placement (None: nothing)."""
    from torch.distributed.tensor import DTensor, Partial

    lin = nn.Linear(2, 2)
    lin.weight = nn.Parameter(DTensor.from_local(torch.ones(2, 2), mesh, [Partial()]))
    try:
        sl.Monitor(lin, optimizer=torch.optim.AdamW(lin.parameters()), every=1).close()
    except Exception as e:  # noqa: BLE001 - reported to the test
        return type(e).__name__, str(e)
    return None
