"""Monitor plumbing a reader of ``monitor.py`` does not need: its argument checks and messages, the
``torch.compile`` stance on logged steps, wrapper unwrapping, the device of a model, the loss record,
stacking a logged step's partials on one device, the one device -> host transfer of a logged step, and
reading a run back from its Parquet sink."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from stabilitylab._checks import check_every, int_at_least
from stabilitylab.metrics import LOSS, Block, Event
from stabilitylab.sinks.base import Sink
from stabilitylab.sinks.parquet import Parquet, read_history


def check_monitor_args(*, model: Any, every: Any, sinks: Any, keep_history: Any, run_id: Any, start_step: Any,
                       config: Any, on_event: Any, rank_zero_only: Any, eager_logged_steps: Any,
                       max_events: Any) -> list[Sink]:
    """Validate ``Monitor(...)``'s arguments (one sentence naming the argument and the fix); returns the
    sinks as a list."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"Monitor(model=...): expected a torch.nn.Module, got {type(model).__name__}")
    check_every(every, "Monitor(every")
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
    return list(sinks)


def check_set_step(closed: bool, step: Any) -> None:
    """Validate ``Monitor.set_step(step)`` on a monitor that is ``closed`` or not."""
    if closed:
        raise RuntimeError("Monitor.set_step: the monitor is closed")
    if not int_at_least(step, 0):
        raise ValueError(f"Monitor.set_step(step={step!r}): must be an int >= 0 (the number of the step "
                         "in progress)")


def events_dropped_event(monitor: Any) -> Event:
    """The one ``events_dropped`` event a closing Monitor emits when ``Monitor.events`` overflowed."""
    n = monitor.events_dropped
    return Event(monitor.run_id, monitor.step_count, "events_dropped", "", float(n),
                 f"{n} events were dropped from Monitor.events (max_events={monitor._events.maxlen}); the "
                 "sinks received all of them")


def loss_block(loss: torch.Tensor | float) -> Block:
    """The ``loss`` record of a step: a (1,) tensor, float32 unless the loss is float64 or a Python float
    (which keeps its digits)."""
    if isinstance(loss, torch.Tensor):
        t = loss.detach().reshape(-1)[:1]
        t = t if t.dtype == torch.float64 else t.float()
    else:
        t = torch.tensor([float(loss)], dtype=torch.float64)
    return Block(LOSS, ("",), t, torch.ones_like(t))


def parquet_history(sinks: Sequence[Sink], run_id: str) -> pd.DataFrame:
    """Run ``run_id``'s records read back from the first Parquet sink (``Monitor(keep_history=False)``)."""
    for s in sinks:
        if isinstance(s, Parquet):
            s.flush()
            df = read_history(s.path)
            return df[df["run_id"] == run_id].reset_index(drop=True)
    raise RuntimeError("Monitor.history(): keep_history=False and no Parquet sink; nothing to read")


def param_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a model without parameters)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def stack(blocks: Sequence[Block], model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Every block's ``(num, weight)`` concatenated into two 1-D tensors on one device.

    The device is the first block's that is not the CPU (CPU scalars such as the LR move to it, not
    back), else the first block's (the model's without blocks); float64, float32 on MPS.
    """
    device = next((b.num.device for b in blocks if b.num.device.type != "cpu"),
                  blocks[0].num.device if blocks else param_device(model))
    dtype = torch.float32 if device.type == "mps" else torch.float64
    empty = [torch.zeros(0, device=device, dtype=dtype)]
    num = torch.cat([b.num.to(device=device, dtype=dtype, non_blocking=True) for b in blocks] or empty)
    w = torch.cat([b.weight.to(device=device, dtype=dtype, non_blocking=True) for b in blocks] or empty)
    return num, w


def to_host(t: torch.Tensor) -> np.ndarray:
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


class EagerStance:
    """Reference-counted ``force_eager`` compile stance shared by all armed Monitors.

    The stance is global, so it is switched on when the first Monitor arms and the previous stance is
    restored when the last one disarms, closes or is garbage-collected (an abandoned Monitor never leaves
    compiled code running eagerly).
    """

    def __init__(self) -> None:
        self.holders: set[int] = set()
        self.saved = None

    def hold(self, monitor: object) -> None:
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


EAGER = EagerStance()


def force_eager(monitor: Any, on: bool) -> None:
    """Make compiled code run eagerly while ``monitor``'s probes are armed (``eager_logged_steps``).

    Called inside a compiled region the stance cannot switch: one warning, and ``eager_logged_steps``
    is turned off for that Monitor.
    """
    try:
        EAGER.hold(monitor) if on else EAGER.release(id(monitor))
    except RuntimeError as e:  # Monitor.step called inside a compiled region
        monitor.eager_logged_steps = False
        warnings.warn(f"stabilitylab: cannot switch torch.compile to eager on logged steps ({e}); call "
                      "Monitor.step outside compiled code, or pass eager_logged_steps=False", stacklevel=3)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module the user's code runs, without DDP / ``torch.compile`` wrappers (their names add prefixes)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model
