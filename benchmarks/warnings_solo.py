"""Which metric, if any, may warn alone at ``every=1`` (``DetectorConfig.solo``): chosen on a development build and
four model families, measured on the warnings benchmark and four other families.

    stabilitylab warnings build --scale quick --seeds 10 11 12 --out runs/wq_dev      # the development build
    stabilitylab warnings build --scale quick --out runs/wq                           # the benchmark
    python benchmarks/warnings_external.py --models gpt llama neox qwen2 opt falcon phi3 gemma3 --pool runs/ext
    python benchmarks/warnings_solo.py runs/wq_dev runs/wq runs/ext --out benchmarks/results/warnings_solo.json

At ``every=1`` a warning needs two metrics hot within the window (``min_metrics=2``); a metric of ``solo`` warns
by itself. The rule that picks the default, stated before this script first ran on the development build or
the families: of ``()`` and each watched metric alone, the one with the largest Youden's J (share of divergences
warned >= 50 steps ahead minus share of stable runs warned) summed over the development build (recalibrated with
each mechanism held out: ``warnings evaluate --settings-from warnings_calibration_dev.json``) and the ``CHOOSE``
families (the shipped calibrations as they are, runs counted whole as ``warnings_gate.py`` does), ``()`` on a tie.
The benchmark (seeds 0-5, both protocols) and the ``REPORT`` families are the check, and the acceptance test the
loss gate had to pass (``tests/test_detectors.py``) decides whether the choice becomes the default: on the
``REPORT`` families it must warn no more runs that did not diverge than no solo metric (``adopted``; else the
default stays ``()``). ``every=10`` warns on one metric already (``min_metrics=1``), so ``solo`` changes nothing
there.

First run (AMD EPYC, 2026-12-06): the rule chose ``grad.global_norm`` (development build, each mechanism held
out: 42% -> 66% of divergences warned >= 50 steps ahead, stable runs warned 10% either way); the acceptance test
rejected it (the ``REPORT`` families: 8 instead of 3 of 86 runs that did not diverge warned, the same 5 of 10
divergences warned >= 50 ahead), so the default stays ``()`` and ``solo`` is an option (README).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm
from warnings_gate import CHOOSE, REPORT, summary  # the script's folder is on sys.path
from warnings_pooled import load_pool

from stabilitylab import detectors as D
from stabilitylab.studies import warnings_bench as W

DEV_SETTINGS = Path(__file__).parent / "results" / "warnings_calibration_dev.json"
CANDIDATES: tuple[tuple[str, ...], ...] = ((), *((m,) for m in D.DEFAULT_WATCH))
SPLITS = ("all mechanisms held out", "each seed held out", "gradual mechanisms held out",
          "abrupt-change mechanisms held out")
COLS = ["warned_50_share", "warned_any_share", "median_lead", "stable_warned_share", "fa_steps_stable",
        "fa_steps_spiked", "forecast_coverage"]


def recalibrated(store: str, solo: tuple[str, ...]) -> pd.DataFrame:
    """``warnings evaluate`` at every=1 with the development settings and this ``solo``: its pooled rows."""
    res = W.evaluate(store, everys=(1,), base=D.DetectorConfig(solo=solo), settings_from=DEV_SETTINGS, grid=())
    s = res["summary"]
    return s[s["split"].isin(SPLITS)].assign(solo=",".join(solo))


def shipped(outcomes: pd.DataFrame, history: pd.DataFrame, censor: int, desc: str) -> pd.DataFrame:
    """Per-run rows of the shipped every=1 calibration as it is, for each candidate (the runs scored once)."""
    rows = []
    for _, every, rep in W.replays(outcomes, history, D.DEFAULT_CALIBRATIONS, (1,), progress=True, desc=desc):
        for solo in CANDIDATES:
            rows += [{**r, "every": every, "solo": ",".join(solo)}
                     for r in rep.measure(outcomes, replace(rep.config(), solo=solo), censor=censor)[1]]
    return pd.DataFrame(rows)


def tally(rows: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """``warnings_gate.summary`` per group, with Youden's J (``warnings_gate.youden``: NaN shares count 0)."""
    s = summary(rows, by)
    return s.assign(youden=s["warned_50_share"].fillna(0) - s["not_diverged_warned_share"].fillna(0))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dev", help="the development build (`warnings build --seeds 10 11 12 --out`)")
    ap.add_argument("store", help="the benchmark build (`warnings build --out`)")
    ap.add_argument("pool", help="a `warnings_external.py --pool` folder with the eight families")
    ap.add_argument("--out", help="write the results as JSON here")
    a = ap.parse_args()
    e_runs, e_hist = load_pool(a.pool)
    missing = sorted(set(CHOOSE + REPORT) - set(e_runs["mechanism"]))
    if missing:
        raise SystemExit(f"{a.pool!r} has no runs of {missing}: train them with `python benchmarks/warnings_external.py "
                         f"--models {' '.join(CHOOSE + REPORT)} --pool {a.pool}`")
    fam = shipped(W.label_runs(e_runs, e_hist), e_hist, censor=0, desc="families")
    fam["half"] = fam["mechanism"].map(lambda m: "choose" if m in CHOOSE else "report")
    halves = tally(fam, ["half", "solo"])
    dev = pd.concat([recalibrated(a.dev, c) for c in tqdm(CANDIDATES, desc="development build")])
    dev_all = dev[dev["split"] == "all mechanisms held out"].set_index("solo")
    choose_j = halves[halves["half"] == "choose"].set_index("solo")["youden"]
    scores = [{"solo": ",".join(c), "youden_dev": float(dev_all.loc[",".join(c), "warned_50_share"]
                                                       - dev_all.loc[",".join(c), "stable_warned_share"]),
               "youden_choose": float(choose_j[",".join(c)])} for c in CANDIDATES]
    for s in scores:
        s["youden_sum"] = s["youden_dev"] + s["youden_choose"]
    best = max(scores, key=lambda s: round(s["youden_sum"], 12))  # first on a tie: () is first
    chosen = best["solo"]
    report = halves[halves["half"] == "report"].set_index("solo")["not_diverged_warned"]
    adopted = chosen if report[chosen] <= report[""] else ""
    b_runs, b_hist = W.load_benchmark(a.store)
    b_out = W.label_runs(b_runs, b_hist)
    keep = sorted({"", chosen})
    bench_re = pd.concat([recalibrated(a.store, tuple(c.split(",")) if c else ()) for c in keep])
    bench_sh = shipped(b_out, b_hist, censor=W.CENSOR, desc="benchmark")
    bench_sh = bench_sh[bench_sh["solo"].isin(keep)]
    sh_summary = pd.DataFrame([{"solo": k, **W.summarise(g)} for k, g in bench_sh.groupby("solo", sort=False)])
    per_mech = tally(bench_sh, ["mechanism", "solo"])
    pd.set_option("display.width", 250)
    print("choice (Youden's J):\n" + pd.DataFrame(scores).round(4).to_string(index=False))
    print(f"\nchosen: solo={tuple(chosen.split(',')) if chosen else ()}; adopted as the default: "
          f"solo={tuple(adopted.split(',')) if adopted else ()} (REPORT families, runs that did not diverge warned: "
          f"{int(report[chosen])} with it, {int(report[''])} without)")
    print("\nfamilies by half (shipped calibrations, every=1):\n" + halves.round(4).to_string(index=False))
    print("\ndevelopment build, recalibrated:\n" + dev[["solo", "split", *COLS]].round(4).to_string(index=False))
    print("\nbenchmark, recalibrated:\n" + bench_re[["solo", "split", *COLS]].round(4).to_string(index=False))
    print("\nbenchmark, shipped calibrations:\n" + sh_summary[["solo", *COLS]].round(4).to_string(index=False))
    print("\nbenchmark per mechanism, shipped:\n" + per_mech.round(4).to_string(index=False))
    if a.out:
        def recs(df: pd.DataFrame) -> list[dict]:
            return json.loads(df.to_json(orient="records"))

        Path(a.out).write_text(json.dumps({
            "cpu": W.cpu_name(), "candidates": [",".join(c) for c in CANDIDATES], "choose": CHOOSE, "report": REPORT,
            "rule": "max over CANDIDATES of Youden's J (warned >= 50 ahead share - stable / not-diverged warned share) "
                    "summed over the development build (each mechanism held out, recalibrated with the development "
                    "settings) and the CHOOSE families (shipped calibrations, every=1); ties: the first (no solo metric)",
            "acceptance": "adopted as the default only if, on the REPORT families, it warns no more runs that did "
                          "not diverge than no solo metric",
            "scores": scores, "chosen": chosen, "adopted": adopted, "families_by_half": recs(halves),
            "families": recs(tally(fam, ["mechanism", "solo"])), "development": recs(dev),
            "benchmark_recalibrated": recs(bench_re), "benchmark_shipped": recs(sh_summary),
            "benchmark_shipped_per_mechanism": recs(per_mech),
            "per_run": recs(pd.concat([bench_sh.assign(group="benchmark"), fam.assign(group="families")])
                            [["group", "every", "solo", "run_id", "mechanism", "role", "lr", "seed", "outcome",
                              "diverge_step", "first_warning", "lead_steps", "metric", "module", "alarm_steps",
                              "judged_steps"]])}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
