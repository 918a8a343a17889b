import pytest
import torch

from stabilitylab import Monitor
from stabilitylab.proxy import ProxyConfig, ProxyTransformer
from stabilitylab.studies.coord_check import coord_check, plot_coord_check, width_slopes

WIDTHS = [32, 64, 128, 256]


def _proxy(mup: bool):
    return lambda w: ProxyTransformer(ProxyConfig(d_model=w, n_layers=2, head_dim=16, seq_len=16, mup=mup,
                                                  mup_base_width=32))


def test_coord_check_grows_with_width_under_sp_and_stays_flat_under_mup(tmp_path):
    sp = coord_check(_proxy(False), WIDTHS, steps=4, lr=3e-2, batch_size=4)
    mup = coord_check(_proxy(True), WIDTHS, steps=4, lr=3e-2, batch_size=4)
    assert list(sp.columns) == ["width", "seed", "step", "module", "metric", "value"]
    assert set(sp["module"]) == {"blocks.0", "blocks.1"} and set(sp["step"]) == {0, 1, 2, 3}
    assert len(sp) == len(WIDTHS) * 4 * 2 and (sp["metric"] == "act.rms").all()
    s_sp, s_mup = width_slopes(sp), width_slopes(mup)
    last = s_sp["step"] == 3
    # measured slopes at step 3: ~1.3 (SP) and ~-0.05 (muP); step 0 (init) is flat for both
    assert (s_sp[last]["slope"] > 0.5).all()
    assert (s_mup["slope"].abs() < 0.2).all()
    assert (s_sp[s_sp["step"] == 0]["slope"].abs() < 0.1).all()
    fig = plot_coord_check(sp)
    fig.savefig(tmp_path / "cc.png")
    assert (tmp_path / "cc.png").stat().st_size > 0


def test_width_slopes_recovers_a_power_law():
    import pandas as pd

    rows = [{"width": w, "seed": 0, "step": 0, "module": "m", "metric": "act.rms", "value": 3.0 * w ** 0.7}
            for w in WIDTHS]
    assert width_slopes(pd.DataFrame(rows))["slope"].iloc[0] == pytest.approx(0.7)


def test_coord_check_validates_arguments():
    with pytest.raises(ValueError, match="widths"):
        coord_check(_proxy(False), [32])
    with pytest.raises(ValueError, match="steps"):
        coord_check(_proxy(False), [32, 64], steps=0)
    with pytest.raises(ValueError, match="data"):
        coord_check(lambda w: torch.nn.Linear(w, w), [8, 16])


class _MuModel(torch.nn.Module):
    def __init__(self, width: int):
        from mup import MuReadout

        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(8 if i == 0 else width, width) for i in range(2)])
        self.readout = MuReadout(width, 3)

    def forward(self, x, y):
        for b in self.blocks:
            x = torch.relu(b(x))
        logits = self.readout(x)
        return logits, torch.nn.functional.cross_entropy(logits, y)


def test_mup_package_models_can_be_monitored_and_coord_checked():
    mup = pytest.importorskip("mup")

    def factory(width):
        model = _MuModel(width)
        mup.set_base_shapes(model, _MuModel(16), delta=_MuModel(32))
        return model

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
    table = coord_check(factory, [16, 64], steps=2, data=lambda s: (x, y),
                        optimizer_factory=lambda m: mup.MuAdam(m.parameters(), lr=1e-2))
    assert set(table["module"]) == {"blocks.0", "blocks.1"} and table["value"].gt(0).all()
    model = factory(32)
    opt = mup.MuAdam(model.parameters(), lr=1e-2)
    with Monitor(model, optimizer=opt, every=1, probes=["logits", "optimizer", "activations"]) as mon:
        logits, loss = model(x, y)
        loss.backward()
        opt.step()
        mon.step(loss)
    h = mon.history()
    assert {"logits.lse_mean", "update.rms", "act.rms"} <= set(h["metric"])
    assert h[h["module"] == "readout.weight"]["metric"].str.startswith("update").any()


def test_old_mitigations_path_still_works_with_a_deprecation_warning():
    import stabilitylab.mitigations as mit

    for name, fn in (("coord_check", coord_check), ("plot_coord_check", plot_coord_check),
                     ("width_slopes", width_slopes)):
        with pytest.warns(DeprecationWarning, match=f"studies.coord_check.{name}"):
            assert getattr(mit, name) is fn
    with pytest.raises(AttributeError, match="no_such_name"):
        mit.no_such_name  # noqa: B018
