import pytest

from stabilitylab.mitigations import BUNDLES, bundle, bundles
from stabilitylab.proxy import TrainConfig, preset

REQUIRED = ["baseline", "qk_layernorm", "z_loss", "qk_layernorm+z_loss", "indep_wd", "mup", "adam_atan2",
            "eps1e-15", "all"]


@pytest.mark.parametrize("name", list(BUNDLES))
def test_every_bundle_builds_a_valid_run_and_is_documented(name):
    b = bundle(name)
    cfg = TrainConfig(model=preset("xxs", **b["model"]), **b["train"])
    for k, v in b["train"].items():
        assert getattr(cfg, k) == v
    assert f"``{name}``" in bundles.__doc__


def test_bundles_mean_what_their_names_say():
    assert set(REQUIRED) <= set(BUNDLES)
    base = bundle("baseline")
    assert base["model"] == {} and base["train"] == {"independent_wd": False}
    assert bundle("qk_layernorm")["model"] == {"qk_layernorm": True}
    assert bundle("z_loss")["model"] == {"z_loss": 1e-4}
    assert bundle("indep_wd")["train"]["independent_wd"] is True
    assert bundle("eps1e-15")["train"]["eps"] == 1e-15
    assert bundle("adam_atan2")["train"]["optimizer"] == "adam_atan2"
    assert bundle("mup")["model"]["mup"] and bundle("mup")["train"]["mup_lr_scaling"]
    every = bundle("all")
    for name in REQUIRED[1:-1]:
        assert bundle(name)["model"].items() <= every["model"].items()
    assert every["train"]["independent_wd"] and every["train"]["optimizer"] == "adam_atan2"
    bundle("baseline")["model"]["qk_layernorm"] = True  # a copy: the registry is unchanged
    assert BUNDLES["baseline"]["model"] == {}
    with pytest.raises(ValueError, match="unknown mitigation bundle 'qk'"):
        bundle("qk")


def test_the_all_bundle_trains(tmp_path):
    from stabilitylab.mitigations import AdamAtan2
    from stabilitylab.proxy import train_one

    b = bundle("all")
    seen = {}
    cfg = TrainConfig(model=preset("xxs", seq_len=16, **b["model"]), steps=3, warmup_steps=1, batch_size=2,
                      eval_batches=1, **b["train"])
    res = train_one(cfg, monitor=lambda m, o: seen.setdefault("opt", o) and None)
    assert isinstance(seen["opt"], AdamAtan2) and res.steps_done == 3 and res.status == "ok"
