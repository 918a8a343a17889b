"""``train_one(config)``: train the proxy once at one learning rate and report what happened.

AdamW (beta2 0.95, configurable eps), weight decay coupled (``lr * wd``, PyTorch's AdamW) or independent
(``wd * schedule``, the paper's default), linear warm-up + cosine decay, global-norm clipping, held-out
evaluation, init loss, divergence flag (non-finite, or final loss above the init loss).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd
import torch

from stabilitylab._checks import int_at_least
from stabilitylab.mitigations.schedules import warmup_cosine
from stabilitylab.proxy.data import ByteData
from stabilitylab.proxy.model import ProxyConfig, ProxyTransformer

OPTIMIZERS = ("adamw", "adam_atan2")


@dataclass(kw_only=True)
class TrainConfig:
    """One training run of the proxy."""

    model: ProxyConfig = field(default_factory=ProxyConfig)
    """Model shape and mitigation switches."""
    lr: float = 1e-2
    """Peak learning rate."""
    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 16
    """Sequences per step."""
    warmup_steps: int = 30
    """Linear warm-up steps."""
    min_lr: float = 1e-5
    """Cosine decay floor (absolute LR; the paper decays to 1e-5)."""
    weight_decay: float = 1e-4
    """Weight decay on matrices (dim >= 2)."""
    independent_wd: bool = True
    """Decay by ``wd * schedule(t)`` (True, the paper's default) or by ``lr_t * wd`` (False, AdamW's)."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    """Adam epsilon (a first-class sweep variable)."""
    optimizer: str = "adamw"
    """``"adamw"`` or ``"adam_atan2"``."""
    mup_lr_scaling: bool = False
    """Scale hidden-matrix LRs by base_width / width (simple muP; pair with model.mup=True)."""
    clip: float | None = 1.0
    """Global gradient-norm clipping threshold (None: off)."""
    seed: int = 0
    """Seed for init and data order."""
    eval_batches: int = 8
    """Held-out batches for init and final loss."""
    data_path: str | None = None
    """Text file / directory (default: the Python standard library sources)."""
    device: str = "cpu"
    check_every: int = 10
    """Steps between divergence checks (each is one host sync)."""
    lr_schedule: str = ""
    """Piecewise-linear LR factor knots ``"step:factor,..."`` (x ``lr``; held before the first and after the
    last knot) replacing warm-up + cosine when set: ``"0:0.05,40:1,400:6"`` ramps slowly past the peak,
    ``"0:1,199:1,200:4"`` steps up at step 200. Empty: warm-up + cosine."""
    data_switch_step: int = 0
    """From this step on, training bytes are remapped by a fixed permutation (a data switch; 0: never)."""
    freeze_until: int = 0
    """Gradients of parameters whose name starts with ``freeze_prefix`` are zeroed before this step (0: never)."""
    freeze_prefix: str = "wte"
    """Name prefix of the parameters ``freeze_until`` freezes."""

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ProxyConfig(**self.model)
        if not isinstance(self.model, ProxyConfig):
            raise TypeError(f"TrainConfig(model={self.model!r}): pass a ProxyConfig (or a dict of its fields)")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TrainConfig(lr={self.lr!r}): must be a positive finite number")
        for name in ("steps", "batch_size", "eval_batches", "check_every"):
            v = getattr(self, name)
            if not int_at_least(v, 1):
                raise ValueError(f"TrainConfig({name}={v!r}): must be a positive int")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"TrainConfig(warmup_steps={self.warmup_steps!r}): must be an int >= 0")
        for name in ("weight_decay", "eps", "min_lr"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 <= v < math.inf):
                raise ValueError(f"TrainConfig({name}={v!r}): must be a finite number >= 0")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 <= v < 1):
                raise ValueError(f"TrainConfig({name}={v!r}): must be in [0, 1)")
        if self.clip is not None and not (isinstance(self.clip, (int, float)) and self.clip > 0):
            raise ValueError(f"TrainConfig(clip={self.clip!r}): must be > 0, or None to turn clipping off")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrainConfig(optimizer={self.optimizer!r}): choose from {OPTIMIZERS}")
        for name in ("data_switch_step", "freeze_until"):
            if not int_at_least(getattr(self, name), 0):
                raise ValueError(f"TrainConfig({name}={getattr(self, name)!r}): must be an int >= 0 (0: off)")
        if not isinstance(self.lr_schedule, str):
            raise ValueError(f"TrainConfig(lr_schedule={self.lr_schedule!r}): must be a string "
                             "'step:factor,...' (e.g. '0:0.05,40:1,400:6'), or '' for warm-up + cosine")
        if self.lr_schedule:
            lr_knots(self.lr_schedule)
        if not isinstance(self.freeze_prefix, str):
            raise ValueError(f"TrainConfig(freeze_prefix={self.freeze_prefix!r}): must be a parameter-name "
                             "prefix string, e.g. 'wte' or 'blocks.0.'")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lr_knots(text: str) -> list[tuple[int, float]]:
    """Parse ``TrainConfig.lr_schedule`` (``"step:factor,..."``, steps increasing, factors >= 0)."""
    knots = []
    try:
        for part in text.split(","):
            step, factor = part.split(":")
            knots.append((int(step), float(factor)))
    except ValueError:
        raise ValueError(f"TrainConfig(lr_schedule={text!r}): use 'step:factor,step:factor,...' "
                         "(e.g. '0:0.05,40:1,400:6')") from None
    steps = [k[0] for k in knots]
    if steps != sorted(steps) or len(set(steps)) != len(steps) or any(f < 0 or not math.isfinite(f) for _, f in knots):
        raise ValueError(f"TrainConfig(lr_schedule={text!r}): steps must increase and factors be finite and >= 0")
    return knots


def lr_knots_factor(step: int, knots: list[tuple[int, float]]) -> float:
    """LR factor at ``step``: linear between knots, held before the first and after the last."""
    if step <= knots[0][0]:
        return knots[0][1]
    for (s0, f0), (s1, f1) in zip(knots, knots[1:]):
        if step <= s1:
            return f0 + (f1 - f0) * (step - s0) / (s1 - s0)
    return knots[-1][1]


def build_scheduler(opt: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """The LR schedule ``train_one`` uses for ``config`` (any trainer of a TrainConfig should call it):
    ``lr_schedule`` knots when set, else warm-up + cosine down to ``min_lr``."""
    if config.lr_schedule:
        knots = lr_knots(config.lr_schedule)
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_knots_factor(s, knots))
    return warmup_cosine(opt, config.warmup_steps, config.steps, floor=min(1.0, config.min_lr / config.lr))


#: Fixed byte permutation of the data switch (``TrainConfig.data_switch_step``).
_SWITCH_PERM = torch.randperm(256, generator=torch.Generator().manual_seed(20231))


@dataclass
class RunResult:
    """What one run did."""

    final_loss: float
    init_loss: float
    diverged: bool
    steps_done: int
    status: str
    n_params: int
    wall_time: float
    train_loss: list[float] = field(default_factory=list)
    history: pd.DataFrame | None = None
    error: str = ""

    def to_row(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in
                ("final_loss", "init_loss", "diverged", "steps_done", "status", "n_params", "wall_time", "error")}


def build_optimizer(model: ProxyTransformer, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Parameter groups (decay on matrices only; muP LR scaling on hidden matrices) and the optimizer."""
    width_mult = model.cfg.mup_base_width / model.cfg.d_model if cfg.mup_lr_scaling else 1.0
    # Independent decay through AdamW: group wd = wd / peak_lr, so lr_t * wd_group = wd * schedule(t).
    groups: dict[tuple[bool, bool], list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        decay = p.dim() >= 2
        hidden = decay and not name.startswith(("wte", "wpe"))
        groups.setdefault((decay, hidden), []).append(p)
    param_groups = []
    for (decay, hidden), params in groups.items():
        lr = cfg.lr * (width_mult if hidden else 1.0)
        wd = cfg.weight_decay if decay else 0.0
        if cfg.independent_wd and wd:
            wd = wd / lr
        param_groups.append({"params": params, "lr": lr, "weight_decay": wd})
    if cfg.optimizer == "adam_atan2":
        from stabilitylab.mitigations.optimizers import AdamAtan2

        return AdamAtan2(param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


@torch.no_grad()
def evaluate(model: ProxyTransformer, data: ByteData, cfg: TrainConfig) -> float:
    """Mean held-out cross-entropy (no z-loss) over ``cfg.eval_batches`` fixed batches (same batches for every call)."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(cfg.seed + 7919)
    total = torch.zeros((), device=cfg.device)
    for _ in range(cfg.eval_batches):
        x, y = data.batch("val", cfg.batch_size, g, cfg.device)
        logits, _ = model(x)
        total += torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    model.train(was_training)
    return float(total) / cfg.eval_batches


MonitorArg = None | dict | Callable[[torch.nn.Module, torch.optim.Optimizer], Any]


def _make_monitor(monitor: MonitorArg, model, opt, cfg: TrainConfig):
    if monitor is None:
        return None
    if isinstance(monitor, dict):
        from stabilitylab.monitor import Monitor

        return Monitor(model, optimizer=opt, config={"lr": cfg.lr}, **monitor)
    if callable(monitor):
        return monitor(model, opt)
    raise TypeError("train_one(monitor=...): pass None, a dict of Monitor arguments, or fn(model, optimizer) -> Monitor")


def train_one(config: TrainConfig, monitor: MonitorArg = None, progress: bool = False) -> RunResult:
    """Train the proxy once; never raises for divergence (NaN/Inf is a result, not an error).

    Args:
        config: the run.
        monitor: None, a dict of ``Monitor`` keyword arguments, or ``fn(model, optimizer) -> Monitor``;
            the monitor is closed at the end and its history returned in the result.
        progress: show a per-run tqdm bar.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train_one(config=...): expected a TrainConfig, got {type(config).__name__}")
    t0 = time.time()
    torch.manual_seed(config.seed)
    data = ByteData(config.model.seq_len, config.data_path)
    model = ProxyTransformer(config.model).to(config.device)
    opt = build_optimizer(model, config)
    sched = build_scheduler(opt, config)
    frozen = [p for n, p in model.named_parameters() if n.startswith(config.freeze_prefix)] \
        if config.freeze_until else []
    init_loss = evaluate(model, data, config)
    mon = _make_monitor(monitor, model, opt, config)
    gen = torch.Generator().manual_seed(config.seed)
    losses: list[torch.Tensor] = []
    diverged = False
    steps_done = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, desc=f"lr={config.lr:.2g}", leave=False)
    try:
        for step in range(config.steps):
            x, y = data.batch("train", config.batch_size, gen, config.device)
            if config.data_switch_step and step >= config.data_switch_step:
                perm = _SWITCH_PERM.to(x.device)
                x, y = perm[x], perm[y]
            _, loss = model(x, y)
            loss.backward()
            if step < config.freeze_until:
                for p in frozen:
                    p.grad = torch.zeros_like(p)
            if config.clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if mon is not None:
                mon.step(loss)
            losses.append(loss.detach())
            steps_done = step + 1
            if bar is not None:
                bar.update(1)
            if step % config.check_every == 0 or step == config.steps - 1:
                if not math.isfinite(float(loss.detach())):  # one host sync every check_every steps
                    diverged = True
                    break
    finally:
        if bar is not None:
            bar.close()
        if mon is not None:
            mon.close()
    final = evaluate(model, data, config) if not diverged else float("nan")
    if not math.isfinite(final) or final > init_loss:
        diverged = True
    train_loss = torch.stack(losses).float().cpu().tolist() if losses else []
    return RunResult(
        final_loss=final, init_loss=init_loss, diverged=diverged, steps_done=steps_done,
        status="diverged" if diverged else "ok", n_params=model.n_params(), wall_time=time.time() - t0,
        train_loss=train_loss, history=mon.history() if mon is not None else None,
    )
