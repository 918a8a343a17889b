"""The diagnosis of a sweep in words with its numbers: what broke, where, which signal led, what helped.

    from stabilitylab.diagnosis import diagnose
    d = diagnose(runs, history)           # or diagnose(runs, history, tables=report.analysis_tables(...))
    print(d.text())                        # the report's "Findings" section and the end of `make demo`
    d.facts                                # the same numbers, keyed (tests check them against the tables)

Four findings, each computed from the report's tables:

1. **What broke**: per (size, variant), the lowest peak LR whose run diverged (``runs.diverged``); if no run
   diverged, the configuration whose worst LR lost most against its best LR (final loss, diverged = init).
2. **Which signal and layer led**: the broken run (earliest divergence; else the worst loss gap), its first
   early warning (signal and module) if any, and the layer whose max attention logit peaked highest with
   that peak, against the same size and LR with each mitigation.
3. **What a mitigation changed**: LR sensitivity (Wortsman et al.: mean over LRs of min(L, L0) - L*, nats) of
   each variant vs ``baseline`` at each size, as a relative change.
4. **What to do**: the variant with the lowest mean LR sensitivity over sizes, and its best LR per size.
5. **Early warnings**: how many runs whose training loss diverged were warned and how early (steps), and
   the false-alarm count on the other runs (``analysis.evaluate_warnings``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from stabilitylab import metrics as M

BASELINE = "baseline"


def run_label(row: Any) -> str:
    """Human-readable label of one run: ``"s, baseline, lr=0.1, seed 0"`` (fields the row has)."""
    get = row.get if isinstance(row, (dict, pd.Series)) else (lambda k, d=None: getattr(row, k, d))
    parts = [str(get(k)) for k in ("size", "variant") if get(k) is not None]
    if get("lr") is not None:
        parts.append(f"lr={float(get('lr')):g}")
    if get("seed") is not None:
        parts.append(f"seed {int(get('seed'))}")
    return ", ".join(parts) or str(get("run_id"))


def run_labels(runs: pd.DataFrame) -> pd.Series:
    """``run_id`` -> ``run_label`` for every run of a runs table."""
    return pd.Series([run_label(r) for _, r in runs.iterrows()], index=runs["run_id"].to_numpy())


def _n(v: float, digits: int = 3) -> str:
    """A number for prose: 3 significant digits, no exponent for everyday sizes."""
    if v is None or not np.isfinite(v):
        return str(v)
    return f"{v:.{digits}g}" if 1e-3 <= abs(v) < 1e5 or v == 0 else f"{v:.2e}"


def _layer_rank(module: str, modules: list[str]) -> str:
    order = sorted(modules, key=lambda m: [int(t) if t.isdigit() else t for t in m.split(".")])
    return f"layer {order.index(module) + 1} of {len(order)}"


@dataclass
class Diagnosis:
    """Findings in words (``lines``) and the numbers behind them (``facts``)."""

    lines: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    def text(self, bullet: str = "- ") -> str:
        """The findings as plain text, one bullet per finding."""
        return "\n".join(bullet + line for line in self.lines)


def _losses(runs: pd.DataFrame) -> pd.Series:
    """Final loss with diverged / non-finite runs at their init loss (the LR-sensitivity convention)."""
    fl = runs["final_loss"].astype(float)
    bad = runs["diverged"].astype(bool) | ~np.isfinite(fl)
    return pd.Series(np.where(bad, runs["init_loss"].astype(float), np.minimum(fl, runs["init_loss"])),
                     index=runs.index)


def diagnose(runs: pd.DataFrame, history: pd.DataFrame, tables: dict[str, pd.DataFrame] | None = None) -> Diagnosis:
    """The findings of a sweep (see the module docstring).

    Args:
        runs: the runs table (``run_id, lr, size, variant, final_loss, init_loss, diverged`` ...).
        history: its tidy history.
        tables: ``report.analysis_tables(runs, history)`` if already computed (``sensitivity`` and
            ``warnings`` are used); computed here otherwise.

    Returns:
        a ``Diagnosis``.
    """
    from stabilitylab.analysis import lr_sensitivity
    from stabilitylab.analysis.tables import check_history, check_runs

    runs = check_runs(runs, "diagnose").reset_index(drop=True)
    history = check_history(history, "diagnose")
    runs = runs.assign(**{c: runs[c] if c in runs.columns else v for c, v in (("size", "-"), ("variant", BASELINE))})
    tables = dict(tables or {})
    if "sensitivity" not in tables:
        tables["sensitivity"] = lr_sensitivity(runs, by=["size", "variant"])
    if "warnings" not in tables and len(history) and (history["metric"] == M.LOSS).any():
        from stabilitylab.analysis import evaluate_warnings

        tables["warnings"] = evaluate_warnings(runs, history)[0]
    d = Diagnosis()
    labels = run_labels(runs)
    culprit = _what_broke(runs, d)
    if culprit is not None:
        _what_led(runs, history, culprit, labels, tables.get("warnings"), d)
    _mitigations(tables["sensitivity"], d)
    if tables.get("warnings") is not None:
        _warnings(tables["warnings"], labels, d)
    return d


def _what_broke(runs: pd.DataFrame, d: Diagnosis) -> str | None:
    """Finding 1; returns the run_id of the run to explain next."""
    div = runs[runs["diverged"].astype(bool)]
    n_lrs = runs.groupby(["size", "variant"])["lr"].nunique()
    if len(div):
        broke = (div.groupby(["size", "variant"]).agg(critical_lr=("lr", "min"), n_diverged=("lr", "nunique"))
                 .reset_index().sort_values(["critical_lr", "size"]))
        d.facts["broke"] = [{"size": r.size, "variant": r.variant, "critical_lr": float(r.critical_lr),
                             "n_diverged": int(r.n_diverged), "n_lrs": int(n_lrs[(r.size, r.variant)])}
                            for r in broke.itertuples()]
        parts = [f"{r['size']} / {r['variant']} from lr={r['critical_lr']:g} ({r['n_diverged']} of {r['n_lrs']} LRs)"
                 for r in d.facts["broke"]]
        stable = sorted({f"{s} / {v}" for (s, v) in n_lrs.index} - {f"{r['size']} / {r['variant']}" for r in d.facts["broke"]})
        d.lines.append(f"{len(div)} of {len(runs)} runs diverged: " + "; ".join(parts) + "."
                       + (f" Never diverged: {', '.join(stable)}." if stable else ""))
        first = div.assign(_div_first=div["steps_done"] if "steps_done" in div.columns else div["lr"])
        return str(first.sort_values(["lr", "_div_first"]).iloc[0]["run_id"])
    loss = runs.assign(_L=_losses(runs))
    gaps = loss.groupby(["size", "variant"])["_L"].agg(["min", "max"])
    gaps["gap"] = gaps["max"] - gaps["min"]
    (size, variant), g = gaps["gap"].idxmax(), gaps.loc[gaps["gap"].idxmax()]
    grp = loss[(loss["size"] == size) & (loss["variant"] == variant)]
    worst, best = grp.loc[grp["_L"].idxmax()], grp.loc[grp["_L"].idxmin()]
    d.facts["broke"] = []
    d.facts["worst_gap"] = {"size": size, "variant": variant, "lr": float(worst["lr"]), "loss": float(worst["_L"]),
                            "best_lr": float(best["lr"]), "best_loss": float(best["_L"]), "gap": float(g["gap"])}
    d.lines.append(f"No run diverged. The most LR-sensitive configuration is {size} / {variant}: at lr="
                   f"{worst['lr']:g} its final loss is {_n(worst['_L'])}, {_n(g['gap'])} nats worse than "
                   f"{_n(best['_L'])} at its best lr={best['lr']:g}.")
    return str(worst["run_id"])


def _what_led(runs, history, run_id, labels, warnings, d: Diagnosis) -> None:
    """Finding 2: the run's first warning, and its peak attention layer vs the mitigated runs."""
    row = runs.set_index("run_id").loc[run_id]
    h = history[history["run_id"] == run_id]
    fact: dict[str, Any] = {"run_id": run_id, "label": labels[run_id]}
    words = [f"In run ({labels[run_id]})"]
    if warnings is not None and len(warnings) and run_id in set(warnings["run_id"]):
        w = warnings.set_index("run_id").loc[run_id]
        diverged = w["label"] == "diverged" if "label" in w.index else np.isfinite(w["diverge_step"])
        fact["diverge_step"] = float(w["diverge_step"]) if diverged else math.nan
        if np.isfinite(w["diverge_step"]):
            words.append(f" (loss diverged at step {w['diverge_step']:.0f})")
    first = _first_warning(h, run_id, fact.get("diverge_step", math.nan))
    if first is not None:
        fact["first_warning"] = first
        where = f" in {first['module']}" if first["module"] else ""
        words.append(f", the early-warning detector first flagged {first['metric']}{where}, at step {first['step']}")
    blew_up = np.isfinite(fact.get("diverge_step", math.nan))
    attn = h[h["metric"] == M.ATTN_MAX_LOGIT]
    if blew_up:
        attn = attn[attn["step"] < fact["diverge_step"]]  # what led, not the wreckage after the divergence
    if len(attn):
        per_layer = attn.groupby("module")["value"].max()
        layer = str(per_layer.idxmax())
        fact.update(peak_layer=layer, peak_attn_logit=float(per_layer.max()),
                    first_attn_logit=float(attn[attn["module"] == layer].sort_values("step")["value"].iloc[0]))
        words.append(("; " if first is not None else ", ") + f"the max attention logit peaked in {layer} "
                     f"({_layer_rank(layer, list(per_layer.index))}) at {_n(fact['peak_attn_logit'])}"
                     + (" before the divergence" if blew_up else "")
                     + f", up from {_n(fact['first_attn_logit'])} at the first logged step")
        same = runs[(runs["size"] == row["size"]) & np.isclose(runs["lr"], row["lr"]) & (runs["variant"] != row["variant"])]
        peaks = history[history["run_id"].isin(same["run_id"]) & (history["metric"] == M.ATTN_MAX_LOGIT)]
        if blew_up:
            peaks = peaks[peaks["step"] < fact["diverge_step"]]  # the same window of steps
        peaks = peaks.groupby("run_id")["value"].max()
        if len(peaks):
            fact["peak_attn_logit_other_variants"] = {
                str(same.set_index("run_id").loc[r, "variant"]): float(v) for r, v in peaks.items()}
            words.append(" (" + ", ".join(f"{v}: {_n(p)}" for v, p in fact["peak_attn_logit_other_variants"].items())
                         + " at the same size, LR and steps)")
    d.facts["led"] = fact
    d.lines.append("".join(words) + ".")


def _first_warning(h: pd.DataFrame, run_id: str, diverge_step: float) -> dict[str, Any] | None:
    from stabilitylab.analysis import EarlyWarning

    if not (h["metric"] == M.LOSS).any():
        return None
    seen = h[h["step"] < diverge_step] if np.isfinite(diverge_step) else h
    events = EarlyWarning().replay(seen, run_id)
    if not events:
        return None
    e = events[0]
    return {"step": int(e.step), "metric": str(e.extra.get("metric", "")), "module": str(e.extra.get("module", ""))}


def _mitigations(sens: pd.DataFrame, d: Diagnosis) -> None:
    """Finding 3: LR sensitivity of every variant relative to the baseline, per size."""
    if "variant" not in sens.columns or BASELINE not in set(sens["variant"]):
        return
    base = sens[sens["variant"] == BASELINE].set_index("size")["lr_sensitivity"]
    changes = []
    for r in sens[sens["variant"] != BASELINE].itertuples():
        if r.size in base.index:
            b = float(base[r.size])
            changes.append({"variant": r.variant, "size": r.size, "baseline": b, "mitigated": float(r.lr_sensitivity),
                            "relative_change": (float(r.lr_sensitivity) - b) / b if b > 0 else math.nan})
    if not changes:
        return
    d.facts["mitigation"] = changes
    by_variant: dict[str, list[dict]] = {}
    for c in changes:
        by_variant.setdefault(c["variant"], []).append(c)
    for variant, cs in by_variant.items():
        parts = [(f"{'lowered' if c['mitigated'] < c['baseline'] else 'raised'} it by {abs(c['relative_change']):.0%} "
                  if np.isfinite(c["relative_change"]) else "changed it ")
                 + f"at {c['size']} ({_n(c['baseline'])} -> {_n(c['mitigated'])} nats)" for c in cs]
        d.lines.append(f"LR sensitivity vs baseline: {variant} " + ", ".join(parts) + ".")
    mean = sens.groupby("variant")["lr_sensitivity"].mean().sort_values()
    best = str(mean.index[0])
    lrs = sens[sens["variant"] == best].set_index("size")["best_lr"]
    d.facts["recommendation"] = {"variant": best, "mean_lr_sensitivity": float(mean.iloc[0]),
                                 "best_lr": {str(k): float(v) for k, v in lrs.items()}}
    d.lines.append(f"What to do: train with {best} (lowest LR sensitivity, {_n(mean.iloc[0])} nats on average over "
                   f"sizes); its best LR was " + ", ".join(f"{v:g} at {k}" for k, v in lrs.items()) + ".")


def _warnings(w: pd.DataFrame, labels: pd.Series, d: Diagnosis) -> None:
    """Finding 4: which diverged runs were warned and how early; false alarms on stable runs."""
    div = w[w["label"] == "diverged"] if "label" in w.columns else w[w["diverge_step"].notna()]
    stable = w[~w.index.isin(div.index)]
    warned = div[div["first_warning"].notna()].sort_values("lead_steps", ascending=False)
    fact = {"n_diverged": len(div), "n_warned": len(warned),
            "n_warned_in_time": int((div["outcome"] == "warned").sum()),
            "lead_steps": {labels[r]: float(x) for r, x in zip(warned["run_id"], warned["lead_steps"])},
            "n_stable": len(stable), "n_false_alarm": int((stable["outcome"] == "false_alarm").sum())}
    d.facts["warnings"] = fact
    if not len(div):
        text = ("No run's training loss diverged (went non-finite, or rose and stayed up), so no warning could "
                f"come early; the detector still fired on {fact['n_false_alarm']} of {fact['n_stable']} runs "
                "(false alarms)")
    else:
        text = f"Early warnings: {len(warned)} of {len(div)} runs whose training loss diverged were warned beforehand"
        if len(warned):
            lead = ", ".join(f"{lab} {x:.0f} steps ahead" for lab, x in list(fact["lead_steps"].items())[:4])
            more = f" and {len(warned) - 4} more" if len(warned) > 4 else ""
            text += f" ({lead}{more}; median {np.median(list(fact['lead_steps'].values())):.0f} steps)"
        text += f"; false alarms on {fact['n_false_alarm']} of {fact['n_stable']} stable runs"
    d.lines.append(text + ".")
