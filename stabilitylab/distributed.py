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

One logged step costs one small host-side control ``all_reduce`` (a fixed-size status vector per rank
on a gloo group of the Monitor's own) and two device ``all_reduce`` calls on stacked tensors (SUM; MAX,
which also carries the negated ``min`` rows), not one per metric, with no device-to-host sync of their
own (:class:`Reducer`). The SUM call also carries one slot per rank with that rank's local non-finite
count and local loss, so events can name the rank(s) where a problem appeared. A probe that raises on
one rank, a rank with non-finite values, a rank that records nothing or stops logging early never
makes the ranks' collectives differ in size or number: the failure becomes an event naming the rank.
Tensor parallelism (``parallelize_module``, alone or with FSDP2 on a 2-D mesh) follows the same rules:
tensor-parallel ranks share the batch and hold disjoint shards of parameters, heads and (vocabulary-
parallel output) logits, or replicated copies that the sums count once; probes read DTensors through
``to_local()`` (:func:`local`), a ``Partial`` gradient is summed over its mesh dimension first, and
vocabulary-parallel logits get their log Z from a log-sum-exp over the ranks (``probes.logits``).
"""

from __future__ import annotations

import math
import uuid
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from stabilitylab.metrics import HEALTH_NONFINITE, Event
from stabilitylab.metrics import REDUCE_MAX as _MAX
from stabilitylab.metrics import REDUCE_MIN as _MIN
from stabilitylab.shards import active, is_dtensor, local, rank_and_world, replication  # noqa: F401 - re-exported

#: Seconds a Monitor's control collective waits for the other ranks before it gives up (a dead peer).
CONTROL_TIMEOUT_S = 600.0


class UnsupportedParallelismError(ValueError):
    """The model uses a parallelism whose statistics cannot be combined exactly (e.g. tensor parallel)."""


def check_supported(model: torch.nn.Module) -> None:
    """Refuse parameters whose statistics cannot be combined exactly across ranks.

    Supported: single process, DDP (plain tensors), FSDP2 / HSDP (``fully_shard``), tensor parallel
    (``parallelize_module``) and their 2-D combination: DTensor parameters with any mix of ``Shard``
    and ``Replicate`` placements (every element of a parameter is then held by the same number of ranks,
    :func:`replication`). Refused: a parameter with a ``Partial`` placement (its local values are not
    values of the parameter).

    Raises:
        UnsupportedParallelismError: naming the first offending parameter and its placements.
    """
    for name, p in model.named_parameters():
        if is_dtensor(p) and any(pl.is_partial() for pl in p.placements):
            raise UnsupportedParallelismError(
                f"Monitor(model=...): parameter {name!r} is a DTensor with placements {tuple(p.placements)} "
                f"on {p.device_mesh}; a Partial parameter holds partial sums, not values, so its norms cannot "
                "be combined. Redistribute it to Shard or Replicate placements, or pass probes=[] for this run")


class Reducer:
    """Cross-rank reduction of one Monitor's partials that cannot hang or desynchronise on one rank's fault.

    Every logged step is one *round*, on every rank:

    1. **Control** (host, fixed size): one ``all_reduce`` of a ``(world, 6)`` int64 tensor on a gloo
       group of the Monitor's own: each rank's step, probe-fault bits, rows missing from and rows beyond
       the agreed layout, a closing flag and its row count. It runs on the CPU, so it costs no device
       sync, and every rank then knows what every other rank brings.
    2. **Layout** (only when some rank has rows the agreed layout lacks: the first logged step, a probe
       that starts recording a new module): ``all_gather_object`` of the row keys; every rank adopts
       the same union (rank 0's order, then new keys by rank).
    3. **Data** (device): the SUM ``all_reduce`` (numerators, weights, NaN flags of max/min rows, row
       presence, per-rank non-finite count and loss) and, when the layout has max/min rows, the MAX one.
       Both have the layout's size on every rank: a row a rank lacks (its probe raised, it recorded
       nothing) is filled with a neutral sentinel (0 numerator and weight; ``-inf`` for max/min) and
       counted absent; a row absent on every rank gets weight ``-1`` so the Monitor drops it.

    ``close()`` keeps answering rounds (with no data) until every rank is closing, so a rank that logged
    fewer steps than the others (it skipped a ``Monitor.step`` call) never leaves them waiting. Like
    constructing them, close a rank's Monitors in the same order on every rank (each has its own group). A failed
    or timed-out collective (a dead peer) stops cross-rank reduction on this rank: one warning, one
    ``collective_failed`` event, local values from then on.

    Args:
        timeout_s: timeout of the control group's collectives (default :data:`CONTROL_TIMEOUT_S`).
    """

    STEP, FAULTS, MISSING, EXTRA, CLOSING, ROWS = range(6)

    def __init__(self, timeout_s: float | None = None):
        from datetime import timedelta

        self.rank, self.world = rank_and_world()
        timeout = timedelta(seconds=CONTROL_TIMEOUT_S if timeout_s is None else timeout_s)
        self.group = dist.new_group(backend="gloo", timeout=timeout)
        self.keys: list[tuple[str, str]] = []
        self.codes = np.zeros(0, dtype=np.int64)
        self._index: dict[tuple[str, str], int] = {}
        self._dev: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, ...]] = {}
        self._maps: dict[tuple[tuple[str, str], ...], tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        self.status = np.zeros((self.world, 6), dtype=np.int64)
        self.failed: str | None = None
        self.closed = False
        self._last: tuple[torch.device, torch.dtype] | None = None
        self.has_extreme = False

    # ------------------------------------------------------------------ layout
    def _set_layout(self, keys: list[tuple[str, str]], codes: np.ndarray) -> None:
        self.keys = list(keys)
        self.codes = np.asarray(codes, dtype=np.int64)
        self._index = {k: i for i, k in enumerate(self.keys)}
        self._dev.clear()
        self._maps.clear()
        self.has_extreme = bool(np.isin(self.codes, (_MAX, _MIN)).any())

    def _masks(self, dev: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """Device masks of the layout (max, min, health rows), copied once per layout (non-blocking)."""
        got = self._dev.get((dev, dtype))
        if got is None:
            health = np.array([k[0] == HEALTH_NONFINITE for k in self.keys], dtype=bool)
            host = np.stack([self.codes == _MAX, self.codes == _MIN, health]) if self.keys else np.zeros((3, 0), bool)
            m = to_device(host, dev, torch.bool)
            got = self._dev[(dev, dtype)] = (m[0], m[1], m[0] | m[1], m[2])
        return got

    def _map(self, keys: tuple[tuple[str, str], ...], dev: torch.device):
        """``(rows, positions)`` device index tensors taking this rank's rows into the layout (cached per
        row list; ``(None, None)`` when the rows are the layout itself)."""
        if keys in self._maps:
            return self._maps[keys]
        last = {k: i for i, k in enumerate(keys)}  # a key recorded twice: the last one wins (as in the Monitor)
        if len(last) == len(keys) and list(keys) == self.keys:
            out = (None, None)
        else:
            rows = [i for k, i in last.items() if k in self._index]
            pos = [self._index[k] for k, i in last.items() if k in self._index]
            both = to_device(np.array([rows, pos], dtype=np.int64).reshape(2, -1), dev, torch.long)
            out = (both[0], both[1])
        if len(self._maps) > 64:
            self._maps.clear()
        self._maps[keys] = out
        return out

    # ------------------------------------------------------------------ rounds
    def _control(self, step: int, faults: int, keys: tuple[tuple[str, str], ...], closing: bool) -> np.ndarray:
        uniq = set(keys)
        known = sum(1 for k in uniq if k in self._index)
        ctrl = torch.zeros(self.world, 6, dtype=torch.int64)
        ctrl[self.rank] = torch.tensor([step, faults, len(self.keys) - known, len(uniq) - known,
                                        int(closing), len(uniq)])
        dist.all_reduce(ctrl, group=self.group)
        return ctrl.numpy()

    def _relayout(self, keys: tuple[tuple[str, str], ...], codes: np.ndarray, status: np.ndarray) -> None:
        mine = list(dict.fromkeys(zip(keys, codes.tolist())))
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, mine, group=self.group)
        union: dict[tuple[str, str], int] = dict(zip(self.keys, self.codes.tolist()))
        for rows in gathered:
            for k, c in rows:
                union.setdefault(tuple(k), c)
        self._set_layout(list(union), np.fromiter(union.values(), dtype=np.int64, count=len(union)))
        for r, rows in enumerate(gathered):  # what each rank lacks of the new layout
            status[r, self.MISSING] = len(self.keys) - len({tuple(k) for k, _ in rows})
            status[r, self.EXTRA] = 0

    def round(self, keys: Sequence[tuple[str, str]], codes: np.ndarray, num: torch.Tensor, w: torch.Tensor,
              loss: torch.Tensor | None, step: int, faults: int = 0, closing: bool = False):
        """One logged step (or, with ``closing``, one answer to the others' step); see the class docstring.

        Args:
            keys: this rank's ``(metric, module)`` per row; codes: their reduce codes.
            num, w: this rank's partials (same device and dtype; length ``len(keys)``).
            loss: this rank's loss (0-d or 1-element tensor) or None.
            step: this rank's step number; faults: bit ``i`` set when probe ``i`` raised since the last round.
            closing: this rank is closing (contributes no data).

        Returns:
            ``None`` when every rank is closing, else ``(keys, codes, num, w, per_rank)`` in the agreed
            layout: reduced numerators, weights (``-1`` for rows no rank had) and ``(2, world)`` per-rank
            non-finite counts and losses. ``self.status`` holds the control vectors of this round.
        """
        keys = tuple(keys)
        status = self._control(step, faults, keys, closing)
        if (status[:, self.EXTRA] > 0).any():
            self._relayout(keys, np.asarray(codes), status)
        self.status = status
        if status[:, self.CLOSING].all():
            return None
        dev, dtype = num.device, num.dtype
        self._last = (dev, dtype)
        n = len(self.keys)
        is_max, is_min, extreme, health = self._masks(dev, dtype)
        rows, pos = self._map(keys, dev)
        if rows is None:
            full_num, full_w, present = num, w, torch.ones_like(num)
        else:
            full_num = torch.zeros(n, device=dev, dtype=dtype).index_copy_(0, pos, num[rows])
            full_w = torch.zeros(n, device=dev, dtype=dtype).index_copy_(0, pos, w[rows])
            present = torch.zeros(n, device=dev, dtype=dtype).index_fill_(0, pos, 1.0)
        bad = (~torch.isfinite(full_num)).sum().to(dtype) + torch.where(health, full_num, 0.0).nan_to_num(0.0).sum()
        lo = torch.zeros((), device=dev, dtype=dtype) if loss is None else loss.reshape(()).to(dtype)
        slots = torch.zeros(2, self.world, device=dev, dtype=dtype)
        slots[:, self.rank] = torch.stack([bad, lo])
        nan_flag = torch.isnan(full_num) & extreme
        group = self.group if dev.type == "cpu" else None
        summed = torch.cat([torch.where(extreme, 0.0, full_num), full_w, nan_flag.to(dtype), present,
                            slots.reshape(-1)])
        dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
        out = summed[:n]
        if self.has_extreme:
            signed = torch.where(is_min, -full_num, full_num).nan_to_num(nan=-math.inf)
            signed = torch.where(present > 0, signed, -math.inf)
            dist.all_reduce(signed, op=dist.ReduceOp.MAX, group=group)
            ext = torch.where(is_min, -signed, signed)
            ext = torch.where(summed[2 * n:3 * n] > 0, math.nan, ext)
            out = torch.where(extreme, ext, out)
        w_out = torch.where(summed[3 * n:4 * n] > 0, summed[n:2 * n], -1.0)
        return list(self.keys), self.codes, out, w_out, summed[4 * n:].reshape(2, self.world)

    def close(self, step: int, device: torch.device, dtype: torch.dtype) -> None:
        """Answer the other ranks' rounds with no data until every rank is closing (then return).

        ``device`` / ``dtype`` are those of the data collectives when this rank never logged a step."""
        if self.closed or self.failed:
            self.closed = True
            return
        self.closed = True
        device, dtype = self._last or (device, dtype)
        empty = torch.zeros(0, device=device, dtype=dtype)
        try:
            while self.round((), np.zeros(0, np.int64), empty, empty, None, step, closing=True) is not None:
                pass
        except Exception as e:  # noqa: BLE001 - a dead peer: nothing left to answer
            self.failed = f"{type(e).__name__}: {e}"
        try:
            dist.destroy_process_group(self.group)
        except Exception:  # noqa: BLE001, S110 - the group may already be gone with the default one
            pass

    def events(self, run_id: str, step: int, probe_names: Sequence[str]) -> list[Event]:
        """Events naming the other ranks that faulted in the last round (this rank's own faults are the
        probes' ``probe_error`` events): a probe that raised there, a rank that sent no or fewer rows,
        a rank whose step number differs."""
        st, me = self.status, self.rank
        out: list[Event] = []
        for i, name in enumerate(probe_names):
            ranks = [r for r in range(self.world) if r != me and st[r, self.FAULTS] >> i & 1]
            if ranks:
                out.append(Event(run_id, step, "probe_error", name, float(len(ranks)),
                                 f"probe {name!r} raised on ranks {ranks} (see their warnings); its values "
                                 "reduce over the other ranks", {"ranks": ranks}))
        closing = [r for r in range(self.world) if st[r, self.CLOSING]]
        if closing:
            out.append(Event(run_id, step, "rank_skipped", "", float(len(closing)),
                             f"ranks {closing} did not log step {step} (closed, or skipped a Monitor.step call); "
                             "values reduce over the other ranks", {"ranks": closing}))
        live = [r for r in range(self.world) if not st[r, self.CLOSING] and not st[r, self.FAULTS]]
        empty = [r for r in live if st[r, self.ROWS] == 0 and len(self.keys)]
        if empty:
            out.append(Event(run_id, step, "rank_skipped", "", float(len(empty)),
                             f"ranks {empty} recorded nothing on step {step} (no forward/backward ran there); "
                             "values reduce over the other ranks", {"ranks": empty}))
        partial = [r for r in live if r not in empty and st[r, self.MISSING] > 0]
        if partial:
            out.append(Event(run_id, step, "rank_partial", "", float(max(st[r, self.MISSING] for r in partial)),
                             f"ranks {partial} lacked {[int(st[r, self.MISSING]) for r in partial]} of "
                             f"{len(self.keys)} rows on step {step}; those rows reduce over the other ranks",
                             {"ranks": partial}))
        steps = {r: int(st[r, self.STEP]) for r in range(self.world) if not st[r, self.CLOSING]}
        if len(set(steps.values())) > 1:
            odd = [r for r, s in steps.items() if s != steps.get(0, step)]
            out.append(Event(run_id, step, "rank_desync", "", float(len(odd)),
                             f"ranks disagree on the step number ({steps}); a rank skipped or repeated "
                             "Monitor.step calls", {"ranks": odd, "steps": steps}))
        return out


def to_device(host: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``host`` on ``device`` without blocking the host: pinned staging and a non-blocking copy on CUDA."""
    t = torch.from_numpy(np.ascontiguousarray(host)).to(dtype)
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


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


def setup(model: torch.nn.Module, run_id: str | None, rank_zero_only: bool) -> tuple[str, Reducer | None, bool]:
    """A Monitor's multi-rank set-up: refuses unsupported parallelism (``check_supported``), then
    returns ``(run_id, reducer, writes)``.

    ``run_id`` is the given one or a random id, rank 0's on every rank (``<run_id>-rank<r>`` when
    ``rank_zero_only`` is False); ``reducer`` is None in one process; ``writes`` says whether this rank
    writes to the sinks (every rank, or only rank 0 with ``rank_zero_only``).
    """
    check_supported(model)
    rank, world = rank_and_world()
    if world == 1:
        return run_id or uuid.uuid4().hex[:8], None, True
    run_id = broadcast_run_id(run_id)
    if not rank_zero_only:
        run_id = f"{run_id}-rank{rank}"
    return run_id, Reducer(), not (rank_zero_only and rank != 0)


def blame_ranks(events: Sequence[Event], per_rank: np.ndarray, probes: Sequence) -> None:
    """``name_ranks`` on a logged step's events, given ``per_rank`` (``(2, world)``: each rank's local
    non-finite count and loss; no columns in one process) and the first probe ``loss_level()`` set."""
    if events and per_rank.shape[1]:
        level = next((lv for p in probes if (lv := p.loss_level()) is not None), None)
        name_ranks(events, per_rank[0], per_rank[1], level)


def broadcast_run_id(run_id: str | None) -> str:
    """Rank 0's run id on every rank (a random default would otherwise differ per rank)."""
    box = [run_id or uuid.uuid4().hex[:8]]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def reduce_step(reducer: Reducer | None, probes: Sequence, codes: np.ndarray, num: torch.Tensor, w: torch.Tensor,
                keys: list[tuple[str, str]], loss: torch.Tensor | None, step: int, run_id: str):
    """Combine one logged step's partials over the data-parallel ranks (``Reducer.round``), stacked for the
    Monitor's one device -> host transfer.

    Identity without a reducer (one process) or after a failed round. Returns ``(codes, keys, both,
    failure)``: the rows in the layout the ranks agreed on; ``both``, a ``(2, len(keys) + world)`` tensor:
    the numerators and weights (rows no rank had get weight -1), then each rank's local non-finite count
    and loss (no such columns in one process or after a failure); and, when the round fails (a dead or
    timed-out peer), a ``collective_failed`` Event (else None): this rank then logs its local values.
    """
    if reducer is None or reducer.failed:
        return codes, keys, torch.stack([num, w]), None
    faults = sum(1 << i for i, p in enumerate(probes) if p.faults)
    try:
        keys, codes, num, w, per_rank = reducer.round(keys, codes, num, w, loss, step, faults)
    except Exception as e:  # noqa: BLE001 - a dead or timed-out peer: local values from now on
        reducer.failed = f"{type(e).__name__}: {e}"
        warnings.warn(f"stabilitylab: cross-rank reduction failed on step {step} ({reducer.failed}); this rank "
                      "logs its local values from now on", stacklevel=4)
        return codes, keys, torch.stack([num, w]), Event(run_id, step, "collective_failed", "",
                                                         message=reducer.failed)
    return codes, keys, torch.cat([torch.stack([num, w]), per_rank], dim=1), None


def fault_events(reducer: Reducer | None, probes: Sequence, run_id: str, step: int) -> list[Event]:
    """This logged step's fault events: every probe's own ``probe_error`` events (drained from
    ``probe.faults``, stamped with run id, step and, in a multi-rank run, this rank) and, after a
    successful round, the events naming the other ranks' faults and skipped, partial or desynced ranks
    (``Reducer.events``)."""
    out: list[Event] = []
    for p in probes:
        for e in p.faults:
            e.run_id, e.step = run_id, step
            if reducer is not None:
                e.extra["ranks"] = [reducer.rank]
                e.message = f"{e.message} (rank {reducer.rank})"
        out.extend(p.faults)
        p.faults = []
    if reducer is not None and not reducer.failed:
        out.extend(reducer.events(run_id, step, [p.name for p in probes]))
    return out
