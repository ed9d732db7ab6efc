import pytest
import torch

from components.training import LocalReporter, StageContext, run_training
from tests.spine import tiny_train


def _ctx(tmp_path, steps):
    import numpy as np
    x = np.random.default_rng(0).normal(size=(64, 5)).astype("float32")
    np.savetxt(tmp_path / "xy.csv", x, delimiter=",")
    p = tiny_train.Params(steps=steps, checkpoint_every=5, log_every=5, lr=0.01)
    return StageContext(params=p, data_dir=tmp_path, parent_dir=None)


def test_resume_continues_to_the_same_result(tmp_path):
    full = run_training(tiny_train, _ctx(tmp_path, 20), LocalReporter(tmp_path / "a"))
    rep = LocalReporter(tmp_path / "b")
    run_training(tiny_train, _ctx(tmp_path, 10), rep)  # interrupted after 10 steps
    heard = []
    resumed = run_training(tiny_train, _ctx(tmp_path, 20), rep, progress=lambda *a: heard.append(a))
    assert resumed.extra["resumed_from"] == 10
    assert heard[0] == (10, 20, {"resumed_from": 10.0}) and [a[0] for a in heard[1:]] == [15, 20]
    for a, b in zip(full.modules["model"].parameters(), resumed.modules["model"].parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert [h["step"] for h in resumed.extra["history"]] == [5, 10, 15, 20]


def test_scheduled_lr_warms_up_then_holds_or_decays_linearly_to_zero():
    from components.training import scheduled_lr, warmup_lr

    assert [scheduled_lr(1.0, s, 4, 10) for s in range(10)] == [warmup_lr(1.0, s, 4) for s in range(10)]
    lin = [scheduled_lr(1.0, s, 0, 10, "linear") for s in range(11)]
    assert lin[0] == 1.0 and lin[5] == pytest.approx(0.5) and lin[10] == 0.0
    assert all(a > b for a, b in zip(lin, lin[1:]))
    assert scheduled_lr(1.0, 1, 4, 10, "linear") == pytest.approx(0.5 * 0.9)  # warm-up and decay multiply
    with pytest.raises(ValueError, match="cosine"):
        scheduled_lr(1.0, 0, 0, 10, "cosine")
