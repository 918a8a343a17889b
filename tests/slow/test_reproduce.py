"""A reduced quick reproduction (3 tiny sizes x 5 LRs x 200 steps, studies 1 and 2) whose qualitative
findings must hold, so a regression in the proxy, the probes or the mitigations is caught."""

from __future__ import annotations

import numpy as np
import pytest

from stabilitylab.studies import reproduce as R

pytestmark = pytest.mark.slow

SCALE = R.Scale(name="slowtest", sizes=("xxs", "xs", "s"), lrs=tuple(float(v) for v in np.geomspace(1e-3, 3e-1, 5)),
                steps=200, batch_size=8, seq_len=32, every=10)


@pytest.fixture(scope="module")
def rep(tmp_path_factory):
    return R.reproduce(SCALE, out=tmp_path_factory.mktemp("repro_slow"), studies=("attention", "output_logits"),
                       device="cpu", progress=False)


def _sens(rep, variant):
    t = rep.tables["attention_sensitivity"]
    t = t[t["variant"] == variant].sort_values("n_params")
    return t["lr_sensitivity"].to_numpy()


def test_qk_layernorm_lowers_lr_sensitivity_more_as_size_grows(rep):
    base, qk = _sens(rep, "baseline"), _sens(rep, "qk_layernorm")
    assert np.all(qk < base)
    gap = base - qk
    assert gap[-1] > gap[0] + 0.005  # the instability part of the sensitivity grows with size


def test_peak_attention_logit_at_high_lr_is_orders_of_magnitude_larger_without_qk_layernorm(rep):
    t = rep.tables["attention_peak_logit"]
    largest = "s"
    hi = [c for c in t.columns if c.startswith("lr=") and float(c[3:]) >= SCALE.high_lr]
    peak = t[t["size"] == largest].set_index("variant")[hi].max(axis=1)
    assert peak["baseline"] > 30 * peak["qk_layernorm"]
    low = t[t["size"] == largest].set_index("variant")[f"lr={SCALE.lrs[0]:.3g}"]
    assert peak["baseline"] > 30 * low["baseline"]


def test_z_loss_lowers_log_z_drift(rep):
    d = rep.tables["output_logits_lse"]
    lower = d["|lse_final| z_loss"] < d["|lse_final| baseline"]
    assert lower.mean() > 0.75
    s = d[d["size"] == "s"]
    assert s["|lse_final| z_loss"].mean() < s["|lse_final| baseline"].mean()


def test_findings_table_reports_finding_one_and_the_z_loss_direction_as_held(rep):
    f = rep.findings.set_index("finding")["held"]
    held = {k: v for k, v in f.items() if "attention logit at high LR" in k or "qk-layernorm removes" in k
            or "|lse_mean| at the end" in k}
    assert held and set(held.values()) == {"yes"}
