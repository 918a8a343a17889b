"""Console sink: one compact line per logged step with the headline signals."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO

import numpy as np

from stabilitylab import metrics as M
from stabilitylab.metrics import Event
from stabilitylab.sinks.base import Records, Sink

_HEADLINE = [
    (M.LOSS, "loss", "{:.4f}"),
    (M.GRAD_GLOBAL_NORM, "gnorm", "{:.3g}"),
    (M.ATTN_MAX_LOGIT, "attn_max", "{:.3g}"),
    (M.LOGITS_LSE_MEAN, "lse", "{:.3g}"),
    (M.UPDATE_RATIO, "upd/p", "{:.2g}"),
    (M.ADAM_EPS_DOMINANCE, "eps_dom", "{:.2g}"),
    (M.HEALTH_NONFINITE, "nonfinite", "{:.0f}"),
]


class Console(Sink):
    """Prints ``step 120 | loss 2.3141 | gnorm 0.84 | attn_max 14.2 | ...`` (maxima over modules)."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream

    def write(self, records: Records) -> None:
        vals: dict[str, list[float]] = {}
        for m, v in zip(records.metric, records.value):
            vals.setdefault(m, []).append(float(v))
        parts = [f"step {records.step}"]
        for metric, label, fmt in _HEADLINE:
            if metric in vals:
                arr = np.asarray(vals[metric])
                v = float(np.nanmax(arr)) if np.isfinite(arr).any() else float(arr[0])
                parts.append(f"{label} {fmt.format(v)}")
        print(" | ".join(parts), file=self.stream or sys.stdout, flush=True)

    def write_events(self, events: Sequence[Event]) -> None:
        for e in events:
            where = f" in {e.module}" if e.module else ""
            print(f"[stabilitylab] step {e.step}: {e.kind}{where}: {e.message}",
                  file=self.stream or sys.stdout, flush=True)
