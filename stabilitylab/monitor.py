"""Monitor: runs probes on a schedule, reduces their partials once, one host transfer per logged step.

    mon = Monitor(model, optimizer=opt, every=10)
    for batch in loader:
        loss = model(batch).loss
        loss.backward(); opt.step(); opt.zero_grad()
        mon.step(loss)          # non-logged steps: a counter increment, no host sync
    mon.close()
    df = mon.history()          # tidy DataFrame: run_id, step, metric, module, value, wall_time

Step ``s`` (counted from ``start_step``) is logged when ``s % every == 0``. Probes are armed *before*
a logged step's forward/backward (at construction for the first one, then by the previous ``step()``
call), so hooks only compute on logged steps.
"""

from __future__ import annotations

import time
import uuid
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from stabilitylab import distributed as D
from stabilitylab import metrics as M
from stabilitylab._checks import int_at_least
from stabilitylab.probes import build_probes
from stabilitylab.probes.attention import AttentionProbe
from stabilitylab.probes.base import Block, Event, Probe
from stabilitylab.sinks.base import Records, Sink, _Guarded
from stabilitylab.sinks.memory import Memory
from stabilitylab.sinks.parquet import Parquet, read_history


def _finalise(reduce: np.ndarray, num: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Final values from reduced partials, vectorised over rows (see metrics module docstring)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = num.copy()
        mean = reduce == 2
        out[mean] = num[mean] / w[mean]
        r = reduce == 3
        out[r] = np.sqrt(num[r] / w[r])
    return out


_REDUCE_CODE = {"max": 0, "min": 1, "mean": 2, "rms": 3, "sum": 4}


class Monitor:
    """Attach stability probes to a model (and optimizer) and log their signals.

    Args:
        model: the ``nn.Module`` being trained (DDP/compiled wrappers are fine; a DDP wrapper is unwrapped
            so module names carry no ``module.`` prefix; FSDP2 ``fully_shard``, tensor parallel
            ``parallelize_module`` and 2-D FSDP2 x TP models are supported, a parameter with a ``Partial``
            placement is refused with ``distributed.UnsupportedParallelismError``).
        optimizer: its optimizer (any wrapper around a ``torch.optim.Optimizer``); needed for gradient,
            update and Adam metrics.
        every: log every ``every``-th step (``>= 1``).
        probes: ``"default"`` or a list of probe names / Probe objects.
        sinks: where records go (``sinks.Parquet``, ``sinks.WandB``, ``sinks.Console``, ...).
        run_id: name of this run in the records (default: a random id).
        keep_history: keep every record in memory for ``history()`` (an int keeps the last N logged
            steps; False keeps none and ``history()`` reads the Parquet sink instead).
        start_step: number of the first step (for resumed runs).
        config: extra settings stored with the run (sinks such as W&B record them).
        on_event: callback ``fn(event)`` for health events and early warnings.
        rank_zero_only: in a multi-rank run (DDP, FSDP2) only rank 0 writes to ``sinks`` (every rank
            still computes the same reduced values and keeps ``history()``). False makes every rank write,
            with run id ``<run_id>-rank<r>`` so per-rank files never collide (for debugging).
        eager_logged_steps: run ``torch.compile``d code eagerly on logged steps
            (``torch.compiler.set_stance("force_eager")`` while probes are armed, the previous stance
            restored after). Non-logged steps run the compiled graph unchanged (no graph breaks, no
            recompilation: the graph was traced with the probes disarmed), and logged steps see every hook
            and every attention call, so compiled and eager models record the same values. This also
            covers a model compiled after the Monitor was attached. Set False if you manage
            ``set_stance`` yourself.
        max_events: keep at most this many events in ``Monitor.events`` (and the in-memory history),
            oldest dropped first; ``events_dropped`` counts the dropped ones and ``close()`` emits one
            ``events_dropped`` event. Sinks still receive every event.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: Any = None,
        every: int = 10,
        probes: str | Sequence[str | Probe] = "default",
        sinks: Sequence[Sink] | None = None,
        run_id: str | None = None,
        keep_history: bool | int = True,
        start_step: int = 0,
        config: dict[str, Any] | None = None,
        on_event: Callable[[Event], None] | None = None,
        rank_zero_only: bool = True,
        eager_logged_steps: bool = True,
        max_events: int = 10_000,
    ):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"Monitor(model=...): expected a torch.nn.Module, got {type(model).__name__}")
        if not int_at_least(every, 1):
            raise ValueError(f"Monitor(every={every!r}): must be an int >= 1 (1 logs every step)")
        if not int_at_least(start_step, 0):
            raise ValueError(f"Monitor(start_step={start_step!r}): must be an int >= 0")
        if sinks is None:
            sinks = []
        if isinstance(sinks, Sink):
            sinks = [sinks]
        if not isinstance(sinks, (list, tuple)):
            raise TypeError(f"Monitor(sinks={sinks!r}): pass a list of stabilitylab sinks (sinks.Parquet, "
                            "sinks.WandB, sinks.Console, sinks.Memory)")
        for s in sinks:
            if not isinstance(s, Sink):
                raise TypeError(f"Monitor(sinks=...): {s!r} is not a stabilitylab sink (sinks.Parquet, "
                                "sinks.WandB, sinks.Console, sinks.Memory)")
        if not (isinstance(keep_history, bool) or (isinstance(keep_history, int) and keep_history > 0)):
            raise ValueError(f"Monitor(keep_history={keep_history!r}): pass True, False or a positive int")
        if run_id is not None and not (isinstance(run_id, str) and run_id):
            raise TypeError(f"Monitor(run_id={run_id!r}): pass a non-empty str or None (a random id)")
        if config is not None and not isinstance(config, dict):
            raise TypeError(f"Monitor(config={config!r}): pass a dict of settings or None")
        if on_event is not None and not callable(on_event):
            raise TypeError(f"Monitor(on_event={on_event!r}): pass a callable fn(event) or None")
        if not isinstance(rank_zero_only, bool):
            raise TypeError(f"Monitor(rank_zero_only={rank_zero_only!r}): pass True or False")
        if not isinstance(eager_logged_steps, bool):
            raise TypeError(f"Monitor(eager_logged_steps={eager_logged_steps!r}): pass True or False")
        if not int_at_least(max_events, 1):
            raise ValueError(f"Monitor(max_events={max_events!r}): must be an int >= 1 (events kept in memory)")
        model = _unwrap(model)
        D.check_supported(model)
        rank, world = D.rank_and_world()
        if world > 1:
            run_id = _broadcast_run_id(run_id)
            if not rank_zero_only:
                run_id = f"{run_id}-rank{rank}"
        self._reducer = D.Reducer() if world > 1 else None
        self.model = model
        self.optimizer = optimizer
        self.every = every
        self.run_id = run_id or uuid.uuid4().hex[:8]
        self.step_count = start_step
        self.config = dict(config or {})
        self.on_event = on_event
        self._events: deque[Event] = deque(maxlen=max_events)
        self.events_dropped = 0
        self._memory: Memory | None = None
        if keep_history:
            self._memory = Memory(None if keep_history is True else int(keep_history), max_events=max_events)
        self.sinks: list[Sink] = list(sinks)
        self.rank_zero_only = rank_zero_only
        writes = not (rank_zero_only and rank != 0)
        targets = ([self._memory] if self._memory else []) + (self.sinks if writes else [])
        self._guards = [_Guarded(s) for s in targets]
        self._per_rank: torch.Tensor | None = None
        self.eager_logged_steps = eager_logged_steps
        if eager_logged_steps:
            weakref.finalize(self, _EAGER.release, id(self))  # an abandoned Monitor restores the stance
        self.probes = self._build(probes)
        self._closed = False
        self._t0 = time.time()
        settings = {"every": every, "probes": [p.name for p in self.probes], "run_id": self.run_id,
                    "n_params": sum(p.numel() for p in model.parameters()), **self.config}
        for g in self._guards:
            g._call(g.sink.open, self.run_id, settings)
        self.arm(self._logged(self.step_count))

    # ------------------------------------------------------------------ construction
    def _build(self, spec) -> list[Probe]:
        attached = []
        for p in build_probes(spec, self.optimizer is not None):
            p.run_id = self.run_id
            try:
                p.attach(self.model, self.optimizer)
            except Exception:
                for q in attached:  # a failed Monitor leaves no hooks behind
                    q.detach()
                raise
            if isinstance(p, AttentionProbe) and not p.covered:  # only when required=False (default set)
                warnings.warn("stabilitylab: " + _short_unsupported(self.model), stacklevel=3)
                p.detach()
                continue
            attached.append(p)
        return attached

    # ------------------------------------------------------------------ schedule
    def _logged(self, step: int) -> bool:
        return step % self.every == 0

    @property
    def logging_now(self) -> bool:
        """True when the step in progress will be logged (probes are armed)."""
        return self._logged(self.step_count)

    def arm(self, armed: bool) -> None:
        """Arm (or disarm) every probe by hand. ``step()`` does this on its own; integrations call it
        to keep probes off during evaluation forwards that fall between a logged step's micro-batches."""
        for p in self.probes:
            p.guard(p.arm)(armed)
        if self.eager_logged_steps:
            self._force_eager(armed)

    def _force_eager(self, on: bool) -> None:
        """Make compiled code run eagerly while probes are armed (see ``eager_logged_steps``)."""
        try:
            _EAGER.hold(self) if on else _EAGER.release(id(self))
        except RuntimeError as e:  # Monitor.step called inside a compiled region
            self.eager_logged_steps = False
            warnings.warn(f"stabilitylab: cannot switch torch.compile to eager on logged steps ({e}); call "
                          "Monitor.step outside compiled code, or pass eager_logged_steps=False", stacklevel=3)

    def probe(self, name: str) -> Probe:
        """The attached probe called ``name`` (e.g. ``"attention"``)."""
        for p in self.probes:
            if p.name == name:
                return p
        raise KeyError(f"Monitor.probe({name!r}): no such probe attached; attached: {[p.name for p in self.probes]}")

    # ------------------------------------------------------------------ stepping
    def step(self, loss: torch.Tensor | float | None = None) -> dict[tuple[str, str], float] | None:
        """End of a training step. On logged steps collect, reduce, transfer once, write sinks.

        Returns the logged values ``{(metric, module): value}`` on logged steps, else None.
        """
        if self._closed:
            raise RuntimeError("Monitor.step: the monitor is closed")
        step = self.step_count
        out = None
        if self._logged(step):
            out = self._log_step(step, loss)
        self.step_count += 1
        self.arm(self._logged(self.step_count))
        return out

    def _gather(self, loss) -> list[Block]:
        blocks: list[Block] = []
        for p in self.probes:
            blocks.extend(p.guard(p.collect)() or [])
        if loss is not None:
            if isinstance(loss, torch.Tensor):
                t = loss.detach().reshape(-1)[:1]
                t = t if t.dtype == torch.float64 else t.float()
            else:
                t = torch.tensor([float(loss)], dtype=torch.float64)  # a Python float keeps its digits
            blocks.append(Block(M.LOSS, ("",), t, torch.ones_like(t)))
        return blocks

    def _reduce_across_ranks(self, reduce: np.ndarray, num: torch.Tensor, w: torch.Tensor,
                             keys: list[tuple[str, str]], loss: torch.Tensor | None, step: int):
        """Combine partials over data-parallel ranks (``distributed.Reducer``); single process: identity.

        Returns ``(reduce, num, w, keys)`` in the layout the ranks agreed on (rows no rank had get weight
        -1). Also keeps ``self._per_rank`` (``(2, world)``: each rank's local non-finite count and loss),
        moved to the host with the values, so events can name the rank(s) where a problem appeared.
        """
        self._per_rank = None
        r = self._reducer
        if r is None or r.failed:
            return reduce, num, w, keys
        faults = sum(1 << i for i, p in enumerate(self.probes) if p.faults)
        try:
            keys, reduce, num, w, self._per_rank = r.round(keys, reduce, num, w, loss, step, faults)
        except Exception as e:  # noqa: BLE001 - a dead or timed-out peer: local values from now on
            r.failed = f"{type(e).__name__}: {e}"
            warnings.warn(f"stabilitylab: cross-rank reduction failed on step {step} ({r.failed}); this rank "
                          "logs its local values from now on", stacklevel=4)
            self.emit([Event(self.run_id, step, "collective_failed", "", message=r.failed)])
        return reduce, num, w, keys

    def _log_step(self, step: int, loss) -> dict[tuple[str, str], float]:
        blocks = self._gather(loss)
        metrics_col: list[str] = []
        modules_col: list[str] = []
        if blocks or self._reducer is not None:  # every rank joins the round, even with nothing recorded
            # Device of the first block not on the CPU (CPU scalars such as the LR move to it, not back).
            device = next((b.num.device for b in blocks if b.num.device.type != "cpu"),
                          blocks[0].num.device if blocks else _param_device(self.model))
            dtype = torch.float32 if device.type == "mps" else torch.float64
            num = torch.cat([b.num.to(device=device, dtype=dtype, non_blocking=True) for b in blocks]
                            or [torch.zeros(0, device=device, dtype=dtype)])
            w = torch.cat([b.weight.to(device=device, dtype=dtype, non_blocking=True) for b in blocks]
                          or [torch.zeros(0, device=device, dtype=dtype)])
            codes = []
            for b in blocks:
                metrics_col.extend([b.metric] * len(b.modules))
                modules_col.extend(b.modules)
                codes.extend([_REDUCE_CODE[M.spec(b.metric).reduce]] * len(b.modules))
            reduce = np.asarray(codes, dtype=np.int64)
            loss_t = blocks[-1].num[0].to(device, non_blocking=True) if loss is not None else None
            reduce, num, w, keys = self._reduce_across_ranks(
                reduce, num, w, list(zip(metrics_col, modules_col)), loss_t, step)
            metrics_col, modules_col = [k[0] for k in keys], [k[1] for k in keys]
            both = torch.stack([num, w])
            if self._per_rank is not None:
                both = torch.cat([both, self._per_rank], dim=1)
            both = _to_host(both)  # the one device -> host transfer
            n = len(metrics_col)
            values = _finalise(reduce, both[0, :n], both[1, :n])
            per_rank = both[:, n:]
            kept = both[1, :n] >= 0  # rows that no rank recorded this step (weight -1) are not records
            if not kept.all():
                values = values[kept]
                metrics_col = [m for m, k in zip(metrics_col, kept) if k]
                modules_col = [m for m, k in zip(modules_col, kept) if k]
        else:
            values, per_rank = np.zeros(0), np.zeros((2, 0))
        # Same (metric, module) from several blocks: keep the last (probes own distinct keys).
        vals = dict(zip(zip(metrics_col, modules_col), values.tolist()))
        events: list[Event] = []
        for p in self.probes:
            extra, ev = p.guard(p.on_host)(step, vals) or ([], [])
            for metric, module, v in extra:
                vals[(metric, module)] = float(v)
            events.extend(ev)
        r = self._reducer
        for p in self.probes:
            for e in p.faults:
                e.run_id, e.step = self.run_id, step
                if r is not None:
                    e.extra["ranks"] = [r.rank]
                    e.message = f"{e.message} (rank {r.rank})"
            events.extend(p.faults)
            p.faults = []
        if r is not None and not r.failed:
            events.extend(r.events(self.run_id, step, [p.name for p in self.probes]))
        rec = Records(self.run_id, step, time.time(), [k[0] for k in vals], [k[1] for k in vals],
                      np.fromiter(vals.values(), dtype=np.float64, count=len(vals)))
        for g in self._guards:
            g.write(rec)
        if events and per_rank.shape[1]:
            health = next((p for p in self.probes if p.name == "health"), None)
            D.name_ranks(events, per_rank[0], per_rank[1], getattr(health, "spike_level", None))
        if events:
            self.emit(events)
        return vals

    @property
    def events(self) -> list[Event]:
        """The most recent events, oldest first (at most ``max_events``; see ``events_dropped``)."""
        return list(self._events)

    def emit(self, events: Sequence[Event]) -> None:
        """Send events (health, early warnings) to the sinks and the ``on_event`` callback."""
        self.events_dropped += max(0, len(self._events) + len(events) - self._events.maxlen)
        self._events.extend(events)
        for g in self._guards:
            g.write_events(events)
        if self.on_event is not None:
            for e in events:
                self.on_event(e)

    # ------------------------------------------------------------------ results
    def history(self) -> pd.DataFrame:
        """All logged records as a tidy DataFrame (run_id, step, metric, module, value, wall_time)."""
        if self._memory is not None:
            return self._memory.to_frame()
        for s in self.sinks:
            if isinstance(s, Parquet):
                s.flush()
                df = read_history(s.path)
                return df[df["run_id"] == self.run_id].reset_index(drop=True)
        raise RuntimeError("Monitor.history(): keep_history=False and no Parquet sink; nothing to read")

    def flush(self) -> None:
        for g in self._guards:
            g.flush()

    def close(self) -> None:
        """Detach probes and flush/close every sink. Closing twice is a no-op."""
        if self._closed:
            return
        self._closed = True
        if self._reducer is not None:  # answer the ranks still logging, so none waits for this one
            self._reducer.close(self.step_count, _param_device(self.model), torch.float64)
        if self.eager_logged_steps:
            self._force_eager(False)
        for p in self.probes:
            p.detach()
        if self.events_dropped:
            dropped = self.events_dropped
            self.emit([Event(self.run_id, self.step_count, "events_dropped", "", float(dropped),
                             f"{dropped} events were dropped from Monitor.events (max_events="
                             f"{self._events.maxlen}); the sinks received all of them")])
        for g in self._guards:
            g.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Monitor(run_id={self.run_id!r}, every={self.every}, step={self.step_count}, "
                f"probes={[p.name for p in self.probes]}, sinks={[type(s).__name__ for s in self.sinks]})")


def _param_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a model without parameters)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _to_host(t: torch.Tensor) -> np.ndarray:
    """The one device -> host transfer of a logged step, as numpy.

    It is the one deliberate sync of a logged step, so it is exempt from
    ``torch.cuda.set_sync_debug_mode``: under ``"error"`` any *other* sync still raises.
    """
    if t.device.type != "cuda":
        return t.cpu().numpy()
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        return t.cpu().numpy()
    finally:
        torch.cuda.set_sync_debug_mode(mode)


def _broadcast_run_id(run_id: str | None) -> str:
    """Rank 0's run id on every rank (a random default would otherwise differ per rank)."""
    import torch.distributed as dist

    box = [run_id or uuid.uuid4().hex[:8]]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class _EagerStance:
    """Reference-counted ``force_eager`` compile stance shared by all armed Monitors.

    The stance is global, so it is switched on when the first Monitor arms and the previous stance is
    restored when the last one disarms, closes or is garbage-collected (an abandoned Monitor never leaves
    compiled code running eagerly).
    """

    def __init__(self) -> None:
        self.holders: set[int] = set()
        self.saved = None

    def hold(self, monitor: Monitor) -> None:
        from torch._dynamo import eval_frame

        key = id(monitor)
        if key in self.holders:
            return
        if not self.holders:
            self.saved = eval_frame._set_stance(eval_frame.DynamoStance("force_eager"))
        self.holders.add(key)

    def release(self, key: int) -> None:
        if key not in self.holders:
            return
        self.holders.discard(key)
        if not self.holders and self.saved is not None:
            from torch._dynamo import eval_frame

            eval_frame._set_stance(self.saved)
            self.saved = None


_EAGER = _EagerStance()


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module the user's code runs, without DDP / ``torch.compile`` wrappers (their names add prefixes)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def _short_unsupported(model: torch.nn.Module) -> str:
    return (f"no attention found in {type(model).__name__}, so attn.* metrics are off. Add "
            "stabilitylab.record_qk(q, k, ..., module=self) where it computes attention to get them.")

