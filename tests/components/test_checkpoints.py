import json

import pytest
import torch

from components import checkpoints as ck


def test_save_load_roundtrip_and_md5(tmp_path):
    t = {"w": torch.arange(6.0).reshape(2, 3)}
    md5 = ck.save_checkpoint(tmp_path / "c", t, {"width": 3}, {"stage": "x"})
    assert md5.endswith(".dir") and md5 == ck.dir_md5(tmp_path / "c")
    loaded = ck.load_checkpoint(tmp_path / "c", expected_md5=md5)
    assert torch.equal(loaded.tensors["w"], t["w"])
    assert loaded.config == {"width": 3} and loaded.manifest["stage"] == "x"
    assert not list(tmp_path.glob(".c.*")), "no temporary directory is left behind"


def test_changed_byte_is_detected_before_loading(tmp_path):
    md5 = ck.save_checkpoint(tmp_path / "c", {"w": torch.ones(4)}, {}, {})
    p = tmp_path / "c" / ck.CONFIG
    p.write_text(p.read_text().replace("{", "{ ", 1))
    with pytest.raises(ck.ChecksumMismatch, match="bytes changed"):
        ck.load_checkpoint(tmp_path / "c", expected_md5=md5)


def test_dir_md5_matches_dvc_definition(tmp_path):
    import hashlib
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_bytes(b"b")
    (tmp_path / "d" / "sub" / "a.txt").write_bytes(b"a")
    entries = sorted([{"md5": hashlib.md5(b"b").hexdigest(), "relpath": "b.txt"},
                      {"md5": hashlib.md5(b"a").hexdigest(), "relpath": "sub/a.txt"}], key=lambda e: e["relpath"])
    expected = hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"
    assert ck.dir_md5(tmp_path / "d") == expected


def test_train_state_roundtrip_restores_optimizer(tmp_path):
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(m.parameters(), lr=0.1)
    m(torch.randn(4, 3)).sum().backward()
    opt.step()
    ck.save_train_state(tmp_path / "s", {"m": m}, {"opt": opt}, 7, {"history": [{"step": 7}]})
    m2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.Adam(m2.parameters(), lr=0.1)
    step, extra = ck.load_train_state(tmp_path / "s", {"m": m2}, {"opt": opt2})
    assert step == 7 and extra["history"] == [{"step": 7}]
    assert torch.equal(m.weight, m2.weight)
    s1, s2 = opt.state_dict()["state"][0], opt2.state_dict()["state"][0]
    assert torch.equal(s1["exp_avg"], s2["exp_avg"]) and float(s1["step"]) == float(s2["step"])
