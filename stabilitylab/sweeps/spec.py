"""``SweepSpec``: a grid of learning rate x model size x mitigation variant x seed, plus fixed settings.

    spec = SweepSpec(name="lr_sweep", lrs={"log_range": [1e-3, 1e-1, 5]}, sizes=["xs", "s"],
                     variants=["baseline", "qk_layernorm"], seeds=[0, 1], steps=300)
    for p in spec.points():          # one Point per grid cell, in grid order
        p.run_id, p.config           # stable id, the TrainConfig it trains

The same spec as TOML (``SweepSpec.from_toml(path)``; ``spec.to_toml()`` writes it)::

    name = "lr_sweep"
    lrs = { log_range = [1e-3, 1e-1, 5] }          # or a list: [1e-3, 3e-3, 1e-2]
    sizes = ["xs", { d_model = 16, n_layers = 1, head_dim = 8, name = "tiny" }]
    variants = ["baseline", "qk_layernorm", { name = "eps1e-15", eps = 1e-15 }]
    seeds = [0, 1]
    steps = 300
    [train]                                         # extra TrainConfig fields for every point
    optimizer = "adamw"

The spec holds one base ``TrainConfig`` (``base``; default ``TrainConfig()``): ``steps``, ``batch_size``,
``seq_len``, ``warmup_steps``, ``weight_decay``, ``eps``, ``data_path``, ``device`` are aliases for its
fields and ``model`` / ``train`` (the TOML ``[model]`` / ``[train]`` tables) hold its other non-default
fields. The one rule kept from before the base existed: without ``base`` and ``warmup_steps``, warm-up is
``max(1, steps // 10)``. A point's config is built in this order, later wins: the base (itself, then
``train`` / ``model``, then the aliases), the size, the variant, then ``lr`` and ``seed``.
Its ``run_id`` is the first 16 hex digits of the SHA-256 of the canonical JSON (sorted keys) of
``{size, variant, every, probes, config}``, so it is the same in every process and on every machine.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from stabilitylab._checks import int_at_least
from stabilitylab.mitigations.bundles import BUNDLES, bundle
from stabilitylab.proxy.model import ProxyConfig
from stabilitylab.proxy.presets import PRESETS
from stabilitylab.proxy.train import TrainConfig

_PROXY_FIELDS = frozenset(f.name for f in fields(ProxyConfig))
_TRAIN_FIELDS = frozenset(f.name for f in fields(TrainConfig)) - {"model", "lr", "seed"}
_SIZE_KEYS = ("d_model", "n_layers", "head_dim")
#: TrainConfig fields the spec has aliases for (so ``train = {...}`` may not repeat them).
_FIXED_TRAIN = ("steps", "batch_size", "warmup_steps", "weight_decay", "eps", "data_path", "device")
_TRAIN_DEFAULTS = {k: v for k, v in asdict(TrainConfig()).items() if k != "model"}
_MODEL_DEFAULTS = asdict(ProxyConfig())


@dataclass(frozen=True)
class Point:
    """One grid cell: its labels, its stable id and the ``TrainConfig`` it trains."""

    run_id: str
    lr: float
    size: str
    variant: str
    seed: int
    config: TrainConfig
    every: int
    probes: str | tuple[str, ...]

    def row(self) -> dict[str, Any]:
        """Labels and every config field as flat columns (model fields unprefixed; they never clash)."""
        train = {k: v for k, v in asdict(self.config).items() if k not in ("model", "lr", "seed")}
        return {"run_id": self.run_id, "lr": self.lr, "size": self.size, "variant": self.variant,
                "seed": self.seed, **self.config.model.to_dict(), **train, "every": self.every}


#: TrainConfig fields added after run ids were first published: left out of the hashed config while they
#: hold their defaults, so stores written before they existed keep their run ids (and resume).
_ID_OPTIONAL_FIELDS = ("lr_schedule", "data_switch_step", "freeze_until", "freeze_prefix")


def _id_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config as hashed into a run id (see ``_ID_OPTIONAL_FIELDS``)."""
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.name in _ID_OPTIONAL_FIELDS}
    return {k: v for k, v in config.items() if k not in defaults or v != defaults[k]}


def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no spaces): the text run ids are hashed from."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _err(argument: str, value: Any, problem: str) -> ValueError:
    return ValueError(f"SweepSpec({argument}={value!r}): {problem}")


def _as_list(argument: str, value: Any) -> list:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise _err(argument, value, "expected a list")
    if not value:
        raise _err(argument, value, f"empty grid; give at least one entry in {argument}")
    return list(value)


def _parse_lrs(lrs: Any) -> tuple[float, ...]:
    if isinstance(lrs, Mapping):
        rng = lrs.get("log_range")
        ok = (set(lrs) == {"log_range"} and isinstance(rng, Sequence) and len(rng) == 3
              and isinstance(rng[2], int) and not isinstance(rng[2], bool))
        if not ok:
            raise _err("lrs", lrs, "use a list of learning rates or {'log_range': [lo, hi, n]} with an int n")
        lo, hi, n = rng
        if n < 1:
            raise _err("lrs", lrs, "empty grid; log_range needs n >= 1 points")
        for v in (lo, hi):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise _err("lrs", lrs, f"log_range bound {v!r} must be a positive finite number")
        return tuple(float(x) for x in np.geomspace(lo, hi, n))
    out = []
    for i, v in enumerate(_as_list("lrs", lrs)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
            raise _err("lrs", lrs, f"entry {i} ({v!r}) is not a number")
        if not (math.isfinite(v) and v > 0):
            raise _err("lrs", lrs, f"learning rate {v!r} at position {i} must be positive and finite")
        out.append(float(v))
    return tuple(out)


def _size(entry: Any) -> tuple[str, dict[str, Any]]:
    """(label, ProxyConfig overrides) of one entry of ``sizes``."""
    if isinstance(entry, str):
        if entry not in PRESETS:
            raise _err("sizes", entry, f"unknown preset; presets: {', '.join(PRESETS)}, "
                                       "or a dict {d_model, n_layers, head_dim}")
        return entry, dict(PRESETS[entry])
    if not isinstance(entry, Mapping):
        raise _err("sizes", entry, "each size is a preset name or a dict {d_model, n_layers, head_dim}")
    d = dict(entry)
    name = d.pop("name", None)
    missing = [k for k in _SIZE_KEYS if k not in d]
    unknown = sorted(set(d) - _PROXY_FIELDS)
    if missing or unknown:
        raise _err("sizes", entry, f"missing keys {missing} / unknown keys {unknown}; a size dict needs "
                                   "d_model, n_layers, head_dim and may add 'name' and other ProxyConfig fields")
    return (name if name is not None else f"d{d['d_model']}_L{d['n_layers']}_h{d['head_dim']}"), d


def _variant(entry: Any) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(label, model overrides, train overrides) of one entry of ``variants``."""
    if isinstance(entry, str):
        if entry not in BUNDLES:
            raise _err("variants", entry, f"unknown variant; bundles: {', '.join(BUNDLES)}, "
                                          "or a dict of ProxyConfig/TrainConfig overrides")
        b = bundle(entry)
        return entry, b["model"], b["train"]
    if not isinstance(entry, Mapping):
        raise _err("variants", entry, "each variant is a bundle name or a dict of config overrides")
    d = dict(entry)
    name, base = d.pop("name", None), d.pop("bundle", None)
    nested = [d.pop(k) for k in ("model", "train") if isinstance(d.get(k), Mapping)]  # bundle-shaped form
    for sub in nested:
        d.update(sub)
    unknown = sorted(set(d) - _PROXY_FIELDS - _TRAIN_FIELDS)
    if unknown:
        raise _err("variants", entry, f"unknown keys {unknown}; use 'name', 'bundle' and ProxyConfig/"
                                      "TrainConfig fields, flat or as {'model': {...}, 'train': {...}} "
                                      "(lr and seed are grid axes)")
    if base is not None:
        label, model, train = _variant(base)
    else:
        label, model, train = "baseline", {}, {}
    model.update({k: v for k, v in d.items() if k in _PROXY_FIELDS})
    train.update({k: v for k, v in d.items() if k in _TRAIN_FIELDS})
    if name is None:
        name = ",".join([label] * (base is not None or not d) + [f"{k}={d[k]}" for k in sorted(d)])
    return str(name), model, train


def _unique_labels(argument: str, labels: list[str], values: list) -> None:
    seen: dict[str, Any] = {}
    for label, v in zip(labels, values):
        if label in seen:
            raise _err(argument, v, f"label {label!r} is used twice (same entry twice, or two entries with "
                                    "one name); give each entry a distinct 'name' or remove the repeat")
        seen[label] = v


@dataclass(frozen=True, kw_only=True)
class SweepSpec:
    """A learning-rate x size x variant x seed grid on the proxy (or a user ``train_fn``), validated on creation.

    Every field is checked in ``__post_init__`` and every point's ``TrainConfig`` is built there, so a bad
    spec fails at once with one message naming the field. Lists are stored as tuples.
    """

    name: str = "sweep"
    """Name of the study (letters, digits, ``_ . -``); the default store is ``runs/<name>``."""
    lrs: Any
    """Peak learning rates: a list, or ``{"log_range": [lo, hi, n]}`` (n log-spaced values, ends included)."""
    sizes: Any = ("xs",)
    """Preset names (``stabilitylab.proxy.PRESETS``) and/or dicts ``{d_model, n_layers, head_dim[, name]}``."""
    variants: Any = ("baseline",)
    """Bundle names (``mitigations.bundles.BUNDLES``) and/or dicts of overrides: ProxyConfig or TrainConfig
    fields (flat, or nested as ``{"model": {...}, "train": {...}}`` like a bundle), plus optional
    ``name`` (label) and ``bundle`` (a bundle to start from)."""
    seeds: Any = (0,)
    """Seeds (init and data order); each is a grid axis."""
    base: Any = None
    """The ``TrainConfig`` every point starts from (or a dict of its fields, ``model`` a dict of ProxyConfig
    fields); None: ``TrainConfig()``. Its ``lr`` and ``seed`` and its model's size fields are set per point.
    After creation it holds the resolved base (the fields below, ``model`` and ``train`` applied)."""
    steps: int | None = None
    """Alias for ``base.steps`` (None: the base's). Without a ``base`` and a ``warmup_steps``, warm-up is
    ``max(1, steps // 10)``, as before the base existed (30 = TrainConfig's default at 300 steps)."""
    batch_size: int | None = None
    """Alias for ``base.batch_size``."""
    seq_len: int | None = None
    """Alias for ``base.model.seq_len``."""
    warmup_steps: int | None = None
    """Alias for ``base.warmup_steps`` (see ``steps`` for the default)."""
    weight_decay: float | None = None
    """Alias for ``base.weight_decay``."""
    eps: float | None = None
    """Alias for ``base.eps``."""
    every: int = 10
    """Monitor logging interval in steps."""
    probes: Any = "default"
    """Monitor probes: ``"default"`` or a list of probe names."""
    data_path: str | None = None
    """Alias for ``base.data_path`` (the proxy's byte data; None: the base's)."""
    device: str | None = None
    """Alias for ``base.device``."""
    model: Mapping[str, Any] = field(default_factory=dict)
    """Extra ``ProxyConfig`` fields for every point (not the size fields or seq_len). After creation: the
    base model's fields that differ from ``ProxyConfig``'s defaults."""
    train: Mapping[str, Any] = field(default_factory=dict)
    """Extra ``TrainConfig`` fields for every point (not lr, seed or the aliases above). After creation: the
    base's other fields that differ from ``TrainConfig``'s defaults (so the TOML ``[train]`` table and the
    aliases describe the base)."""

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if not (isinstance(self.name, str) and re.fullmatch(r"[A-Za-z0-9_.-]+", self.name)):
            raise _err("name", self.name, "use a non-empty name of letters, digits, '_', '.', '-'")
        set_(self, "lrs", _parse_lrs(self.lrs))
        sizes = [_size(s) for s in _as_list("sizes", self.sizes)]
        variants = [_variant(v) for v in _as_list("variants", self.variants)]
        seeds = _as_list("seeds", self.seeds)
        for s in seeds:
            if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0:
                raise _err("seeds", self.seeds, f"seed {s!r} must be an int >= 0")
        set_(self, "seeds", tuple(int(s) for s in seeds))
        set_(self, "sizes", tuple(dict(s) if isinstance(s, Mapping) else s for s in self.sizes))
        set_(self, "variants", tuple(dict(v) if isinstance(v, Mapping) else v for v in self.variants))
        _unique_labels("sizes", [s[0] for s in sizes], list(self.sizes))
        _unique_labels("variants", [v[0] for v in variants], list(self.variants))
        if not int_at_least(self.every, 1):
            raise _err("every", self.every, "the monitor interval must be an int >= 1")
        self._check_probes()
        for arg, allowed in (("model", _PROXY_FIELDS - {*_SIZE_KEYS, "seq_len"}),
                             ("train", _TRAIN_FIELDS - set(_FIXED_TRAIN))):
            value = getattr(self, arg)
            if not isinstance(value, Mapping) or set(value) - allowed:
                raise _err(arg, value, f"unknown or reserved keys {sorted(set(value) - allowed)}; allowed: "
                                       f"{', '.join(sorted(allowed))} (sizes, lrs, seeds and fixed settings "
                                       "have their own fields)")
            set_(self, arg, dict(value))
        self._resolve_base()
        set_(self, "_points", self._build(sizes, variants))

    def _resolve_base(self) -> None:
        """Build ``base`` from itself, ``model``, ``train`` and the aliases; then store every one of them in
        its canonical form (aliases = the base's values, ``model``/``train`` = non-default fields)."""
        set_ = object.__setattr__
        base = self.base
        if isinstance(base, TrainConfig):
            base = asdict(base)
        elif base is None:
            base = {}
        elif not isinstance(base, Mapping):
            raise _err("base", self.base, "pass a TrainConfig, a dict of its fields, or None (TrainConfig())")
        train = {k: v for k, v in base.items() if k not in ("model", "lr", "seed")}
        model = {k: v for k, v in dict(base.get("model") or {}).items() if k not in _SIZE_KEYS}
        aliases = {a: getattr(self, a) for a in _FIXED_TRAIN if getattr(self, a) is not None}
        train.update({**self.train, **aliases})
        model.update(self.model)
        if self.seq_len is not None:
            model["seq_len"] = self.seq_len
        if self.base is None and "warmup_steps" not in train:
            steps = train.get("steps", _TRAIN_DEFAULTS["steps"])
            train["warmup_steps"] = max(1, steps // 10) if int_at_least(steps, 1) else steps
        try:
            resolved = TrainConfig(**train, model=ProxyConfig(**model))
        except (TypeError, ValueError) as e:
            raise ValueError(f"SweepSpec: bad base config: {e}") from None
        full = asdict(resolved)
        full_model = full.pop("model")
        for a in _FIXED_TRAIN:
            set_(self, a, full[a])
        set_(self, "seq_len", full_model["seq_len"])
        set_(self, "train", {k: v for k, v in full.items()
                             if k not in (*_FIXED_TRAIN, "lr", "seed") and v != _TRAIN_DEFAULTS[k]})
        set_(self, "model", {k: v for k, v in full_model.items()
                             if k not in (*_SIZE_KEYS, "seq_len") and v != _MODEL_DEFAULTS[k]})
        size_defaults = {k: _MODEL_DEFAULTS[k] for k in _SIZE_KEYS}
        set_(self, "base", TrainConfig(**{**full, "lr": _TRAIN_DEFAULTS["lr"], "seed": _TRAIN_DEFAULTS["seed"]},
                                       model=ProxyConfig(**{**full_model, **size_defaults})))

    def _check_probes(self) -> None:
        from stabilitylab.probes import REGISTRY, register_optional_probes

        if self.probes == "default":
            return
        register_optional_probes()
        if isinstance(self.probes, str) or not isinstance(self.probes, Sequence) or not self.probes or \
                any(p not in REGISTRY for p in self.probes):
            raise _err("probes", self.probes, f"use 'default' or a list of probe names from {sorted(REGISTRY)}")
        object.__setattr__(self, "probes", tuple(self.probes))

    def _build(self, sizes, variants) -> tuple[Point, ...]:
        base = asdict(self.base)
        base_model = base.pop("model")
        points, by_config = [], {}
        for size, size_kw in sizes:
            for variant, v_model, v_train in variants:
                for lr in self.lrs:
                    for seed in self.seeds:
                        where = f"size={size!r}, variant={variant!r}, lr={lr:g}, seed={seed}"
                        try:
                            model = ProxyConfig(**{**base_model, **size_kw, **v_model})
                            cfg = TrainConfig(**{**base, **v_train, "lr": lr, "seed": seed}, model=model)
                        except (TypeError, ValueError) as e:
                            raise ValueError(f"SweepSpec: point ({where}) has a bad config: {e}") from None
                        cfg_json = canonical_json(asdict(cfg))
                        if cfg_json in by_config:
                            raise ValueError(f"SweepSpec: duplicate points: ({where}) trains exactly the same "
                                             f"config as ({by_config[cfg_json]}); remove one of them")
                        by_config[cfg_json] = where
                        key = {"size": size, "variant": variant, "every": self.every,
                               "probes": list(self.probes) if not isinstance(self.probes, str) else self.probes,
                               "config": _id_config(json.loads(cfg_json))}
                        rid = hashlib.sha256(canonical_json(key).encode()).hexdigest()[:16]
                        points.append(Point(rid, lr, size, variant, seed, cfg, self.every, self.probes))
        return tuple(points)

    def points(self) -> list[Point]:
        """Every grid point in order size, variant, lr, seed (outermost first)."""
        return list(self._points)

    def __len__(self) -> int:
        return len(self._points)

    def __hash__(self) -> int:
        return hash(canonical_json(self.to_dict()))

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (lists, not tuples); ``SweepSpec.from_dict(spec.to_dict()) == spec``."""
        return json.loads(json.dumps({f.name: getattr(self, f.name) for f in fields(self) if f.name != "base"}))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SweepSpec:
        """Build from a dict of field values (as read from TOML or JSON)."""
        if not isinstance(d, Mapping):
            raise TypeError(f"SweepSpec.from_dict: expected a mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"SweepSpec: unknown keys {unknown}; known: {', '.join(f.name for f in fields(cls))}")
        if "lrs" not in d:
            raise ValueError("SweepSpec: 'lrs' is required (a list, or {log_range = [lo, hi, n]})")
        return cls(**d)

    @classmethod
    def from_toml(cls, path: str | Path) -> SweepSpec:
        """Read a spec from a TOML file (see the module docstring for the format)."""
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"SweepSpec.from_toml: no such file {str(p)!r}")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"SweepSpec.from_toml({str(p)!r}): not valid TOML ({e})") from None
        return cls.from_dict(data)

    def to_toml(self, path: str | Path | None = None) -> str:
        """The spec as TOML text (written to ``path`` if given). Fields left at None are omitted."""
        d = self.to_dict()
        tables = {k: d.pop(k) for k in ("model", "train")}
        lines = [f"{k} = {_toml_value(v, k)}" for k, v in d.items() if v is not None]
        for k, t in tables.items():
            if t:
                lines += ["", f"[{k}]"] + [f"{_toml_key(a)} = {_toml_value(v, f'{k}.{a}')}" for a, v in t.items()]
        text = "\n".join(lines) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def _toml_value(v: Any, where: str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)  # Python's repr of floats (incl. nan, inf) is valid TOML
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x, where) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x, f'{where}.{k}')}" for k, x in v.items()) + " }"
    raise ValueError(f"SweepSpec.to_toml: {where} = {v!r} has no TOML form (TOML has no null); "
                     "drop the key or save the spec with to_dict() / JSON")
