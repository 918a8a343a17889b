"""The warnings benchmark: real runs that break after warm-up, and the early warning measured on them.

    stabilitylab warnings build --scale quick --out runs/warnings_quick     # CPU, minutes
    stabilitylab warnings evaluate runs/warnings_quick                      # the table of issue 17
    stabilitylab warnings check runs/my_store --margins 1.5 2               # the shipped defaults, as they are

``build`` trains every run of a versioned definition (``BENCHMARK_VERSION``) into ordinary sweep stores
under ``--out`` (``proxy/`` for the built-in proxy, ``hf_gpt2/`` for a Hugging Face GPT-2 built from a
config and trained by ``train_hf_gpt2``, the sweeps' ``train_fn`` path for user models), then labels
each run from its training loss alone (``stabilitylab.detectors.label_outcome``) and writes
``benchmark.json`` (version, scale, mechanisms, outcome definition, composition, wall time) and
``outcomes.parquet``. Every mechanism has unstable configurations and two stable-by-design controls with
the same schedule (a low LR and one nearer the edge; a control that diverges anyway is labelled diverged:
labels come from the loss, never from the role); the Monitor records at ``every=1`` (probes ``attention``, ``logits``, ``optimizer``), so
``every=10`` is evaluated on the same histories subsampled to steps ``% 10 == 0`` (what a Monitor with
``every=10`` logs, since probes never change training).

Mechanisms (quick scale: a 2-layer proxy of width 32, byte-level text, 450 steps, 6 seeds):

- ``attn_logit_growth``: no qk-layernorm, LR raised slowly (linear ramp over ~420 steps) past the critical
  LR; clipping on.
- ``logit_drift``: no z-loss, no weight decay, no clipping, the same slow ramp (output-logit log Z drift).
- ``adam_stale``: beta2 0.999 (a second moment that adapts over ~1000 steps), the second block frozen for
  150 steps then unfrozen (its v starts from 0), no clipping, the slow ramp.
- ``lr_stepup``: abrupt LR step-ups (x2 at 1/3, x4 at 5/9, x8 at 7/9 of the run) after a stable phase.
- ``lr_spike``: one abrupt LR spike (x18 for 10 steps at 4/9 of the run); runs recover from it or not
  (the source of ``spiked_recovered`` runs; the jump itself cannot be forecast before it happens).
- ``hf_gpt2``: a Hugging Face GPT-2 (``GPT2LMHeadModel`` from a config) under the slow ramp, clipping on.

``evaluate`` calibrates the detector (``stabilitylab.detectors``) on some runs and measures it on others
(``splits``): each seed held out in turn (calibrate on the other seeds of every mechanism), each mechanism
held out in turn (calibrate on the others), and each mechanism and seed held out with the mechanism's own
lowest-LR stable runs on the other seeds added to the calibration (what recalibrating on your own model buys).
The detector's settings (``margin``, ``min_metrics``, ``persist``) are either fixed (``settings_from``: the
reported results take the ones a development build on seeds 10-12 chose) or picked from a small grid by
leave-one-mechanism-out *inside* each split's calibration runs, so the tested runs never choose anything.
The last ``CENSOR`` (100) steps of runs that did not diverge are neither judged nor used for thresholds
(``horizon``). A divergence is *reachable* when no abrupt change of the schedule (``abrupt_changes``: an LR
jump, a block unfrozen, a data switch) came in the 50 steps before it: only then can the run's own signals
give a 50-step lead. ``build --seeds`` trains the same definition on other seeds: the structural defaults
(window, ``min_points``, ``sustain``, ``accel``, the grid, the fixed settings) were chosen on such a
development build (seeds 10-12), never on the reported seeds. Two were chosen with models outside the
benchmark in view (``benchmarks/warnings_external.py``), so those models are not held out: ``lag_points``
(at ``every=10`` most of their stable runs' warnings came at steps 100-110, from an acceleration gate
against 2-4 point slopes; it costs the benchmark's ``every=10`` result the warnings it gave at those steps)
and leaving ``logits.max`` out of ``DEFAULT_WATCH`` (fewer stable runs warned on the development build, the
benchmark and those models, the same divergences warned).

Version 2 (this one) differs from v1 in its LRs (unstable runs diverge later, median step ~277, so leads of
100+ steps are possible) and in the second control per mechanism. Its quick scale trains 6 seeds (144 runs;
it trained seeds 0-2, 72 runs, when v2 was introduced: those runs are unchanged), because with 3 seeds one
held-out seed's result moved by 10-20 points per mechanism between builds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from stabilitylab import detectors as D
from stabilitylab import metrics as M
from stabilitylab._checks import int_at_least
from stabilitylab.analysis.early_warning import logged_interval, run_steps

BENCHMARK_VERSION = "2"
PROBES = ("attention", "logits", "optimizer")
#: Outcome definition (``label_outcome`` arguments) used by build and evaluate.
OUTCOME_DEFINITION: dict[str, float] = {"span": 20, "rise": 0.5, "recover": 0.25, "patience": 100}
#: Grid the held-out evaluation chooses the detector's settings from (on calibration runs only).
GRID: tuple[dict[str, Any], ...] = tuple({"margin": m, "min_metrics": k, "persist": p}
                                        for m in (1.0, 1.25, 1.5, 2.0) for k in (1, 2) for p in (0, 10))
EVERIES = (1, 10)
#: Issue-17 goals of the held-out table: metric -> (comparison, value).
GOALS = {"warned_50_share": (">=", 0.8), "median_lead": (">=", 100), "stable_warned_share": ("<=", 0.05),
         "fa_steps_stable": ("<=", 5e-4), "fa_steps_spiked": ("<=", 5e-4)}
#: Steps at the end of a run that did not diverge that are not judged (``horizon``): the labels' patience.
CENSOR = int(OUTCOME_DEFINITION["patience"])
#: Threshold margins of the lead-time vs false-alarm curve (each seed held out, at each ``every``).
TRADEOFF_MARGINS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)
#: A logged LR at least this many times the previous one is an abrupt change (``abrupt_changes``).
ABRUPT_LR_FACTOR = 1.5


def ramp(steps: int, start: float = 0.01, warm: float = 0.03) -> str:
    """``lr_schedule`` knots of the slow ramp: ``start`` -> ``warm`` over the first 30 steps, then linear to
    1 at ``steps`` (so the peak LR is reached at the end and the critical LR is crossed late)."""
    return f"0:{start},30:{warm},{steps}:1"


def stepups(steps: int) -> str:
    """``lr_schedule`` knots of abrupt step-ups: warm-up to 1 over 30 steps, x2 at steps/3, x4 at 5 steps/9,
    x8 at 7 steps/9."""
    a, b, c = steps // 3, 5 * steps // 9, 7 * steps // 9
    return f"0:0.03,30:1,{a - 1}:1,{a}:2,{b - 1}:2,{b}:4,{c - 1}:4,{c}:8"


def spike(steps: int, factor: float = 18.0, length: int = 10) -> str:
    """``lr_schedule`` knots of one LR spike: warm-up to 1 over 30 steps, ``factor`` x for ``length`` steps
    from step ``4 * steps / 9``, then back to 1."""
    a = 4 * steps // 9
    return f"0:0.03,30:1,{a - 1}:1,{a}:{factor:g},{a + length - 1}:{factor:g},{a + length}:1"


@dataclass(frozen=True, kw_only=True)
class Mechanism:
    """One way to break a run: unstable configurations and their stable control (same schedule)."""

    name: str
    doc: str
    unstable_lrs: tuple[float, ...]
    control_lrs: tuple[float, ...]
    overrides: dict[str, Any] = field(default_factory=dict)
    """ProxyConfig / TrainConfig fields of every run of the mechanism (a sweep variant)."""
    trainer: str = "proxy"
    """``proxy`` (``train_one``) or ``hf_gpt2`` (``train_hf_gpt2``)."""
    abrupt: bool = False
    """Its divergences follow an abrupt change of the schedule (an LR spike or step-up, a block unfrozen) by
    tens of steps, so a lead of 50 steps is at best partly possible; the others grow gradually (slow ramps)."""


@dataclass(frozen=True, kw_only=True)
class BenchScale:
    """Size, run length and mechanisms of one benchmark scale."""

    name: str
    size: dict[str, Any]
    steps: int
    batch_size: int
    seq_len: int
    seeds: tuple[int, ...]
    mechanisms: tuple[Mechanism, ...]


def _mechanisms(steps: int, hi: float = 1.0) -> tuple[Mechanism, ...]:
    r = ramp(steps)
    return (
        Mechanism(name="attn_logit_growth", doc="no qk-layernorm, slow LR ramp past the critical LR, clipping on",
                  unstable_lrs=(0.7 * hi, 1.0 * hi), control_lrs=(0.15 * hi, 0.3 * hi),
                  overrides={"lr_schedule": r, "qk_layernorm": False}),
        Mechanism(name="logit_drift", doc="no z-loss, no weight decay, no clipping, slow LR ramp",
                  unstable_lrs=(0.4 * hi, 0.6 * hi), control_lrs=(0.08 * hi, 0.2 * hi),
                  overrides={"lr_schedule": r, "weight_decay": 0.0, "clip": None, "z_loss": 0.0}),
        Mechanism(name="adam_stale", doc="beta2 0.999, block 1 frozen for the first third then unfrozen, "
                                         "no clipping, slow LR ramp",
                  unstable_lrs=(0.3 * hi, 0.5 * hi), control_lrs=(0.08 * hi, 0.15 * hi),
                  overrides={"lr_schedule": r, "beta2": 0.999, "clip": None, "weight_decay": 0.0,
                             "freeze_until": steps // 3, "freeze_prefix": "blocks.1"}, abrupt=True),
        Mechanism(name="lr_stepup", doc="abrupt LR step-ups x2, x4, x8 after a stable phase",
                  unstable_lrs=(0.04 * hi, 0.08 * hi), control_lrs=(0.008 * hi, 0.02 * hi),
                  overrides={"lr_schedule": stepups(steps)}, abrupt=True),
        Mechanism(name="lr_spike", doc="one abrupt LR spike (x18 for 10 steps) after a stable phase; runs "
                                       "recover from it or not",
                  unstable_lrs=(0.01 * hi, 0.015 * hi), control_lrs=(0.002 * hi, 0.005 * hi),
                  overrides={"lr_schedule": spike(steps)}, abrupt=True),
        Mechanism(name="hf_gpt2", doc="Hugging Face GPT-2 from a config, slow LR ramp, clipping on",
                  unstable_lrs=(0.7 * hi, 1.0 * hi), control_lrs=(0.15 * hi, 0.3 * hi),
                  overrides={"lr_schedule": r}, trainer="hf_gpt2"),
    )


SCALES: dict[str, BenchScale] = {
    "quick": BenchScale(name="quick", size={"name": "w32_L2", "d_model": 32, "n_layers": 2, "head_dim": 16},
                        steps=450, batch_size=8, seq_len=32, seeds=(0, 1, 2, 3, 4, 5),
                        mechanisms=_mechanisms(450)),
    "full": BenchScale(name="full", size={"name": "w128_L4", "d_model": 128, "n_layers": 4, "head_dim": 32},
                       steps=2000, batch_size=32, seq_len=128, seeds=(0, 1, 2, 3), mechanisms=_mechanisms(2000, 0.5)),
}


# ---------------------------------------------------------------------------------------------- training
def train_hf_gpt2(config, monitor) -> dict[str, Any]:
    """``train_fn`` of the ``hf_gpt2`` mechanism: a byte-level ``GPT2LMHeadModel`` of the point's shape.

    Uses the point's LR, ``lr_schedule`` (or warm-up + cosine), betas, eps, weight decay and clipping;
    stops at the first non-finite loss (checked every 10 steps). No weights are downloaded.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from stabilitylab.proxy.data import ByteData
    from stabilitylab.proxy.train import build_scheduler

    m = config.model
    torch.manual_seed(config.seed)
    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=256, n_positions=m.seq_len, n_embd=m.d_model, n_layer=m.n_layers,
        n_head=m.d_model // m.head_dim, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0, attn_implementation="sdpa"))
    data = ByteData(m.seq_len, config.data_path)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(config.beta1, config.beta2),
                            eps=config.eps, weight_decay=config.weight_decay)
    sched = build_scheduler(opt, config)

    @torch.no_grad()
    def held_out() -> float:
        g = torch.Generator().manual_seed(config.seed + 7919)
        return float(torch.stack([model(x, labels=x).loss for x, _ in
                                  (data.batch("val", config.batch_size, g) for _ in range(config.eval_batches))]).mean())

    init_loss = held_out()
    mon = monitor(model, opt)
    gen = torch.Generator().manual_seed(config.seed)
    for step in range(config.steps):
        x, _ = data.batch("train", config.batch_size, gen)
        loss = model(x, labels=x).loss
        loss.backward()
        if config.clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        mon.step(loss)
        if step % 10 == 0 and not math.isfinite(float(loss.detach())):
            return {"final_loss": float("nan"), "init_loss": init_loss, "steps_done": step + 1}
    return {"final_loss": held_out(), "init_loss": init_loss}


TRAINERS = {"proxy": None, "hf_gpt2": train_hf_gpt2}


def benchmark_specs(scale: BenchScale, device: str = "cpu") -> list[tuple[Mechanism, str, Any]]:
    """``(mechanism, role, SweepSpec)`` for every (mechanism, ``unstable`` / ``control``) of a scale."""
    from stabilitylab.sweeps import SweepSpec

    out = []
    for mech in scale.mechanisms:
        for role, lrs in (("unstable", mech.unstable_lrs), ("control", mech.control_lrs)):
            out.append((mech, role, SweepSpec(
                name=f"warnings-v{BENCHMARK_VERSION}-{scale.name}-{mech.name}-{role}", lrs=list(lrs),
                sizes=[dict(scale.size)], variants=[{"name": f"{mech.name}/{role}", **mech.overrides}],
                seeds=list(scale.seeds), steps=scale.steps, batch_size=scale.batch_size, seq_len=scale.seq_len,
                every=1, probes=list(PROBES), device=device, train={"eval_batches": 2})))
    return out


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; else ``platform.processor()``): a benchmark's histories depend on it (the README's CPU paragraph)."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())


def build(scale: str | BenchScale = "quick", out: str | os.PathLike | None = None, executor: str = "processes",
          workers: int | None = 2, device: str = "cpu", progress: bool = True,
          seeds: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Train (or resume) every run of the benchmark into sweep stores under ``out``, label them, and write
    ``benchmark.json`` and ``outcomes.parquet``; returns the metadata written.

    Args:
        scale: ``"quick"`` (CPU), ``"full"`` (GPU) or a ``BenchScale``.
        out: output folder (default ``runs/warnings_<scale>``).
        executor: sweep executor for the proxy runs (``local``, ``processes``, ``ray``); the Hugging Face
            runs use the same one.
        workers: worker processes / Ray tasks.
        device: torch device of the proxy runs.
        progress: tqdm bar over runs.
        seeds: replace the scale's seeds (e.g. a development build on seeds no reported result uses).
    """
    from tqdm.auto import tqdm

    from stabilitylab.sweeps.executors import EXECUTORS
    from stabilitylab.sweeps.run import trainer_name
    from stabilitylab.sweeps.store import FINISHED, SweepStore

    if isinstance(scale, str) and scale not in SCALES:
        raise ValueError(f"build(scale={scale!r}): choose from {list(SCALES)}")
    sc = SCALES[scale] if isinstance(scale, str) else scale
    if seeds is not None:
        if not seeds or not all(int_at_least(x, 0) for x in seeds):
            raise ValueError(f"build(seeds={seeds!r}): give one or more non-negative int seeds")
        sc = replace(sc, seeds=tuple(seeds))
    if executor not in EXECUTORS or executor == "vectorized":
        raise ValueError(f"build(executor={executor!r}): use 'local', 'processes' or 'ray' (the benchmark's "
                         "schedules are not implemented by the vectorized trainer)")
    out = Path(out) if out is not None else Path("runs") / f"warnings_{sc.name}"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    todo: dict[str, list] = {}
    for mech, _, spec in benchmark_specs(sc, device):
        store = SweepStore(out / mech.trainer)
        store.open(spec, trainer_name(TRAINERS[mech.trainer]), extend=True)
        rows = store.rows()
        todo.setdefault(mech.trainer, []).extend(
            p for p in spec.points() if rows.get(p.run_id, {}).get("status") not in FINISHED)
    n = sum(len(v) for v in todo.values())
    bar = tqdm(total=n, desc="warnings benchmark", unit="run", disable=not progress)
    for trainer, points in todo.items():
        store = SweepStore(out / trainer)
        for _, row, history in EXECUTORS[executor](points, TRAINERS[trainer], workers, None, False):
            store.write(row, history)
            bar.update(1)
        store.write_runs_table()
    bar.close()
    runs, history = load_benchmark(out)
    outcomes = label_runs(runs, history)
    outcomes.to_parquet(out / "outcomes.parquet", index=False)
    meta = {
        "benchmark_version": BENCHMARK_VERSION, "scale": asdict(sc), "outcome_definition": OUTCOME_DEFINITION,
        "probes": list(PROBES), "every": 1, "executor": executor, "workers": workers, "trained_now": n,
        "build_wall_s": round(time.time() - t0, 1), "cpu_count": os.cpu_count(), "cpu": cpu_name(),
        "load_avg_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "composition": composition(outcomes).to_dict("records"),
        "n_runs": len(outcomes), "n_diverged_after_150": int(((outcomes["outcome"] == "diverged")
                                                             & (outcomes["diverge_step"] > 150)).sum()),
    }
    (out / "benchmark.json").write_text(json.dumps(meta, indent=1, default=str))
    return meta


# ---------------------------------------------------------------------------------------------- data
def load_benchmark(path: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(runs, history)`` of a benchmark folder (its sweep stores) or of one sweep store.

    ``runs`` gets ``mechanism`` and ``role`` from the variant label ``mechanism/role`` (any other label:
    mechanism = the label, role = "").
    """
    from stabilitylab.sweeps import load_sweep

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"no benchmark or sweep store at {str(p)!r}")
    stores = [p] if (p / "spec.json").exists() else sorted(s for s in p.iterdir() if (s / "spec.json").exists())
    if not stores:
        raise ValueError(f"{str(p)!r} holds no sweep store (no spec.json in it or its subfolders); "
                         "pass the folder given to `stabilitylab warnings build --out`")
    parts = [load_sweep(s) for s in stores]
    runs = pd.concat([r for r, _ in parts], ignore_index=True)
    history = pd.concat([h for _, h in parts if len(h)], ignore_index=True)
    runs = runs[runs["status"] != "failed"].reset_index(drop=True)
    split = runs["variant"].astype(str).str.split("/", n=1, expand=True)
    runs["mechanism"] = split[0]
    runs["role"] = split[1].fillna("") if split.shape[1] > 1 else ""
    return runs, history[history["run_id"].isin(runs["run_id"])]


def abrupt_changes(lr_steps: Sequence[int], lr_values: Sequence[float], run: Mapping[str, Any] | None = None,
                   factor: float = ABRUPT_LR_FACTOR) -> list[int]:
    """Steps of abrupt changes of a run's schedule: a logged LR at least ``factor`` x the previous logged one
    after a steady stretch (the change before it under half as large, so a step-up or a spike counts and the
    first steps of a warm-up from ~0, where the LR doubles but so it did the step before, do not), and a block
    unfrozen (``freeze_until``) or a data switch (``data_switch_step``) when the run's config has them."""
    x = [float(v) for v in lr_values]
    out = [int(lr_steps[i]) for i in range(2, len(x))
           if x[i - 1] > 0 and x[i] >= factor * x[i - 1] and x[i - 1] < (1 + (factor - 1) / 2) * x[i - 2]]
    for key in ("freeze_until", "data_switch_step"):
        v = (run or {}).get(key)
        if not pd.isna(v) and int(v) > 0:  # None and NaN: no such setting
            out.append(int(v))
    return sorted(out)


def label_runs(runs: pd.DataFrame, history: pd.DataFrame) -> pd.DataFrame:
    """One row per run: ``run_id, mechanism, role, lr, seed, outcome, diverge_step, n_spikes, steps_logged,
    last_change`` (the last abrupt change of the schedule at or before the divergence step, ``abrupt_changes``;
    NaN if none or the run did not diverge)."""
    by = {m: dict(tuple(g.groupby("run_id", sort=False))) for m, g in
          history[history["metric"].isin([M.LOSS, "lr"])].sort_values(["run_id", "step"]).groupby("metric")}
    rows = []
    for r in runs.to_dict("records"):
        h = by.get(M.LOSS, {}).get(r["run_id"])
        if h is None:
            continue
        o = D.label_outcome(h["step"].to_numpy(), h["value"].to_numpy(dtype=float), **OUTCOME_DEFINITION)
        lr = by.get("lr", {}).get(r["run_id"], pd.DataFrame({"step": [], "value": []}))
        changes = abrupt_changes(lr["step"].tolist(), lr["value"].tolist(), r)
        before = [c for c in changes if c <= o.diverge_step]  # empty unless diverged (NaN compares False)
        rows.append({"run_id": r["run_id"], "mechanism": r["mechanism"], "role": r["role"], "lr": r["lr"],
                     "seed": r["seed"],
                     "outcome": o.label, "diverge_step": o.diverge_step, "n_spikes": len(o.spike_steps),
                     "steps_logged": len(h), "last_change": float(before[-1]) if before else math.nan})
    return pd.DataFrame(rows)


def composition(outcomes: pd.DataFrame) -> pd.DataFrame:
    """Runs per mechanism and outcome (plus diverged after step 150 and the median divergence step)."""
    t = pd.crosstab(outcomes["mechanism"], outcomes["outcome"]).reindex(columns=list(D.OUTCOMES), fill_value=0)
    div = outcomes[outcomes["outcome"] == "diverged"].groupby("mechanism")["diverge_step"]
    t["diverged_after_150"] = outcomes[(outcomes["outcome"] == "diverged") & (outcomes["diverge_step"] > 150)] \
        .groupby("mechanism").size().reindex(t.index, fill_value=0)
    t["median_diverge_step"] = div.median().reindex(t.index)
    t = t.reset_index()
    total = {"mechanism": "all", **{c: t[c].sum() for c in t.columns if c not in ("mechanism", "median_diverge_step")},
             "median_diverge_step": float(outcomes.loc[outcomes["outcome"] == "diverged", "diverge_step"].median())}
    return pd.concat([t, pd.DataFrame([total])], ignore_index=True)


# ---------------------------------------------------------------------------------------------- evaluation
def horizon(scored_run: D.ScoredRun, diverge_step: float = math.nan, censor: int = CENSOR) -> float:
    """First step that is not judged: the divergence step of a diverged run; for any other run, ``censor``
    steps before its last logged step (whether a run diverges within ``censor`` steps of a step is known only
    up to there: a run that ends while heading for divergence is labelled stable, and a warning in its last
    steps can be neither confirmed nor refuted)."""
    if math.isfinite(diverge_step):
        return diverge_step
    return scored_run[-1][0] - censor + 1 if scored_run else math.inf


def _measure(ids: list[str], outcomes: pd.DataFrame, scored: dict, cfg: D.DetectorConfig, cal: D.Calibration,
             min_lead: int = 50, censor: int = CENSOR, also: Mapping[str, Mapping[int, Any]] | None = None
             ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Summary and per-run rows of the detector on runs ``ids`` (``also``: run id -> the run scored on each
    further rule's window, ``detectors.score_rules``; every rule of ``cal`` then counts)."""
    o = outcomes.set_index("run_id")
    rows = []
    for rid in ids:
        r = o.loc[rid]
        dstep = float(r["diverge_step"])
        end = horizon(scored[rid], dstep, censor)  # diverge_step is NaN unless the run diverged
        det = D.decide_run(scored[rid], cfg, cal, before=end, also=also[rid] if also is not None else None)
        w = det.warnings[0] if det.warnings else None
        lead = dstep - w.step if (w is not None and r["outcome"] == "diverged") else math.nan
        logged = [s for s, _ in scored[rid] if s < end]
        judged = sum(1 for s in logged if s - logged[0] >= cfg.burn_in) if logged else 0
        rows.append({"run_id": rid, "mechanism": r["mechanism"], "role": r["role"], "lr": r["lr"], "seed": r["seed"],
                     "outcome": r["outcome"], "diverge_step": dstep, "first_warning": w.step if w else math.nan,
                     "lead_steps": lead, "metric": w.metric if w else "", "module": w.module if w else "",
                     "window": w.window if w else math.nan,
                     "steps_left": w.steps_left if w else math.nan, "steps_left_lo": w.steps_left_lo if w else math.nan,
                     "steps_left_hi": w.steps_left_hi if w else math.nan,
                     "covered": bool(w is not None and w.steps_left_lo <= lead <= w.steps_left_hi)
                     if r["outcome"] == "diverged" else None,
                     "alarm_steps": len(det.alarm_steps), "judged_steps": judged,
                     "last_change": float(r.get("last_change", math.nan))})
    return summarise(pd.DataFrame(rows), min_lead), rows


def summarise(per_run: pd.DataFrame, min_lead: int = 50) -> dict[str, Any]:
    """The issue-17 numbers of a per-run table (``_measure`` rows)."""
    div = per_run[per_run["outcome"] == "diverged"]
    stable = per_run[per_run["outcome"] == "stable"]
    spiked = per_run[per_run["outcome"] == "spiked_recovered"]
    warned = div[div["lead_steps"].notna()]
    # A lead of min_lead is possible only if the schedule did not change abruptly in the min_lead steps before
    # the divergence (what comes after an LR spike or a step-up is not in the run's signals before it).
    last = div["last_change"] if "last_change" in div else pd.Series(math.nan, index=div.index)
    reach = div[~(last > div["diverge_step"] - min_lead)]

    def rate(df: pd.DataFrame) -> float:
        return float(df["alarm_steps"].sum() / df["judged_steps"].sum()) if len(df) and df["judged_steps"].sum() else math.nan

    return {
        "n_runs": len(per_run), "n_diverged": len(div), "n_stable": len(stable), "n_spiked": len(spiked),
        "warned_50_share": float((div["lead_steps"] >= min_lead).mean()) if len(div) else math.nan,
        "warned_any_share": float(div["lead_steps"].notna().mean()) if len(div) else math.nan,
        "reachable_share": float(len(reach) / len(div)) if len(div) else math.nan,
        "warned_50_reachable_share": float((reach["lead_steps"] >= min_lead).mean()) if len(reach) else math.nan,
        "median_lead": float(warned["lead_steps"].median()) if len(warned) else math.nan,
        "stable_warned_share": float(stable["first_warning"].notna().mean()) if len(stable) else math.nan,
        "fa_steps_stable": rate(stable), "fa_steps_spiked": rate(spiked),
        "forecast_coverage": float(warned["covered"].astype(bool).mean()) if len(warned) else math.nan,
        "forecast_median_width": float((warned["steps_left_hi"] - warned["steps_left_lo"]).median())
        if len(warned) else math.nan,
    }


def _objective(s: dict[str, Any]) -> tuple:
    """Sort key of a setting's inner result: Youden's J (share of divergences warned >= 50 steps ahead minus
    share of stable runs warned), ties broken by the median lead."""
    def val(k: str) -> float:
        return 0.0 if math.isnan(s[k]) else float(s[k])

    return (val("warned_50_share") - val("stable_warned_share"), val("median_lead"))


def _calibrate(ids: list[str], outcomes: pd.DataFrame, scored: dict, cfg: D.DetectorConfig, source: str,
               censor: int = CENSOR, rules: Sequence[tuple[int, Mapping[str, Any]]] = (),
               also: Mapping[str, Mapping[int, Any]] | None = None) -> D.Calibration:
    """The calibration on runs ``ids``; ``rules``: further rules ``(window, settings)``, each calibrated on the
    runs scored on its window (``also``) and carried in ``Calibration.also``, with ``cfg``'s settings recorded
    (a detector scales the rules by its margin over the calibration's, so a rule's margin holds at ``cfg``'s as
    in a shipped calibration that carries its settings)."""
    cal = _calibrate_rule(ids, outcomes, scored, cfg, source, censor)
    subs = [replace(_calibrate_rule(ids, outcomes, {i: also[i][w] for i in ids}, replace(cfg, window=w, **st),
                                    f"{source}, {w}-step rule", censor), settings=dict(st)) for w, st in rules]
    return replace(cal, also=tuple(subs), settings={k: getattr(cfg, k) for k in D.ADOPTABLE}) if subs else cal


def _calibrate_rule(ids: list[str], outcomes: pd.DataFrame, scored: dict, cfg: D.DetectorConfig, source: str,
                    censor: int = CENSOR) -> D.Calibration:
    o = outcomes.set_index("run_id")
    neg = [[x for x in scored[i] if x[0] < horizon(scored[i], censor=censor)] for i in ids
           if o.loc[i, "outcome"] != "diverged"]
    if neg and not any(step - run[0][0] >= cfg.burn_in for run in neg if run for step, _ in run):
        raise ValueError(f"no logged step of the {len(neg)} runs that did not diverge is judged: a run's last "
                         f"{censor} steps (censor) and first {cfg.burn_in} (burn-in) are not, so runs need more than "
                         f"{censor + cfg.burn_in} steps; train longer or pass a smaller censor")
    pos = [(scored[i], float(o.loc[i, "diverge_step"])) for i in ids if o.loc[i, "outcome"] == "diverged"]
    return D.calibrate(neg, pos, cfg, source=source)


def choose_settings(ids: list[str], outcomes: pd.DataFrame, scored: dict, base: D.DetectorConfig,
                    grid: tuple[dict[str, Any], ...] = GRID, censor: int = CENSOR,
                    rules: Sequence[tuple[int, Mapping[str, Any]]] = (), also: Mapping[str, Any] | None = None
                    ) -> tuple[D.DetectorConfig, list[dict[str, Any]]]:
    """Pick the grid setting with the best leave-one-mechanism-out result *within* ``ids``.

    Objective (``_objective``, Youden's J): share of divergences warned >= 50 steps ahead minus share of stable runs warned (higher is
    better), ties broken by the median lead. Returns the chosen config and the inner results.
    """
    o = outcomes.set_index("run_id")
    mechs = sorted({o.loc[i, "mechanism"] for i in ids})
    results = []
    for g in grid:
        cfg = replace(base, **g)
        rows: list[dict[str, Any]] = []
        for m in mechs:
            cal_ids = [i for i in ids if o.loc[i, "mechanism"] != m]
            test_ids = [i for i in ids if o.loc[i, "mechanism"] == m]
            cal = _calibrate(cal_ids, outcomes, scored, cfg, "", censor, rules, also)
            rows += _measure(test_ids, outcomes, scored, cfg, cal, censor=censor, also=also)[1]
        results.append({**g, **summarise(pd.DataFrame(rows))})
    best = max(range(len(grid)), key=lambda i: _objective(results[i]))
    return replace(base, **grid[best]), results


def splits(outcomes: pd.DataFrame) -> list[tuple[str, str, list[str], list[str]]]:
    """``(name, kind, calibration ids, test ids)`` of the held-out evaluation:

    - kind ``seed``: each seed held out in turn, the runs of the other seeds calibrate;
    - kind ``mechanism``: each mechanism held out in turn, the other mechanisms calibrate;
    - kind ``own`` (2+ seeds): each mechanism and seed held out, with the other mechanisms *and* the held-out
      mechanism's lowest-LR runs that did not diverge, on the other seeds, calibrating: a user who recalibrates
      on a few stable runs of their own model at a lower LR.
    """
    seeds = sorted(outcomes["seed"].unique())
    out = [(f"held-out seed {seed}", "seed", list(outcomes.loc[outcomes["seed"] != seed, "run_id"]),
            list(outcomes.loc[outcomes["seed"] == seed, "run_id"])) for seed in seeds] if len(seeds) > 1 else []
    mechs = sorted(outcomes["mechanism"].unique())
    for m in mechs:
        out.append((f"held-out {m}", "mechanism", list(outcomes.loc[outcomes["mechanism"] != m, "run_id"]),
                    list(outcomes.loc[outcomes["mechanism"] == m, "run_id"])))
    if len(mechs) > 1 and outcomes["seed"].nunique() > 1:
        for m in mechs:
            om = outcomes[outcomes["mechanism"] == m]
            low = om[(om["lr"] == om["lr"].min()) & (om["outcome"] != "diverged")]
            for seed in sorted(om["seed"].unique()):
                out.append((f"held-out {m} seed {seed}, own low-LR runs", "own",
                            list(outcomes.loc[outcomes["mechanism"] != m, "run_id"])
                            + list(low.loc[low["seed"] != seed, "run_id"]),
                            list(om.loc[om["seed"] == seed, "run_id"])))
    return out


def fixed_settings(settings_from: Any, every: int, window: int | None = None) -> dict[str, Any]:
    """The ``margin`` / ``min_metrics`` / ``persist`` a calibration (file) carries for a logging interval (and
    slope window in steps: ``detectors.pick_calibration``)."""
    cal = D.pick_calibration(D.load_calibration(settings_from, "settings_from"), every, window)
    if not cal.settings:
        raise ValueError(f"settings_from: its calibration for every={every} carries no settings; write one with "
                         "`stabilitylab warnings evaluate DEV_STORE --calibration-out FILE` (which chooses them)")
    return cal.adoptable


#: Pooled rows of the summary: name -> (split kind, mechanism kind: None = all, else ``Mechanism.abrupt``).
POOLS = {"each seed held out": ("seed", None), "all mechanisms held out": ("mechanism", None), "gradual mechanisms held out": ("mechanism", False),
         "abrupt-change mechanisms held out": ("mechanism", True),
         "each mechanism held out, its own low-LR runs calibrate": ("own", None)}


def evaluate(path: str | os.PathLike, everys: tuple[int, ...] = EVERIES, base: D.DetectorConfig | None = None,
             grid: tuple[dict[str, Any], ...] = GRID, censor: int = CENSOR, settings_from: Any = None,
             rules: Sequence[tuple[int, Mapping[str, Any]]] | None = None) -> dict[str, Any]:
    """Measure the early warning on a benchmark folder or any sweep store (see the module docstring).

    ``censor``: steps at the end of each run that did not diverge that are neither judged nor used for
    thresholds (``horizon``). ``settings_from``: a calibration (``Calibration``, ``{interval: Calibration}``,
    or the JSON file ``--calibration-out`` writes, e.g. of a development build) whose ``settings`` fix
    ``margin`` / ``min_metrics`` / ``persist`` per logging interval for every split, instead of choosing them
    on each split's calibration runs from ``grid``. ``rules``: further rules ``(window, settings)`` calibrated
    on each split next to the chosen settings, the detector warning when any warns (``Calibration.also``); None:
    those of the shipped default a detector would pick for the interval (at every=1 the sustained rule), ``()``:
    none.

    Each requested interval is measured at the interval its subsampled histories are really logged at
    (``every`` in the results; ``meta["intervals"]`` maps each request to it): on a store a Monitor logged
    with ``every=10``, ``everys=(1, 10)`` measures every=10 once, not the same histories twice with one row
    labelled every=1.

    Returns:
        ``{"summary": DataFrame (one row per every x mechanism held out, plus the ``POOLS`` rows: each seed's
        held-out result pooled, each mechanism's held-out result pooled, on a benchmark folder the same over the gradual and over the
        abrupt-change mechanisms, ``Mechanism.abrupt``, and the ``own`` splits pooled, see ``splits``),
        "per_run": DataFrame, "composition": DataFrame, "outcomes": DataFrame,
        "tradeoff": DataFrame (the each-seed-held-out result per logging interval and threshold margin, the split's other settings), "calibrations": {every:
        the calibration on every run at that logging interval, carrying the settings that
        leave-one-mechanism-out over every run chooses, or the fixed ones} (what the shipped defaults are),
        "calibration": the one at every=1 (else the smallest every), "meta": {...}}``.
    """
    base = base or D.DetectorConfig()
    runs, history = load_benchmark(path)
    outcomes = label_runs(runs, history)
    if outcomes.empty:
        raise ValueError(f"{str(path)!r}: no run has a logged loss; the benchmark needs Monitor histories")
    t0 = time.time()
    summary, per_run = [], []
    full_cal: dict[int, D.Calibration] = {}
    tradeoff: list[dict[str, Any]] = []
    kinds = {m.name: m.abrupt for sc in SCALES.values() for m in sc.mechanisms}
    mechanism_of = dict(zip(outcomes["run_id"], outcomes["mechanism"]))
    settings_from = D.load_calibration(settings_from, "settings_from")  # once, not per logging interval
    intervals: dict[int, int] = {}  # requested every -> the interval its subsampled histories are logged at
    rules_at: dict[int, list[tuple[int, dict[str, Any]]]] = {}  # logged interval -> its further rules
    for asked in everys:
        steps = run_steps(history, asked)
        every = intervals[asked] = logged_interval(steps)
        if every in full_cal:  # e.g. every=1 on a store a Monitor logged every 10 steps: the same histories
            continue
        fixed = replace(base, **fixed_settings(settings_from, every, base.window_at(every))) \
            if settings_from is not None else None
        scored = {rid: D.score_run(s, base) for rid, s in steps.items() if rid in mechanism_of}
        rules_at[every] = rl = list(rules) if rules is not None else [
            (a.window, dict(a.settings)) for a in D.pick_calibration(D.DEFAULT_CALIBRATIONS, every, base.window_at(every)).also]
        also = {rid: D.score_windows(steps[rid], base, [w for w, _ in rl]) for rid in scored} if rl else None
        pools: dict[str, list[dict[str, Any]]] = {"seed": [], "mechanism": [], "own": []}
        tradeoff_rows: dict[float, list[dict[str, Any]]] = {m: [] for m in TRADEOFF_MARGINS}
        chosen_for: dict[str, D.DetectorConfig] = {}
        for name, kind, cal_ids, test_ids in splits(outcomes):
            if not test_ids or not cal_ids:
                continue
            if fixed is not None:
                cfg = fixed
            elif kind == "own":  # the settings chosen with the mechanism held out altogether
                cfg = chosen_for[mechanism_of[test_ids[0]]]
            else:
                cfg = choose_settings(cal_ids, outcomes, scored, base, grid, censor, rl, also)[0] if grid else base
            if kind == "mechanism":
                chosen_for[mechanism_of[test_ids[0]]] = cfg
            cal = _calibrate(cal_ids, outcomes, scored, cfg, f"{name}, every={every}", censor, rl, also)
            s, rows = _measure(test_ids, outcomes, scored, cfg, cal, censor=censor, also=also)
            if kind == "seed":  # the trade-off: the same split, per threshold margin (scaling every rule alike)
                for m, acc in tradeoff_rows.items():
                    acc += _measure(test_ids, outcomes, scored, replace(cfg, margin=m), cal, censor=censor, also=also)[1]
            if kind == "mechanism":
                summary.append({"every": every, "split": name, "margin": cfg.margin, "min_metrics": cfg.min_metrics,
                                "persist": cfg.persist, **s})
            for r in rows:
                r.update(every=every, split=name, kind=kind)
            per_run += rows
            pools.get(kind, []).extend(rows)
        for pool, (kind, abrupt) in POOLS.items():
            rows = [r for r in pools[kind] if abrupt is None or kinds.get(r["mechanism"]) is abrupt]
            if abrupt is not None and not all(r["mechanism"] in kinds for r in pools[kind]):
                rows = []  # gradual / abrupt pools only on a benchmark folder
            if rows:
                summary.append({"every": every, "split": pool, "margin": fixed.margin if fixed else math.nan,
                                "min_metrics": fixed.min_metrics if fixed else math.nan,
                                "persist": fixed.persist if fixed else math.nan, **summarise(pd.DataFrame(rows))})
        if any(tradeoff_rows.values()):
            tradeoff += [{"every": every, "split": "each seed held out", "margin": m, **summarise(pd.DataFrame(rows))}
                         for m, rows in tradeoff_rows.items()]
        ids = list(outcomes["run_id"])
        chosen = fixed or base
        if fixed is None and grid and outcomes["mechanism"].nunique() > 1:  # the settings a calibration on every run carries
            chosen = choose_settings(ids, outcomes, scored, base, grid, censor, rl, also)[0]
        cal = _calibrate(ids, outcomes, scored, chosen,
                         f"warnings benchmark v{BENCHMARK_VERSION}, {len(ids)} runs, every={every}", censor, rl, also)
        full_cal[every] = replace(cal, settings={k: getattr(chosen, k) for k in D.ADOPTABLE}
                                  if chosen is not base else {})
    if not summary:
        raise ValueError(f"{str(path)!r}: nothing to hold out; evaluate needs runs of at least 2 seeds or 2 "
                         "variants (mechanisms), so that some runs calibrate and others are tested")
    pr = pd.DataFrame(per_run)
    pr = pr.sort_values(["every", "mechanism", "role", "lr", "seed"], kind="stable", ignore_index=True) if len(pr) else pr
    return {"summary": pd.DataFrame(summary), "per_run": pr, "composition": composition(outcomes),
            "calibration": full_cal[min(full_cal, key=lambda e: (e != 1, e))], "calibrations": full_cal,
            "outcomes": outcomes, "tradeoff": pd.DataFrame(tradeoff),
            "meta": {"benchmark_version": BENCHMARK_VERSION, "detector": {k: (dict(v) if k == "watch" else v)
                                                                         for k, v in asdict(base).items()},
                     "grid": list(grid) if fixed is None else [], "censor": censor, "intervals": intervals,
                     "rules": {e: [{"window": w, **st} for w, st in r] for e, r in rules_at.items()},
                     "settings": "fixed" if settings_from is not None else "chosen per split",
                     "outcome_definition": OUTCOME_DEFINITION, "evaluate_wall_s": round(time.time() - t0, 1)}}



@dataclass(frozen=True)
class Replay:
    """The runs of a store scored at one logging interval, with the calibration a detector picks there:
    what ``check`` (and ``benchmarks/warnings_gate.py``) replay the shipped or a given calibration on."""

    every: int
    calibration: D.Calibration
    scored: dict[str, D.ScoredRun]
    also: dict[str, Any] | None  # run id -> the run scored on each further rule's window (``score_rules``)
    base: D.DetectorConfig

    def config(self, margin: float | None = None, loss_gate: float | None = None) -> D.DetectorConfig:
        """``base`` with the calibration's own settings (``Calibration.settings``), then ``margin`` and
        ``loss_gate`` where given."""
        return replace(self.base, **{**self.calibration.adoptable, **({} if margin is None else {"margin": margin}),
                                     **({} if loss_gate is None else {"loss_gate": loss_gate})})

    def measure(self, outcomes: pd.DataFrame, cfg: D.DetectorConfig, censor: int = CENSOR
                ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """``_measure`` on every scored run with ``cfg``: the summary and the per-run rows."""
        return _measure(list(self.scored), outcomes, self.scored, cfg, self.calibration, censor=censor,
                        also=self.also)


def replays(outcomes: pd.DataFrame, history: pd.DataFrame, calibrations: D.Calibrations,
            everys: Sequence[int] = EVERIES, base: D.DetectorConfig | None = None, progress: bool = False,
            desc: str = "") -> Iterator[tuple[int, int, Replay | None]]:
    """``(asked, every, Replay)`` per requested logging interval ``asked``, with ``every`` the interval its
    subsampled histories are logged at; the ``Replay`` is None when those histories are an earlier request's
    (every=1 and every=10 on a store a Monitor logged every 10 steps)."""
    from tqdm.auto import tqdm

    base = base or D.DetectorConfig()
    seen: set[int] = set()
    for asked in everys:
        steps = run_steps(history, asked)
        every = logged_interval(steps)
        if every in seen:
            yield asked, every, None
            continue
        seen.add(every)
        cal = D.pick_calibration(calibrations, every, base.window_at(every))
        ids = [rid for rid in outcomes["run_id"] if rid in steps]
        scored = {rid: D.score_run(steps[rid], base)
                  for rid in tqdm(ids, desc=f"{desc} score every={every}".strip(), disable=not progress)}
        also = {rid: D.score_rules(steps[rid], base, cal) for rid in ids} if cal.also else None
        yield asked, every, Replay(every, cal, scored, also, base)


def check(path: str | os.PathLike, calibration: Any = None, everys: tuple[int, ...] = EVERIES,
          margins: Sequence[float] = (), censor: int = CENSOR, loss_gates: Sequence[float] = (),
          base: D.DetectorConfig | None = None) -> dict[str, Any]:
    """The warning with a calibration as it is, nothing recalibrated, on every run of a store: what
    ``EarlyWarning(calibration=calibration)`` would have said on those runs (``evaluate`` instead calibrates on
    some runs and tests on the others).

    ``calibration``: None (the shipped ``detectors.DEFAULT_CALIBRATIONS``), a ``Calibration``, a mapping or the
    JSON file ``warnings calibrate`` / ``--calibration-out`` writes; at each interval the one a detector would
    pick (``detectors.pick_calibration``), at its own settings, at each of ``margins`` and with each loss gate of
    ``loss_gates`` (``DetectorConfig.loss_gate``, nats; 0: none) instead of the default one; ``base``: the other
    detector settings (default ``DetectorConfig()``, e.g. ``DetectorConfig(solo=())``). Same outcome labels,
    censoring and per-run measurement as ``evaluate``.

    Returns:
        ``{"summary": DataFrame (per interval and setting, the ``summarise`` numbers), "per_run": DataFrame (at
        the calibration's own settings), "composition": DataFrame, "meta": {...}}``.
    """
    margins = [float(m) for m in margins]
    if any(not m > 0 for m in margins):
        raise ValueError(f"margins={margins}: each must be a number > 0 (a multiplier on the thresholds)")
    loss_gates = [float(g) for g in loss_gates]
    if any(not (math.isfinite(g) and g >= 0) for g in loss_gates):
        raise ValueError(f"loss_gates={loss_gates}: each must be a number of nats >= 0 (0: no loss gate)")
    cals = D.load_calibration(calibration, "calibration") or D.DEFAULT_CALIBRATIONS
    runs, history = load_benchmark(path)
    outcomes = label_runs(runs, history)
    if outcomes.empty:
        raise ValueError(f"{str(path)!r}: no run has a logged loss; the check needs Monitor histories")
    summary: list[dict[str, Any]] = []
    per_run: list[dict[str, Any]] = []
    intervals: dict[int, int] = {}  # requested every -> the interval its subsampled histories are logged at
    sources: dict[int, str] = {}  # logged interval -> the source of the calibration picked for it
    for asked, every, replay in replays(outcomes, history, cals, everys, base=base):
        intervals[asked] = every
        if replay is None:  # the same histories as an earlier request (a store logged every 10 steps)
            continue
        sources[every] = replay.calibration.source + _rules_note(replay.calibration)
        for margin, gate in ((None, None), *((m, None) for m in margins), *((None, g) for g in loss_gates)):
            cfg = replay.config(margin=margin, loss_gate=gate)
            res, rows = replay.measure(outcomes, cfg, censor=censor)
            label = "calibration's" if margin is None and gate is None else \
                f"margin={margin:g}" if gate is None else f"loss_gate={gate:g}"
            summary.append({"every": every, "settings": label, "margin": cfg.margin, "min_metrics": cfg.min_metrics,
                            "persist": cfg.persist, "loss_gate": cfg.loss_gate, "solo": " ".join(cfg.solo), **res})
            if margin is None and gate is None:
                per_run += [{**r, "every": every} for r in rows]
    source = "the shipped defaults" if calibration is None else (
        str(calibration) if isinstance(calibration, (str, os.PathLike)) else "a calibration passed in")
    pr = pd.DataFrame(per_run)
    pr = pr.sort_values(["every", "mechanism", "role", "lr", "seed"], kind="stable", ignore_index=True) if len(pr) else pr
    return {"summary": pd.DataFrame(summary), "per_run": pr, "composition": composition(outcomes),
            "meta": {"calibration": source, "censor": censor, "intervals": intervals, "margins": margins,
                     "loss_gates": loss_gates, "sources": dict(sorted(sources.items()))}}


def check_markdown(result: dict[str, Any]) -> str:
    """``check``'s result as markdown: composition, summary, every diverged run and every stable run warned."""
    from stabilitylab.report import Paragraph, Table, render

    pr = result["per_run"]
    cols = ["every", "mechanism", "role", "lr", "seed", "outcome", "diverge_step", "first_warning", "lead_steps",
            "metric", "module", "window", "steps_left", "steps_left_lo", "steps_left_hi"]
    meta = result["meta"]
    parts = [Paragraph(f"Calibration: {meta['calibration']}, not recalibrated ("
                       + "; ".join(f"every={e}: {src}" for e, src in meta["sources"].items())
                       + f"). The last {meta['censor']} steps of runs that did not diverge are not judged."),
             Table(result["composition"], "Composition (runs per mechanism and outcome)", level=2),
             Table(result["summary"], "Summary (per logging interval and setting)", level=2),
             Table(pr[pr["outcome"] == "diverged"][cols], "Diverged runs (the calibration's settings)", level=2,
                   collapse_rows=40),
             Table(pr[(pr["outcome"] != "diverged") & pr["first_warning"].notna()][cols],
                   "Runs that did not diverge and were warned", level=2, collapse_rows=40)]
    return render("Early warning on a store, as calibrated", parts)[1].rstrip("\n")


def page(result: dict[str, Any], build_meta: dict[str, Any] | None = None) -> tuple[str, list]:
    """``(title, report parts)`` of an evaluation: composition, the summary table with goals, the trade-off, the
    per-run rows of diverged runs and the calibrations; ``markdown`` and the HTML report render these."""
    from stabilitylab.report import Bullets, Code, Heading, Paragraph, Table

    s = result["summary"].copy()
    title = f"the warnings benchmark v{build_meta.get('benchmark_version', BENCHMARK_VERSION)}" if build_meta \
        else "a sweep store"
    parts: list = []
    if build_meta:
        seeds = " ".join(str(x) for x in build_meta["scale"].get("seeds", []))
        parts.append(Paragraph(
            f"Built with `stabilitylab warnings build --scale {build_meta['scale']['name']} --seeds {seeds}` in "
            f"{build_meta['build_wall_s']} s wall ({build_meta['executor']}, {build_meta['workers']} workers, "
            f"{build_meta['cpu_count']} cores{' of ' + build_meta['cpu'] if build_meta.get('cpu') else ''}; 1/5/15-min load average at the end "
            f"{', '.join(f'{x:.1f}' for x in build_meta.get('load_avg_at_end') or [])}: "
            "the cores were shared with other work, so wall times are upper bounds)."))
    parts += [Table(result["composition"], "Composition (runs per mechanism and outcome)", level=2),
              Heading("Held-out results"),
              Paragraph("Goals: warned >= 50 steps ahead >= 0.8, median lead >= 100 steps, stable runs warned <= 0.05, "
                        "false-alarm steps on stable / spiked-and-recovered runs <= 0.0005. "
                        + ("`margin` / `min_metrics` / `persist` were fixed for every split (`--settings-from`: "
                           "chosen on other runs, e.g. a development build). "
                           if result["meta"].get("settings") == "fixed" else
                           "`margin` / `min_metrics` / `persist` were chosen on the calibration runs only "
                           "(leave-one-mechanism-out inside them, by Youden's J: warned >= 50 share minus "
                           "stable-warned share). ")
                        + "`reachable_share`: divergences with no abrupt change of the schedule (an LR at least "
                        f"{ABRUPT_LR_FACTOR:g}x the previous step's, a block unfrozen, a data switch) in the 50 steps "
                        "before them, so that a 50-step lead is possible from the run's own signals; "
                        "`warned_50_reachable_share` is the warned >= 50 share among those. The last "
                        f"{result['meta'].get('censor', CENSOR)} steps of runs that did not diverge are neither judged "
                        "nor used for thresholds: whether a run diverges after them is unknown (a run that ends while "
                        "heading for divergence is labelled stable).")]
    for k, (op, v) in GOALS.items():
        s[f"{k}_ok"] = s[k].map(lambda x, op=op, v=v: "" if pd.isna(x) else ("yes" if (x >= v if op == ">=" else x <= v)
                                                                        else "no"))
    parts.append(Table(s, "Summary (goals met: the *_ok columns)"))
    moved = {a: e for a, e in result["meta"].get("intervals", {}).items() if a != e}
    if moved:
        parts.append(Paragraph("Logging intervals: the store's histories subsampled to "
                               + ", ".join(f"every={a} are logged every {e} steps" for a, e in moved.items())
                               + ", so they are measured (and calibrated) at that interval."))
    pr = result["per_run"]
    held = pr[(pr["kind"] == "mechanism") & pr["first_warning"].notna()]
    burn = result["meta"]["detector"]["burn_in"]
    parts.append(Bullets([f"every={every}: {float((g['first_warning'] <= burn + every).mean()):.0%} of the first "
                          f"warnings (mechanism held out) came on the first step the burn-in ({burn} steps) allows: "
                          "those runs' signals already grew faster than on any calibration run when the detector "
                          "started to look." for every, g in held.groupby("every")]))
    tradeoff = "Lead time vs false alarms (each seed held out, per threshold margin)"
    if len(result["tradeoff"]):
        parts.append(Table(result["tradeoff"], tradeoff, level=2))
    else:
        parts += [Heading(tradeoff), Paragraph("(no held-out seed split: the store has runs of one seed only)")]
    d = pr[(pr["outcome"] == "diverged") & (pr["kind"] == "mechanism")]
    cols = ["every", "mechanism", "lr", "seed", "diverge_step", "first_warning", "lead_steps", "metric", "module",
            "window", "steps_left", "steps_left_lo", "steps_left_hi", "covered"]
    parts.append(Table(d[cols], "Diverged runs, mechanism held out", level=2, collapse_rows=40))
    for every, cal in result.get("calibrations", {1: result["calibration"]}).items():
        parts += [Heading(f"Calibration on every run at every={every} (what --calibration-out writes)"),
                  Code(json.dumps(cal.to_dict(), indent=1), "json")]
    return f"Early warning on {title}", parts


def markdown(result: dict[str, Any], build_meta: dict[str, Any] | None = None) -> str:
    """The evaluation as markdown (``page`` rendered by ``stabilitylab.report.render``)."""
    from stabilitylab.report import render

    return render(*page(result, build_meta))[1].rstrip("\n")


def _jsonable(result: dict[str, Any], build_meta: dict[str, Any] | None) -> dict[str, Any]:
    def recs(df: pd.DataFrame) -> list[dict]:
        return json.loads(df.to_json(orient="records"))

    return {"meta": result["meta"], "build": build_meta, "composition": recs(result["composition"]),
            "summary": recs(result["summary"]), "tradeoff": recs(result["tradeoff"]), "per_run": recs(result["per_run"]),
            "calibration": result["calibration"].to_dict(),
            "calibrations": D.calibrations_to_dict(result["calibrations"])}


# ---------------------------------------------------------------------------------------------- CLI
def _build_cmd(args: argparse.Namespace) -> int:
    meta = build(args.scale, out=args.out, executor=args.executor, workers=args.workers, device=args.device,
                 progress=not args.no_progress, seeds=tuple(args.seeds) if args.seeds else None)
    from stabilitylab.report import markdown_table as markdown_table

    print(markdown_table(pd.DataFrame(meta["composition"])))
    print(f"\n{meta['n_runs']} runs, {meta['n_diverged_after_150']} diverged after step 150; "
          f"built in {meta['build_wall_s']} s")
    return 0


def _evaluate_cmd(args: argparse.Namespace) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        base = D.DetectorConfig(**({} if args.loss_gate is None else {"loss_gate": args.loss_gate}),
                                **({} if args.solo is None else {"solo": tuple(args.solo)}))
        res = evaluate(args.store, everys=tuple(args.every), censor=args.censor, settings_from=args.settings_from,
                       rules=() if args.no_rules else None, base=base)
    build_meta = _build_meta(args.store)
    md = markdown(res, build_meta)
    print(md)
    if args.json:
        _write(args.json, json.dumps(_jsonable(res, build_meta), indent=1, default=str))
    if args.md:
        _write(args.md, md)
    if args.calibration_out:
        _write(args.calibration_out, json.dumps(D.calibrations_to_dict(res["calibrations"]), indent=1))
    if args.report:
        from stabilitylab.studies.warnings_report import write_warnings_report

        print(f"report: {write_warnings_report(args.store, res, args.report, build_meta)}")
    return 0


def _check_cmd(args: argparse.Namespace) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = check(args.store, calibration=args.calibration, everys=tuple(args.every), margins=args.margins,
                    censor=args.censor, loss_gates=args.loss_gates,
                    base=None if args.solo is None else D.DetectorConfig(solo=tuple(args.solo)))
    md = check_markdown(res)
    print(md)
    if args.json:
        recs = {k: json.loads(res[k].to_json(orient="records")) for k in ("summary", "per_run", "composition")}
        _write(args.json, json.dumps({"meta": res["meta"], "cpu": cpu_name(), "build": _build_meta(args.store),
                                      **recs}, indent=1, default=str))
    if args.md:
        _write(args.md, md)
    return 0


def _build_meta(store: str | os.PathLike) -> dict[str, Any] | None:
    """A benchmark folder's ``benchmark.json`` (what ``build`` wrote), or None for any other store."""
    meta_file = Path(store) / "benchmark.json"
    return json.loads(meta_file.read_text()) if meta_file.exists() else None


def _rules_note(cal: D.Calibration) -> str:
    """``"; with the 90-step rule {...}"`` per further rule of a calibration (``Calibration.also``)."""
    return "".join(f"; with the {a.window}-step rule {dict(a.settings)}" for a in cal.also)


def _write(path: str | os.PathLike, text: str) -> None:
    """Write a CLI output file (its folder created), ending in one newline."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text + "\n")


def _calibrate_cmd(args: argparse.Namespace) -> int:
    from stabilitylab.analysis.early_warning import calibrate_warnings

    runs, history = load_benchmark(args.store)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        cals: dict[int, D.Calibration] = {}
        for e in args.every:  # keyed by the interval the histories are logged at (every=1 on an every=10 store: 10)
            if logged_interval(run_steps(history, e)) in cals:  # the same histories as an earlier --every
                continue
            cal = calibrate_warnings(runs, history, every=e, extend=args.extend, censor=args.censor,
                                     source=f"{args.store}, every={e}")
            cals.setdefault(cal.interval, cal)
    _write(args.out, json.dumps(D.calibrations_to_dict(cals), indent=1))
    for e, cal in cals.items():
        print(f"every={e}: {cal.source}; settings {dict(cal.settings) or 'none (EarlyWarning defaults)'}"
              + _rules_note(cal))
    print(f"calibration: {args.out}  (EarlyWarning(calibration={str(args.out)!r}))")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("warnings", help="build the warnings benchmark or measure the early warning on a store",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    wsub = p.add_subparsers(dest="warnings_command", metavar="SUBCOMMAND")
    solo_help = ("metrics that warn alone, without a second metric hot (default: "
                 f"{' '.join(D.DetectorConfig().solo) or 'none'}; --solo with no metric: none)")
    b = wsub.add_parser("build", help="train the benchmark's runs into sweep stores and label them")
    b.add_argument("--scale", choices=list(SCALES), default="quick",
                   help="quick: CPU, <= 15 min on 2 cores; full: larger proxy, longer runs, one GPU")
    b.add_argument("--out", default=None, help="output folder (default runs/warnings_<scale>)")
    b.add_argument("--executor", choices=["local", "processes", "ray"], default="processes")
    b.add_argument("--workers", type=int, default=2, help="worker processes / Ray tasks (default 2)")
    b.add_argument("--device", default="cpu", help="torch device of the runs")
    b.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="seeds to train instead of the scale's (e.g. a development build for choosing settings)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=_build_cmd)
    e = wsub.add_parser("evaluate", help="held-out lead time, false alarms and forecast coverage of the warning")
    e.add_argument("store", help="benchmark folder (from `warnings build`) or any sweep store with loss histories")
    e.add_argument("--every", type=int, nargs="+", default=list(EVERIES),
                   help="logging intervals to evaluate by subsampling the histories (default 1 10)")
    e.add_argument("--censor", type=int, default=CENSOR,
                   help=f"steps at the end of runs that did not diverge that are not judged (default {CENSOR}: "
                        "the labels' patience)")
    e.add_argument("--settings-from", default=None, metavar="CALIBRATION_JSON",
                   help="fix margin / min_metrics / persist per --every to the settings this calibration file "
                        "carries (e.g. a development build's --calibration-out) instead of choosing them per split")
    e.add_argument("--no-rules", action="store_true",
                   help="leave out the shipped defaults' further rules (at every=1 the sustained rule): the main rule alone")
    e.add_argument("--loss-gate", type=float, default=None,
                   help=f"nats the loss EMA must be above its best for an alarm (default {D.DetectorConfig().loss_gate:g}; "
                        "0: no loss gate)")
    e.add_argument("--solo", nargs="*", default=None, metavar="METRIC", help=solo_help)
    e.add_argument("--json", default=None, help="also write the results as JSON here")
    e.add_argument("--md", default=None, help="also write the markdown here")
    e.add_argument("--calibration-out", default=None,
                   help="write the calibrations on every run, one per --every (JSON), for EarlyWarning(calibration=...)")
    e.add_argument("--report", default=None, help="write an HTML report with the figures to this folder")
    e.set_defaults(func=_evaluate_cmd)
    k = wsub.add_parser("check", help="the warning as calibrated (default: the shipped defaults), nothing "
                                      "recalibrated, on every run of a store")
    k.add_argument("store", help="benchmark folder (from `warnings build`) or any sweep store with loss histories")
    k.add_argument("--calibration", default=None, metavar="CALIBRATION_JSON",
                   help="a calibration file (`warnings calibrate --out`, `evaluate --calibration-out`); default: "
                        "the shipped defaults")
    k.add_argument("--every", type=int, nargs="+", default=list(EVERIES),
                   help="logging intervals to check by subsampling the histories (default 1 10)")
    k.add_argument("--margins", type=float, nargs="*", default=[],
                   help="also check at these threshold margins (e.g. 1 1.5 2), besides the calibration's own")
    k.add_argument("--loss-gates", type=float, nargs="*", default=[],
                   help="also check with these loss gates (nats above the loss's best; 0: none) instead of the "
                        f"default {D.DetectorConfig().loss_gate:g}")
    k.add_argument("--solo", nargs="*", default=None, metavar="METRIC", help=solo_help)
    k.add_argument("--censor", type=int, default=CENSOR,
                   help=f"steps at the end of runs that did not diverge that are not judged (default {CENSOR})")
    k.add_argument("--json", default=None, help="also write the results as JSON here")
    k.add_argument("--md", default=None, help="also write the markdown here")
    k.set_defaults(func=_check_cmd)
    c = wsub.add_parser("calibrate", help="fit the warning's thresholds to your own runs and write a calibration file")
    c.add_argument("store", help="a sweep store (or benchmark folder) with Monitor histories, incl. the loss")
    c.add_argument("--out", required=True, help="calibration JSON to write (EarlyWarning(calibration=FILE))")
    c.add_argument("--every", type=int, nargs="+", default=list(EVERIES),
                   help="logging intervals to calibrate for, by subsampling the histories (default 1 10)")
    c.add_argument("--extend", default=None, metavar="default|CALIBRATION_JSON",
                   help="keep this calibration's thresholds as a floor (`default`: the shipped ones), so your "
                        "stable runs only raise them; the result carries its settings")
    c.add_argument("--censor", type=int, default=0,
                   help="steps at the end of runs that did not diverge left out of the thresholds (default 0)")
    c.set_defaults(func=_calibrate_cmd)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
