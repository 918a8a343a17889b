"""The early warning's loss gate (``DetectorConfig.loss_gate``): chosen on four model families, measured on the
four others and on the warnings benchmark.

    stabilitylab warnings build --scale quick --out runs/wq                    # the benchmark (~10 min)
    python benchmarks/warnings_external.py --models gpt llama neox qwen2 opt falcon phi3 gemma3 --pool runs/ext
    python benchmarks/warnings_gate.py runs/wq runs/ext --out benchmarks/results/warnings_gate.json

The gate: an alarm counts only while the EMA of the training loss (20 steps) is at least ``loss_gate`` nats above
its running best. Everything here runs the shipped calibrations and settings as they are (``warnings check``'s
protocol: nothing recalibrated, every rule of the calibration a detector picks, the last ``--censor`` steps of
runs that did not diverge not judged), at ``every=1`` and ``every=10``, for each gate of ``GATES``.

The rule that picks the default, fixed before this script first ran: the gate of ``GATES`` with the largest
Youden's J summed over ``every=1`` and ``every=10`` on the pooled ``CHOOSE`` families (share of divergences warned
>= 50 steps ahead minus share of runs that did not diverge with any warning), the smaller gate on a tie.
``REPORT`` families and the benchmark (per mechanism) are the held-out check of what it buys and costs.
``CHOOSE`` are the families earlier detector changes were tried on (``warnings_external.py``'s docstring);
``REPORT`` were added later (OPT once, Falcon, Phi-3, Gemma 3 after every other default was fixed).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pandas as pd
from warnings_pooled import counts, load_pool  # the script's folder is on sys.path

from stabilitylab import detectors as D
from stabilitylab.studies import warnings_bench as W

GATES = (0.0, 0.05, 0.1, 0.15, 0.2)
CHOOSE = ("gpt", "llama", "neox", "qwen2")
REPORT = ("opt", "falcon", "phi3", "gemma3")
EVERIES = (1, 10)
#: ``every=10`` margins replayed with each gate (the shipped margin 2 is the smallest of these at which at most
#: 5% of the families' runs that did not diverge are warned, without a gate: README).
MARGINS_10 = (1.0, 1.25, 1.5, 2.0)


def per_run(outcomes: pd.DataFrame, history: pd.DataFrame, gates=GATES, everys=EVERIES, censor: int = W.CENSOR,
            desc: str = "") -> pd.DataFrame:
    """``warnings_bench._measure`` rows of every run at each logging interval and gate (the shipped defaults;
    at ``every=10`` also at each of ``MARGINS_10``; ``shipped``: the row has the calibration's own margin)."""
    rows = []
    for _, every, replay in W.replays(outcomes, history, D.DEFAULT_CALIBRATIONS, everys, progress=True, desc=desc):
        if replay is None:
            continue
        own = replay.config().margin
        for gate in gates:
            for margin in sorted({own, *(MARGINS_10 if every == 10 else ())}):
                rows += [{**r, "every": every, "loss_gate": gate, "margin": margin, "shipped": margin == own}
                         for r in replay.measure(outcomes, replay.config(margin=margin, loss_gate=gate),
                                                 censor=censor)[1]]
    return pd.DataFrame(rows)


def summary(rows: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """``warnings_bench.summarise`` per group, plus the share of runs that did not diverge with any warning."""
    out = []
    for key, g in rows.groupby(by, sort=False):
        c = counts(g.to_dict("records"))
        out.append({**dict(zip(by, key if isinstance(key, tuple) else (key,))), **c,
                    "not_diverged_warned_share": c["not_diverged_warned"] / c["not_diverged"] if c["not_diverged"]
                    else math.nan, **W.summarise(g)})
    return pd.DataFrame(out)


def youden(s: pd.DataFrame) -> float:
    """Share of divergences warned >= 50 ahead minus share of runs that did not diverge warned (NaN shares: 0)."""
    return float(s["warned_50_share"].fillna(0).iloc[0] - s["not_diverged_warned_share"].fillna(0).iloc[0])


def choose(fam: pd.DataFrame) -> tuple[float, list[dict], float, list[dict]]:
    """The rules of the module docstring on the ``CHOOSE`` families' rows: the gate, then the ``every=10``
    margin with it."""
    mine = fam[fam["mechanism"].isin(CHOOSE)]
    pooled = summary(mine[mine["shipped"]], ["every", "loss_gate"])
    scores = [{"loss_gate": g, "youden_sum": sum(youden(pooled[(pooled["every"] == e) & (pooled["loss_gate"] == g)])
                                                 for e in EVERIES)} for g in GATES]
    best = max(scores, key=lambda s: (round(s["youden_sum"], 12), -s["loss_gate"]))["loss_gate"]
    at10 = summary(mine[(mine["every"] == 10) & (mine["loss_gate"] == best)], ["margin"])
    shares = at10[["margin", "not_diverged_warned_share", "warned_50_share"]].to_dict("records")
    ok = [r["margin"] for r in shares if r["not_diverged_warned_share"] <= 0.05]
    return best, scores, (min(ok) if ok else max(MARGINS_10)), shares


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store", help="the warnings benchmark folder (`stabilitylab warnings build --out`)")
    ap.add_argument("pool", help="a `warnings_external.py --pool` folder with the eight families")
    ap.add_argument("--censor", type=int, default=W.CENSOR, help="steps at the end of the benchmark's runs that did "
                    "not diverge that are not judged (default %(default)s, as `warnings check`)")
    ap.add_argument("--family-censor", type=int, default=0, help="the same on the families (default %(default)s: "
                    "whole runs, as `warnings_external.py` counts and the every=10 margin rule was stated)")
    ap.add_argument("--out", help="write the results as JSON here")
    a = ap.parse_args()
    b_runs, b_hist = W.load_benchmark(a.store)
    e_runs, e_hist = load_pool(a.pool)
    missing = sorted(set(CHOOSE + REPORT) - set(e_runs["mechanism"]))
    if missing:
        raise SystemExit(f"{a.pool!r} has no runs of {missing}: train them with `python benchmarks/warnings_external.py "
                         f"--models {' '.join(CHOOSE + REPORT)} --pool {a.pool}`")
    bench = per_run(W.label_runs(b_runs, b_hist), b_hist, censor=a.censor, desc="benchmark")
    fam = per_run(W.label_runs(e_runs, e_hist), e_hist, censor=a.family_censor, desc="families")
    gate, scores, margin10, shares10 = choose(fam)
    by = ["every", "margin", "loss_gate"]
    halves = summary(fam.assign(half=fam["mechanism"].map(lambda m: "choose" if m in CHOOSE else "report")),
                     ["half", *by])
    families = summary(fam, ["mechanism", *by])
    bench_all = summary(bench, by)
    bench_mech = summary(bench[bench["shipped"]], ["mechanism", *by])
    # the divergences the chosen gate costs a >= 50-step lead, at the shipped margins
    key = ["run_id", "every"]
    shipped = bench[bench["shipped"] & (bench["outcome"] == "diverged")]
    d0 = shipped[shipped["loss_gate"] == 0].set_index(key)
    dg = shipped[shipped["loss_gate"] == gate].set_index(key)
    lost = d0[(d0["lead_steps"] >= 50) & ~(dg["lead_steps"] >= 50)].assign(
        lead_gated=dg["lead_steps"]).reset_index()[["every", "mechanism", "role", "lr", "seed", "diverge_step",
                                                     "lead_steps", "lead_gated", "metric"]]
    cols = [*by, "not_diverged", "not_diverged_warned", "n_diverged", "warned_50", "warned_before", "median_lead",
            "fa_steps_stable", "fa_steps_spiked", "forecast_coverage"]
    print(f"chosen on {', '.join(CHOOSE)}: loss_gate={gate:g} (Youden's J summed: {scores}); with it the every=10 "
          f"margin rule gives {margin10:g} ({shares10})")
    print("\nfamilies, by half:\n" + halves[["half", *cols]].to_string(index=False))
    print("\nbenchmark:\n" + bench_all[cols].to_string(index=False))
    print("\nbenchmark per mechanism (shipped margins):\n" + bench_mech[["mechanism", *cols]].to_string(index=False))
    print(f"\nbenchmark divergences warned >= 50 ahead without the gate, not with loss_gate={gate:g}:\n"
          + lost.to_string(index=False))
    if a.out:
        def recs(df: pd.DataFrame) -> list[dict]:
            return json.loads(df.to_json(orient="records"))

        Path(a.out).write_text(json.dumps({
            "cpu": W.cpu_name(), "censor": a.censor, "family_censor": a.family_censor, "gates": GATES,
            "margins_10": MARGINS_10, "choose": CHOOSE, "report": REPORT,
            "rule": "the gate: max over GATES of Youden's J (warned >= 50 ahead share - not-diverged warned share) "
                    "summed over every=1 and every=10 at the shipped margins on the pooled CHOOSE families, ties: "
                    "the smaller gate; then the every=10 margin: the smallest of MARGINS_10 at which, with that gate, "
                    "at most 5% of the CHOOSE families' runs that did not diverge are warned",
            "youden_on_choose": scores, "chosen_gate": gate, "every10_margin_shares": shares10,
            "chosen_every10_margin": margin10,
            "halves": recs(halves), "families": recs(families), "benchmark": recs(bench_all),
            "benchmark_per_mechanism": recs(bench_mech), "benchmark_lost_50": recs(lost),
            "per_run": recs(pd.concat([bench[bench["shipped"]].assign(group="benchmark"),
                                       fam[fam["shipped"]].assign(group="families")])  # at the shipped margins
                            [["group", *by, "run_id", "mechanism", "role", "lr", "seed", "outcome", "diverge_step",
                              "first_warning", "lead_steps", "metric", "module", "alarm_steps", "judged_steps"]])},
            indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
