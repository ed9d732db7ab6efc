"""Hyper-Bagel's Table 1 ablation of the draft: every variant trained with the same budget, each
then decoded (greedy chain speculative decoding, batch 1) on the same held-out prompts.

The variants are ``components/draft.py``'s ``variant`` switch:

- ``eagle3`` (vanilla EAGLE-3): FC over the 3 levels, 1 freshly initialised draft layer, no
  zero-init, KL only;
- ``ours``: meta-query CA + skip -> fc1 -> Dec, 2 draft layers from the target's last 2,
  zero-init, KL + 0.1 CE;
- ``no_zero_init``: as ours without zero-init;
- ``no_ce``: as ours with KL only;
- ``no_zero_init_no_ce``: as ours without both.

The target's answers are regenerated once and shared (``draft.load_inputs``); every variant
runs the shared training loop (``components.training.run_training``, in process) from the same
seed, so the data order, the steps and the batch size are the same for all. Pure ML: the caller
(``flows/bench.py``) finds the base checkpoint and the world data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from components import draft, speculative
from components.training import LocalReporter, StageContext, TrainState, run_training

VARIANTS = ("eagle3", "ours", "no_zero_init", "no_ce", "no_zero_init_no_ce")


class _SharedStage:
    """The draft stage's interface with the regenerated answers shared by every variant."""

    def __init__(self, inputs: draft.Inputs):
        self.inputs = inputs

    def setup(self, ctx: StageContext) -> TrainState:
        return draft.build_state(ctx, self.inputs)

    train_step = staticmethod(draft.train_step)


def variant_config(params: draft.Params, inputs: draft.Inputs) -> dict:
    """What distinguishes a variant (Table 1's rows)."""
    c = params.draft_config(inputs.target)
    return {"fusion": c.fusion, "draft_layers": c.draft_layers, "init_from_target": c.init_from_target,
            "zero_init": c.zero_init, "ce_weight": params.ce_lambda()}


def run_ablation(params: draft.Params, base_dir: Path, data_dir: Path, work_dir: Path,
                 steps: int | None = None, prompts: int | None = None, variants: tuple[str, ...] = VARIANTS,
                 progress: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Train each of ``variants`` for ``steps`` (default ``params.ablation_steps``) from the base
    checkpoint at ``base_dir`` on the world data at ``data_dir`` and decode the first ``prompts``
    (default ``params.ablation_prompts``) held-out prompts of ``draft.heldout_rows``.

    ``work_dir`` holds each variant's training state (a fresh folder: a finished state there
    would be resumed). Returns ``{variant: {tau, speedup, alpha, identical_fraction,
    tokens_per_s, n_prompts, steps, final_loss, config}}``."""
    steps = steps or params.ablation_steps
    n = prompts or params.ablation_prompts
    base = params.model_dump()
    base.update(steps=steps, checkpoint_every=steps, log_every=max(1, min(params.log_every, steps)))
    inputs = draft.load_inputs(StageContext(draft.Params.model_validate(base), Path(data_dir), Path(base_dir)))
    images, ids, _kinds = draft.heldout_inputs(inputs.world, inputs.teacher, n, params.seed)
    stage = _SharedStage(inputs)
    out: dict[str, dict] = {}
    for v in variants:
        p = draft.Params.model_validate({**base, "variant": v})
        state = run_training(stage, StageContext(p, Path(data_dir), Path(base_dir)),
                             LocalReporter(Path(work_dir) / v))
        model = getattr(state.modules["draft"], "module", state.modules["draft"]).eval()
        res = speculative.benchmark(inputs.target, model, images, ids, p.max_new_tokens, p.chain, p.stop_below,
                                    p.delay)
        history = state.extra.get("history") or []
        out[v] = {"tau": res.tau, "speedup": res.speedup, "alpha": res.alpha,
                  "identical_fraction": res.identical_fraction, "tokens_per_s": dict(res.tokens_per_s),
                  "n_prompts": res.n_prompts, "steps": steps,
                  "final_loss": history[-1]["loss"] if history else None,
                  "config": variant_config(p, inputs)}
        if progress is not None:
            progress(f"{v}: tau {res.tau:.3f}, speedup {res.speedup:.2f}x")
    return out
