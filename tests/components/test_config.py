import pytest

from components import config as cfg

RAW = {
    "pipeline": {},
    "tiny_train": {"steps": 10, "lr": 0.01},
    "profiles": {"smoke": {"tiny_train": {"steps": 2}}},
}
MODULES = {"tiny_train": "tests.spine.tiny_train", "pipeline": "tasks.settings"}


def test_profile_overrides_merge_over_sections():
    assert cfg.resolve_profile(RAW, "smoke")["tiny_train"] == {"steps": 2, "lr": 0.01}
    assert cfg.resolve_profile(RAW, "default")["tiny_train"]["steps"] == 10
    assert cfg.profile_names(RAW) == ["default", "smoke"]


def test_unknown_profile_names_the_choices():
    with pytest.raises(cfg.ConfigError, match=r"unknown profile 'fast'.*default, smoke"):
        cfg.resolve_profile(RAW, "fast")


def test_bad_value_names_key_and_allowed_range():
    raw = {**RAW, "tiny_train": {"steps": 0, "lr": 0.01}}
    with pytest.raises(cfg.ConfigError) as e:
        cfg.validate_all(raw, "default", MODULES)
    msg = str(e.value)
    assert "tiny_train.steps" in msg and "greater than or equal to 1" in msg and "got 0" in msg


def test_unknown_key_and_unknown_section_are_refused():
    raw = {**RAW, "tiny_train": {"stepz": 3}, "nope": {}}
    with pytest.raises(cfg.ConfigError) as e:
        cfg.validate_all(raw, "default", MODULES)
    assert "tiny_train.stepz" in str(e.value) and "nope: no stage of that name" in str(e.value)


def test_profile_override_of_unknown_section_is_refused():
    raw = {**RAW, "profiles": {"smoke": {"tiny_trian": {"steps": 1}}}}
    with pytest.raises(cfg.ConfigError, match="tiny_trian"):
        cfg.resolve_profile(raw, "smoke")
