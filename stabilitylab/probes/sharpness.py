"""Preconditioned sharpness: the top eigenvalue of Adam's P^-1 H, and the edge-of-stability threshold.

Metrics (whole model, module ""):

- ``sharpness.preconditioned``  lambda_max of ``P^-1 H`` with ``P = diag(sqrt(v_hat) + eps)`` from Adam's
                                state (``v_hat = v / (1 - beta2^t)``) and ``H`` the Hessian of the loss;
                                parameter groups whose LR differs from group 0 are scaled by
                                ``lr_g / lr_0`` so the threshold below stays exact (Cohen et al., 2022)
- ``sharpness.threshold``       ``(2 + 2*beta1) / ((1 - beta1) * lr_0)`` (38/lr for beta1 = 0.9)

``P^-1 H`` is similar to the symmetric ``D H D`` with ``D = P^-1/2``; power iteration runs on ``D H D``
with Hessian-vector products (double backward), ``iters`` at most, stopping when the Rayleigh quotient
changes by less than ``tol`` (relative). The eigenvalue of largest magnitude is reported (signed).

Its extra forward/backward passes run with the model's module hooks removed and attention probes
disarmed, so other probes never see them. The loss comes from ``loss_fn()`` when given (a closure that runs the forward pass and returns the scalar
loss, e.g. on a fixed batch); otherwise the probe replays the model's last forward call on a logged step
(its inputs are kept by a forward pre-hook, with any KV cache replaced by ``None`` and ``use_cache=False``
so the replay never extends a live cache) and takes the loss from the output: a scalar tensor, the
scalar element of a tuple (the proxy's ``(logits, loss)``) or ``output.loss`` (Hugging Face).
It runs on every ``every``-th logged step, after the optimizer step (needs Adam state; skipped before).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from stabilitylab import metrics as M
from stabilitylab._caches import without_caches
from stabilitylab._checks import int_at_least
from stabilitylab.adapters import generic
from stabilitylab.probes.base import Probe
from stabilitylab.probes.optimizer import unwrap_optimizer


def _loss_of(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output if output.numel() == 1 else None
    if isinstance(output, (tuple, list)):
        for o in output:
            if isinstance(o, torch.Tensor) and o.numel() == 1 and o.requires_grad:
                return o
        return None
    loss = getattr(output, "loss", None)
    return loss if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
               "_forward_hooks_always_called")


@contextmanager
def _unobserved(model: torch.nn.Module) -> Iterator[None]:
    """Run extra forward passes unseen by other probes: module hooks off, attention probes disarmed."""
    saved = [(m, name, getattr(m, name)) for m in model.modules() for name in _HOOK_DICTS if getattr(m, name, None)]
    armed = [p for p in generic.ACTIVE if p.armed]
    for m, name, d in saved:
        setattr(m, name, type(d)())
    for p in armed:
        p.armed = False
    try:
        yield
    finally:
        for m, name, d in saved:
            setattr(m, name, d)
        for p in armed:
            p.armed = True


def top_eigenvalue(hvp: Callable[[list[torch.Tensor]], list[torch.Tensor]], like: list[torch.Tensor],
                   iters: int = 20, tol: float = 1e-3, generator: torch.Generator | None = None) -> float:
    """Power iteration: the eigenvalue of largest magnitude of the symmetric operator ``hvp``.

    Args:
        hvp: ``v -> A v`` on lists of tensors shaped like ``like``.
        like: tensors giving the shapes, dtypes and devices of ``v``.
        iters: maximum iterations.
        tol: stop when the Rayleigh quotient changes by less than ``tol * |lambda|``.
        generator: RNG for the start vector (CPU).
    """
    v = [torch.randn(t.shape, generator=generator, dtype=torch.float32).to(t) for t in like]
    norm = torch.sqrt(sum((x * x).sum() for x in v))
    v = [x / norm for x in v]
    lam = 0.0
    for _ in range(iters):
        av = hvp(v)
        new = float(sum((a * x).sum() for a, x in zip(av, v)))
        norm = torch.sqrt(sum((a * a).sum() for a in av))
        if not torch.isfinite(norm) or float(norm) == 0.0:
            return new
        v = [a / norm for a in av]
        if abs(new - lam) <= tol * abs(new):
            return new
        lam = new
    return lam


class SharpnessProbe(Probe):
    """Preconditioned sharpness by power iteration on Hessian-vector products.

    Args:
        loss_fn: closure returning the scalar loss (default: replay the last forward of a logged step).
        every: compute on every ``every``-th logged step (each costs ~``2 * iters`` backward passes).
        iters: power-iteration steps at most.
        tol: relative convergence tolerance of the eigenvalue.
        seed: seed of the start vector.
    """

    name = "sharpness"
    metrics = (M.SHARPNESS_PRECONDITIONED, M.SHARPNESS_THRESHOLD)

    def __init__(self, loss_fn: Callable[[], torch.Tensor] | None = None, every: int = 10, iters: int = 20,
                 tol: float = 1e-3, seed: int = 0):
        super().__init__()
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"SharpnessProbe(loss_fn={loss_fn!r}): pass a callable returning the scalar loss")
        for name, v in (("every", every), ("iters", iters)):
            if not int_at_least(v, 1):
                raise ValueError(f"SharpnessProbe({name}={v!r}): must be an int >= 1")
        self.loss_fn = loss_fn
        self.every = every
        self.iters = iters
        self.tol = tol
        self._gen = torch.Generator().manual_seed(seed)
        self._logged = 0
        self._inputs: tuple[tuple, dict] | None = None

    def _attach(self) -> None:
        if self.optimizer is None:
            raise ValueError("SharpnessProbe: needs the optimizer (Adam state gives P); pass "
                             "Monitor(model, optimizer=opt, probes=[..., SharpnessProbe(...)])")
        self.optimizer = unwrap_optimizer(self.optimizer)
        if self.loss_fn is None:
            self._hook(self.model.register_forward_pre_hook(self._keep_inputs, with_kwargs=True))

    def _detach(self) -> None:
        self._inputs = None

    def _keep_inputs(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if self.armed and torch.is_grad_enabled():
            self._inputs = (args, kwargs)

    def _loss(self) -> torch.Tensor | None:
        if self.loss_fn is not None:
            return self.loss_fn()
        if self._inputs is None:
            self.warn_once("noinput", "no forward call seen on a logged step; pass SharpnessProbe(loss_fn=...)")
            return None
        args, kwargs = without_caches(self.model.forward, *self._inputs)  # never extend a live KV cache
        loss = _loss_of(self.model(*args, **kwargs))
        if loss is None:
            self.warn_once("noloss", "the model's output holds no scalar loss; pass SharpnessProbe(loss_fn=...)")
        return loss

    def _scales(self) -> tuple[list[torch.Tensor], list[torch.Tensor], float, float] | None:
        """Parameters with Adam state, D = sqrt((lr_g/lr_0) / (sqrt(v_hat)+eps)) per parameter, lr_0, beta1."""
        groups = self.optimizer.param_groups
        lr0 = float(groups[0]["lr"])
        beta1 = float(groups[0].get("betas", (0.9, 0.999))[0])
        params, scales = [], []
        for g in groups:
            beta2 = g.get("betas", (0.9, 0.999))[1]
            eps = g.get("eps", 1e-8)
            for p in g["params"]:
                st = self.optimizer.state.get(p)
                if not p.requires_grad or not st or "exp_avg_sq" not in st:
                    continue
                step = st.get("step", 1)
                step = float(step) if isinstance(step, (int, float)) else float(step.item())
                v_hat = st["exp_avg_sq"].detach() / (1 - beta2**step)
                params.append(p)
                scales.append(torch.sqrt((float(g["lr"]) / lr0) / (v_hat.sqrt() + eps)))
        return (params, scales, lr0, beta1) if params else None

    def _before_collect(self) -> None:
        self._logged += 1
        if (self._logged - 1) % self.every:
            return
        found = self._scales()
        if found is None:
            return
        params, scales, lr0, beta1 = found
        lam = self.preconditioned_sharpness(params, scales)
        if lam is None:
            return
        self.record_value(M.SHARPNESS_PRECONDITIONED, "", lam)
        self.record_value(M.SHARPNESS_THRESHOLD, "", (2 + 2 * beta1) / ((1 - beta1) * lr0))

    def preconditioned_sharpness(self, params: list[torch.Tensor], scales: list[torch.Tensor]) -> float | None:
        """Top eigenvalue of ``D H D`` (= that of ``D^2 H``) for the current loss; None without a loss."""
        # the math SDPA kernel is the one with a double backward (fused kernels lack it)
        with torch.enable_grad(), _unobserved(self.model), sdpa_kernel(SDPBackend.MATH):
            loss = self._loss()
            if loss is None:
                return None
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            pairs = [(p, g, d) for p, g, d in zip(params, grads, scales) if g is not None]
            if not pairs:
                return None
            ps, gs, ds = zip(*pairs)

            def hvp(v: list[torch.Tensor]) -> list[torch.Tensor]:
                dv = [d * x for d, x in zip(ds, v)]
                hv = torch.autograd.grad(gs, ps, grad_outputs=dv, retain_graph=True)
                return [d * h.detach() for d, h in zip(ds, hv)]

            return top_eigenvalue(hvp, list(ps), self.iters, self.tol, self._gen)
