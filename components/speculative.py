"""Chain speculative decoding of the understanding expert with a trained draft (batch 1).

One round, with the target's KV cache holding every accepted position and ``x`` the next
token (already emitted, not yet in the cache):

1. the draft reads the target states of the positions verified last round (its Dec and
   draft layers keep their own KV caches over accepted positions) and proposes a chain
   ``d_1 .. d_K`` one token at a time on its cache;
2. the target runs ``[x, d_1 .. d_K]`` in one forward on its cache, giving its
   distribution ``p_0 .. p_K`` at those positions and the hidden states of all its layers;
3. **greedy**: ``d_i`` is accepted while ``d_i == argmax p_{i-1}``; then ``argmax p_m``
   is emitted, so the output is the target's own greedy decoding token for token.
   **sampling**: ``d_i ~ q_i`` is accepted with probability ``min(1, p_{i-1}(d_i) / q_i(d_i))``;
   the first rejection emits a sample of ``norm(max(p - q, 0))``, a full acceptance a sample
   of ``p_K``: the emitted tokens follow the target's distribution exactly;
4. both caches are cropped back to the accepted positions.

**Token tree** (EAGLE-2's dynamic tree, greedy only; ``tree_topk`` > 0): step 1 grows a tree
instead of a chain. The root's top ``tree_topk`` tokens form depth 1; at every further depth the
draft expands the ``tree_topk`` frontier nodes of highest cumulative draft log-probability in one
forward (each row attends to the verified prefix and its own ancestors), each proposing its top
``tree_topk`` children; after ``chain`` depths the ``tree_nodes`` best nodes (by the same score, so
every kept node's ancestors are kept) are verified in one target forward under the tree's mask.
The longest path whose every token is the target's argmax at its parent is accepted, then the
target's argmax after it: the output is still the target's own greedy decoding. Its cache keeps
the path's slots (:meth:`~components.models.kv_decoder.LayerStack.keep`). Expansion stops early
once no frontier node can still enter the best ``tree_nodes`` (a child never outscores its parent).
The tree accepts more per round but each round costs more (a wider verification and draft steps);
on this project's CPU it was not faster than the chain (reports/NOTES.md).

Target and draft run on static KV caches (``components/models/kv_decoder.py``), the target
through the same :class:`~components.models.kv_decoder.LeanLM` as its own greedy decoding
(``Understanding.generate``), so a speed-up measured against it is the speculation's alone.

Metrics: τ = accepted drafts per round + 1 (EAGLE's convention; a round that ends the answer on
an accepted ``eos`` still counts the +1, though the target's token is not emitted then), n-α =
P(d_n accepted | d_1 .. d_{n-1} accepted) over rounds that proposed ``d_n`` (a tree: some depth-n
child of the accepted path). ``d_n`` reads n-1 of the draft's own features, so this n-α is what
EAGLE calls (n-1)-α; n = 1..10 are the ten positions of a chain of 10. An accepted ``eos`` ends
the answer and the round. Everything runs in float32 so greedy verification and the target's
own greedy decoding compute the same argmax.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from components.models.draft import Draft, DraftDecoder
from components.models.kv_decoder import LeanLM
from components.models.understanding import Understanding


@dataclass
class SpecResult:
    tokens: list[int]                                       # the answer, without eos
    rounds: list[list[bool]] = field(default_factory=list)  # per round: outcome of d_1, d_2, ... until rejection
    drafted: list[int] = field(default_factory=list)        # per round: draft tokens proposed (<= chain;
                                                            # a tree: nodes verified, <= tree_nodes)

    @property
    def accepted(self) -> list[int]:
        return [sum(r) for r in self.rounds]


class _Sampler:
    def __init__(self, mode: str, temperature: float, generator: torch.Generator | None):
        if mode not in ("greedy", "sample"):
            raise ValueError(f"mode must be 'greedy' or 'sample', not {mode!r}")
        if mode == "sample" and temperature <= 0:
            raise ValueError("sampling needs a temperature > 0")
        self.greedy, self.t, self.g = mode == "greedy", temperature, generator

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float() / self.t, dim=-1)

    def draw(self, logits: torch.Tensor) -> int:
        if self.greedy:
            return int(logits.argmax(-1))
        return self.multinomial(self.probs(logits))

    def multinomial(self, p: torch.Tensor) -> int:
        return int(torch.multinomial(p, 1, generator=self.g))

    def uniform(self) -> float:
        return float(torch.rand((), generator=self.g))


def _prefill(target: Understanding, lean: LeanLM, image: torch.Tensor, prompt: list[int]):
    img = target.encoder(image).to(target.lm.dtype)
    embeds = torch.cat([img, lean.embed(torch.tensor([prompt]))], dim=1)
    logits, states = lean.forward(embeds, torch.arange(embeds.shape[1])[None], hidden=True)
    return embeds, logits, torch.stack(states, dim=2)


@torch.no_grad()
def generate(target: Understanding, draft: Draft, image: torch.Tensor, prompt: list[int], max_new_tokens: int = 48,
             chain: int = 10, mode: str = "greedy", temperature: float = 1.0,
             generator: torch.Generator | None = None, stop_below: float = 0.0, delay: int = 0,
             tree_topk: int = 0, tree_nodes: int = 0) -> SpecResult:
    """Speculative decoding of one answer to ``prompt`` (question ids ending in ``sep``) about
    ``image`` ``(1, 3, H, W)``; up to ``chain`` draft tokens per round (a tree: ``chain`` deep).

    ``delay``: target-only steps after the first token before the first draft round. An answer
    that ends within them never pays for the draft (its catch-up on the whole prefix costs about a
    target step, and a one-word answer gains nothing from drafting); longer answers pay one plain
    step. Those steps are not rounds: τ and n-α count draft rounds only.

    ``stop_below`` > 0 makes the chain dynamic (EAGLE-2's confidence as the acceptance proxy):
    a round stops drafting once the draft's top probability for the next token falls below it
    (at least one draft per round). The decision reads the draft alone, so verification, and the
    output, are unchanged; only draft steps that would likely be rejected are saved.

    ``tree_topk`` > 0 drafts a token tree ``chain`` deep (see the module's docstring) and verifies
    its ``tree_nodes`` best nodes; greedy only."""
    target.check_image(image)
    if image.shape[0] != 1:
        raise ValueError("speculative decoding runs at batch 1")
    s = _Sampler(mode, temperature, generator)
    if tree_topk < 0 or (tree_topk and tree_nodes < 1):
        raise ValueError("a token tree needs tree_topk >= 1 and tree_nodes >= 1")
    if tree_topk and (not s.greedy or stop_below > 0):
        raise ValueError("a token tree is verified greedily, with its own dynamic shape (no stop_below)")
    eos = target.cfg.eos_id
    drafted_max = max(chain, tree_nodes, chain * tree_topk) if tree_topk else chain
    max_len = target.n_image_tokens + len(prompt) + max_new_tokens + drafted_max + 1
    lean, drafter = LeanLM(target.lm, 1, max_len), None
    embeds, logits, states = _prefill(target, lean, image, prompt)
    n = embeds.shape[1]                       # positions in the target's cache
    x = s.draw(logits[0, -1])
    emitted = [x]
    # pending draft inputs: target states at positions [p0, n) and the next input embeddings
    nxt = torch.cat([embeds[:, 1:], draft.embed(torch.tensor([[x]]))], dim=1)
    for _ in range(delay):  # plain target steps, their states queued for the draft's catch-up
        if x == eos or len(emitted) >= max_new_tokens:
            break
        logits, st = lean.forward(lean.embed(torch.tensor([[x]])), torch.tensor([[n]]), hidden=True)
        x = s.draw(logits[0, -1])
        emitted.append(x)
        states = torch.cat([states, torch.stack(st, dim=2)], dim=1)
        nxt = torch.cat([nxt, draft.embed(torch.tensor([[x]]))], dim=1)
        n += 1
    p0 = 0
    result = SpecResult([])
    while x != eos and len(emitted) < max_new_tokens:
        drafter = drafter or DraftDecoder(draft, max_len)
        k = min(chain, max_new_tokens - len(emitted))
        # 1. the draft catches up on the positions verified last round
        pos = torch.arange(p0, n)
        feat = drafter.fuse(states, pos)
        drafter.layers.crop(p0)
        h = drafter.step(feat, nxt, pos)[:, -1:]
        # 2.-3. draft the round's tokens (a chain or a tree), verify them, accept
        if tree_topk:
            outcomes, accepted, new, rows, k, vstates = _tree_round(lean, drafter, h, x, n, k, tree_topk, tree_nodes,
                                                                   eos)
        else:
            outcomes, accepted, new, rows, k, vstates = _chain_round(lean, drafter, s, h, x, n, k, stop_below, eos)
        result.rounds.append(outcomes)
        result.drafted.append(k)
        ended = bool(accepted) and accepted[-1] == eos
        emitted += accepted + ([] if ended else [new])
        # 4. keep x and the accepted drafts in the target's cache, at positions n .. n+m
        lean.keep(n, [n + r for r in rows])
        states = torch.stack(vstates, dim=2)[:, rows]
        nxt = drafter.embed(torch.tensor([accepted + [eos if ended else new]]))
        p0, n = n, n + len(rows)
        x = emitted[-1]
    answer = emitted[:emitted.index(eos)] if eos in emitted else emitted
    result.tokens = answer[:max_new_tokens]
    return result


def _chain_round(lean: LeanLM, drafter: DraftDecoder, s: _Sampler, h: torch.Tensor, x: int, n: int, k: int,
                 stop_below: float, eos: int):
    """One round with a chain of up to ``k`` drafts from ``h`` (the draft's output on the last
    verified position), verified at positions ``n ..`` greedily or by the accept/reject rule.
    Returns what :func:`_tree_round` returns (the rows to keep are ``0 .. m``)."""
    drafts: list[int] = []
    q: list[torch.Tensor] = []
    for i in range(k):
        logits = drafter.logits(h)[0, -1]
        if stop_below > 0 and i > 0 and float(torch.softmax(logits.float(), -1).max()) < stop_below:
            break
        d = s.draw(logits)
        drafts.append(d)
        if not s.greedy:
            q.append(s.probs(logits))
        if d == eos:  # nothing after an end of answer can be accepted: stop drafting
            break
        if i + 1 < k:
            h = drafter.step(h, drafter.embed(torch.tensor([[d]])), torch.tensor([n + i]))
    return _verify_chain(lean, s, x, drafts, q, n, eos)


def _verify_chain(lean: LeanLM, s: _Sampler, x: int, drafts: list[int], q: list[torch.Tensor], n: int, eos: int,
                  hidden: bool = True):
    """Verify ``[x, d_1 .. d_k]`` at positions ``n .. n+k`` in one target forward: greedily, or by the
    accept/reject rule with the drafts' distributions ``q``. Returns what :func:`_chain_round` returns
    (``hidden`` False: no target states, for a decoder without a draft to feed them to)."""
    tl, vstates = lean.forward(lean.embed(torch.tensor([[x] + drafts])), torch.arange(n, n + len(drafts) + 1)[None],
                               hidden=hidden)
    tl = tl[0]
    best = tl.argmax(-1).tolist() if s.greedy else []
    outcomes: list[bool] = []
    new: int | None = None
    for i, d in enumerate(drafts):
        if s.greedy:
            ok = d == best[i]
        else:
            p = s.probs(tl[i])
            ok = s.uniform() * float(q[i][d]) < float(p[d])
            if not ok:
                resid = (p - q[i]).clamp_min(0)
                new = s.multinomial(resid / resid.sum()) if float(resid.sum()) > 0 else s.multinomial(p)
        outcomes.append(ok)
        if not ok or d == eos:
            break
    m = sum(outcomes)
    accepted = drafts[:m]
    if not (accepted and accepted[-1] == eos) and new is None:
        new = best[m] if s.greedy else s.draw(tl[m])
    return outcomes, accepted, new, list(range(m + 1)), len(drafts), vstates


def _ancestry(parents: list[int]) -> list[list[bool]]:
    """Row ``i`` may attend ``j`` when ``j`` is ``i`` or one of its ancestors (``parents[i]`` < ``i``,
    -1 for a child of the root). Python lists: at these sizes one tensor built at the end is
    cheaper than setting elements of one."""
    rows: list[list[bool]] = []
    for i, par in enumerate(parents):
        row = list(rows[par]) if par >= 0 else [False] * len(parents)
        row[i] = True
        rows.append(row)
    return rows


def _tree_round(lean: LeanLM, drafter: DraftDecoder, h_root: torch.Tensor, x: int, n: int, depth: int, topk: int,
                max_nodes: int, eos: int):
    """One greedy round with a token tree: draft it from ``h_root`` (the draft's output on the
    last verified position), verify ``[x, nodes]`` at positions ``n ..``, accept the longest path
    of target argmaxes. Returns (outcomes per depth, accepted tokens, the target's next token
    (None after an accepted eos), the verified rows to keep (0 = ``x``), nodes verified, the
    target's states of every verified row)."""
    tokens: list[int] = []
    parents: list[int] = []       # the node's parent (-1: the root)
    depths: list[int] = []
    scores: list[float] = []      # cumulative draft log-probability
    reads: dict[int, list[int]] = {-1: []}  # expanded node -> the tree rows of the draft's cache it reads
    hid: dict[int, torch.Tensor] = {-1: h_root}
    base = drafter.layers.length  # the verified prefix in the draft's cache; tree rows follow it

    def add_children(nodes: list[int], logits: torch.Tensor, d: int) -> list[int]:
        top = torch.log_softmax(logits.float(), -1).topk(min(topk, logits.shape[-1]))
        first = len(tokens)
        for parent, lps, toks in zip(nodes, top.values.tolist(), top.indices.tolist()):
            for lp, tok in zip(lps, toks):
                tokens.append(tok), parents.append(parent), depths.append(d)
                scores.append((scores[parent] if parent >= 0 else 0.0) + lp)
        return list(range(first, len(tokens)))

    fresh = add_children([-1], drafter.logits(h_root)[0, -1:], 1)
    for d in range(1, depth):
        frontier = sorted((i for i in fresh if tokens[i] != eos), key=lambda i: -scores[i])[:topk]
        if not frontier:
            break
        start = drafter.layers.length - base
        rows = []
        for r, i in enumerate(frontier):
            reads[i] = reads[parents[i]] + [start + r]
            row = [False] * (start + len(frontier))
            for j in reads[i]:
                row[j] = True
            rows.append(row)
        attend = torch.cat([torch.ones(len(frontier), base, dtype=torch.bool), torch.tensor(rows)], dim=1)
        hs = drafter.step(torch.cat([hid[parents[i]] for i in frontier], dim=1),
                          drafter.embed(torch.tensor([[tokens[i] for i in frontier]])),
                          torch.full((len(frontier),), n + d - 1), attend)
        for r, i in enumerate(frontier):
            hid[i] = hs[:, r:r + 1]
        fresh = add_children(frontier, drafter.logits(hs)[0], d + 1)
        if len(tokens) > max_nodes:  # stop once no frontier node can enter the best max_nodes (ties go shallower)
            cut = sorted(scores, reverse=True)[max_nodes - 1]
            if max(scores[i] for i in fresh) <= cut:
                break
    # the best nodes; a child never outscores its parent (log-probabilities <= 0), ties go to the shallower
    keep = sorted(sorted(range(len(tokens)), key=lambda i: (-scores[i], depths[i]))[:max_nodes],
                  key=lambda i: (depths[i], i))
    row_of = {i: r + 1 for r, i in enumerate(keep)}  # verification rows: 0 is x, then by depth
    tree_parents = [-1, *(row_of[parents[i]] if parents[i] >= 0 else 0 for i in keep)]
    attend = torch.cat([torch.ones(len(keep) + 1, n, dtype=torch.bool), torch.tensor(_ancestry(tree_parents))],
                       dim=1)
    ids = [x] + [tokens[i] for i in keep]
    positions = torch.tensor([[n] + [n + depths[i] for i in keep]])
    tl, vstates = lean.forward(lean.embed(torch.tensor([ids])), positions, hidden=True, attend=attend)
    best = tl[0].argmax(-1).tolist()
    children: dict[int, list[int]] = {}
    for r in range(1, len(ids)):
        children.setdefault(tree_parents[r], []).append(r)
    cur, path, outcomes = 0, [0], []
    while children.get(cur):  # (an eos node has no children: it was never expanded)
        hit = next((r for r in children[cur] if ids[r] == best[cur]), None)
        outcomes.append(hit is not None)
        if hit is None:
            break
        path.append(hit)
        cur = hit
    accepted = [ids[r] for r in path[1:]]
    new = None if accepted and accepted[-1] == eos else best[path[-1]]
    return outcomes, accepted, new, path, len(keep), vstates


# ---------------------------------------------------------------- metrics

def tau(results: list[SpecResult]) -> float:
    rounds = [sum(r) + 1 for res in results for r in res.rounds]
    return sum(rounds) / len(rounds) if rounds else float("nan")


def alphas(results: list[SpecResult], n_max: int = 10) -> list[float]:
    """n-α for n = 1..n_max: acceptance of the n-th draft given the first n-1 were accepted."""
    out = []
    for n in range(1, n_max + 1):
        tried = [r[n - 1] for res in results for r in res.rounds if len(r) >= n]
        out.append(sum(tried) / len(tried) if tried else float("nan"))
    return out


KIND_METRICS = ("n_prompts", "tokens", "tau", "speedup")  # per-kind figures logged as ``<metric>_<kind>``
TREE_METRICS = ("topk", "nodes", "identical_fraction", "tau", "speedup")  # logged as ``tree_<metric>``
TREE_KIND_METRICS = ("tau", "speedup")  # ``tree_<metric>_<kind>`` (and ``tree_tokens_per_s``, ``tree_alpha_<n>``)


@dataclass
class Benchmark:
    n_prompts: int
    identical_fraction: float
    tau: float
    alpha: list[float]
    tokens_per_s: dict[str, float]
    speedup: float
    tokens: int
    by_kind: dict[str, dict] = field(default_factory=dict)  # kind -> the same figures over its prompts
    tree: dict = field(default_factory=dict)  # with a token tree: its figures (overall and by kind) and shape

    def metrics(self) -> dict[str, float]:
        out = {"n_prompts": float(self.n_prompts), "identical_fraction": self.identical_fraction, "tau": self.tau,
               "tokens_per_s_target": self.tokens_per_s["target"],
               "tokens_per_s_speculative": self.tokens_per_s["speculative"], "speedup": self.speedup}
        out.update({f"alpha_{i + 1}": a for i, a in enumerate(self.alpha)})
        for kind, k in self.by_kind.items():
            out.update({f"{key}_{kind}": float(k[key]) for key in KIND_METRICS})
        if self.tree:
            out.update({f"tree_{key}": float(self.tree[key]) for key in TREE_METRICS})
            out["tree_tokens_per_s"] = self.tree["tokens_per_s"]["speculative"]
            out.update({f"tree_alpha_{i + 1}": a for i, a in enumerate(self.tree["alpha"])})
            for kind, k in self.tree["by_kind"].items():
                out.update({f"tree_{key}_{kind}": float(k[key]) for key in TREE_KIND_METRICS})
        return out

    def report(self) -> dict:
        """The benchmark report's ``speculative`` keys (without the ablation)."""
        return {"n_prompts": self.n_prompts, "identical_fraction": self.identical_fraction, "tau": self.tau,
                "alpha": self.alpha, "tokens_per_s": dict(self.tokens_per_s), "speedup": self.speedup,
                "by_kind": {kind: dict(k) for kind, k in self.by_kind.items()},
                **({"tree": self.tree} if self.tree else {})}


@torch.no_grad()
def benchmark(target: Understanding, draft: Draft, images: torch.Tensor, prompts: list[list[int]],
              max_new_tokens: int = 48, chain: int = 10, stop_below: float = 0.0, delay: int = 0,
              kinds: list[str] | None = None, tree_topk: int = 0, tree_nodes: int = 0) -> Benchmark:
    """Greedy decoding of every prompt by the target alone and with speculation, at batch 1:
    identical outputs, τ, n-α (n = 1..chain) and tokens/s of both (the same answer tokens).

    ``tree_topk`` > 0 also decodes every prompt with a token tree ``chain`` deep (its figures in
    ``Benchmark.tree``), in the same pass, so both speed-ups share the target's timings.

    ``kinds`` (one label per prompt, e.g. ``qa`` / ``caption``) adds the figures per kind: a mix
    of one-word answers and long captions has one overall speed-up, but speculation can only
    shorten the long ones."""
    if tree_topk and tree_nodes < 1:
        raise ValueError("a token tree needs tree_nodes >= 1")
    draft.eval()
    decoders = {"chain": lambda img, prompt, ref: generate(target, draft, img, prompt, max_new_tokens, chain,
                                                          stop_below=stop_below, delay=delay)}
    if tree_topk:
        decoders["tree"] = lambda img, prompt, ref: generate(target, draft, img, prompt, max_new_tokens, chain,
                                                             delay=delay, tree_topk=tree_topk, tree_nodes=tree_nodes)
    decoded = _decode_all(target, images, prompts, max_new_tokens, kinds, decoders)
    rows, tree_rows = decoded["chain"], decoded.get("tree", [])
    tree = {}
    if tree_topk:
        tree = {"topk": tree_topk, "nodes": tree_nodes, "depth": chain, **_figures(tree_rows),
                "alpha": alphas([r[5] for r in tree_rows], chain), "by_kind": _by_kind(tree_rows, kinds)}
    return _benchmark(rows, kinds, chain, tree)


# a decoded prompt: (kind, answer tokens, target s, speculative s, identical, SpecResult)
Row = tuple[str, int, float, float, bool, SpecResult]


def _decode_all(target: Understanding, images: torch.Tensor, prompts: list[list[int]], max_new_tokens: int,
                kinds: list[str] | None, decoders: dict[str, Callable[[torch.Tensor, list[int], list[int]], SpecResult]]
                ) -> dict[str, list[Row]]:
    """Every prompt decoded at batch 1 by the target alone (timed; its answer is the reference), then by
    each of ``decoders`` in turn (``(image, prompt, reference) -> SpecResult``, timed): one row per
    prompt and decoder, each paired with the same target timing."""
    if kinds is not None and len(kinds) != len(prompts):
        raise ValueError(f"{len(kinds)} kinds for {len(prompts)} prompts")
    target.eval()
    rows: dict[str, list[Row]] = {name: [] for name in decoders}
    for i, prompt in enumerate(prompts):
        img = images[i:i + 1]
        kind = kinds[i] if kinds else "all"
        t0 = time.perf_counter()
        ref = target.generate(img, [prompt], max_new_tokens)[0]
        target_s = time.perf_counter() - t0
        for name, decode in decoders.items():
            t0 = time.perf_counter()
            res = decode(img, prompt, ref)
            rows[name].append((kind, len(ref), target_s, time.perf_counter() - t0, res.tokens == ref, res))
    return rows


def _figures(sel: list[Row]) -> dict:
    tokens = sum(r[1] for r in sel)
    tps = {"target": tokens / max(sum(r[2] for r in sel), 1e-9),
           "speculative": tokens / max(sum(r[3] for r in sel), 1e-9)}
    return {"n_prompts": len(sel), "tokens": tokens,
            "identical_fraction": sum(r[4] for r in sel) / max(len(sel), 1), "tau": tau([r[5] for r in sel]),
            "tokens_per_s": tps, "speedup": tps["speculative"] / max(tps["target"], 1e-9)}


def _by_kind(sel: list[Row], kinds: list[str] | None) -> dict:
    if not kinds:
        return {}
    return {kind: _figures([r for r in sel if r[0] == kind]) for kind in sorted({r[0] for r in sel})}


def _benchmark(rows: list[Row], kinds: list[str] | None, chain: int, tree: dict | None = None) -> Benchmark:
    a = _figures(rows)
    return Benchmark(a["n_prompts"], a["identical_fraction"], a["tau"], alphas([r[5] for r in rows], chain),
                     a["tokens_per_s"], a["speedup"], a["tokens"], _by_kind(rows, kinds), tree or {})


@torch.no_grad()
def oracle_generate(target: Understanding, image: torch.Tensor, prompt: list[int], answer: list[int],
                    max_new_tokens: int = 48, chain: int = 10) -> SpecResult:
    """Greedy chain decoding of ``prompt`` with a perfect draft that costs nothing: every round
    proposes the next ``chain`` tokens of ``answer`` (the target's own greedy answer, without ``eos``)
    and the target verifies them as :func:`generate` does (same prefill, verification forward and
    cache), without the target states no draft reads. Every draft is accepted, so its speed-up bounds
    what any draft can reach with this target, chain and machine (:func:`oracle_benchmark`)."""
    target.check_image(image)
    eos = target.cfg.eos_id
    greedy = _Sampler("greedy", 1.0, None)
    lean = LeanLM(target.lm, 1, target.n_image_tokens + len(prompt) + max_new_tokens + chain + 1)
    embeds, logits, _ = _prefill(target, lean, image, prompt)
    n = embeds.shape[1]
    x = greedy.draw(logits[0, -1])
    emitted, script = [x], list(answer) + [eos]
    result = SpecResult([])
    while x != eos and len(emitted) < max_new_tokens:
        drafts = script[len(emitted):len(emitted) + min(chain, max_new_tokens - len(emitted))]
        outcomes, accepted, new, rows, k, _ = _verify_chain(lean, greedy, x, drafts, [], n, eos, hidden=False)
        result.rounds.append(outcomes)
        result.drafted.append(k)
        emitted += accepted + ([] if accepted and accepted[-1] == eos else [new])
        lean.keep(n, [n + r for r in rows])
        n, x = n + len(rows), emitted[-1]
    answer_out = emitted[:emitted.index(eos)] if eos in emitted else emitted
    result.tokens = answer_out[:max_new_tokens]
    return result


@torch.no_grad()
def oracle_benchmark(target: Understanding, images: torch.Tensor, prompts: list[list[int]],
                     max_new_tokens: int = 48, chain: int = 10, kinds: list[str] | None = None) -> Benchmark:
    """:func:`benchmark`'s figures for the perfect, free draft of :func:`oracle_generate`: every prompt
    decoded by the target alone (timed, its answer the oracle's script), then by the oracle (timed). The
    speed-up is the ceiling of speculative decoding for this target and chain on this machine: a real
    draft accepts fewer tokens per round and costs time to run."""
    oracle = {"oracle": lambda img, prompt, ref: oracle_generate(target, img, prompt, ref, max_new_tokens, chain)}
    return _benchmark(_decode_all(target, images, prompts, max_new_tokens, kinds, oracle)["oracle"], kinds, chain)


def ask(teacher, draft: Draft, image, question: str, max_new_tokens: int = 64, chain: int = 10,
        compare: bool = False, delay: int = 0, stop_below: float = 0.0, tree_topk: int = 0,
        tree_nodes: int = 0) -> tuple[str, dict[str, float]]:
    """``Teacher``-level speculative answer to ``question`` about one (64, 64, 3) uint8 image, with
    τ and tokens/s (``compare``: also the target alone, and whether both answers are identical)."""
    from components.inference import InputError, to_tensor

    target = teacher.understanding.float().eval()
    x = to_tensor(image, target.cfg.image_size)
    if x.shape[0] != 1:
        raise InputError("speculative decoding answers one image at a time")
    prompt = teacher.prompt_ids(question)
    t0 = time.perf_counter()
    res = generate(target, draft.eval(), x, prompt, max_new_tokens, chain, stop_below=stop_below, delay=delay,
                   tree_topk=tree_topk, tree_nodes=tree_nodes)
    dt = time.perf_counter() - t0
    stats = {"tau": tau([res]), "rounds": float(len(res.rounds)), "tokens": float(len(res.tokens)),
             "tokens_per_s": len(res.tokens) / max(dt, 1e-9)}
    if compare:
        t0 = time.perf_counter()
        with torch.no_grad():
            ref = target.generate(x, [prompt], max_new_tokens)[0]
        stats["tokens_per_s_target"] = len(ref) / max(time.perf_counter() - t0, 1e-9)
        stats["identical"] = float(ref == res.tokens)
    return teacher.tokenizer.decode(res.tokens), stats
