"""Health probe: non-finite values and loss spikes.

Metrics:

- ``health.nonfinite``  module "loss": 1 if the loss is NaN/Inf; module "param": count of non-finite
                        parameter elements after the step (module "grad" comes from the optimizer probe);
                        module "metrics": number of this step's other metric values (attention, logits,
                        activations, norms ...) that are NaN/Inf, with an event naming them
- ``health.spike``      on the host: z-score of the logged loss against a trailing window of earlier
                        logged losses (median / MAD, robust), recorded when above ``z_threshold`` (else 0);
                        an Event ``loss_spike`` is emitted too. Non-finite values emit an Event ``nonfinite``.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import torch

from stabilitylab import functional as F
from stabilitylab import metrics as M
from stabilitylab import shards
from stabilitylab.probes.base import Event, Probe


class HealthProbe(Probe):
    """Non-finite counts and loss-spike events.

    Args:
        window: number of earlier logged losses in the trailing baseline.
        z_threshold: robust z-score above which a loss is a spike.
        check_params: count non-finite parameter elements on logged steps.
    """

    name = "health"
    metrics = (M.HEALTH_NONFINITE, M.HEALTH_SPIKE)

    def __init__(self, window: int = 50, z_threshold: float = 6.0, check_params: bool = True):
        super().__init__()
        if window < 3:
            raise ValueError(f"HealthProbe(window={window}): need at least 3 earlier losses")
        self.window = window
        self.z_threshold = z_threshold
        self.check_params = check_params
        self._losses: deque[float] = deque(maxlen=window)
        self.spike_level: float | None = None
        """Loss above which the last logged step was a spike (median + z_threshold * scale)."""

    def _attach(self) -> None:
        self._params = [p for p in self.model.parameters()]
        # Whole-model count under DDP / FSDP2: each rank's local count / replication sums to the true count.
        self._inv_rep = [1.0 / shards.replication(p) for p in self._params]
        self._inv_rep_t: torch.Tensor | None = None

    def _before_collect(self) -> None:
        if self.check_params and self._params:
            local = [p.detach().to_local() if hasattr(p, "to_local") else p.detach() for p in self._params]
            counts = F.nonfinite_counts(local).double()
            if self._inv_rep_t is None or self._inv_rep_t.device != counts.device:
                self._inv_rep_t = torch.tensor(self._inv_rep, dtype=torch.float64, device=counts.device)
            cnt = (counts * self._inv_rep_t).sum()
            self.record(M.HEALTH_NONFINITE, "param", cnt, 1.0)

    def loss_level(self) -> float | None:
        """``spike_level``: the loss above which the last logged step counted as a spike."""
        return self.spike_level

    def on_host(self, step: int, values: dict[tuple[str, str], float]):
        records, events = [], []
        loss = values.get((M.LOSS, ""))
        for (metric, module), v in values.items():
            if metric == M.HEALTH_NONFINITE and v and v > 0:
                events.append(Event(self.run_id, step, "nonfinite", module, float(v),
                                    f"{int(v)} non-finite {module} values"))
        bad = [f"{m}/{mod}" if mod else m for (m, mod), v in values.items()
               if not math.isfinite(v) and m != M.LOSS and not m.startswith("health.")]
        records.append((M.HEALTH_NONFINITE, "metrics", float(len(bad))))
        if bad:
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            events.append(Event(self.run_id, step, "nonfinite", "metrics", float(len(bad)),
                                f"{len(bad)} non-finite metric values: {', '.join(bad[:5])}{more}"))
        if loss is None:
            return records, events
        if not math.isfinite(loss):
            records.append((M.HEALTH_NONFINITE, "loss", 1.0))
            events.append(Event(self.run_id, step, "nonfinite", "loss", loss, f"loss is {loss}"))
            return records, events
        records.append((M.HEALTH_NONFINITE, "loss", 0.0))
        z = 0.0
        if len(self._losses) >= 3:
            base = np.asarray(self._losses)
            med = float(np.median(base))
            mad = float(np.median(np.abs(base - med))) * 1.4826
            scale = max(mad, 1e-3 * max(abs(med), 1e-8))
            z = (loss - med) / scale
            self.spike_level = med + self.z_threshold * scale
        spike = z if z > self.z_threshold else 0.0
        records.append((M.HEALTH_SPIKE, "", spike))
        if spike:
            events.append(Event(self.run_id, step, "loss_spike", "", loss,
                                f"loss {loss:.4g} is {z:.1f} robust SDs above the trailing median"))
        self._losses.append(loss)
        return records, events
