"""Does calibrating the early warning on more model families help on a family it has not seen? Leave one out.

    stabilitylab warnings build --scale quick --out runs/wq                    # the benchmark (9 min)
    python benchmarks/warnings_external.py --models gpt llama neox qwen2 opt falcon phi3 gemma3 --pool runs/ext
    python benchmarks/warnings_pooled.py runs/wq runs/ext --out benchmarks/results/warnings_pooled.json

Groups: the warnings benchmark (all its mechanisms, one group) and each family of ``warnings_external.py``'s
pool (a GPT written there, HF Llama, GPT-NeoX, Qwen2, OPT, Falcon, Phi-3, Gemma 3). For each group held out in
turn, the thresholds are fit on every run of the other groups (``calibrate``: the largest growth score of the
runs that did not diverge, per 50-step bin, their last ``--censor`` steps left out; forecast constants from the
diverged ones) and tested on the held-out group at each interval and margin (``min_metrics`` as shipped: 2 at
every=1, 1 at every=10). Next to it the shipped calibrations (fit on the benchmark alone; on the benchmark
group they are not held out). Counting as ``warnings_external.py`` does: a run that did not diverge is warned
if any warning comes in its whole run, a divergence is warned before / >= 50 steps ahead by its first warning
(outcomes from the loss alone, ``detectors.label_outcome``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from stabilitylab import detectors as D
from stabilitylab.analysis.early_warning import run_steps
from stabilitylab.studies import warnings_bench as W

MARGINS = (1.0, 1.25, 1.5, 2.0)
EVERIES = (1, 10)


def load_pool(pool: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(runs, history)`` of a ``warnings_external.py --pool`` folder, in ``warnings_bench.load_benchmark``'s
    form (``mechanism``: the family; ``role``: the schedule; ``lr``: the peak)."""
    runs, hists = [], []
    for meta in sorted(Path(pool).glob("*.json")):
        if meta.stem.endswith("steps"):  # a run of another length (``--steps``): not the families' 600-step runs
            continue
        r = json.loads(meta.read_text())
        h = pd.read_parquet(meta.with_suffix(".parquet"), columns=["run_id", "step", "metric", "module", "value"])
        rid = meta.stem  # unique per model, schedule, peak and seed
        h["run_id"] = rid
        runs.append({"run_id": rid, "mechanism": r["model"], "role": r["schedule"], "lr": r["peak"], "seed": r["seed"],
                     "variant": f"{r['model']}/{r['schedule']}", "status": "done"})
        hists.append(h)
    if not runs:
        raise FileNotFoundError(f"{str(pool)!r}: no pooled run (NAME.json + NAME.parquet); train them with "
                                "`python benchmarks/warnings_external.py --pool DIR`")
    return pd.DataFrame(runs), pd.concat(hists, ignore_index=True)


def counts(rows: list[dict]) -> dict:
    """Runs that did not diverge and were warned (anywhere), divergences warned before and >= 50 steps ahead."""
    calm = [r for r in rows if r["outcome"] != "diverged"]
    div = [r for r in rows if r["outcome"] == "diverged"]
    lead = [r["lead_steps"] for r in div if r["lead_steps"] == r["lead_steps"]]
    return {"not_diverged": len(calm), "not_diverged_warned": sum(r["first_warning"] == r["first_warning"] for r in calm),
            "diverged": len(div), "warned_before": len(lead), "warned_50": sum(x >= 50 for x in lead)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store", help="the warnings benchmark folder (`stabilitylab warnings build --out`)")
    ap.add_argument("pool", help="a `warnings_external.py --pool` folder")
    ap.add_argument("--censor", type=int, default=W.CENSOR, help="steps at the end of runs that did not diverge "
                    "left out of the thresholds (default %(default)s)")
    ap.add_argument("--out", help="write the rows as JSON here")
    a = ap.parse_args()
    b_runs, b_hist = W.load_benchmark(a.store)
    b_runs = b_runs.assign(group="benchmark")
    e_runs, e_hist = load_pool(a.pool)
    e_runs = e_runs.assign(group=e_runs["mechanism"])
    runs = pd.concat([b_runs, e_runs], ignore_index=True)
    history = pd.concat([b_hist, e_hist], ignore_index=True)
    outcomes = W.label_runs(runs, history).merge(runs[["run_id", "group"]], on="run_id")
    groups = list(dict.fromkeys(outcomes["group"]))
    base = D.DetectorConfig()
    rows, seeds = [], []
    for every in EVERIES:
        steps = run_steps(history, every)
        scored = {rid: D.score_run(steps[rid], base) for rid in tqdm(outcomes["run_id"], desc=f"score every={every}")}
        k = D.DEFAULT_CALIBRATIONS[every].settings["min_metrics"]
        shipped = D.pick_calibration(D.DEFAULT_CALIBRATIONS, every, base.window_at(every))
        cfg0 = replace(base, min_metrics=k)
        for held in tqdm(groups, desc=f"hold out every={every}"):
            test = list(outcomes.loc[outcomes["group"] == held, "run_id"])
            fit = list(outcomes.loc[outcomes["group"] != held, "run_id"])
            pooled = W._calibrate(fit, outcomes, scored, cfg0, f"all groups but {held}", censor=a.censor)
            for name, cal in (("pooled", pooled), ("shipped", shipped)):
                for m in MARGINS:
                    _, per = W._measure(test, outcomes, scored, replace(cfg0, margin=m), cal, censor=0)
                    rows.append({"every": every, "held_out": held, "calibration": name, "margin": m,
                                 "min_metrics": k, **counts(per)})
        # the benchmark's own protocol (its censor, each seed held out), calibrated with and without the families
        bench = outcomes[outcomes["group"] == "benchmark"]
        ext_ids = list(outcomes.loc[outcomes["group"] != "benchmark", "run_id"])
        for name in ("benchmark + families", "benchmark alone"):
            for m in MARGINS:
                per_seed = []
                for seed in sorted(bench["seed"].unique()):
                    test = list(bench.loc[bench["seed"] == seed, "run_id"])
                    fit = list(bench.loc[bench["seed"] != seed, "run_id"]) + (ext_ids if name != "benchmark alone" else [])
                    cfg = replace(cfg0, margin=m)
                    cal = W._calibrate(fit, outcomes, scored, cfg, name, censor=a.censor)
                    per_seed += W._measure(test, outcomes, scored, cfg, cal, censor=a.censor)[1]
                seeds.append({"every": every, "calibration": name, "margin": m, "min_metrics": k,
                              **W.summarise(pd.DataFrame(per_seed))})
    table = pd.DataFrame(rows)
    seed_table = pd.DataFrame(seeds)
    cols = ["every", "calibration", "margin", "warned_50_share", "median_lead", "stable_warned_share",
            "fa_steps_stable", "forecast_coverage"]
    print("\nThe benchmark, each seed held out (censor as `warnings evaluate`):\n" + seed_table[cols].to_string(index=False))
    ext = table[table["held_out"] != "benchmark"]
    tot = ext.groupby(["every", "calibration", "margin"], as_index=False)[
        ["not_diverged", "not_diverged_warned", "diverged", "warned_before", "warned_50"]].sum()
    print("Summed over the held-out external families:\n" + tot.to_string(index=False))
    bench = table[table["held_out"] == "benchmark"].drop(columns=["held_out"])
    print("\nThe benchmark held out (shipped: not held out):\n" + bench.to_string(index=False))
    if a.out:
        Path(a.out).write_text(json.dumps({"censor": a.censor, "cpu": W.cpu_name(), "groups": groups,
                                           "summed_external": tot.to_dict("records"),
                                           "rows": table.to_dict("records"),
                                           "benchmark_seeds": json.loads(seed_table.to_json(orient="records"))},
                                          indent=1) + "\n")


if __name__ == "__main__":
    main()
