"""``stabilitylab reproduce`` plumbing on a minuscule grid: stores, reuse across studies, resume, report,
and the reported numbers checked against independent computations from the stores' parquet files."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from stabilitylab import cli
from stabilitylab.studies import reproduce as R

TINY = R.Scale(name="tiny", sizes=({"name": "t1", "d_model": 8, "n_layers": 1, "head_dim": 4},
                                   {"name": "t2", "d_model": 16, "n_layers": 1, "head_dim": 8},
                                   {"name": "t3", "d_model": 16, "n_layers": 2, "head_dim": 8}),
               lrs=(1e-3, 3e-1), steps=6, batch_size=2, seq_len=8, every=2, high_lr=1e-1)


@pytest.fixture(scope="module")
def rep(tmp_path_factory):
    return R.reproduce(TINY, out=tmp_path_factory.mktemp("repro"), device="cpu", progress=False)


def _store(path):
    runs = pd.concat([pd.read_parquet(f) for f in sorted((path / "runs").glob("*.parquet"))], ignore_index=True)
    hist = pd.concat([pd.read_parquet(f) for f in sorted((path / "history").glob("*.parquet"))], ignore_index=True)
    return runs, hist


def test_reproduce_writes_report_tables_and_one_store_per_training_study(rep):
    for study in ("attention", "output_logits", "interventions", "adam_eps"):
        assert (rep.out / study / "spec.json").exists()
    html = rep.report_html.read_text()
    md = rep.report_md.read_text()
    assert "<table" in html and "data:image/png;base64," in html
    assert "## Findings" in md and all((rep.out / f"{n}.png").exists() for n in rep.figures)
    f = pd.read_parquet(rep.out / "findings.parquet")
    assert set(f["study"]) == set(R.STUDIES)
    assert set(f["held"]) <= {"yes", "no", "n/a"}
    for name in rep.tables:
        assert len(pd.read_parquet(rep.out / "tables" / f"{name}.parquet").columns)
    assert set(rep.timings) == {*R.STUDIES, "total"} and all(v >= 0 for v in rep.timings.values())


def test_shared_runs_are_copied_not_retrained(rep):
    n_lr, n_sizes = len(TINY.lrs), len(TINY.sizes)
    assert rep.counts["interventions"]["reused"] == n_lr * n_sizes  # the baseline grid of study 1
    assert rep.counts["adam_eps"]["reused"] == n_lr  # baseline at the largest size
    assert rep.counts["interventions"]["trained"] == 4 * n_lr * n_sizes
    a, _ = _store(rep.out / "attention")
    i, _ = _store(rep.out / "interventions")
    shared = set(a.loc[a["variant"] == "baseline", "run_id"])
    assert shared <= set(i["run_id"])
    pd.testing.assert_frame_equal(a[a["run_id"].isin(shared)].sort_values("run_id").reset_index(drop=True),
                                  i[i["run_id"].isin(shared)].sort_values("run_id").reset_index(drop=True))


def test_attention_numbers_match_independent_computation(rep):
    runs, hist = _store(rep.out / "attention")
    runs = runs.set_index("run_id")
    a = hist[(hist["metric"] == "attn.max_logit") & np.isfinite(hist["value"])]
    peak = a.groupby("run_id")["value"].max()
    table = rep.tables["attention_peak_logit"]
    for rid, r in runs.iterrows():
        row = table[(table["variant"] == r["variant"]) & (table["size"] == r["size"])]
        assert row[f"lr={r['lr']:.3g}"].iloc[0] == pytest.approx(peak[rid], rel=1e-12)
    sens = rep.tables["attention_sensitivity"]
    for (variant, size), g in runs.groupby(["variant", "size"]):
        L = [min(fl, l0) if math.isfinite(fl) and not d else l0
             for fl, l0, d in zip(g["final_loss"], g["init_loss"], g["diverged"])]
        expect = float(np.mean(np.array(L) - min(L)))
        got = sens.loc[(sens["variant"] == variant) & (sens["size"] == size), "lr_sensitivity"].iloc[0]
        assert got == pytest.approx(expect, abs=1e-12)


def test_run_summary_matches_hand_computation():
    runs = pd.DataFrame({"run_id": ["a", "b"], "size": ["x", "x"], "n_params": [100, 100],
                         "variant": ["v", "v"], "lr": [0.1, 0.2], "final_loss": [1.0, np.nan],
                         "init_loss": [5.0, 5.0], "diverged": [False, True]})
    rows = []
    for step, (l1, l2, g) in enumerate([(0.5, 1.0, 2.0), (-3.0, 7.0, 4.0), (2.0, np.inf, 6.0), (1.5, np.nan, 8.0)]):
        rows += [("a", step, "attn.max_logit", "blocks.0.attn", l1), ("a", step, "attn.max_logit", "blocks.1.attn", l2),
                 ("a", step, "logits.lse_mean", "", l1), ("a", step, "grad.global_norm", "", g),
                 ("b", step, "logits.lse_mean", "", l2)]
    hist = pd.DataFrame(rows, columns=["run_id", "step", "metric", "module", "value"])
    s = R.run_summary(runs, hist, late_frac=0.5).set_index("run_id")
    assert s.loc["a", "peak_attn_logit"] == 7.0  # non-finite values ignored
    assert (s.loc["a", "lse_initial"], s.loc["a", "lse_final"], s.loc["a", "lse_drift"]) == (0.5, 1.5, 1.0)
    assert s.loc["a", "lse_max_abs"] == 3.0
    assert s.loc["a", "grad_rms"] == pytest.approx(np.median([6.0, 8.0]) / 10.0)
    assert (s.loc["b", "lse_initial"], s.loc["b", "lse_final"]) == (1.0, 7.0)  # last *finite* value
    assert math.isnan(s.loc["b", "peak_attn_logit"]) and math.isnan(s.loc["b", "grad_rms"])


def test_cli_resumes_without_training(rep, monkeypatch, capsys):
    before = {f: f.stat().st_mtime_ns for f in rep.out.glob("*/runs/*.parquet")}
    monkeypatch.setitem(R.SCALES, "quick", TINY)
    code = cli.main(["reproduce", "--out", str(rep.out), "--device", "cpu", "--no-progress",
                     "--studies", "attention", "interventions"])
    text = capsys.readouterr().out
    assert code == 0
    assert "reproduce attention:" in text and "(0 trained" in text and "| study | finding |" in text
    assert {f: f.stat().st_mtime_ns for f in rep.out.glob("*/runs/*.parquet")} == before


@pytest.mark.parametrize("kwargs, word", [({"scale": "huge"}, "scale"), ({"executor": "gpu"}, "executor"),
                                          ({"studies": ["nope"]}, "studies"), ({"studies": []}, "studies")])
def test_bad_arguments_name_the_argument(kwargs, word, tmp_path):
    with pytest.raises(ValueError, match=word):
        R.reproduce(**{"scale": TINY, "out": tmp_path, **kwargs})


def test_scale_rejects_too_few_sizes():
    with pytest.raises(ValueError, match="sizes"):
        R.Scale(name="x", sizes=("xxs", "xs"), lrs=(1e-3, 1e-2), steps=5, batch_size=2, seq_len=8)


def test_cli_rejects_unknown_scale(capsys):
    with pytest.raises(SystemExit):
        cli.main(["reproduce", "--scale", "huge"])
    assert "--scale" in capsys.readouterr().err


def test_prediction_tables_match_independent_computation_from_the_store(rep):
    runs, hist = _store(rep.out / "attention")
    sizes = runs.groupby("size")["n_params"].median().sort_values()
    held = sizes.index[-1]
    a = hist[(hist["metric"] == "attn.max_logit") & np.isfinite(hist["value"])]
    runs = runs.assign(peak=runs["run_id"].map(a.groupby("run_id")["value"].max()))
    att = rep.tables["prediction_attn_logit"]
    crit = rep.tables["prediction_critical_lr"].set_index("variant")
    for (variant, lr), g in runs.groupby(["variant", "lr"]):
        fit = g[g["size"] != held].groupby("n_params")["peak"].apply(lambda s: np.log10(s).mean())
        coef = np.polyfit(np.log10(fit.index.to_numpy(float)), fit.to_numpy(), 1)
        row = att[(att["variant"] == variant) & np.isclose(att["lr"], lr)].iloc[0]
        assert row["predicted"] == pytest.approx(10 ** np.polyval(coef, np.log10(sizes[held])), rel=1e-9)
        assert row["observed"] == pytest.approx(g.loc[g["size"] == held, "peak"].iloc[0], rel=1e-12)
        assert row["inside"] == (row["lo"] <= row["observed"] <= row["hi"])
    for variant, g in runs[runs["size"] == held].groupby("variant"):
        g = g.sort_values("lr")
        L = np.where(g["diverged"] | ~np.isfinite(g["final_loss"]), g["init_loss"],
                     np.minimum(g["final_loss"], g["init_loss"]))
        best = int(np.argmin(L))
        thr = L[best] + 0.1 * (g["init_loss"].mean() - L[best])
        j = best
        while j + 1 < len(L) and L[j + 1] <= thr and not g["diverged"].iloc[j + 1]:
            j += 1
        assert crit.loc[variant, "observed_largest_stable_lr"] == pytest.approx(g["lr"].iloc[j])
    f = rep.findings
    assert f["finding"].str.contains("largest stable LR of a larger model").sum() == 2
    assert (rep.out / "prediction.json").exists() and "prediction_heldout" in rep.figures


def test_predict_cli_prints_predicted_vs_observed_and_report_shows_the_fit(rep, tmp_path, capsys):
    import json

    from stabilitylab.report import write_report

    out = tmp_path / "p.json"
    code = cli.main(["predict", str(rep.out / "attention"), "--holdout", "largest", "--n-boot", "200",
                     "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and "held-out size t3" in text and "Peak max attention logit per LR" in text
    got = json.loads(out.read_text())
    assert got["heldout"] == "t3" and {r["variant"] for r in got["critical_lr"]} == {"baseline", "qk_layernorm"}
    assert len(got["attn_logit"]) == 2 * len(TINY.lrs)
    html, _ = write_report(rep.out / "attention", tmp_path / "report", n_boot=200)
    assert (tmp_path / "report" / "heldout_prediction.png").exists() and "heldout_critical_lr" in html.read_text()
    assert cli.main(["predict", str(rep.out / "attention"), "--holdout", "none"]) == 2
    assert "target_n_params" in capsys.readouterr().err


def test_sensitivity_parts_below_and_above_the_best_lr_sum_to_lr_sensitivity(rep):
    runs, _ = _store(rep.out / "attention")
    sens = rep.tables["attention_sensitivity"]
    for variant, size in runs[["variant", "size"]].drop_duplicates().itertuples(index=False):
        below, above = R.sensitivity_parts(runs, variant, size)
        got = sens.loc[(sens["variant"] == variant) & (sens["size"] == size), "lr_sensitivity"].iloc[0]
        assert below + above == pytest.approx(got, abs=1e-12) and below >= 0 and above >= 0


def test_old_module_forwards_every_public_name_with_a_deprecation_warning():
    import stabilitylab.reproduce as old

    for name in R.__all__:
        with pytest.warns(DeprecationWarning, match=f"stabilitylab.studies.reproduce.{name}"):
            assert getattr(old, name) is getattr(R, name)
    with pytest.raises(AttributeError, match="nope"):
        old.nope  # noqa: B018
