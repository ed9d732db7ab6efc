"""The `world_data` stage's data sets, in a documented JSONL + PNG format (docs/data-formats.md).

One folder per kind, each with ``<kind>.jsonl`` (one JSON object per line) and its PNGs; image
fields are paths relative to the kind's folder:

- ``t2i/``: text-to-image pairs ``{id, prompt, image, scene, tag}`` (JourneyDB's role);
- ``edit/``: editing triplets ``{id, key, task_type, instruction, instruction_language,
  input_image, output_image, edit, source_scene, target_scene}``, one row per language
  (SEED-Data-Edit's role);
- ``qa/``: understanding questions ``{id, image, question, answer, kind}``;
- ``captions/``: detailed captions ``{id, image, caption}`` (LLaVA-OneVision's role);
- ``prefs/``: reward-model preference pairs ``{id, prompt, chosen, rejected, defect,
  defect_type, metadata}``: a correct render against a controlled semantic or quality defect;
- ``benchmarks/geneval/``: GenEval-shapes ``evaluation_metadata.jsonl``,
  ``generation_prompts.txt``, ``object_names.txt``;
- ``benchmarks/gedit/``: GEdit-shapes rows ``gedit.jsonl`` (GEdit's fields plus the structured
  edit, the scenes and the oracle result ``output_image``).

Output is byte-identical for the same parameters (DVC hashes it). :func:`validate_dataset`
checks a kind's file and names the file, the line and the field at fault;
:func:`ingest_batch` adds a user's batch only if every row of every file in it is valid.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from components.evaluation.geneval import TAGS, GenEvalInputError, read_metadata_file
from components.world import gedit as gedit_mod
from components.world.defects import QUALITY, quality_defect, semantic_defect, semantic_kinds
from components.world.geneval_prompts import make_prompts, oracle_scene, sample, write_prompt_files
from components.world.palette import BACKGROUNDS, CLASSES, COLOURS, DIGIT
from components.world.prompts import describe
from components.world.render import STYLES, TONES, random_scene, render
from components.world.understanding import QUESTION_KINDS, caption, questions

KINDS = ("t2i", "edit", "qa", "captions", "prefs")  # the training sets, in build order
BENCH_KINDS = ("gedit",)  # benchmark files validated like the training sets


class WorldDataParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seed: int = Field(0, ge=0, description="seed of every scene")
    n_t2i: int = Field(2000, ge=1, le=1_000_000, description="text-to-image pairs")
    max_objects: int = Field(3, ge=1, le=5, description="objects per scene, 1..max (scene-description prompts)")
    image_size: int = Field(64, ge=64, le=64, description="canvas side in pixels (64)")
    geneval_style: float = Field(0.5, ge=0.0, le=1.0,
                                 description="share of T2I prompts drawn from GenEval's six templates (the rest "
                                             "describe a random scene)")
    n_edit: Optional[int] = Field(None, ge=0, le=1_000_000,
                                  description="editing triplets, each one row per language (null: n_t2i // 2)")
    n_qa: Optional[int] = Field(None, ge=0, le=1_000_000, description="question-answer rows (null: n_t2i)")
    qa_per_image: int = Field(3, ge=1, le=5, description="questions (of distinct kinds) per Q&A image")
    n_captions: Optional[int] = Field(None, ge=0, le=1_000_000, description="captioned images (null: n_t2i // 4)")
    n_prefs: Optional[int] = Field(None, ge=0, le=1_000_000, description="preference pairs (null: n_t2i // 4)")
    semantic_share: float = Field(0.5, ge=0.0, le=1.0, description="share of preference pairs with a semantic defect")
    geneval_seed: int = Field(43, ge=0, description="GenEval-shapes prompt seed (GenEval's default 43)")
    geneval_n: int = Field(100, ge=1, le=10_000, description="GenEval-shapes draws per tag (GenEval's default 100)")
    gedit_seed: int = Field(0, ge=0, description="GEdit-shapes benchmark seed")
    gedit_scale: float = Field(1.0, gt=0.0, le=1.0,
                               description="GEdit-shapes size as a share of GEdit's 606 per language")

    def counts(self) -> dict[str, int]:
        """Rows (triplets for edit, pairs for prefs) of each training set, defaults resolved."""
        n = self.n_t2i
        pick = lambda v, d: d if v is None else v  # noqa: E731
        return {"t2i": n, "edit": pick(self.n_edit, n // 2), "qa": pick(self.n_qa, n),
                "captions": pick(self.n_captions, n // 4), "prefs": pick(self.n_prefs, n // 4)}


class DatasetError(ValueError):
    """A data file is malformed; the message names the file, the line and the field."""


# ----------------------------------------------------------------------------- writing
def _save_png(img: np.ndarray, path: Path) -> None:
    Image.fromarray(img).save(path, format="PNG", optimize=False, compress_level=6)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n")


def _jitter(seed: int, kind: str, i: int) -> int:
    return zlib.crc32(f"{seed}|{kind}|{i}".encode())


def _rng(seed: int, kind: str) -> np.random.Generator:
    """Independent streams per kind, so changing one count leaves the other sets as they were."""
    return np.random.default_rng([seed, zlib.crc32(kind.encode())])


Progress = Optional[Callable[[str, int, int], None]]


def _tick(progress: Progress, what: str, done: int, total: int) -> None:
    if progress is not None:
        progress(what, done, total)


def build_t2i(out: Path, p: WorldDataParams, n: int, progress: Progress = None) -> list[dict]:
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(p.seed)  # the stream the first version used
    rows = []
    for i in range(n):
        if rng.random() < p.geneval_style:
            meta = sample(TAGS[rng.integers(len(TAGS))], rng)
            scene, prompt, tag = oracle_scene(meta, rng, p.image_size), meta["prompt"], meta["tag"]
        else:
            scene = random_scene(rng, int(rng.integers(1, p.max_objects + 1)), p.image_size)
            prompt, tag = describe(scene), "scene"
        name = f"images/{i:06d}.png"
        _save_png(render(scene, jitter_seed=p.seed * 1_000_003 + i), out / name)
        rows.append({"id": f"t2i-{i:06d}", "prompt": prompt, "image": name, "scene": scene.to_json(), "tag": tag})
        _tick(progress, "t2i", i + 1, n)
    return rows


def build_edit(out: Path, p: WorldDataParams, n: int, progress: Progress = None) -> list[dict]:
    """Triplets of every GEdit category, drawn in proportion to GEdit's counts; keys differ from
    the benchmark's (another namespace), so no benchmark sample is a training sample."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = _rng(p.seed, "edit")
    tasks = list(gedit_mod.CATEGORIES)
    weights = np.array(list(gedit_mod.CATEGORIES.values()), dtype=np.float64)
    rows = []
    for i in range(n):
        task = tasks[rng.choice(len(tasks), p=weights / weights.sum())]
        src, edit, tgt = gedit_mod.sample_edit(task, rng, p.image_size)
        key = gedit_mod.edit_key(p.seed, "train|" + task, i)
        js = _jitter(p.seed, "edit", i)
        names = (f"images/{i:06d}_in.png", f"images/{i:06d}_out.png")
        _save_png(render(src, jitter_seed=js), out / names[0])
        _save_png(render(tgt, jitter_seed=js), out / names[1])
        variant = int(rng.integers(2))
        for lang in gedit_mod.LANGUAGES:
            rows.append({"id": f"edit-{i:06d}-{lang}", "key": key, "task_type": task,
                         "instruction": gedit_mod.instruction(edit, lang, variant), "instruction_language": lang,
                         "input_image": names[0], "output_image": names[1], "edit": edit,
                         "source_scene": src.to_json(), "target_scene": tgt.to_json()})
        _tick(progress, "edit", i + 1, n)
    return rows


def build_qa(out: Path, p: WorldDataParams, n: int, progress: Progress = None) -> list[dict]:
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = _rng(p.seed, "qa")
    rows: list[dict] = []
    i = 0
    while len(rows) < n:
        scene = random_scene(rng, int(rng.integers(1, 5)), p.image_size)
        name = f"images/{i:06d}.png"
        _save_png(render(scene, jitter_seed=_jitter(p.seed, "qa", i)), out / name)
        for kind, q, a in questions(scene, rng, p.qa_per_image)[: n - len(rows)]:
            rows.append({"id": f"qa-{len(rows):06d}", "image": name, "question": q, "answer": a, "kind": kind,
                         "scene": scene.to_json()})
        i += 1
        _tick(progress, "qa", len(rows), n)
    return rows


def build_captions(out: Path, p: WorldDataParams, n: int, progress: Progress = None) -> list[dict]:
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = _rng(p.seed, "captions")
    rows = []
    for i in range(n):
        scene = random_scene(rng, int(rng.integers(1, 5)), p.image_size)
        name = f"images/{i:06d}.png"
        _save_png(render(scene, jitter_seed=_jitter(p.seed, "captions", i)), out / name)
        rows.append({"id": f"cap-{i:06d}", "image": name, "caption": caption(scene), "scene": scene.to_json()})
        _tick(progress, "captions", i + 1, n)
    return rows


def build_prefs(out: Path, p: WorldDataParams, n: int, progress: Progress = None) -> list[dict]:
    """A GenEval-style prompt, its correct render (chosen) and a render with one controlled
    defect (rejected): semantic (the prompt no longer holds) or quality (same scene, damaged)."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = _rng(p.seed, "prefs")
    rows = []
    for i in range(n):
        meta = sample(TAGS[rng.integers(len(TAGS))], rng)
        scene = oracle_scene(meta, rng, p.image_size)
        js = _jitter(p.seed, "prefs", i)
        if rng.random() < p.semantic_share:
            kinds = semantic_kinds(meta)
            kind = kinds[rng.integers(len(kinds))]
            bad, _ = semantic_defect(meta, kind, rng, p.image_size)
            rejected, dtype = render(bad, jitter_seed=js + 1), "semantic"
        else:
            kind = QUALITY[rng.integers(len(QUALITY))]
            rejected, dtype = quality_defect(scene, kind, rng, jitter_seed=js), "quality"
        names = (f"images/{i:06d}_chosen.png", f"images/{i:06d}_rejected.png")
        _save_png(render(scene, jitter_seed=js), out / names[0])
        _save_png(rejected, out / names[1])
        rows.append({"id": f"pref-{i:06d}", "prompt": meta["prompt"], "chosen": names[0], "rejected": names[1],
                     "defect": kind, "defect_type": dtype, "metadata": meta})
        _tick(progress, "prefs", i + 1, n)
    return rows


def build_benchmarks(out: Path, p: WorldDataParams, progress: Progress = None) -> dict[str, float]:
    """GenEval-shapes prompt files and the GEdit-shapes set (sources and oracle results)."""
    prompts = make_prompts(seed=p.geneval_seed, n=p.geneval_n)
    write_prompt_files(prompts, out / "geneval")
    g = out / "gedit"
    for sub in ("images", "oracle"):
        (g / sub).mkdir(parents=True, exist_ok=True)
    samples = gedit_mod.make_samples(p.gedit_seed, p.gedit_scale, p.image_size)
    rows = []
    for i, s in enumerate(samples):
        js = _jitter(p.gedit_seed, "gedit", i)
        src, res = f"images/{s['key']}.png", f"oracle/{s['key']}.png"
        _save_png(render(s["source"], jitter_seed=js), g / src)
        _save_png(render(s["target"], jitter_seed=js), g / res)
        for r in gedit_mod.rows_of(s, src):
            r["output_image"] = res
            rows.append(r)
        _tick(progress, "gedit", i + 1, len(samples))
    _write_jsonl(g / "gedit.jsonl", rows)
    return {"geneval_prompts": float(len(prompts)), "gedit_rows": float(len(rows))}


_BUILDERS = {"t2i": build_t2i, "edit": build_edit, "qa": build_qa, "captions": build_captions,
             "prefs": build_prefs}
_METRIC = {"t2i": "t2i_pairs", "edit": "edit_rows", "qa": "qa_rows", "captions": "captions", "prefs": "pref_pairs"}


def build_world_data(out_dir: Path, params: WorldDataParams, progress: Progress = None) -> dict[str, float]:
    """Every training set and the benchmark files under ``out_dir``; every file is validated."""
    out_dir = Path(out_dir)
    metrics: dict[str, float] = {}
    for kind, n in params.counts().items():
        if n == 0:
            continue
        folder = out_dir / kind
        folder.mkdir(parents=True, exist_ok=True)
        rows = _BUILDERS[kind](folder, params, n, progress)
        _write_jsonl(folder / f"{kind}.jsonl", rows)
        metrics[_METRIC[kind]] = float(len(rows))
    metrics.update(build_benchmarks(out_dir / "benchmarks", params, progress))
    validate_world(out_dir)
    return metrics


# ----------------------------------------------------------------------------- validation
class _Check:
    """Validation of one file: each problem raises DatasetError as ``file:line: field 'x' ...``."""

    def __init__(self, f: Path, folder: Path):
        self.f, self.folder, self.line = f, folder, 0
        self.image_size: tuple[int, int] | None = None

    def fail(self, field: str, problem: str):
        raise DatasetError(f"{self.f}:{self.line}: field {field!r} {problem}")

    def typed(self, row: dict, field: str, typ: type, required: bool = True) -> Any:
        if field not in row:
            if required:
                self.fail(field, "is missing")
            return None
        v = row[field]
        if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
            self.fail(field, f"must be a {typ.__name__}")
        if typ is str and not v.strip():
            self.fail(field, "must not be empty")
        return v

    def choice(self, row: dict, field: str, choices, required: bool = True) -> None:
        v = self.typed(row, field, str, required)
        if v is not None and v not in choices:
            self.fail(field, f"must be one of {', '.join(choices)} (got {v!r})")

    def image(self, row: dict, field: str) -> None:
        rel = self.typed(row, field, str)
        p = Path(rel)
        if p.is_absolute() or ".." in p.parts:
            self.fail(field, f"must be a path inside {self.folder} (got {rel!r})")
        path = self.folder / p
        if not path.is_file():
            self.fail(field, f"{rel} does not exist")
        try:
            with Image.open(path) as im:
                size, mode = im.size, im.mode
        except (UnidentifiedImageError, OSError):
            self.fail(field, f"{rel} is not a readable image")
        if mode not in ("RGB", "RGBA", "L", "P"):
            self.fail(field, f"{rel} has colour mode {mode}; expected RGB")
        if self.image_size is None:
            self.image_size = size
        elif size != self.image_size:
            self.fail(field, f"{rel} is {size[0]}x{size[1]}; the file's images are "
                             f"{self.image_size[0]}x{self.image_size[1]}")

    def scene(self, row: dict, field: str, required: bool = True) -> None:
        s = self.typed(row, field, dict, required)
        if s is None:
            return
        objs = s.get("objects")
        if not isinstance(objs, list):
            self.fail(f"{field}.objects", "must be a list")
        for key, choices in (("background", tuple(BACKGROUNDS)), ("tone", ("none",) + tuple(TONES))):
            if key in s and s[key] not in choices:
                self.fail(f"{field}.{key}", f"must be one of {', '.join(choices)} (got {s[key]!r})")
        for j, o in enumerate(objs):
            at = f"{field}.objects[{j}]"
            if not isinstance(o, dict):
                self.fail(at, "must be an object")
            if o.get("cls") not in CLASSES + (DIGIT,):
                self.fail(f"{at}.cls", f"unknown class {o.get('cls')!r}")
            if o.get("colour") not in COLOURS:
                self.fail(f"{at}.colour", f"unknown colour {o.get('colour')!r}")
            for k in ("cx", "cy", "size"):
                if not isinstance(o.get(k), (int, float)) or isinstance(o.get(k), bool):
                    self.fail(f"{at}.{k}", "must be a number")
            if o.get("style", "filled") not in STYLES:
                self.fail(f"{at}.style", f"must be one of {', '.join(STYLES)}")


def _check_t2i(c: _Check, r: dict) -> None:
    c.typed(r, "id", str)
    c.typed(r, "prompt", str)
    c.image(r, "image")
    c.scene(r, "scene", required=False)


def _check_edit(c: _Check, r: dict) -> None:
    c.typed(r, "id", str)
    c.typed(r, "instruction", str)
    c.image(r, "input_image")
    c.image(r, "output_image")
    c.choice(r, "instruction_language", gedit_mod.LANGUAGES, required=False)
    c.typed(r, "task_type", str, required=False)
    c.typed(r, "key", str, required=False)
    c.typed(r, "edit", dict, required=False)
    c.scene(r, "source_scene", required=False)
    c.scene(r, "target_scene", required=False)


def _check_qa(c: _Check, r: dict) -> None:
    c.typed(r, "id", str)
    c.image(r, "image")
    c.typed(r, "question", str)
    c.typed(r, "answer", str)
    c.choice(r, "kind", QUESTION_KINDS, required=False)
    c.scene(r, "scene", required=False)


def _check_captions(c: _Check, r: dict) -> None:
    c.typed(r, "id", str)
    c.image(r, "image")
    c.typed(r, "caption", str)
    c.scene(r, "scene", required=False)


def _check_prefs(c: _Check, r: dict) -> None:
    c.typed(r, "id", str)
    c.typed(r, "prompt", str)
    c.image(r, "chosen")
    c.image(r, "rejected")
    c.typed(r, "defect", str)
    c.choice(r, "defect_type", ("semantic", "quality"))
    c.typed(r, "metadata", dict, required=False)


def _check_gedit(c: _Check, r: dict) -> None:
    c.choice(r, "task_type", tuple(gedit_mod.CATEGORIES))
    c.typed(r, "key", str)
    c.typed(r, "instruction", str)
    c.choice(r, "instruction_language", gedit_mod.LANGUAGES)
    c.image(r, "input_image")
    if not isinstance(r.get("Intersection_exist"), bool):
        c.fail("Intersection_exist", "must be a bool")
    if "output_image" in r:
        c.image(r, "output_image")
    c.typed(r, "edit", dict, required=False)
    c.scene(r, "source_scene", required=False)
    c.scene(r, "target_scene", required=False)


_CHECKS = {"t2i": _check_t2i, "edit": _check_edit, "qa": _check_qa, "captions": _check_captions,
           "prefs": _check_prefs, "gedit": _check_gedit}


def validate_dataset(path: Path, kind: str | None = "t2i") -> dict[str, int]:
    """Check every row of ``<path>/<kind>.jsonl`` (ids unique, images present and readable);
    raise DatasetError naming the file, the line and the field."""
    kind = kind or "t2i"
    if kind not in _CHECKS:
        raise DatasetError(f"unknown data set kind {kind!r}; kinds: {', '.join(_CHECKS)}")
    folder = Path(path)
    f = folder / f"{kind}.jsonl"
    if not f.is_file():
        raise DatasetError(f"{f}: missing")
    c = _Check(f, folder)
    seen: set[Any] = set()
    n = 0
    with open(f, encoding="utf-8") as fh:
        for c.line, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{f}:{c.line}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{f}:{c.line}: expected a JSON object")
            _CHECKS[kind](c, row)
            ident = (row["key"], row["instruction_language"]) if kind == "gedit" else row["id"]
            if ident in seen:
                c.fail("key" if kind == "gedit" else "id", f"{ident!r} is not unique")
            seen.add(ident)
            n += 1
    if n == 0:
        raise DatasetError(f"{f}: no rows")
    return {"rows": n}


def validate_world(data_dir: Path) -> dict[str, int]:
    """Validate every set present under ``data_dir`` (and the benchmark files); rows per kind."""
    data_dir = Path(data_dir)
    out = {k: validate_dataset(data_dir / k, k)["rows"] for k in KINDS if (data_dir / k).exists()}
    g = data_dir / "benchmarks" / "gedit"
    if g.exists():
        out["gedit"] = validate_dataset(g, "gedit")["rows"]
    m = data_dir / "benchmarks" / "geneval" / "evaluation_metadata.jsonl"
    if m.exists():
        try:
            out["geneval"] = len(read_metadata_file(m))
        except GenEvalInputError as e:
            raise DatasetError(str(e)) from None
    return out


# ----------------------------------------------------------------------------- ingestion
_IMAGE_FIELDS = {"t2i": ("image",), "edit": ("input_image", "output_image"), "qa": ("image",),
                 "captions": ("image",), "prefs": ("chosen", "rejected")}


def ingest_batch(batch_dir: Path, data_dir: Path, name: str | None = None) -> dict[str, int]:
    """Add a user's batch (folders ``t2i/``, ``edit/``, ``qa/``, ``captions/``, ``prefs/`` in this
    format) to ``data_dir``. Every file of the batch is validated first, and ids must be new: one
    bad row anywhere and nothing is ingested. Images are copied under ``<kind>/batches/<name>/``;
    each ``<kind>.jsonl`` is replaced atomically. Returns the rows added per kind."""
    batch_dir, data_dir = Path(batch_dir), Path(data_dir)
    name = name or batch_dir.name
    kinds = [k for k in KINDS if (batch_dir / k / f"{k}.jsonl").exists()]
    if not kinds:
        raise DatasetError(f"{batch_dir}: no data set in the batch (expected one of "
                           f"{', '.join(k + '/' + k + '.jsonl' for k in KINDS)})")
    for k in kinds:  # everything is checked before anything is written
        validate_dataset(batch_dir / k, k)
        dest = data_dir / k / "batches" / name
        if dest.exists():
            raise DatasetError(f"{dest}: a batch named {name!r} was already ingested")
        target = data_dir / k / f"{k}.jsonl"
        existing = {json.loads(x)["id"] for x in target.read_text().splitlines() if x.strip()} \
            if target.exists() else set()
        f = batch_dir / k / f"{k}.jsonl"
        for line_no, line in enumerate(f.read_text().splitlines(), 1):
            if line.strip() and json.loads(line)["id"] in existing:
                raise DatasetError(f"{f}:{line_no}: field 'id' {json.loads(line)['id']!r} already exists in {target}")
    added = {}
    for k in kinds:
        dest = data_dir / k / "batches" / name
        rows = []
        for line in (batch_dir / k / f"{k}.jsonl").read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            for fld in _IMAGE_FIELDS[k]:
                src = batch_dir / k / r[fld]
                rel = Path("batches") / name / r[fld]
                (data_dir / k / rel).parent.mkdir(parents=True, exist_ok=True)
                if not (data_dir / k / rel).exists():
                    shutil.copyfile(src, data_dir / k / rel)
                r[fld] = rel.as_posix()
            rows.append(r)
        target = data_dir / k / f"{k}.jsonl"
        old = target.read_text() if target.exists() else ""
        if old and not old.endswith("\n"):
            old += "\n"
        tmp = target.with_suffix(".jsonl.tmp")
        tmp.write_text(old + "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows))
        os.replace(tmp, target)
        added[k] = len(rows)
    return added
