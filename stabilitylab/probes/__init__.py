"""Probes: one file per signal family, all following ``probes.base.Probe``."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from stabilitylab.probes.activations import ActivationProbe
from stabilitylab.probes.attention import AttentionProbe, UnsupportedModelError
from stabilitylab.probes.base import Block, Event, Probe
from stabilitylab.probes.health import HealthProbe
from stabilitylab.probes.logits import LogitsProbe
from stabilitylab.probes.optimizer import OptimizerProbe

#: name -> factory used by ``Monitor(probes=[...names...])``.
REGISTRY: dict[str, type[Probe]] = {
    "optimizer": OptimizerProbe,
    "logits": LogitsProbe,
    "activations": ActivationProbe,
    "attention": AttentionProbe,
    "health": HealthProbe,
}

DEFAULT = ("optimizer", "logits", "activations", "attention", "health")


def register_probe(name: str, cls: type[Probe]) -> None:
    """Make a probe class available by name in ``Monitor(probes=[...])``."""
    if not (isinstance(cls, type) and issubclass(cls, Probe)):
        raise TypeError(f"register_probe: {cls!r} is not a Probe subclass")
    REGISTRY[name] = cls


def register_optional_probes() -> None:
    """Add the probes whose imports are optional or heavy (``sharpness``) to ``REGISTRY`` when importable."""
    if "sharpness" not in REGISTRY:
        try:
            from stabilitylab.probes.sharpness import SharpnessProbe
        except ImportError:
            return
        REGISTRY["sharpness"] = SharpnessProbe


def build_probes(spec, optimizer_given: bool) -> list[Probe]:
    """Turn ``"default"``, a list of names and/or Probe objects into probe objects."""
    register_optional_probes()
    if isinstance(spec, str):
        if spec != "default":
            raise ValueError(f"probes={spec!r}: pass 'default' or a list of probe names/objects "
                             f"(known names: {', '.join(sorted(REGISTRY))})")
        names = [n for n in DEFAULT if optimizer_given or n != "optimizer"]
        return [AttentionProbe(required=False) if n == "attention" else REGISTRY[n]() for n in names]
    if not isinstance(spec, (list, tuple)):
        raise TypeError(f"probes: expected 'default' or a list of probe names/objects, got {type(spec).__name__}")
    out: list[Probe] = []
    for item in spec:
        if isinstance(item, Probe):
            out.append(item)
        elif isinstance(item, str):
            if item not in REGISTRY:
                raise ValueError(f"probes: unknown probe name {item!r}; known: {', '.join(sorted(REGISTRY))}")
            if item == "optimizer" and not optimizer_given:
                raise ValueError("probes: 'optimizer' needs Monitor(..., optimizer=opt)")
            out.append(REGISTRY[item]())
        else:
            raise TypeError(f"probes: {item!r} is neither a probe name nor a Probe object")
    return out


def attach_probes(spec, model: torch.nn.Module, optimizer: Any, run_id: str) -> list[Probe]:
    """``build_probes(spec)`` attached to ``model`` / ``optimizer``, all or none.

    A probe whose ``attach`` raises detaches the ones attached before it and the error propagates (a
    failed Monitor leaves no hooks behind); a probe with nothing to observe (``Probe.unused``) is
    detached and dropped with one warning.
    """
    attached: list[Probe] = []
    for p in build_probes(spec, optimizer is not None):
        p.run_id = run_id
        try:
            p.attach(model, optimizer)
        except Exception:
            for q in attached:
                q.detach()
            raise
        why = p.unused()
        if why:
            warnings.warn(f"stabilitylab: {why}", stacklevel=3)
            p.detach()
            continue
        attached.append(p)
    return attached


__all__ = ["ActivationProbe", "AttentionProbe", "Block", "DEFAULT", "Event", "HealthProbe", "LogitsProbe",
           "OptimizerProbe", "Probe", "REGISTRY", "UnsupportedModelError", "attach_probes", "build_probes",
           "register_probe"]
