"""``stabilitylab reproduce``: the main findings of Wortsman et al. (2023) on the proxy, with one command.

    stabilitylab reproduce --scale quick            # CPU: 42k .. 134k parameters fitted, 1.25M held out, 400 steps
    stabilitylab reproduce --scale full             # one GPU: 0.66M .. 10.8M fitted, 101M held out, 2000 steps

Five studies (shared/reference/papers.md section 1), each a resumable sweep store under ``--out``:

1. ``attention``: LR sensitivity and peak max attention logit per size and LR, without / with qk-layernorm.
2. ``output_logits``: weight decay 0, without / with z-loss 1e-4: drift of ``logits.lse_mean`` (log Z)
   and divergence.
3. ``interventions``: long warm-up, independent weight decay, simple muP and all mitigations combined
   vs the baseline: LR sensitivity per size.
4. ``adam_eps``: global gradient RMS vs size (from study 1's baseline runs) and its extrapolation to
   Adam's eps; eps 1e-8 vs 1e-15 vs Adam-atan2 at the largest size.
5. ``prediction``: ``analysis.predict(holdout="largest")`` on study 1: fit on the smaller sizes, predict
   the largest one's critical / largest stable LR and its peak attention logit per LR, and compare with
   its real runs (``prediction.json``, figure ``prediction_heldout``).

The largest size is the held-out one: ``Scale.small_studies`` lists the studies that skip it (at quick
scale everything but study 1, since it costs more than all other sizes together), and study 1 trains the
fitted sizes with ``Scale.seeds`` and the held-out size with ``Scale.heldout_seeds``.

A point's run id depends only on its size, variant and config, so a run that two studies share (e.g.
the baseline grid of studies 1 and 3) is trained once and copied into the other store, and re-running
skips every finished run. Outputs: ``report.html`` (self-contained), ``report.md``, the figures
(``*.png``), ``findings.parquet`` / ``findings.md`` and one parquet file per table under ``tables/``.
"""

from __future__ import annotations

import argparse
import base64
import html
import importlib.util
import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stabilitylab import metrics as M

STUDIES = ("attention", "output_logits", "interventions", "adam_eps", "prediction")
#: Studies that train runs (the others analyse study 1's store).
_TRAINING = ("attention", "output_logits", "interventions", "adam_eps")


@dataclass(frozen=True, kw_only=True)
class Scale:
    """Sizes, learning rates and run length of a reproduction."""

    name: str
    """Label (the default output folder is ``runs/reproduce_<name>``)."""
    sizes: tuple
    """``SweepSpec`` sizes (preset names or dicts), smallest first; at least 3 (4 give prediction intervals)."""
    lrs: tuple[float, ...]
    """Peak learning-rate grid."""
    steps: int
    """Optimizer steps per run."""
    batch_size: int
    """Sequences per step."""
    seq_len: int
    """Tokens per sequence."""
    every: int = 10
    """Monitor logging interval in steps."""
    long_warmup: float = 0.4
    """Warm-up of the ``long_warmup`` variant as a fraction of ``steps`` (the baseline warms up for 10%)."""
    high_lr: float = 1e-2
    """LRs at or above this count as "high" in the findings."""
    seeds: tuple[int, ...] = (0,)
    """Seeds of the attention study (the prediction's bootstrap resamples them); other studies use the first."""
    heldout_seeds: tuple[int, ...] | None = None
    """Seeds of the largest (held-out) size in the attention study (None: ``seeds``)."""
    small_studies: tuple[str, ...] = ()
    """Training studies that skip the largest size (the held-out one, by far the most expensive to train)."""

    def __post_init__(self) -> None:
        if len(self.sizes) < 3:
            raise ValueError(f"Scale(sizes={self.sizes!r}): need >= 3 sizes (2 to fit a trend, 1 to predict)")
        for name in ("seeds", "heldout_seeds"):
            v = getattr(self, name)
            if v is not None and (not v or any(not isinstance(s, int) or s < 0 for s in v)):
                raise ValueError(f"Scale({name}={v!r}): need a non-empty tuple of ints >= 0")
        bad = [s for s in self.small_studies if s not in _TRAINING]
        if bad:
            raise ValueError(f"Scale(small_studies={self.small_studies!r}): {bad} are not training studies; "
                             f"choose from {', '.join(_TRAINING)}")
        if len(self.lrs) < 2 or any(not (isinstance(v, float) and v > 0) for v in self.lrs):
            raise ValueError(f"Scale(lrs={self.lrs!r}): need >= 2 positive float learning rates")
        if not 0 < self.long_warmup < 1:
            raise ValueError(f"Scale(long_warmup={self.long_warmup!r}): must be a fraction in (0, 1)")


#: Peak LRs 10^-2.5 .. 10^0, one grid step = a factor sqrt(10).
_LRS = tuple(float(v) for v in np.logspace(-2.5, 0, 6))
SCALES: dict[str, Scale] = {
    # head dim 16 at every size; the held-out d128 L6 has 9.4x the parameters of the largest fitted size.
    "quick": Scale(name="quick", sizes=({"name": "d32L2", "d_model": 32, "n_layers": 2, "head_dim": 16},
                                        {"name": "d48L2", "d_model": 48, "n_layers": 2, "head_dim": 16},
                                        {"name": "d64L2", "d_model": 64, "n_layers": 2, "head_dim": 16},
                                        {"name": "d128L6", "d_model": 128, "n_layers": 6, "head_dim": 16}),
                   lrs=_LRS, steps=400, batch_size=8, seq_len=32, seeds=tuple(range(8)), heldout_seeds=(0,),
                   small_studies=("output_logits", "interventions", "adam_eps")),
    # head dim 64; the held-out d1024 L8 (~101M) has 9.4x the parameters of "l" (~10.8M).
    "full": Scale(name="full", sizes=("s", "m", "l", {"name": "d1024L8", "d_model": 1024, "n_layers": 8,
                                                      "head_dim": 64}),
                  lrs=tuple(float(v) for v in np.logspace(-3.5, 0, 8)), steps=2000, batch_size=32, seq_len=64,
                  seeds=(0, 1, 2), heldout_seeds=(0, 1)),
}


@dataclass
class Reproduction:
    """What ``reproduce`` measured: the findings, every table, the timings and where it wrote them."""

    findings: pd.DataFrame
    tables: dict[str, pd.DataFrame]
    timings: dict[str, float]
    counts: dict[str, dict[str, int]]
    out: Path
    report_html: Path | None = None
    report_md: Path | None = None
    figures: dict[str, Path] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- specs
def study_specs(scale: Scale, device: str = "cpu") -> dict[str, list]:
    """The sweeps of each training study: one ``SweepSpec`` per variant (so each can pick its executor).

    Args:
        scale: sizes, LRs and run length.
        device: torch device of every run.

    Returns:
        ``{study: [SweepSpec, ...]}`` for the studies in ``_TRAINING``.
    """
    from stabilitylab.sweeps import SweepSpec

    common = dict(lrs=list(scale.lrs), steps=scale.steps, batch_size=scale.batch_size, seq_len=scale.seq_len,
                  every=scale.every, device=device)
    long = {"name": "long_warmup", "bundle": "baseline", "warmup_steps": max(1, int(scale.long_warmup * scale.steps))}

    def sizes_of(study: str) -> list:
        return list(scale.sizes[:-1] if study in scale.small_studies else scale.sizes)

    def specs(study: str, variants: list, sizes: Sequence | None = None, suffix: str = "", **kw: Any) -> list:
        sizes = sizes_of(study) if sizes is None else sizes
        return [SweepSpec(name=f"{study}-{v if isinstance(v, str) else v['name']}{suffix}", sizes=list(sizes),
                          variants=[v], **common, **kw) for v in variants]

    attention = ["baseline", "qk_layernorm"]
    held = scale.heldout_seeds if scale.heldout_seeds is not None else scale.seeds
    if tuple(held) == tuple(scale.seeds):
        att = specs("attention", attention, seeds=list(scale.seeds))
    else:  # fitted sizes with every seed, the held-out size with its own seeds
        att = [s for v in attention for s in
               (specs("attention", [v], scale.sizes[:-1], seeds=list(scale.seeds))
                + specs("attention", [v], scale.sizes[-1:], "-heldout", seeds=list(held)))]
    first = [scale.seeds[0]]
    return {
        "attention": att,
        "output_logits": specs("output_logits", ["baseline", "z_loss"], weight_decay=0.0, seeds=first),
        "interventions": specs("interventions", ["baseline", long, "indep_wd", "mup", "all"], seeds=first),
        "adam_eps": specs("adam_eps", ["baseline", "eps1e-15", "adam_atan2"], sizes=sizes_of("adam_eps")[-1:],
                          seeds=first),
    }


def default_executor() -> str:
    """``"vectorized"`` when ``stabilitylab.proxy.vectorized.train_many`` is importable, else ``"local"``."""
    try:
        found = importlib.util.find_spec("stabilitylab.proxy.vectorized") is not None
    except ImportError:
        found = False
    if found:
        from stabilitylab.proxy import vectorized

        found = hasattr(vectorized, "train_many")
    return "vectorized" if found else "local"


def _executor_for(spec, executor: str) -> str:
    """``vectorized`` trains AdamW with warm-up + cosine only; other points (Adam-atan2) use ``local``."""
    from stabilitylab.proxy.vectorized import unsupported

    if executor == "vectorized" and any(unsupported(p.config) for p in spec.points()):
        return "local"
    return executor


# ---------------------------------------------------------------------------------------------- training
def _import_shared(store, spec, others: list[Path]) -> int:
    """Copy finished runs of ``spec`` that another study's store already holds (same run id); returns the count."""
    from stabilitylab.sweeps.store import FINISHED, SweepStore

    have = store.rows()
    todo = {p.run_id for p in spec.points() if have.get(p.run_id, {}).get("status") not in FINISHED}
    n = 0
    for path in others:
        if not todo or not (path / "runs").is_dir():
            continue
        src = SweepStore(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # foreign or partial files there are that store's business
            rows = {k: r for k, r in src.rows().items() if k in todo and r["status"] in FINISHED}
        for rid, row in rows.items():
            hist = src.history([rid])
            store.write(row, hist if len(hist) else None)
            todo.discard(rid)
            n += 1
    return n


def run_study(study: str, specs: list, out: Path, executor: str, workers: int | None = None,
              progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, int]]:
    """Train (or resume, or copy from sibling studies) every point of ``specs`` into ``out/<study>``.

    Returns:
        ``(runs, history, counts)``: this study's finished runs and their history, and how many points
        were ``trained``, ``reused`` (copied from another study's store) and ``resumed`` (already there).
    """
    from stabilitylab.sweeps import load_sweep, sweep
    from stabilitylab.sweeps.run import _trainer_name
    from stabilitylab.sweeps.store import FINISHED, SweepStore

    path = out / study
    others = sorted(p for p in out.iterdir() if p.is_dir() and p != path and (p / "spec.json").exists())
    counts = {"trained": 0, "reused": 0, "resumed": 0, "failed": 0}
    ids: list[str] = []
    for spec in specs:
        store = SweepStore(path)
        store.open(spec, _trainer_name(None), extend=True)
        counts["reused"] += _import_shared(store, spec, others)
        rows = store.rows()
        done = sum(rows.get(p.run_id, {}).get("status") in FINISHED for p in spec.points())
        ex = _executor_for(spec, executor)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"sweep .* runs failed")
            runs = sweep(spec, executor=ex, store=path, workers=workers, extend=True, progress=progress)
            if ex != "local" and (runs["status"] == "failed").any():
                print(f"reproduce {study}: {int((runs['status'] == 'failed').sum())} run(s) failed under "
                      f"executor {ex!r} (first error: {runs.loc[runs['status'] == 'failed', 'error'].iloc[0][-200:]!r});"
                      " retrying them with executor 'local'")
                runs = sweep(spec, executor="local", store=path, extend=True, progress=progress)
        counts["trained"] += len(spec) - done
        counts["failed"] += int((runs["status"] == "failed").sum())
        ids += list(runs["run_id"])
    counts["resumed"] = len(ids) - counts["trained"] - counts["reused"]
    runs, history = load_sweep(path)
    runs = runs[runs["run_id"].isin(ids) & (runs["status"] != "failed")].reset_index(drop=True)
    history = history[history["run_id"].isin(runs["run_id"])].reset_index(drop=True)
    return runs, history, counts


# ---------------------------------------------------------------------------------------------- per-run numbers
def run_summary(runs: pd.DataFrame, history: pd.DataFrame, late_frac: float = 0.25) -> pd.DataFrame:
    """One row per run: labels, outcome and the monitored numbers the findings use.

    Columns added to ``run_id, size, n_params, variant, lr, final_loss, init_loss, diverged``:

    - ``peak_attn_logit``: max over layers and logged steps of ``attn.max_logit`` (finite values);
    - ``lse_initial`` / ``lse_final``: first / last finite logged ``logits.lse_mean`` (nats);
      ``lse_drift = lse_final - lse_initial``; ``lse_max_abs`` = max over logged steps of ``|lse_mean|``;
    - ``grad_rms``: global gradient RMS ``grad.global_norm / sqrt(n_params)`` (before clipping), median
      over the last ``late_frac`` of the logged steps.
    """
    cols = ["run_id", "size", "n_params", "variant", "lr", "final_loss", "init_loss", "diverged"]
    out = runs[cols].copy().set_index("run_id")
    h = history[np.isfinite(history["value"].astype(float))]
    attn = h[h["metric"] == M.ATTN_MAX_LOGIT].groupby("run_id")["value"].max()
    lse = h[h["metric"] == M.LOGITS_LSE_MEAN].groupby(["run_id", "step"])["value"].mean().sort_index()
    g = lse.groupby(level="run_id")
    gn = h[h["metric"] == M.GRAD_GLOBAL_NORM].groupby(["run_id", "step"])["value"].max().sort_index()
    late = gn.groupby(level="run_id").apply(lambda s: s.iloc[-max(1, math.ceil(len(s) * late_frac)):].median())
    out["peak_attn_logit"] = attn
    out["lse_initial"], out["lse_final"] = g.first(), g.last()
    out["lse_drift"] = out["lse_final"] - out["lse_initial"]
    out["lse_max_abs"] = lse.abs().groupby(level="run_id").max()
    out["grad_rms"] = late / np.sqrt(out["n_params"].astype(float))
    return out.reset_index()


def _pivot(summary: pd.DataFrame, value: str) -> pd.DataFrame:
    """``value`` per (variant, size) row and LR column, sizes in parameter order."""
    p = summary.pivot_table(index=["variant", "n_params", "size"], columns="lr", values=value, aggfunc="median")
    p.columns = [f"lr={c:.3g}" for c in p.columns]
    return p.reset_index().drop(columns="n_params")


def _sens(runs: pd.DataFrame) -> pd.DataFrame:
    from stabilitylab.analysis import lr_sensitivity

    return lr_sensitivity(runs, by=["variant", "n_params", "size"])


def _sens_parts(runs: pd.DataFrame, variant: str, size: str) -> tuple[float, float]:
    """LR sensitivity of one curve split into the part from LRs below its best LR (under-training) and above it.

    The two parts sum to ``lr_sensitivity``: per LR the seed mean of ``min(L, L0)`` (diverged = ``L0``),
    minus ``L*``, averaged over the grid, with the LRs below / above the best LR summed separately.
    """
    from stabilitylab.analysis.predict import curve_loss

    g = runs[(runs["variant"] == variant) & (runs["size"] == size)]
    if g.empty:
        return math.nan, math.nan
    c = g.assign(_L=curve_loss(g)).groupby("lr")["_L"].mean().sort_index()
    gap = c.to_numpy() - c.min()
    best = int(np.argmin(c.to_numpy()))
    return float(gap[:best].sum() / len(c)), float(gap[best + 1:].sum() / len(c))


def _get(table: pd.DataFrame, variant: str, size: str, col: str) -> float:
    v = table.loc[(table["variant"] == variant) & (table["size"] == size), col]
    return float(v.iloc[0]) if len(v) else math.nan


def _finding(study: str, finding: str, measured: str, held: bool | None, note: str = "") -> dict[str, Any]:
    return {"study": study, "finding": finding, "measured": measured,
            "held": "n/a" if held is None else ("yes" if held else "no"), "note": note}


def _sizes(summary: pd.DataFrame) -> list[str]:
    return list(summary.groupby("size")["n_params"].median().sort_values().index)


def _fmt_sizes(sizes: list[str], values) -> str:
    return " / ".join(f"{v:.3g}" for v in values) + f" at {' / '.join(sizes)}"


# ---------------------------------------------------------------------------------------------- studies
def analyse_attention(runs: pd.DataFrame, history: pd.DataFrame, scale: Scale):
    """Study 1 tables and findings: LR sensitivity and peak attention logit, without / with qk-layernorm."""
    s = run_summary(runs, history)
    sens = _sens(runs)
    sizes = _sizes(s)
    big = sizes[-1]
    base = [_get(sens, "baseline", z, "lr_sensitivity") for z in sizes]
    qk = [_get(sens, "qk_layernorm", z, "lr_sensitivity") for z in sizes]
    high = s[(s["size"] == big) & (s["lr"] >= scale.high_lr * (1 - 1e-9))]
    peak = high.groupby("variant")["peak_attn_logit"].max()
    ratio = peak.get("baseline", math.nan) / peak.get("qk_layernorm", math.nan)
    b = s[(s["size"] == big) & (s["variant"] == "baseline")].sort_values("lr")
    growth = b["peak_attn_logit"].max() / b["peak_attn_logit"].iloc[0]
    parts = [_sens_parts(runs, "baseline", z) for z in sizes]
    rises = base[-1] > base[0]
    split = (f"of which LRs below the best LR (under-training) {' / '.join(f'{a:.3g}' for a, _ in parts)} and "
             f"above it (instability) {' / '.join(f'{b:.3g}' for _, b in parts)}")
    findings = [
        _finding("attention", "without qk-layernorm, LR sensitivity rises with size",
                 "LR sensitivity " + _fmt_sizes(sizes, base) + "; " + split, rises,
                 "" if rises else "the under-training part falls with size faster than the instability part "
                 "rises (short runs train the small models' low LRs least); expected to hold at --scale full "
                 "(2000 steps, 0.66M..101M parameters) and at the paper's 1e5 steps"),
        _finding("attention", "with qk-layernorm, LR sensitivity stays low (below the baseline at the largest "
                              "size and rising less with size)",
                 "LR sensitivity " + _fmt_sizes(sizes, qk),
                 qk[-1] < base[-1] and (qk[-1] - qk[0]) < (base[-1] - base[0])),
        _finding("attention", "the LR sensitivity that qk-layernorm removes (baseline - qk-layernorm) grows "
                              "with size",
                 "difference " + _fmt_sizes(sizes, np.subtract(base, qk)), base[-1] - qk[-1] > base[0] - qk[0]),
        _finding("attention", f"peak max attention logit at high LR (>= {scale.high_lr:g}) is >= 10x larger "
                              "without qk-layernorm",
                 f"{peak.get('baseline', math.nan):.3g} without vs {peak.get('qk_layernorm', math.nan):.3g} "
                 f"with at size {big} (x{ratio:.3g})", bool(ratio >= 10)),
        _finding("attention", "without qk-layernorm, the max attention logit grows by orders of magnitude "
                              "with LR",
                 f"peak {b['peak_attn_logit'].iloc[0]:.3g} at lr={b['lr'].iloc[0]:.3g} -> "
                 f"{b['peak_attn_logit'].max():.3g} (x{growth:.3g}) at size {big}", bool(growth >= 10)),
    ]
    tables = {"attention_sensitivity": sens, "attention_peak_logit": _pivot(s, "peak_attn_logit"),
              "attention_final_loss": _pivot(s, "final_loss")}
    return tables, findings, s


def analyse_output_logits(runs: pd.DataFrame, history: pd.DataFrame, scale: Scale):
    """Study 2, without / with z-loss (weight decay 0): where log Z ends up and divergence.

    Per (size, LR) pair of runs: ``|lse_final|`` (distance of the final log Z from 0, what z-loss
    penalises), ``lse_drift`` (final - initial) and ``lse_max_abs``; the findings compare the pairs in
    which neither run diverged.
    """
    s = run_summary(runs, history)
    key = ["n_params", "size", "lr"]
    b, z = (s[s["variant"] == v].set_index(key) for v in ("baseline", "z_loss"))
    pairs = (("baseline", b), ("z_loss", z))
    comp = pd.DataFrame({
        **{f"|lse_final| {v}": t["lse_final"].abs() for v, t in pairs},
        **{f"lse_drift {v}": t["lse_drift"] for v, t in pairs},
        **{f"max|lse| {v}": t["lse_max_abs"] for v, t in pairs},
        **{f"diverged {v}": t["diverged"].astype(bool) for v, t in pairs},
    }).dropna(subset=["|lse_final| baseline", "|lse_final| z_loss"]).reset_index().sort_values(key)
    ok = comp[~comp["diverged baseline"] & ~comp["diverged z_loss"]]
    big = ok[ok["n_params"] == ok["n_params"].max()]
    findings = []
    for col, label in (("|lse_final|", "z-loss lowers the log Z drift: |lse_mean| at the end of training"),
                       ("max|lse|", "z-loss keeps log Z nearer 0 over training: largest |lse_mean|")):
        lower = ok[f"{col} z_loss"] < ok[f"{col} baseline"]
        mb, mz = big[f"{col} baseline"].mean(), big[f"{col} z_loss"].mean()
        held = bool(len(ok)) and lower.sum() > len(ok) / 2 and mz < mb
        higher = ok[~lower]
        note = "" if held or higher.empty else (
            "higher with z-loss at " + ", ".join(f"{r['size']} lr={r['lr']:.3g} ({r[col + ' z_loss']:.3g} vs "
                                                 f"{r[col + ' baseline']:.3g})" for _, r in higher.iterrows())
            + f"; z-loss 1e-4 adds a gradient of only 2e-4 x log Z per token, which a {scale.steps}-step run at "
            "these LRs does not turn into a lower peak; the paper's effect is over 1e5 steps (expected at "
            "longer runs than --scale full)")
        findings.append(_finding(
            "output_logits", f"{label} (weight decay 0)",
            f"mean over LRs at size {big['size'].iloc[0] if len(big) else '-'}: {mb:.4g} without vs {mz:.4g} "
            f"with z-loss; lower with z-loss in {int(lower.sum())} of {len(ok)} (size, LR) pairs", held, note))
    n_div = s.groupby("variant")["diverged"].sum()
    findings.append(_finding(
        "output_logits", "without z-loss the drift is followed by divergence at high LR",
        f"diverged runs: {int(n_div.get('baseline', 0))} without vs {int(n_div.get('z_loss', 0))} with z-loss",
        bool(n_div.get("baseline", 0) > n_div.get("z_loss", 0)),
        "" if n_div.get("baseline", 0) > n_div.get("z_loss", 0) else
        f"no run's final loss exceeded its init loss (largest |log Z| without z-loss: "
        f"{s.loc[s['variant'] == 'baseline', 'lse_max_abs'].max():.3g} nats over {scale.steps} steps); the paper "
        "sees this divergence in long runs without weight decay, so it is expected at --scale full or longer runs"))
    tables = {"output_logits_lse": comp.drop(columns="n_params"), "output_logits_sensitivity": _sens(runs)}
    return tables, findings, s


def analyse_interventions(runs: pd.DataFrame, history: pd.DataFrame, scale: Scale):
    """Study 3: LR sensitivity of each intervention per size vs the baseline."""
    from stabilitylab.proxy.model import ProxyConfig

    base_width = ProxyConfig().mup_base_width
    sens = _sens(runs)
    sizes = _sizes(run_summary(runs, history))
    wide = sens.pivot_table(index=["n_params", "size"], columns="variant", values="lr_sensitivity").reset_index()
    findings = []
    labels = {"long_warmup": "a longer warm-up", "indep_wd": "independent weight decay", "mup": "simple muP",
              "all": "all mitigations combined"}
    b = [_get(sens, "baseline", z, "lr_sensitivity") for z in sizes]
    for v, label in labels.items():
        x = [_get(sens, v, z, "lr_sensitivity") for z in sizes]
        if not np.isfinite(x[-1]):
            continue
        note = ""
        width = next((z.get("d_model") if isinstance(z, dict) else None for z in scale.sizes
                      if (z if isinstance(z, str) else z.get("name")) == sizes[-1]), None)
        if v == "mup" and not x[-1] < b[-1] and width == base_width:
            note = (f"at the largest size of this study the width equals muP's base width ({base_width}), so its "
                    "multipliers are 1 and the run is the baseline's; expected to show at wider sizes (--scale full)")
        if v == "indep_wd" and not x[-1] < b[-1]:
            total = 1e-4 * scale.steps * 0.5
            note = (f"decoupled decay 1e-4 x schedule shrinks weights by only ~{total:.2g} in total over "
                    f"{scale.steps} steps (coupled decay: lr x 1e-4, less still), so both recipes barely decay; "
                    "the paper's 1e5-step runs decay by O(1), where the difference is expected")
        findings.append(_finding("interventions", f"{label} lowers LR sensitivity (largest size)",
                                 f"{x[-1]:.3g} vs baseline {b[-1]:.3g} at size {sizes[-1]}; lower at "
                                 f"{sum(a < c for a, c in zip(x, b))} of {len(sizes)} sizes", x[-1] < b[-1], note))
    return {"interventions_sensitivity": wide.drop(columns="n_params")}, findings, None


def analyse_adam_eps(runs: pd.DataFrame, history: pd.DataFrame, scale: Scale, attention: pd.DataFrame | None):
    """Study 4: grad RMS vs size (study 1 baseline runs) and eps 1e-8 / 1e-15 / Adam-atan2 at the largest size."""
    from stabilitylab.analysis import fit_scaling

    tables, findings, fit = {}, [], None
    if attention is not None:
        b = attention[(attention["variant"] == "baseline") & ~attention["diverged"].astype(bool)]
        per = b.groupby(["size", "n_params"], as_index=False)["grad_rms"].median().sort_values("n_params")
        per = per.dropna()
        if len(per) >= 2:
            fit = fit_scaling(per, "n_params", "grad_rms", degree=1)
            cross = fit.solve(1e-8, x_range=(per["n_params"].min(), 1e30))
            lo, hi = fit.exponent_interval
            per["fit_exponent"] = fit.exponent
            tables["adam_eps_grad_rms"] = per
            findings.append(_finding(
                "adam_eps", "gradient RMS falls as models grow (toward Adam's eps)",
                f"median grad RMS {_fmt_sizes(list(per['size']), per['grad_rms'])}; power law exponent "
                f"{fit.exponent:.3g} [{lo:.3g}, {hi:.3g}]; extrapolated to reach eps=1e-8 at ~{cross['x']:.3g} "
                f"[{cross['lo']:.3g}, {cross['hi']:.3g}] parameters",
                fit.exponent < 0))
    sens = _sens(runs)
    tables["adam_eps_sensitivity"] = sens
    big = sens.sort_values("n_params")["size"].iloc[-1]
    ref = _get(sens, "baseline", big, "best_loss")
    for v, label in (("eps1e-15", "eps 1e-15"), ("adam_atan2", "Adam-atan2")):
        x = _get(sens, v, big, "best_loss")
        if np.isfinite(x):
            findings.append(_finding(
                "adam_eps", f"{label} trains at least as well as eps 1e-8 at the largest size (best loss "
                            "within 0.02 nats or lower)",
                f"best loss {x:.4g} vs {ref:.4g} (eps 1e-8) at size {big}; LR sensitivity "
                f"{_get(sens, v, big, 'lr_sensitivity'):.3g} vs {_get(sens, 'baseline', big, 'lr_sensitivity'):.3g}",
                x <= ref + 0.02, "eps matters once grad RMS nears eps; at small sizes grad RMS >> eps"))
    return tables, findings, fit


def analyse_prediction(runs: pd.DataFrame, history: pd.DataFrame, scale: Scale):
    """Study 5: ``analysis.predict`` on study 1: fit the smaller sizes, predict the largest, compare with its runs.

    Returns:
        ``(tables, findings, prediction)``.
    """
    from stabilitylab.analysis import predict

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        pred = predict(runs, history, holdout="largest")
    sizes = runs.groupby("size")["n_params"].median().sort_values()
    fitted = sizes.drop(pred.heldout)
    ratio = pred.target_n_params / fitted.iloc[-1]
    span = f"fitted on {' / '.join(fitted.index)}, held out {pred.heldout} ({ratio:.3g}x the largest fitted size)"
    lever = math.log10(pred.target_n_params / fitted.iloc[-1]) / max(1e-12, math.log10(fitted.iloc[-1] / fitted.iloc[0]))
    findings = []
    for _, c in pred.critical_lr.iterrows():
        v = c["variant"]
        fit = pred.fits.get((v, "critical_lr"), (None,))[0]
        text = (f"{span}: largest stable LR predicted in [{c['stable_lo']:.3g}, {c['stable_hi']:.3g}] "
                f"({c['stable_width_steps']:.2f} grid steps), observed {c['observed_largest_stable_lr']:.3g}; from "
                f"the critical LR (leaves the basin) predicted {c['predicted']:.3g} [{c['lo']:.3g}, {c['hi']:.3g}] "
                f"({c['width_steps']:.2f} grid steps wide), observed {c['observed_critical_lr']:.3g}")
        held = bool(c["stable_inside"]) and bool(c["stable_width_steps"] <= 1 + 1e-9)
        note = c["note"]
        if not held and fit is not None:
            why = []
            if not c["stable_inside"]:
                why.append("the observed largest stable LR is outside the interval")
            if c["stable_width_steps"] > 1 + 1e-9:
                why.append(f"the interval spans {c['stable_width_steps']:.2f} grid steps")
            note = (f"{'; '.join(why)}: seed noise of the critical LR {fit.sigma:.3g} decades per run, lack of fit "
                    f"{fit.tau:.3g} decades, extrapolating {lever:.2g}x the fitted log-size range; expected to "
                    "narrow at --scale full (3 seeds, 0.66M..101M parameters, 2000 steps)")
        findings.append(_finding("prediction", f"the largest stable LR of a larger model is predicted from the "
                                               f"scaling of smaller models ({v})", text, held, note))
        findings.append(_finding(
            "prediction", f"the LR at which the larger model's LR-vs-loss curve leaves the basin is predicted ({v})",
            f"predicted {c['predicted']:.3g} [{c['lo']:.3g}, {c['hi']:.3g}] vs observed {c['observed_critical_lr']:.3g}",
            None if c["critical_inside"] is None else bool(c["critical_inside"])))
    for v, g in pred.attn_logit.groupby("variant", sort=True):
        hits = int((g["inside"] == True).sum())  # noqa: E712 - None (no observation) is not a hit
        per = "; ".join(f"lr={r.lr:.3g}: {r.observed:.3g} in [{r.lo:.3g}, {r.hi:.3g}]" if r.inside else
                        f"lr={r.lr:.3g}: {r.observed:.3g} NOT in [{r.lo:.3g}, {r.hi:.3g}]" for r in g.itertuples())
        need = math.ceil(2 * len(g) / 3)
        miss = g[g["inside"] == False]  # noqa: E712
        note = "" if miss.empty else (
            "misses: observed / predicted = " + ", ".join(f"{r.observed / r.predicted:.2g} at lr={r.lr:.3g}"
                                                         for r in miss.itertuples())
            + (" (below the interval: the logit's growth with size slows beyond the fitted sizes at these LRs, "
               "which a power law fitted on the small sizes does not capture)"
               if (miss["observed"] < miss["lo"]).all() else ""))
        findings.append(_finding(
            "prediction", f"at a fixed LR the max attention logit follows a trend in model size that predicts the "
                          f"larger model ({v})",
            f"{span}: inside the {pred.level:.0%} interval at {hits} of {len(g)} LRs ({per})", hits >= need, note))
    tables = {"prediction_critical_lr": pred.critical_lr, "prediction_attn_logit": pred.attn_logit,
              "prediction_basin_edges": pred.edges}
    return tables, findings, pred


# ---------------------------------------------------------------------------------------------- report
def _figures(study: str, runs: pd.DataFrame, history: pd.DataFrame, extra) -> dict[str, Any]:
    from stabilitylab import plots

    figs = {f"{study}_lr_vs_loss": plots.lr_vs_loss(runs)}
    if runs["size"].nunique() >= 2:
        figs[f"{study}_lr_sensitivity_vs_size"] = plots.lr_sensitivity_vs_size(runs)
    if study == "attention" and (history["metric"] == M.ATTN_MAX_LOGIT).any():
        figs["attention_max_logit"] = plots.max_attention_logit(history, runs)
    if study == "output_logits" and (history["metric"] == M.LOGITS_LSE_MEAN).any():
        big = runs.sort_values("n_params")["size"].iloc[-1]
        figs["output_logits_lse_drift"] = plots.lse_drift(history, runs[runs["size"] == big])
    if study == "adam_eps" and extra is not None:
        figs["adam_eps_grad_rms_fit"] = plots.scaling_fit(extra, title="grad RMS vs size (baseline)")
    return figs


def _write_report(rep: Reproduction, scale: Scale, executor: str, device: str, figs: dict[str, Any]) -> None:
    from stabilitylab import plots
    from stabilitylab.report import _fmt, _markdown

    out = rep.out
    (out / "tables").mkdir(parents=True, exist_ok=True)
    for name, df in {"findings": rep.findings, **rep.tables}.items():
        df.to_parquet(out / "tables" / f"{name}.parquet", index=False)
    rep.findings.to_parquet(out / "findings.parquet", index=False)
    (out / "findings.md").write_text(_markdown(rep.findings) + "\n", encoding="utf-8")
    for name, fig in figs.items():
        rep.figures[name] = Path(plots.save(fig, out / f"{name}.png", dpi=100))
    title = f"stabilitylab reproduce --scale {scale.name}"
    setup = (f"Proxy sizes {', '.join(s if isinstance(s, str) else s['name'] for s in scale.sizes)}; "
             f"LRs {', '.join(f'{v:.3g}' for v in scale.lrs)}; {scale.steps} steps x {scale.batch_size} "
             f"sequences x {scale.seq_len} tokens; seeds {list(scale.seeds)} in study 1 (held-out size "
             f"{list(scale.heldout_seeds if scale.heldout_seeds is not None else scale.seeds)}), "
             f"{scale.seeds[0]} elsewhere; studies without the largest size: "
             f"{', '.join(scale.small_studies) or 'none'}; executor {executor}; device {device}.")
    timing = pd.DataFrame([{"study": k, "wall_s": v, **rep.counts.get(k, {})} for k, v in rep.timings.items()])
    sections = [("Findings", rep.findings), ("Timing", timing), *rep.tables.items()]
    md = [f"# {title}", "", setup, ""]
    body = [f"<h1>{html.escape(title)}</h1><p>{html.escape(setup)}</p>"]
    for name, df in sections:
        md += [f"## {name}", "", _markdown(df) if len(df) else "(no rows)", ""]
        body += [f"<h2>{html.escape(name)}</h2>", _fmt(df).to_html(index=False, border=0)]
    md.append("## Figures\n")
    body.append("<h2>Figures</h2>")
    for name, png in rep.figures.items():
        b64 = base64.b64encode(png.read_bytes()).decode("ascii")
        body.append(f'<h3>{html.escape(name)}</h3><img alt="{name}" src="data:image/png;base64,{b64}"/>')
        md.append(f"![{name}]({png.name})")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;"
             "font-size:12px}td,th{padding:2px 6px;border-bottom:1px solid #ddd}img{max-width:100%}")
    rep.report_html, rep.report_md = out / "report.html", out / "report.md"
    rep.report_html.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
                               f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>",
                               encoding="utf-8")
    rep.report_md.write_text("\n".join(md) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------- entry point
def reproduce(scale: str | Scale = "quick", out: str | Path | None = None, executor: str | None = None,
              workers: int | None = None, studies: Sequence[str] = STUDIES, device: str | None = None,
              progress: bool = True) -> Reproduction:
    """Run the studies (resuming from ``out``) and write the report; prints the wall time per study.

    Args:
        scale: ``"quick"`` (CPU, minutes), ``"full"`` (one GPU) or a ``Scale``.
        out: output folder (default ``runs/reproduce_<scale name>``).
        executor: sweep executor (default: ``"vectorized"`` when available, else ``"local"``); points the
            vectorized executor cannot train (Adam-atan2) run with ``"local"``.
        workers: worker processes / Ray tasks (``processes`` / ``ray`` executors).
        studies: subset of ``STUDIES`` (``prediction`` and the grad-RMS part of ``adam_eps`` need ``attention``).
        device: torch device (default ``"cuda"`` when available, else ``"cpu"``).
        progress: tqdm progress bars.

    Returns:
        a ``Reproduction`` (findings, tables, timings in seconds, counts of trained / reused runs, paths).
    """
    from stabilitylab.sweeps.executors import EXECUTORS

    if isinstance(scale, str):
        if scale not in SCALES:
            raise ValueError(f"reproduce(scale={scale!r}): choose one of {', '.join(SCALES)} or pass a Scale")
        scale = SCALES[scale]
    if not isinstance(scale, Scale):
        raise TypeError(f"reproduce(scale=...): expected 'quick', 'full' or a Scale, got {type(scale).__name__}")
    executor = executor or default_executor()
    if executor not in EXECUTORS:
        raise ValueError(f"reproduce(executor={executor!r}): choose one of {', '.join(EXECUTORS)}")
    bad = [s for s in studies if s not in STUDIES]
    if bad or not studies:
        raise ValueError(f"reproduce(studies={list(studies)!r}): choose a non-empty subset of {', '.join(STUDIES)}")
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out) if out is not None else Path("runs") / f"reproduce_{scale.name}"
    out.mkdir(parents=True, exist_ok=True)
    specs = study_specs(scale, device)
    data: dict[str, tuple[pd.DataFrame, pd.DataFrame]] = {}
    rep = Reproduction(findings=pd.DataFrame(), tables={}, timings={}, counts={}, out=out)
    findings: list[dict] = []
    figs: dict[str, Any] = {}
    summary_attention = None
    t_all = time.time()
    for study in STUDIES:
        need = study in studies or (study == "attention" and "prediction" in studies)
        if not need:
            continue
        t0 = time.time()
        if study in _TRAINING:
            runs, history, rep.counts[study] = run_study(study, specs[study], out, executor, workers, progress)
            data[study] = (runs, history)
        else:
            runs, history = data["attention"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            if study == "attention":
                tables, f, summary_attention = analyse_attention(runs, history, scale)
            elif study == "output_logits":
                tables, f, _ = analyse_output_logits(runs, history, scale)
            elif study == "interventions":
                tables, f, _ = analyse_interventions(runs, history, scale)
            elif study == "adam_eps":
                tables, f, extra = analyse_adam_eps(runs, history, scale, summary_attention)
            else:
                tables, f, pred = analyse_prediction(runs, history, scale)
                (out / "prediction.json").write_text(json.dumps(pred.summary(), indent=1) + "\n", encoding="utf-8")
                if pred.fits:
                    from stabilitylab import plots

                    figs["prediction_heldout"] = plots.heldout_prediction(pred)
            if study in _TRAINING:
                figs.update(_figures(study, runs, history, extra if study == "adam_eps" else None))
        rep.tables.update(tables)
        findings += f
        rep.timings[study] = time.time() - t0
        print(f"reproduce {study}: {rep.timings[study]:.1f} s"
              + (f" ({rep.counts[study]['trained']} trained, {rep.counts[study]['reused']} reused, "
                 f"{rep.counts[study]['resumed']} resumed)" if study in rep.counts else ""), flush=True)
    rep.findings = pd.DataFrame(findings, columns=["study", "finding", "measured", "held", "note"])
    rep.tables["run_times"] = _run_times(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _write_report(rep, scale, executor, device, figs)
    rep.timings["total"] = time.time() - t_all
    print(f"reproduce: total {rep.timings['total']:.1f} s; report {rep.report_html}", flush=True)
    return rep


def _run_times(data: dict[str, tuple[pd.DataFrame, pd.DataFrame]]) -> pd.DataFrame:
    """Mean wall time per run by size and variant over the distinct runs of every study (seconds)."""
    runs = pd.concat([r for r, _ in data.values()], ignore_index=True).drop_duplicates("run_id")
    return runs.groupby("size", as_index=False).agg(
        n_params=("n_params", "min"), runs=("run_id", "size"), mean_run_s=("wall_time", "mean"),
        total_s=("wall_time", "sum")).sort_values("n_params")


# ---------------------------------------------------------------------------------------------- CLI
def _cmd(args: argparse.Namespace) -> int:
    rep = reproduce(args.scale, out=args.out, executor=args.executor, workers=args.workers,
                    studies=args.studies or STUDIES, device=args.device, progress=not args.no_progress)
    from stabilitylab.report import _markdown

    print(_markdown(rep.findings))
    failed = sum(c.get("failed", 0) for c in rep.counts.values())
    return 1 if failed else 0


def add_parser(sub) -> None:
    from stabilitylab.sweeps.executors import EXECUTORS

    p = sub.add_parser(
        "reproduce", help="reproduce the main paper's findings on the proxy (one command)",
        description="Run the five studies of Wortsman et al. (2023) on the proxy (attention logit growth, "
                    "output logit divergence, interventions, Adam eps, prediction) into resumable sweep "
                    "stores and write a report with a findings table (HTML + markdown + figures + parquet).")
    p.add_argument("--scale", choices=list(SCALES), default="quick",
                   help="quick: 42k..1.25M parameters, CPU; full: 0.66M..101M parameters, one GPU")
    p.add_argument("--executor", choices=list(EXECUTORS), default=None,
                   help="sweep executor (default: vectorized when available, else local)")
    p.add_argument("--out", default=None, help="output folder (default: runs/reproduce_<scale>)")
    p.add_argument("--workers", type=int, default=None, help="worker processes / Ray tasks (processes, ray)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--studies", nargs="+", choices=list(STUDIES), default=None,
                   help="run only these studies (default: all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd)
