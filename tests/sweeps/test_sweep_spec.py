"""SweepSpec: validation (one clear error each), grid expansion, stable run ids, TOML round-trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from stabilitylab.mitigations.bundles import bundle
from stabilitylab.proxy import PRESETS
from stabilitylab.sweeps import SweepSpec

TINY = {"d_model": 16, "n_layers": 1, "head_dim": 8}


@pytest.mark.parametrize("kwargs, match", [
    (dict(lrs=[]), r"lrs=\[\]\).*empty grid"),
    (dict(lrs=[1e-2], sizes=[]), r"sizes=\[\]\).*empty grid"),
    (dict(lrs=[1e-2], variants=[]), r"variants=\[\]\).*empty grid"),
    (dict(lrs=[1e-2], seeds=[]), r"seeds=\[\]\).*empty grid"),
    (dict(lrs={"log_range": [1e-3, 1e-1, 0]}), r"empty grid"),
    (dict(lrs=[1e-2, -0.1]), r"learning rate -0.1 at position 1 must be positive"),
    (dict(lrs=[0.0]), r"learning rate 0.0 at position 0 must be positive"),
    (dict(lrs=[float("nan")]), r"must be positive and finite"),
    (dict(lrs={"log_range": [0, 1e-1, 3]}), r"log_range bound 0"),
    (dict(lrs={"range": [1e-3, 1e-1, 3]}), r"log_range"),
    (dict(lrs=1e-2), r"expected a list"),
    (dict(lrs=[1e-2], variants=["baseline", "no_such_bundle"]), r"variants='no_such_bundle'\).*unknown variant"),
    (dict(lrs=[1e-2], variants=[{"qk_layer_norm": True}]), r"unknown keys \['qk_layer_norm'\]"),
    (dict(lrs=[1e-2], sizes=["huge"]), r"sizes='huge'\).*unknown preset.*xxs"),
    (dict(lrs=[1e-2], sizes=[{"d_model": 16, "n_layers": 1}]), r"missing keys \['head_dim'\]"),
    (dict(lrs=[1e-2], sizes=[{"d_model": 16, "n_layers": 1, "head_dim": 5}]), r"not a multiple of head_dim"),
    (dict(lrs=[1e-2, 1e-2]), r"duplicate points.*lr=0.01"),
    (dict(lrs=[1e-2], seeds=[1, 1]), r"duplicate points"),
    (dict(lrs=[1e-2], variants=["baseline", {"name": "mine", "independent_wd": False}]), r"duplicate points"),
    (dict(lrs=[1e-2], sizes=["xs", "xs"]), r"label 'xs' is used twice"),
    (dict(lrs=[1e-2], seeds=[-1]), r"seed -1"),
    (dict(lrs=[1e-2], steps=0), r"steps=0"),
    (dict(lrs=[1e-2], every=0), r"every=0"),
    (dict(lrs=[1e-2], probes=["attention", "nope"]), r"probes="),
    (dict(lrs=[1e-2], name="a/b"), r"name='a/b'"),
    (dict(lrs=[1e-2], train={"steps": 5}), r"reserved keys \['steps'\]"),
    (dict(lrs=[1e-2], model={"d_model": 32}), r"reserved keys \['d_model'\]"),
])
def test_bad_specs_raise_one_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SweepSpec(**kwargs)


def test_grid_order_configs_and_log_range():
    spec = SweepSpec(lrs={"log_range": [1e-3, 1e-1, 3]}, sizes=["xs", TINY], seeds=[0, 2],
                     variants=["baseline", "qk_layernorm", {"name": "eps", "bundle": "z_loss", "eps": 1e-12}],
                     steps=40, eps=1e-9)
    assert spec.lrs == pytest.approx([10 ** -3, 10 ** -2, 10 ** -1], rel=1e-12)
    pts = spec.points()
    assert len(pts) == len(spec) == 2 * 3 * 3 * 2
    first = pts[0]
    assert (first.size, first.variant, first.lr, first.seed) == ("xs", "baseline", spec.lrs[0], 0)
    assert [p.seed for p in pts[:2]] == [0, 2] and pts[2].lr == spec.lrs[1]
    by = {(p.size, p.variant, p.lr, p.seed): p.config for p in pts}
    xs = by[("xs", "qk_layernorm", spec.lrs[2], 2)]
    assert (xs.model.d_model, xs.model.n_layers, xs.model.head_dim) == tuple(PRESETS["xs"][k] for k in TINY)
    assert xs.model.qk_layernorm and xs.lr == spec.lrs[2] and xs.seed == 2 and xs.eps == 1e-9
    assert xs.warmup_steps == 4 and xs.steps == 40
    for k, v in bundle("qk_layernorm")["train"].items():
        assert getattr(xs, k) == v
    nested = SweepSpec(lrs=np.array([1e-3]), variants=[{"name": "n", "model": {"qk_layernorm": True},
                                                         "train": {"eps": 1e-12}}]).points()[0].config
    assert nested.model.qk_layernorm and nested.eps == 1e-12 and nested.lr == 1e-3
    mine = by[("d16_L1_h8", "eps", spec.lrs[0], 0)]
    assert mine.eps == 1e-12 and mine.model.z_loss == bundle("z_loss")["model"]["z_loss"]
    assert mine.model.d_model == 16
    assert len({p.run_id for p in pts}) == len(pts)


def test_run_id_changes_with_any_config_field_and_label():
    base = dict(lrs=[1e-2], sizes=[TINY], steps=10)
    rid = SweepSpec(**base).points()[0].run_id
    assert SweepSpec(**base).points()[0].run_id == rid
    for change in (dict(steps=11), dict(eps=1e-9), dict(train={"beta2": 0.99}), dict(every=5),
                   dict(sizes=[{**TINY, "name": "tiny"}]), dict(lrs=[1e-2 * (1 + 1e-15)])):
        assert SweepSpec(**{**base, **change}).points()[0].run_id != rid, change
    assert SweepSpec(**base, name="other").points()[0].run_id == rid  # the study name is not the config


def test_run_ids_are_the_same_in_another_process():
    spec = SweepSpec(lrs={"log_range": [1e-4, 1.0, 4]}, sizes=["xxs", TINY], variants=["baseline", "z_loss"])
    code = ("import json, sys; from stabilitylab.sweeps import SweepSpec; "
            "s = SweepSpec.from_dict(json.loads(sys.argv[1])); print(json.dumps([p.run_id for p in s.points()]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(spec.to_dict())], capture_output=True,
                         text=True, env=env, check=True, timeout=300)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [p.run_id for p in spec.points()]


def test_toml_round_trip(tmp_path):
    spec = SweepSpec(name="rt", lrs={"log_range": [3e-4, 0.3, 4]}, sizes=["xs", {**TINY, "name": "t"}],
                     variants=["baseline", {"name": "cap", "logit_softcap": 30.0, "clip": 0.5}], seeds=[0, 1],
                     steps=25, warmup_steps=3, probes=["attention", "health"], model={"mlp_ratio": 2},
                     train={"beta2": 0.99, "optimizer": "adamw"})
    path = tmp_path / "s.toml"
    spec.to_toml(path)
    back = SweepSpec.from_toml(path)
    assert back == spec and hash(back) == hash(spec)
    assert [p.run_id for p in back.points()] == [p.run_id for p in spec.points()]
    assert SweepSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    path.write_text('name = "x"\nlrs = [0.01]\nstepz = 3\n')
    with pytest.raises(ValueError, match=r"unknown keys \['stepz'\]"):
        SweepSpec.from_toml(path)
    path.write_text("lrs = [0.01\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        SweepSpec.from_toml(path)
    with pytest.raises(FileNotFoundError):
        SweepSpec.from_toml(tmp_path / "missing.toml")


def test_to_toml_refuses_null_inside_overrides():
    spec = SweepSpec(lrs=[1e-2], variants=[{"name": "nocap", "clip": None}])
    assert spec.points()[0].config.clip is None
    with pytest.raises(ValueError, match="variants.clip = None has no TOML form"):
        spec.to_toml()


def test_fields_added_later_keep_old_run_ids_while_at_their_defaults():
    from dataclasses import asdict

    from stabilitylab.sweeps.spec import _ID_OPTIONAL_FIELDS, canonical_json

    spec = SweepSpec(sizes=["xs"], lrs=[1e-3], steps=20)
    p = spec.points()[0]
    # The id is the hash of the config as it was before these fields existed.
    old_config = {k: v for k, v in json.loads(canonical_json(asdict(p.config))).items()
                  if k not in _ID_OPTIONAL_FIELDS}
    import hashlib

    key = {"size": "xs", "variant": p.variant, "every": spec.every, "probes": spec.probes, "config": old_config}
    assert p.run_id == hashlib.sha256(canonical_json(key).encode()).hexdigest()[:16]
    scheduled = SweepSpec(sizes=["xs"], lrs=[1e-3], steps=20, train={"lr_schedule": "0:1,10:2"}).points()[0]
    assert scheduled.run_id != p.run_id


def test_spec_holds_one_base_train_config_and_the_old_keywords_are_aliases_onto_it():
    from dataclasses import asdict

    from stabilitylab.proxy import ProxyConfig, TrainConfig

    old = SweepSpec(lrs=[1e-2, 3e-2], sizes=[TINY], steps=40, batch_size=8, seq_len=32, eps=1e-9,
                    train={"beta2": 0.99})
    assert isinstance(old.base, TrainConfig)
    assert (old.base.steps, old.base.batch_size, old.base.model.seq_len, old.base.eps) == (40, 8, 32, 1e-9)
    assert old.base.warmup_steps == 4 and old.steps == 40 and old.train == {"beta2": 0.99}  # max(1, 40 // 10)
    base = TrainConfig(steps=40, batch_size=8, warmup_steps=4, eps=1e-9, beta2=0.99, model=ProxyConfig(seq_len=32))
    new = SweepSpec(lrs=[1e-2, 3e-2], sizes=[TINY], base=base)
    assert new == old and [p.run_id for p in new.points()] == [p.run_id for p in old.points()]
    plain = SweepSpec(lrs=[1e-2, 3e-2], sizes=[TINY], variants=[{"name": "plain"}], base=base)
    assert [p.config for p in plain.points()] == [
        TrainConfig(**{**asdict(base), "lr": lr, "model": {**asdict(base.model), **TINY}}) for lr in (1e-2, 3e-2)]
    # A base's own warm-up is kept; an alias overrides the base field.
    assert SweepSpec(lrs=[1e-2], base=TrainConfig(steps=1000)).points()[0].config.warmup_steps == 30
    assert SweepSpec(lrs=[1e-2], steps=1000).points()[0].config.warmup_steps == 100
    assert SweepSpec(lrs=[1e-2], base=base, steps=50).points()[0].config.steps == 50
    assert SweepSpec.from_dict({"lrs": [1e-2], "base": {"steps": 12, "model": {"mlp_ratio": 2}}}).model == {"mlp_ratio": 2}
    with pytest.raises(ValueError, match=r"base=3\): pass a TrainConfig"):
        SweepSpec(lrs=[1e-2], base=3)
    with pytest.raises(ValueError, match=r"bad base config.*clip=-1"):
        SweepSpec(lrs=[1e-2], base={"clip": -1})
