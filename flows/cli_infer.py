"""`hyperbagel generate | edit | ask`: inference on any registered version of a teacher-like model.

The model is named by an MLflow URI (``models:/hyperbagel-base@champion``,
``models:/hyperbagel-base/3``); its checkpoint is downloaded from the registry's artifact
store into the state folder's cache and loaded only after its md5 matches the one the
version was registered with. Bad input ends with one ``error:`` line and exit code 2.
"""

from __future__ import annotations

from pathlib import Path

import typer

from flows.console import err, fail as _fail


def _checkpoint(model: str):
    """A registered version's checkpoint directory (a local cached copy) and its md5."""
    from components import checkpoints
    from flows.cli import setup_environment
    from tasks import registry, tracking
    from tasks.project import state_dir

    project = setup_environment()
    c = tracking.client(state_dir(project))
    mv = registry.resolve(c, model)
    md5 = mv.tags.get("dvc.md5")
    if not md5:
        raise checkpoints.ChecksumMismatch(f"{mv.name} v{mv.version} records no checkpoint md5")
    cache = state_dir(project) / "model-cache" / md5.replace(".dir", "")
    ckpt = cache / "checkpoint"
    if not ckpt.exists():
        cache.mkdir(parents=True, exist_ok=True)
        ckpt = registry.download_checkpoint(c, mv, cache)
    err.print(f"{mv.name} v{mv.version} ({md5[:12]})")
    return ckpt, md5


def _load(model: str):
    """The teacher of a registered version, from a local md5-verified copy."""
    from components.inference import Teacher

    return Teacher.load(*_checkpoint(model)).frozen()  # sampling only: no per-call weight checks


def _read_image(path: Path):
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (64, 64):
                err.print(f"note: {path} is {im.size[0]}x{im.size[1]}; resized to 64x64")
                im = im.resize((64, 64), Image.BICUBIC)
            return np.asarray(im)[None]
    except FileNotFoundError:
        _fail(f"{path}: no such file")
    except (UnidentifiedImageError, OSError) as e:
        _fail(f"{path}: not a readable image ({e})")


def _write_image(img, out: Path) -> None:
    from PIL import Image

    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(out)
    typer.echo(str(out))


def _run(fn):
    from components.checkpoints import ChecksumMismatch
    from components.inference import InputError
    from tasks.registry import ModelNotFound

    try:
        return fn()
    except (InputError, ModelNotFound, ChecksumMismatch, FileNotFoundError) as e:
        _fail(str(e))


def generate(model: str = typer.Option(..., "--model", "-m", help="models:/NAME@ALIAS or models:/NAME/VERSION"),
             prompt: str = typer.Option(..., "--prompt", help="e.g. 'a photo of a red circle'"),
             out: Path = typer.Option(..., "--out", "-o", help="PNG to write"),
             steps: int | None = typer.Option(None, help="Euler steps; default: the model's own (the teacher 50 "
                                                        "with 2 CFG passes each, the 6-NFE model 6 with 1 pass)"),
             seed: int = typer.Option(0)):
    """Text-to-image with the model's own sampler and CFG."""
    teacher = _run(lambda: _load(model))
    img = _run(lambda: teacher.generate([prompt], seed=seed, num_steps=steps))
    err.print(f"{teacher.last_nfe} NFE")
    _write_image(img[0], out)


def edit(model: str = typer.Option(..., "--model", "-m"),
         image: Path = typer.Option(..., "--image", "-i", help="source image (64x64 RGB; others are resized)"),
         instruction: str = typer.Option(..., "--instruction"),
         out: Path = typer.Option(..., "--out", "-o"),
         steps: int | None = typer.Option(None, help="Euler steps; default: the model's own (50 or 6)"),
         seed: int = typer.Option(0)):
    """Instruction editing of an image."""
    src = _read_image(image)
    teacher = _run(lambda: _load(model))
    img = _run(lambda: teacher.edit(src, [instruction], seed=seed, num_steps=steps))
    err.print(f"{teacher.last_nfe} NFE")
    _write_image(img[0], out)


def ask(model: str = typer.Option(..., "--model", "-m"),
        image: Path = typer.Option(..., "--image", "-i"),
        question: str = typer.Option(..., "--question", "-q", help="e.g. 'how many circles are there?'"),
        max_new_tokens: int = typer.Option(96),
        speculative: bool = typer.Option(False, "--speculative",
                                         help="decode with the draft model (the same greedy answer, float32)"),
        draft: str = typer.Option("models:/hyperbagel-draft@champion", "--draft",
                                  help="the draft's model URI (other profiles: hyperbagel-draft-PROFILE)"),
        chain: int = typer.Option(10, min=1, help="draft tokens per round (a tree: its depth)"),
        delay: int = typer.Option(1, min=0, help="target-only steps before the first draft round"),
        tree_topk: int = typer.Option(0, min=0, help="> 0: draft a token tree (EAGLE-2), this many children per "
                                                   "expanded node, --chain deep; 0: a chain"),
        tree_nodes: int = typer.Option(24, min=1, help="tree nodes verified per round"),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="print tau and tokens/s")):
    """Answer a question about an image (or describe it: 'describe the image in detail')."""
    src = _read_image(image)
    teacher = _run(lambda: _load(model))
    if not speculative:
        typer.echo(_run(lambda: teacher.ask(src, [question], max_new_tokens=max_new_tokens))[0])
        return
    from components import speculative as spec
    from components.draft import load_draft

    def _draft():
        ckpt, md5 = _checkpoint(draft)
        return load_draft(ckpt, teacher.understanding, md5)

    drafter = _run(_draft)
    answer, stats = _run(lambda: spec.ask(teacher, drafter, src, question, max_new_tokens, chain, compare=verbose,
                                                   delay=delay, tree_topk=tree_topk, tree_nodes=tree_nodes))
    typer.echo(answer)
    if verbose:
        tau = f"{stats['tau']:.2f}" if stats["rounds"] else "- (the answer ended before a draft round)"
        err.print(f"tau {tau} ({stats['rounds']:.0f} rounds, {stats['tokens']:.0f} tokens); "
                  f"{stats['tokens_per_s']:.1f} tokens/s speculative, {stats['tokens_per_s_target']:.1f} tokens/s "
                  f"target alone ({stats['tokens_per_s'] / max(stats['tokens_per_s_target'], 1e-9):.2f}x); "
                  f"identical to the target's answer: {'yes' if stats['identical'] else 'no'}")


def register(app: typer.Typer) -> None:
    app.command(help="Generate an image from a prompt with a registered model.")(generate)
    app.command(help="Edit an image by instruction with a registered model.")(edit)
    app.command(help="Ask a registered model about an image.")(ask)
