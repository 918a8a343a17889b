"""Data-parallel support: cross-rank reduction of partials, replication of sharded tensors, rank blame.

Under ``DistributedDataParallel`` every rank holds the full parameters and gradients (DDP averages the
gradients, so each rank's gradient is already the global-batch gradient) but sees its own data. Under
FSDP2 (``torch.distributed.fsdp.fully_shard``) parameters, gradients and optimizer state are DTensors and
each rank holds a disjoint shard (``to_local()``); HSDP replicates those shards over a second mesh
dimension. The Monitor handles all three with one rule per partial (see ``stabilitylab.metrics``):

* per-tensor ``rms`` / ``mean`` partials ``(sum, count)`` are summed over ranks: exact when shards are
  disjoint (true sums) and when tensors are replicated (numerator and count both scaled by the number of
  copies);
* whole-model sums (``grad.global_norm``, non-finite counts) divide each tensor's local sum by its
  replication ``R`` (the number of ranks that hold each of its elements, :func:`replication`), so summing
  over the world counts every element once, and ``grad.global_norm`` gets weight ``1 / world_size`` so
  its weights sum to 1;
* data-dependent statistics (attention, logits, activations, loss) combine by their declared reduction.

One logged step costs two ``all_reduce`` calls on stacked tensors (SUM; MAX, which also carries the
negated ``min`` rows), not one per metric. The SUM call also carries one slot per rank with that rank's
local non-finite count and local loss, so events can name the rank(s) where a problem appeared.
Tensor parallelism (DTensor parameters sharded on a non-data-parallel mesh) is refused with
:class:`UnsupportedParallelismError` rather than reported with wrong numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from stabilitylab.probes.base import Event

# Reduce codes used by the Monitor (metrics.REDUCTIONS order).
_MAX, _MIN, _SUM_LIKE = 0, 1, (2, 3, 4)


class UnsupportedParallelismError(ValueError):
    """The model uses a parallelism whose statistics cannot be combined exactly (e.g. tensor parallel)."""


def active() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "placements") and hasattr(t, "to_local")


def replication(t: torch.Tensor) -> int:
    """Number of ranks that hold each element of ``t``'s local data.

    A DTensor is replicated over the mesh dimensions with ``Replicate`` placement (1 for plain FSDP2,
    the replicate-group size for HSDP); a plain tensor in a multi-rank run is assumed replicated on every
    rank (DDP), so its replication is the world size.
    """
    if _is_dtensor(t):
        mesh = t.device_mesh
        return math.prod(mesh.size(i) for i, p in enumerate(t.placements) if p.is_replicate())
    return rank_and_world()[1]


def check_supported(model: torch.nn.Module) -> None:
    """Refuse parallelisms whose statistics cannot be combined exactly across ranks.

    Supported: single process, DDP (plain tensors), FSDP2 / HSDP (DTensor parameters under
    ``fully_shard`` with one ``Shard`` placement and otherwise ``Replicate``). Refused: tensor parallel
    (DTensor parameters outside ``fully_shard``, or sharded on more than one mesh dimension) and
    ``Partial`` placements.

    Raises:
        UnsupportedParallelismError: naming the first offending parameter and its placements.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        FSDPModule = ()  # noqa: N806
    under_fsdp = {id(p) for m in model.modules() if isinstance(m, FSDPModule) for p in m.parameters()}
    for name, p in model.named_parameters():
        if not _is_dtensor(p):
            continue
        shards = sum(1 for pl in p.placements if not (pl.is_replicate() or pl.is_partial()))
        partial = any(pl.is_partial() for pl in p.placements)
        if id(p) not in under_fsdp or shards > 1 or partial:
            raise UnsupportedParallelismError(
                f"Monitor(model=...): parameter {name!r} is a DTensor with placements {tuple(p.placements)} "
                f"on {p.device_mesh}; stabilitylab supports DDP and FSDP2/HSDP (fully_shard) but not tensor "
                "parallel or Partial placements, whose activation and norm statistics it cannot combine "
                "exactly. Monitor the model without tensor parallelism, or pass probes=[] for this run")


def reduce_partials(codes: np.ndarray, num: torch.Tensor, w: torch.Tensor,
                    local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Combine partials over the default process group with at most two ``all_reduce`` calls.

    ``max`` rows take the maximum over ranks, ``min`` rows the minimum, all other rows sum (numerator
    and weight); weights always sum. A NaN on any rank makes a ``max``/``min`` row NaN (gloo's MAX
    would drop it). ``local`` is a ``(2,)`` tensor of per-rank scalars (non-finite count, loss).

    Args:
        codes: ``(N,)`` reduce codes (0 max, 1 min, 2 mean, 3 rms, 4 sum).
        num: ``(N,)`` numerators; w: ``(N,)`` weights (same device and dtype).
        local: ``(2,)`` this rank's scalars to gather.

    Returns:
        ``(num, w, per_rank)`` with ``per_rank`` of shape ``(2, world_size)``.
    """
    rank, world = rank_and_world()
    dev, dtype = num.device, num.dtype
    is_max = torch.as_tensor(codes == _MAX, device=dev)
    is_min = torch.as_tensor(codes == _MIN, device=dev)
    extreme = is_max | is_min
    nan_flag = torch.isnan(num) & extreme
    slots = torch.zeros(2, world, device=dev, dtype=dtype)
    slots[:, rank] = local.to(device=dev, dtype=dtype)
    summed = torch.cat([torch.where(extreme, 0.0, num), w, nan_flag.to(dtype), slots.reshape(-1)])
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    n = num.numel()
    out = summed[:n]
    if bool(extreme.any()):
        signed = torch.where(is_min, -num, num).nan_to_num(nan=-math.inf)
        dist.all_reduce(signed, op=dist.ReduceOp.MAX)
        ext = torch.where(is_min, -signed, signed)
        ext = torch.where(summed[2 * n:3 * n] > 0, math.nan, ext)
        out = torch.where(extreme, ext, out)
    return out, summed[n:2 * n], summed[3 * n:].reshape(2, world)


def local_scalars(metrics: Sequence[str], num: torch.Tensor, loss: torch.Tensor | None) -> torch.Tensor:
    """This rank's ``(non-finite count, loss)`` before reduction.

    The count is the number of non-finite partials plus the local ``health.nonfinite`` counts; the
    loss is the local loss (0 when none was passed).
    """
    from stabilitylab.metrics import HEALTH_NONFINITE

    health = torch.tensor([m == HEALTH_NONFINITE for m in metrics], device=num.device)
    bad = (~torch.isfinite(num)).sum().to(num.dtype) + torch.where(health, num, 0.0).nan_to_num(0.0).sum()
    lo = torch.zeros((), device=num.device, dtype=num.dtype) if loss is None else loss.to(num)
    return torch.stack([bad, lo])


def name_ranks(events: Sequence[Event], counts: np.ndarray, losses: np.ndarray,
               spike_level: float | None) -> None:
    """Add ``extra["ranks"]`` and ``" (ranks [...])"`` to non-finite and loss-spike events, in place.

    Non-finite: the ranks whose local loss is non-finite, else those with a local non-finite count.
    Loss spike: the ranks whose local loss is above the spike level (``median + z * scale`` of the
    trailing window), else the rank with the largest local loss.
    """
    bad_loss = np.flatnonzero(~np.isfinite(losses))
    nonfinite = bad_loss if bad_loss.size else np.flatnonzero(counts > 0)
    for e in events:
        if e.kind == "nonfinite":
            ranks = nonfinite
        elif e.kind == "loss_spike":
            ranks = np.flatnonzero(losses > spike_level) if spike_level is not None else np.zeros(0, int)
            ranks = ranks if ranks.size else np.array([int(np.nanargmax(losses))])
        else:
            continue
        e.extra["ranks"] = [int(r) for r in ranks]
        e.message = f"{e.message} (ranks {e.extra['ranks']})"
