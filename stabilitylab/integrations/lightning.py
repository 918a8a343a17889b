"""Lightning callback that runs a stabilitylab ``Monitor`` (``lightning``, else ``pytorch_lightning``).

    from stabilitylab.integrations.lightning import StabilityCallback
    cb = StabilityCallback(every=10)
    lightning.Trainer(callbacks=[cb], ...).fit(module)
    cb.monitor.history()

Step ``s`` is the optimizer step after which ``trainer.global_step == s``. With automatic optimization
Lightning runs forward and backward inside the closure it hands to ``optimizer.step``; the optimizer
probe captures gradients at the end of that backward, so ``grad.global_norm`` is the unclipped norm
``on_before_optimizer_step`` sees, accumulated over ``accumulate_grad_batches``. ``loss`` is the sum of
the step's ``outputs["loss"]`` (Lightning divides each by ``accumulate_grad_batches``: their mean).

Which module is monitored: ``module=`` (a submodule name), else the LightningModule itself, except
when it does not override ``forward`` (``training_step`` calls ``self.model(...)``) and has a single
child module: then that child, so output-logit hooks see the model's forward. Attention and block
hooks sit on submodules and are recorded either way.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

try:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import WandbLogger
except ImportError:  # pragma: no cover - the older package name
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import WandbLogger

from stabilitylab._checks import int_at_least
from stabilitylab.monitor import Monitor
from stabilitylab.probes.base import Probe
from stabilitylab.sinks.base import Sink
from stabilitylab.sinks.parquet import Parquet
from stabilitylab.sinks.wandb import WandB


def monitored_module(pl_module: torch.nn.Module, module: str | None = None) -> torch.nn.Module:
    """The module a ``StabilityCallback`` attaches to (see the module docstring)."""
    if module is not None:
        try:
            return pl_module.get_submodule(module)
        except AttributeError:
            raise ValueError(f"StabilityCallback(module={module!r}): {type(pl_module).__name__} has no such "
                             "submodule; pass the attribute name of the model it trains, e.g. 'model'") from None
    if type(pl_module).forward is not pl.LightningModule.forward:
        return pl_module
    children = list(pl_module.children())
    if len(children) == 1:
        return children[0]
    warnings.warn(f"stabilitylab: {type(pl_module).__name__} does not override forward and has "
                  f"{len(children)} child modules; output-logit metrics need StabilityCallback(module='<name>') "
                  "naming the model training_step calls", stacklevel=3)
    return pl_module


class StabilityCallback(pl.Callback):
    """Builds a ``Monitor`` at train start from the LightningModule and its optimizer; ``callback.monitor``.

    Args:
        every: log every ``every``-th optimizer step (``>= 1``).
        sinks: where records go; None means ``Parquet(<default_root_dir>/stabilitylab)`` plus ``WandB()``
            when the Trainer has a ``WandbLogger``. ``WandB`` sinks without a ``run`` log into the
            ``WandbLogger``'s run. ``[]`` keeps records only in ``monitor.history()``.
        probes: ``"default"`` or a list of probe names / objects (see ``Monitor``).
        module: name of the submodule to monitor (default: see the module docstring).
        run_id: run id of the records (default: a random id).
        config: extra settings stored with the run.
        **monitor_kwargs: other ``Monitor`` arguments (``keep_history``, ``on_event``, ...).
    """

    def __init__(self, every: int = 10, sinks: Sequence[Sink] | None = None,
                 probes: str | Sequence[str | Probe] = "default", module: str | None = None,
                 run_id: str | None = None, config: dict[str, Any] | None = None, **monitor_kwargs: Any):
        if not int_at_least(every, 1):
            raise ValueError(f"StabilityCallback(every={every!r}): must be an int >= 1 (1 logs every step)")
        self.every = every
        self.sinks = sinks
        self.probes = probes
        self.module = module
        self.run_id = run_id
        self.config = dict(config or {})
        self.monitor_kwargs = monitor_kwargs
        self.monitor: Monitor | None = None
        self._loss: torch.Tensor | None = None
        self._seen_step = 0

    def _sinks(self, trainer: pl.Trainer) -> list[Sink]:
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if self.sinks is not None:
            sinks = list(self.sinks)
        else:
            sinks = [Parquet(Path(trainer.default_root_dir) / "stabilitylab")]
            if wandb_loggers:
                sinks.append(WandB())
        if wandb_loggers:
            for s in sinks:
                if isinstance(s, WandB) and s.run is None:
                    s.run = wandb_loggers[0].experiment
        return sinks

    # ------------------------------------------------------------------ Lightning hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the Monitor on the monitored module and the first optimizer."""
        self._release()
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        config = {"framework": "lightning", "accumulate_grad_batches": trainer.accumulate_grad_batches,
                  "gradient_clip_val": trainer.gradient_clip_val, **self.config}
        self.monitor = Monitor(monitored_module(pl_module, self.module), optimizer=optimizer, every=self.every,
                               probes=self.probes, sinks=self._sinks(trainer), run_id=self.run_id,
                               start_step=trainer.global_step + 1, config=config, **self.monitor_kwargs)
        self.monitor.arm(False)
        self._seen_step = trainer.global_step
        self._loss = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        """Arm the probes for this micro-batch when the optimizer step it belongs to is logged."""
        if self.monitor is not None:
            self.monitor.set_step(trainer.global_step + 1)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Add this micro-batch's loss; after an optimizer step, log it. Disarm until the next batch."""
        if self.monitor is None:
            return
        if self.monitor.logging_now:
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            if isinstance(loss, torch.Tensor):
                loss = loss.detach().float().reshape(())
                self._loss = loss if self._loss is None else self._loss + loss
        if trainer.global_step != self._seen_step:
            self._seen_step = trainer.global_step
            self.monitor.step(self._loss)
            self._loss = None
        self.monitor.arm(False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Flush and close the Monitor's sinks and remove its hooks; ``monitor.history()`` stays."""
        self._release()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Close the Monitor so what was recorded reaches the sinks."""
        self._release()

    def _release(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
