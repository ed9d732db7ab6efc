from pathlib import Path

import pytest

from components import config as cfg
from components.checkpoints import dir_md5

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


REPO = Path(__file__).resolve().parents[2]
REPO_RAW = cfg.load_yaml(REPO / "params.yaml")


@pytest.mark.parametrize("profile", cfg.profile_names(REPO_RAW))
def test_committed_teacher_matches_its_md5(profile):
    """A profile whose base stage imports a teacher from a folder of this repository (the default
    profile's committed teacher) must find that folder with the md5 it names, or a fresh clone's
    main job stops at the base stage."""
    base = cfg.resolve_profile(REPO_RAW, profile).get("base") or {}
    path = str(base.get("import_path") or "")
    if base.get("source") not in ("import", "finetune") or "://" in path or Path(path).is_absolute():
        pytest.skip(f"profile {profile!r} does not import its teacher from a folder of the repository")
    folder = REPO / path
    assert folder.is_dir(), f"{profile}: import_path {path} is not a folder of the repository"
    assert dir_md5(folder) == base["import_md5"]
