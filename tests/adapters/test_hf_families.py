"""Every supported Hugging Face family x attention implementation: found, and exact against float64.

Each family is a tiny model (2 layers, hidden 32, vocab 100, batch 2 x 10 with a right-padded row) run
once in float64 through the Monitor's attention probe, and compared with the scores its own explicit
attention path normalises (``_hf_families.reference``). ``scripts/attention_matrix.py`` writes the same
measurements to ``benchmarks/results/attention_matrix.json`` for the README table.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import stabilitylab as sl

transformers = pytest.importorskip("transformers")
from _hf_families import FAMILIES, build, inputs, reference, run_case  # noqa: E402

CASES = [(f, impl) for f, fam in FAMILIES.items() for impl in fam.impls]


@pytest.mark.parametrize("family,impl", CASES, ids=[f"{f}-{i}" for f, i in CASES])
def test_every_attention_module_is_found_and_matches_float64_scores(family, impl):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no stabilitylab warning: nothing silent
        warnings.filterwarnings("ignore", message="(?!stabilitylab)")
        r = run_case(family, impl)
    assert r["covered"] == r["expected"] and len(r["covered"]) == FAMILIES[family].n_attn
    assert set(r["ref"]) == set(r["expected"])
    assert r["max_rel_error"] <= 1e-5, {k: v for k, v in r["errors"].items() if v > 1e-5}
    assert max(v["max_logit"] for v in r["ref"].values()) > 1.0  # real, non-uniform attention
    if FAMILIES[family].softcap is None:
        assert not any(k[0] == "attn.max_logit_capped" for k in r["extra"])


def test_gemma2_soft_cap_entropy_is_that_of_the_capped_softmax_and_both_maxima_are_named():
    r = run_case("gemma2", "eager")
    cap = FAMILIES["gemma2"].softcap
    for name, ref in r["ref"].items():
        assert ref["max_logit"] > cap  # the cap binds: raw and capped maxima differ
        assert ref["max_logit_capped"] == pytest.approx(cap * math.tanh(ref["max_logit"] / cap), rel=1e-12)
        assert r["errors"][f"max_logit_capped/{name}"] <= 1e-10
        assert r["errors"][f"entropy/{name}"] <= 1e-10


def test_padded_query_rows_are_excluded_by_default_and_counted_on_request():
    model = build("llama", "eager").double()
    x = inputs("llama")
    ref = reference("llama", "eager", model.state_dict(), x)
    name = "model.layers.0.self_attn"
    out = {}
    for include in (False, True):
        with sl.Monitor(model, every=1, probes=[sl.probes.AttentionProbe(include_padded_rows=include)]) as mon:
            with torch.no_grad():
                model(**x)
            out[include] = mon.step()[("attn.entropy", name)]
    assert out[False] == pytest.approx(ref[name]["entropy"], rel=1e-12)
    assert abs(out[True] - out[False]) > 1e-4  # the three padded rows of sample 1 change the mean


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
@pytest.mark.parametrize("use_reentrant", [None, True, False])
def test_gradient_checkpointing_does_not_count_the_recomputed_forward(use_reentrant):
    x = inputs("llama")
    vals = {}
    for ckpt in (False, True):
        model = build("llama", "eager").double().train()
        if ckpt:
            kw = {} if use_reentrant is None else {"gradient_checkpointing_kwargs": {"use_reentrant": use_reentrant}}
            model.gradient_checkpointing_enable(**kw)
        with sl.Monitor(model, every=1, probes=["attention", "activations"]) as mon:
            model(**x, labels=x["input_ids"]).loss.backward()
            vals[ckpt] = mon.step()
    assert vals[True].keys() == vals[False].keys()
    assert any(k[0] == "attn.entropy" for k in vals[True]) and any(k[0] == "act.rms" for k in vals[True])
    for k, v in vals[False].items():
        assert vals[True][k] == pytest.approx(v, rel=1e-12), k


def test_an_opaque_attention_implementation_gets_one_warning_naming_module_and_fix():
    from transformers.modeling_utils import AttentionInterface

    def opaque(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        k = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        v = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
        s = query @ k.transpose(-2, -1) * scaling
        e = (s if attention_mask is None else s + attention_mask).exp()  # no softmax, no SDPA
        return ((e / e.sum(-1, keepdim=True)) @ v).transpose(1, 2), None

    AttentionInterface.register("sl_test_opaque", opaque)
    model = build("llama", "sl_test_opaque")
    x = inputs("llama")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with sl.Monitor(model, every=1, probes=["attention"]) as mon:
            for _ in range(2):
                with torch.no_grad():
                    model(**x)
                assert not [k for k in mon.step() if k[0].startswith("attn.")]
    msgs = [str(w.message) for w in caught if "stabilitylab" in str(w.message)]
    assert len(msgs) == 2  # one per module, not one per step
    for i, m in enumerate(sorted(msgs)):
        assert f"model.layers.{i}.self_attn" in m and "sl_test_opaque" in m
        assert "attn_implementation='sdpa' or 'eager'" in m and "stabilitylab.record_qk" in m


@pytest.mark.slow
def test_hf_flex_attention_matches_float64_scores_from_its_score_mod():
    """flex_attention on CPU compiles (about a minute) and runs in float32 only."""
    model = build("llama", "flex_attention")
    x = inputs("llama")
    ref = reference("llama", "eager", model.state_dict(), x)  # flex computes what eager computes
    with sl.Monitor(model, every=1, probes=["attention"]) as mon:
        with torch.no_grad():
            model(**x)
        vals = mon.step()
    for name, r in ref.items():
        assert vals[("attn.max_logit", name)] == pytest.approx(r["max_logit"], rel=1e-5)
        assert vals[("attn.entropy", name)] == pytest.approx(r["entropy"], rel=1e-5)
