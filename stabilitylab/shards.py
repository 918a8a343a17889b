"""Which part of a tensor this rank holds: process-group queries and DTensor shards (pure helpers).

Probes read sharded parameters, gradients and activations through :func:`local` and weight whole-model
sums by :func:`replication`; the cross-rank reduction itself is ``stabilitylab.distributed`` (it builds on
these). See ``stabilitylab.distributed`` for the rules under DDP, FSDP2, HSDP and tensor parallelism.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

__all__ = ["active", "is_dtensor", "local", "local_activation", "rank_and_world", "replication"]


def active() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_dtensor(t: torch.Tensor) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (it has ``placements`` and ``to_local``)."""
    return hasattr(t, "placements") and hasattr(t, "to_local")


def replication(t: torch.Tensor) -> int:
    """Number of ranks that hold each element of ``t``'s local data.

    A DTensor is replicated over the mesh dimensions with ``Replicate`` placement (1 for plain FSDP2,
    the replicate-group size for HSDP, the tensor-parallel size for a replicated TP parameter), and over
    the copies of its mesh when that mesh spans only part of the world (a norm weight sharded by FSDP2
    on the data-parallel sub-mesh of a 2-D mesh is held by every tensor-parallel rank); a plain tensor in
    a multi-rank run is assumed replicated on every rank (DDP, a tensor-parallel model's unsharded
    parameters), so its replication is the world size.
    """
    world = rank_and_world()[1]
    if is_dtensor(t):
        mesh = t.device_mesh
        copies = max(1, world // mesh.size())
        return copies * math.prod(mesh.size(i) for i, p in enumerate(t.placements) if p.is_replicate())
    return world


def local(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(local data, replication)`` of ``t``: what this rank's partial sums are taken over.

    A plain tensor is returned as is (replication: :func:`replication`). A DTensor gives its
    ``to_local()`` shard; a ``Partial`` placement (a tensor-parallel gradient or activation that holds
    partial sums) is first summed over its mesh dimension (one ``all_reduce`` there, on every rank of
    that dimension, as any use of the tensor would), so the local data are values of the tensor.
    """
    if not is_dtensor(t):
        return t, replication(t)
    if any(pl.is_partial() for pl in t.placements):
        from torch.distributed.tensor import Replicate

        t = t.redistribute(t.device_mesh, [Replicate() if pl.is_partial() else pl for pl in t.placements])
    return t.to_local(), replication(t)


def local_activation(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(local data, whole_tokens)`` of an activation ``x`` (``(..., D)``) for per-module statistics.

    A DTensor output (a sequence-parallel norm's, a tensor-parallel linear's with
    ``use_local_output=False``) is read through its local shard (:func:`local`), whose sums the Monitor
    adds over ranks: a statistic taken on the DTensor itself would reduce over the ranks once there and
    again in the Monitor. ``whole_tokens`` is False when the feature dim is sharded: the per-token
    statistics then need features this rank does not hold (sums of squares are still exact).
    """
    if not is_dtensor(x):
        return x, True
    last = x.ndim - 1
    whole = not any(pl.is_shard() and pl.dim in (-1, last) for pl in x.placements)
    return local(x)[0], whole
