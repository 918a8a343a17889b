"""The findings' numbers equal the same numbers computed here, independently, from runs and history."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from stabilitylab.analysis import evaluate_warnings
from stabilitylab.diagnosis import diagnose, run_label

HISTORY_COLUMNS = ["run_id", "step", "metric", "module", "value"]


def test_findings_of_a_real_sweep_match_runs_and_history(tiny_sweep_store):
    runs = pd.read_parquet(tiny_sweep_store / "runs.parquet")
    history = pd.read_parquet(tiny_sweep_store / "history.parquet")
    d = diagnose(runs, history)

    # 1. what broke: the lowest diverged LR of every (size, variant)
    want = {}
    for r in runs.itertuples():
        if r.diverged:
            want[(r.size, r.variant)] = min(want.get((r.size, r.variant), math.inf), r.lr)
    assert want, "the tiny sweep's lr=3 runs are expected to diverge"
    assert {(b["size"], b["variant"]): b["critical_lr"] for b in d.facts["broke"]} == want
    assert d.lines[0].startswith(f"{int(runs['diverged'].sum())} of {len(runs)} runs diverged")
    for (size, variant), lr in want.items():
        assert f"{size} / {variant} from lr={lr:g}" in d.lines[0]

    # 2. which layer led: the explained run is a diverged run at the lowest critical LR; its peak layer and
    # value before the divergence step of the warnings table, from the raw history
    table = evaluate_warnings(runs, history)[0].set_index("run_id")
    led = d.facts["led"]
    row = runs.set_index("run_id").loc[led["run_id"]]
    assert bool(row["diverged"]) and row["lr"] == min(want.values())
    dstep = table.loc[led["run_id"], "diverge_step"] if table.loc[led["run_id"], "label"] == "diverged" else math.nan
    assert led["diverge_step"] == dstep or (math.isnan(dstep) and math.isnan(led["diverge_step"]))
    h = history[history["run_id"] == led["run_id"]]
    attn = h[(h["metric"] == "attn.max_logit") & ((h["step"] < dstep) if np.isfinite(dstep) else True)]
    peaks = {m: g["value"].max() for m, g in attn.groupby("module")}
    layer = max(peaks, key=peaks.get)
    assert led["peak_layer"] == layer and led["peak_attn_logit"] == peaks[layer]
    assert f"peaked in {layer}" in d.lines[1] and run_label(row.to_dict()) in d.lines[1]

    # 5. warnings: counted from the warnings table's labels and outcomes
    div = table[table["label"] == "diverged"]
    w = d.facts["warnings"]
    assert w["n_diverged"] == len(div) and w["n_stable"] == len(table) - len(div)
    assert w["n_warned"] == int(div["first_warning"].notna().sum())
    assert w["n_false_alarm"] == int((table.loc[table["label"] != "diverged", "outcome"] == "false_alarm").sum())
    assert f"{w['n_warned']} of {len(div)} runs whose training loss diverged" in d.lines[-1] if len(div) else \
        f"fired on {w['n_false_alarm']} of {w['n_stable']} runs" in d.lines[-1]


def _runs(losses: dict[tuple[str, str], list[float]], lrs=(1e-3, 1e-2, 1e-1, 1.0), init=5.0) -> pd.DataFrame:
    rows = []
    for (size, variant), ls in losses.items():
        for lr, L in zip(lrs, ls):
            rows.append({"run_id": f"{size}-{variant}-{lr:g}", "size": size, "variant": variant, "lr": lr, "seed": 0,
                         "final_loss": L, "init_loss": init, "diverged": not math.isfinite(L) or L > init})
    return pd.DataFrame(rows)


def _sensitivity(ls: list[float], init: float = 5.0) -> float:
    """Wortsman et al.'s LR sensitivity, float64, by hand: mean of min(L, L0) - min over the grid."""
    clipped = [min(L, init) if math.isfinite(L) and L <= init else init for L in ls]
    return sum(c - min(clipped) for c in clipped) / len(clipped)


def test_mitigation_change_and_recommendation_match_a_hand_computed_sensitivity():
    losses = {("a", "baseline"): [3.0, 2.5, 4.0, 4.6], ("a", "qk_layernorm"): [3.0, 2.4, 2.6, 3.1],
              ("b", "baseline"): [2.8, 2.2, 3.9, 4.9], ("b", "qk_layernorm"): [2.8, 2.1, 2.3, 3.0]}
    runs = _runs(losses)
    d = diagnose(runs, pd.DataFrame(columns=HISTORY_COLUMNS))
    assert d.facts["broke"] == []
    # no run diverged: the configuration whose worst LR lost most against its best
    gaps = {k: max(v) - min(v) for k, v in losses.items()}
    (size, variant) = max(gaps, key=gaps.get)
    g = d.facts["worst_gap"]
    assert (g["size"], g["variant"]) == (size, variant)
    assert g["gap"] == pytest.approx(gaps[(size, variant)], rel=1e-12)
    assert g["lr"] == 1.0 and g["best_lr"] == 1e-2
    assert d.lines[0].startswith(f"No run diverged. The most LR-sensitive configuration is {size} / {variant}")

    for c in d.facts["mitigation"]:
        base, mit = _sensitivity(losses[(c["size"], "baseline")]), _sensitivity(losses[(c["size"], c["variant"])])
        assert c["baseline"] == pytest.approx(base, rel=1e-12) and c["mitigated"] == pytest.approx(mit, rel=1e-12)
        assert c["relative_change"] == pytest.approx((mit - base) / base, rel=1e-12)
        assert f"lowered it by {abs((mit - base) / base):.0%} at {c['size']}" in d.text()
    assert {c["size"] for c in d.facts["mitigation"]} == {"a", "b"}
    mean = {v: np.mean([_sensitivity(losses[(s, v)]) for s in "ab"]) for v in ("baseline", "qk_layernorm")}
    assert d.facts["recommendation"]["variant"] == min(mean, key=mean.get) == "qk_layernorm"
    assert d.facts["recommendation"]["best_lr"] == {"a": 1e-2, "b": 1e-2}
    assert "What to do: train with qk_layernorm" in d.text()


def test_a_diverged_nan_run_counts_at_the_lowest_diverged_lr():
    runs = _runs({("a", "baseline"): [3.0, 2.5, float("nan"), float("nan")],
                  ("a", "qk_layernorm"): [3.0, 2.4, 2.6, 3.1]})
    d = diagnose(runs, pd.DataFrame(columns=HISTORY_COLUMNS))
    assert d.facts["broke"] == [{"size": "a", "variant": "baseline", "critical_lr": 0.1, "n_diverged": 2, "n_lrs": 4}]
    assert d.lines[0] == ("2 of 8 runs diverged: a / baseline from lr=0.1 (2 of 4 LRs). "
                          "Never diverged: a / qk_layernorm.")


def test_run_label_reads_size_variant_lr_seed():
    assert run_label({"run_id": "x", "size": "s", "variant": "z_loss", "lr": 0.03, "seed": 1}) == \
        "s, z_loss, lr=0.03, seed 1"
    assert run_label({"run_id": "x"}) == "x"
