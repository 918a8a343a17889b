import math

import pytest
import torch

from stabilitylab.mitigations import constant_with_warmup, warmup_cosine, wsd


def _lrs(make, steps, peak=0.5):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"] / peak)
        opt.step()
        sched.step()
    return out


def test_warmup_cosine_warms_linearly_then_decays_to_floor():
    f = _lrs(lambda o: warmup_cosine(o, warmup=4, total=20, floor=0.1), 22)
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    for s in range(4, 22):
        t = min(1.0, (s - 4) / 16)
        assert f[s] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
    assert f[20] == pytest.approx(0.1) and f[21] == pytest.approx(0.1)


def test_constant_with_warmup():
    assert _lrs(lambda o: constant_with_warmup(o, 3), 6) == pytest.approx([1 / 3, 2 / 3, 1, 1, 1, 1])
    assert _lrs(lambda o: constant_with_warmup(o, 0), 2) == pytest.approx([1, 1])


@pytest.mark.parametrize("shape", ["linear", "cosine", "sqrt"])
def test_wsd_holds_then_decays_over_the_last_steps(shape):
    total, warm, decay, floor = 20, 2, 5, 0.2
    f = _lrs(lambda o: wsd(o, warm, total, decay=decay, floor=floor, shape=shape), total + 1)
    assert f[:2] == pytest.approx([0.5, 1.0]) and f[2:16] == pytest.approx([1.0] * 14)
    d = {"linear": lambda u: 1 - u, "cosine": lambda u: 0.5 * (1 + math.cos(math.pi * u)),
         "sqrt": lambda u: 1 - math.sqrt(u)}[shape]
    for s in range(15, total + 1):
        assert f[s] == pytest.approx(floor + (1 - floor) * d(min(1.0, (s - 15) / decay)))
    assert f[total] == pytest.approx(floor)
    assert _lrs(lambda o: wsd(o, 0, 10, decay=0.5), 11)[5:] == pytest.approx([1, 0.8, 0.6, 0.4, 0.2, 0.0])


@pytest.mark.parametrize("call,word", [
    (lambda o: warmup_cosine(o, -1, 10), "warmup"),
    (lambda o: warmup_cosine(o, 1, 10, floor=2.0), "floor"),
    (lambda o: wsd(o, 5, 10, decay=8), "decay"),
    (lambda o: wsd(o, 0, 10, shape="exp"), "shape"),
    (lambda o: constant_with_warmup(o, 1.5), "warmup"),
])
def test_schedule_errors_name_the_argument(call, word):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=word):
        call(opt)
