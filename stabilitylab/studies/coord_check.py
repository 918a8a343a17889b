"""Coordinate check (Yang et al., 2022): activation size per layer vs width over the first steps.

Train one model per width for a few steps at the same LR and record ``act.rms`` of each block with
stabilitylab's activation probe. Under a correct muP the curves are flat in width; under standard
parameterisation at a high LR they grow (Adam moves every weight entry by ~lr, so a layer's output
moves by ~lr * fan_in). ``width_slopes`` condenses the table to the log-log slope
``d log(act.rms) / d log(width)`` per step and module (0 = flat, 1 = proportional to width).

Works for any model: the built-in proxy (muP through ``ProxyConfig(mup=True)`` plus
``TrainConfig(mup_lr_scaling=True)``), or a model built with the ``mup`` package (``MuReadout``,
``set_base_shapes``, ``MuAdam``), passed through ``model_factory`` / ``optimizer_factory``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from stabilitylab import metrics as M
from stabilitylab._checks import int_at_least


def _loss_of(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor) and output.dim() == 0:
        return output
    if isinstance(output, (tuple, list)) and len(output) == 2 and isinstance(output[1], torch.Tensor):
        return output[1]
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    raise TypeError("coord_check: the model output has no loss; make data(step) return arguments that make the "
                    "model compute one (e.g. (input_ids, targets) for the proxy, labels for Hugging Face)")


def _default_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    from stabilitylab.proxy import ProxyTransformer, TrainConfig, build_optimizer

    if isinstance(model, ProxyTransformer):
        cfg = TrainConfig(model=model.cfg, lr=lr, weight_decay=0.0, mup_lr_scaling=model.cfg.mup)
        return build_optimizer(model, cfg)
    return torch.optim.Adam(model.parameters(), lr=lr)


def _default_data(model: torch.nn.Module, batch_size: int, seed: int) -> Callable[[int], tuple]:
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(cfg, "vocab_size"):
        raise ValueError("coord_check(data=None): only the built-in proxy has default data; pass "
                         "data=fn(step) -> tuple of model arguments (with targets/labels so it returns a loss)")

    def data(step: int) -> tuple:
        g = torch.Generator().manual_seed(seed * 100_003 + step)
        x = torch.randint(0, cfg.vocab_size, (batch_size, cfg.seq_len + 1), generator=g)
        dev = next(model.parameters()).device
        return x[:, :-1].to(dev), x[:, 1:].to(dev)

    return data


def coord_check(
    model_factory: Callable[[int], torch.nn.Module],
    widths: Sequence[int],
    steps: int = 5,
    *,
    optimizer_factory: Callable[[torch.nn.Module], torch.optim.Optimizer] | None = None,
    data: Callable[[int], tuple] | None = None,
    lr: float = 1e-2,
    seeds: Sequence[int] = (0,),
    modules: list[str] | None = None,
    batch_size: int = 8,
) -> pd.DataFrame:
    """Train each width for ``steps`` steps and return a tidy table of ``act.rms`` per layer.

    Args:
        model_factory: ``fn(width) -> model``.
        widths: widths to compare (at least two).
        steps: optimizer steps per width; step ``s`` is measured in the forward pass after ``s`` updates.
        optimizer_factory: ``fn(model) -> optimizer``; default: the proxy's own optimizer (muP LR scaling
            when ``model.cfg.mup``, weight decay 0) for the proxy, else ``Adam(lr)`` (pass ``MuAdam``
            for ``mup`` models).
        data: ``fn(step) -> tuple`` of model arguments whose output holds a loss; default (proxy only):
            random byte sequences, the same for every width.
        lr: learning rate of the default optimizers.
        seeds: one run per seed and width (seeds init and default data).
        modules: modules to measure (default: the model's repeated blocks).
        batch_size: sequences per step of the default data.

    Returns:
        DataFrame with columns ``width, seed, step, module, metric, value`` (metric is ``act.rms``).
    """
    from stabilitylab.monitor import Monitor
    from stabilitylab.probes.activations import ActivationProbe

    widths = list(widths)
    if len(widths) < 2 or any(not int_at_least(w, 1) for w in widths):
        raise ValueError(f"coord_check(widths={widths!r}): need at least two positive int widths")
    if not int_at_least(steps, 1):
        raise ValueError(f"coord_check(steps={steps!r}): must be an int >= 1")
    frames = []
    for seed in seeds:
        for width in widths:
            torch.manual_seed(seed)
            model = model_factory(width)
            opt = optimizer_factory(model) if optimizer_factory is not None else _default_optimizer(model, lr)
            batches = data if data is not None else _default_data(model, batch_size, seed)
            probe = ActivationProbe(modules=modules, stats=("rms",))
            with Monitor(model, optimizer=opt, every=1, probes=[probe], run_id=f"w{width}s{seed}") as mon:
                for step in range(steps):
                    loss = _loss_of(model(*batches(step)))
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    mon.step()
                hist = mon.history()
            hist = hist[hist["metric"] == M.ACT_RMS]
            frames.append(hist.assign(width=width, seed=seed)[["width", "seed", "step", "module", "metric", "value"]])
    return pd.concat(frames, ignore_index=True)


def width_slopes(table: pd.DataFrame) -> pd.DataFrame:
    """Least-squares slope of ``log(value)`` against ``log(width)`` per step and module (seeds averaged first).

    Returns:
        DataFrame with columns ``step, module, slope``; ``value ~ width ** slope``.
    """
    mean = table.groupby(["step", "module", "width"], as_index=False)["value"].mean()
    rows = [{"step": step, "module": module,
             "slope": float(np.polyfit(np.log(g["width"].to_numpy(float)), np.log(g["value"].to_numpy(float)), 1)[0])}
            for (step, module), g in mean.groupby(["step", "module"])]
    return pd.DataFrame(rows, columns=["step", "module", "slope"])


def plot_coord_check(table: pd.DataFrame, title: str = "coordinate check"):
    """One panel per step: ``act.rms`` vs width (log-log), one line per module; returns the Figure."""
    import matplotlib.pyplot as plt

    mean = table.groupby(["step", "module", "width"], as_index=False)["value"].mean()
    steps = sorted(mean["step"].unique())
    fig, axes = plt.subplots(1, len(steps), figsize=(3 * len(steps), 3), sharey=True, squeeze=False)
    for ax, step in zip(axes[0], steps):
        for module, g in mean[mean["step"] == step].groupby("module"):
            ax.plot(g["width"], g["value"], marker="o", label=module)
        ax.set(xscale="log", yscale="log", title=f"step {step}", xlabel="width")
    axes[0][0].set_ylabel("act.rms")
    axes[0][-1].legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    return fig
