"""Per-run numbers, tables and the findings of each study (tables in, tables and findings out)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pandas as pd

from stabilitylab import metrics as M
from stabilitylab.studies.reproduce.scales import Scale


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


def sensitivity_parts(runs: pd.DataFrame, variant: str, size: str) -> tuple[float, float]:
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
    parts = [sensitivity_parts(runs, "baseline", z) for z in sizes]
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

