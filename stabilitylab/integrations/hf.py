"""Hugging Face ``transformers.Trainer`` callback that runs a stabilitylab ``Monitor``.

    from stabilitylab.integrations.hf import StabilityCallback
    cb = StabilityCallback(every=10)
    Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb]).train()
    cb.monitor.history()      # tidy DataFrame; also <output_dir>/stabilitylab/ as parquet

Step numbers are the Trainer's: the optimizer step that makes ``state.global_step == s`` is logged as
step ``s`` (logged when ``s % every == 0``), so ``grad.global_norm`` at step ``s`` is the ``grad_norm``
the Trainer logs at step ``s`` (the unclipped norm of the gradient accumulated over all micro-batches).
``loss`` is the step's training loss as the Trainer computes it: the sum over micro-batches of the
model's ``loss`` output when the model normalises by ``num_items_in_batch`` (token mean over the step),
their mean otherwise. Probes are armed only during the micro-batches of a logged step, so evaluation
in between never reaches them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from transformers import TrainerCallback

from stabilitylab._checks import int_at_least
from stabilitylab.monitor import Monitor
from stabilitylab.probes.base import Probe
from stabilitylab.sinks.base import Sink
from stabilitylab.sinks.parquet import Parquet
from stabilitylab.sinks.wandb import WandB


class StabilityCallback(TrainerCallback):
    """Builds a ``Monitor`` from the Trainer's model and optimizer at train start; ``callback.monitor``.

    Args:
        every: log every ``every``-th optimizer step (``>= 1``).
        sinks: where records go; None means ``Parquet(<output_dir>/stabilitylab)`` plus ``WandB()`` when
            ``report_to`` includes ``"wandb"`` (it logs into the Trainer's W&B run); ``[]`` keeps records
            only in ``monitor.history()``.
        probes: ``"default"`` or a list of probe names / objects (see ``Monitor``).
        run_id: run id of the records (default: ``args.run_name``, else a random id).
        config: extra settings stored with the run (next to the Trainer's LR, accumulation, clipping).
        **monitor_kwargs: other ``Monitor`` arguments (``keep_history``, ``on_event``, ...).
    """

    def __init__(self, every: int = 10, sinks: Sequence[Sink] | None = None,
                 probes: str | Sequence[str | Probe] = "default", run_id: str | None = None,
                 config: dict[str, Any] | None = None, **monitor_kwargs: Any):
        if not int_at_least(every, 1):
            raise ValueError(f"StabilityCallback(every={every!r}): must be an int >= 1 (1 logs every step)")
        self.every = every
        self.sinks = sinks
        self.probes = probes
        self.run_id = run_id
        self.config = dict(config or {})
        self.monitor_kwargs = monitor_kwargs
        self.monitor: Monitor | None = None
        self._armed = False
        self._losses: list[tuple[torch.Tensor, bool]] = []
        self._loss_hook: Any = None

    def _default_sinks(self, args: Any) -> list[Sink]:
        sinks: list[Sink] = [Parquet(os.path.join(args.output_dir or ".", "stabilitylab"))]
        if "wandb" in (args.report_to or []):
            sinks.append(WandB())
        return sinks

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args: Any, state: Any, control: Any, model: torch.nn.Module | None = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        """Build the Monitor (the wrapped optimizer is unwrapped by its optimizer probe)."""
        if model is None:
            raise ValueError("StabilityCallback: the Trainer passed model=None to on_train_begin")
        self._release()
        config = {"framework": "transformers", "learning_rate": args.learning_rate,
                  "gradient_accumulation_steps": args.gradient_accumulation_steps,
                  "max_grad_norm": args.max_grad_norm, **self.config}
        self.monitor = Monitor(model, optimizer=optimizer, every=self.every, probes=self.probes,
                               sinks=self._default_sinks(args) if self.sinks is None else list(self.sinks),
                               run_id=self.run_id or args.run_name, start_step=state.global_step + 1,
                               config=config, **self.monitor_kwargs)
        self._set_armed(False)
        self._loss_hook = model.register_forward_hook(self._on_output, with_kwargs=True)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Before the first micro-batch of optimizer step ``global_step + 1``: arm if it is logged."""
        if self.monitor is None:
            return
        self._losses.clear()
        self._armed = self.monitor.set_step(state.global_step + 1)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """After the optimizer step (``global_step`` already counts it): log it, then disarm."""
        if self.monitor is None:
            return
        self.monitor.step(self._step_loss())
        self._losses.clear()
        self._set_armed(False)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Flush and close the Monitor's sinks and remove its hooks; ``monitor.history()`` stays."""
        self._release()

    # ------------------------------------------------------------------ helpers
    def _set_armed(self, armed: bool) -> None:
        self._armed = armed
        self.monitor.arm(armed)

    def _release(self) -> None:
        if self._loss_hook is not None:
            self._loss_hook.remove()
            self._loss_hook = None
        if self.monitor is not None:
            self.monitor.close()
        self._armed = False

    def _on_output(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        if not (self._armed and module.training):
            return
        loss = output.get("loss") if hasattr(output, "get") else None
        if isinstance(loss, torch.Tensor):
            self._losses.append((loss.detach().float().reshape(()), kwargs.get("num_items_in_batch") is not None))

    def _step_loss(self) -> torch.Tensor | None:
        """Sum of micro-batch losses normalised by ``num_items_in_batch``, else their mean."""
        if not self._losses:
            return None
        total = torch.stack([v for v, _ in self._losses]).sum()
        return total if self._losses[-1][1] else total / len(self._losses)
