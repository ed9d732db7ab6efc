import json

import numpy as np
import pytest

from components.world.datasets import DatasetError, WorldDataParams, build_world_data, validate_dataset
from components.world.prompts import describe
from components.world.render import Obj, Scene, render


def test_render_is_deterministic_and_antialiased():
    s = Scene((Obj("circle", "red", 20, 20, 14), Obj("square", "blue", 44, 44, 12)))
    a, b = render(s), render(s)
    assert a.shape == (64, 64, 3) and np.array_equal(a, b)
    assert tuple(a[20, 20]) == (220, 30, 30) and tuple(a[0, 0]) == (150, 150, 150)
    edge = a[15, 13:16, 0]  # the boundary crosses pixel 14 of row 15
    assert any(150 < v < 220 for v in edge.tolist()), "the edge pixel is blended, not binary"


def test_prompt_wording_follows_geneval():
    s = Scene((Obj("circle", "orange", 10, 10, 10), Obj("cross", "blue", 30, 30, 10), Obj("cross", "blue", 50, 50, 10)))
    assert describe(s) == "a photo of an orange circle and two blue crosses"


def test_build_is_byte_identical_and_validates(tmp_path):
    p = WorldDataParams(n_t2i=6, seed=3)
    build_world_data(tmp_path / "a", p)
    build_world_data(tmp_path / "b", p)
    for f in ["t2i/t2i.jsonl", "t2i/images/000005.png"]:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert validate_dataset(tmp_path / "a" / "t2i")["rows"] == 6


def test_validator_names_file_line_and_field(tmp_path):
    build_world_data(tmp_path, WorldDataParams(n_t2i=3))
    f = tmp_path / "t2i" / "t2i.jsonl"
    rows = [json.loads(x) for x in f.read_text().splitlines()]
    rows[1]["prompt"] = 7
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DatasetError, match=r"t2i.jsonl:2: field 'prompt' must be a str"):
        validate_dataset(tmp_path / "t2i")
