"""Chain speculative decoding: lossless greedy verification whatever the draft, a perfect draft
accepted in full, the sampling mode keeps the target's distribution, τ and n-α conventions."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from components import speculative
from components.models.draft import Draft, DraftConfig
from components.models.understanding import Understanding, UnderstandingConfig
from components.speculative import SpecResult


def _target(vocab: int = 12, layers: int = 3, seed: int = 0) -> Understanding:
    torch.manual_seed(seed)
    return Understanding(UnderstandingConfig(vocab_size=vocab, sep_id=1, eos_id=2, hidden=32, layers=layers,
                                             heads=2, kv_heads=1, intermediate=64, grid=4)).eval()


def _prompts(n: int, vocab: int, seed: int = 1) -> tuple[torch.Tensor, list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 64, 64, generator=g) * 2 - 1
    prompts = [torch.randint(3, vocab, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist() + [1]
               for _ in range(n)]
    return images, prompts


@pytest.mark.parametrize("kw", [dict(fusion="meta", zero_init=False), dict(fusion="meta", zero_init=True),
                                dict(fusion="fc", draft_layers=1, init_from_target=False, zero_init=False)])
def test_greedy_is_lossless_with_an_untrained_draft(kw):
    torch.set_num_threads(1)
    target = _target()
    draft = Draft.from_target(target, DraftConfig.for_target(target, **kw)).eval()
    images, prompts = _prompts(24, 12)
    for chain, delay in ((1, 0), (10, 0), (10, 1), (3, 5)):
        bench = speculative.benchmark(target, draft, images, prompts, max_new_tokens=20, chain=chain, delay=delay)
        assert bench.n_prompts == 24 and bench.identical_fraction == 1.0
        assert bench.tau >= 1.0 and bench.tokens > 0 and len(bench.alpha) == chain


def test_figures_per_kind_partition_the_prompts():
    """``kinds`` splits the same decodings: counts and tokens add up to the overall ones, each kind's
    τ is over its own rounds, and a kind list of the wrong length is refused."""
    torch.set_num_threads(1)
    target = _target(seed=0)
    draft = Draft.from_target(target, DraftConfig.for_target(target, fusion="meta", zero_init=False)).eval()
    images, prompts = _prompts(12, 12)
    kinds = ["qa" if i % 3 else "caption" for i in range(12)]
    bench = speculative.benchmark(target, draft, images, prompts, max_new_tokens=16, chain=4, kinds=kinds)
    assert set(bench.by_kind) == {"qa", "caption"}
    assert [bench.by_kind[k]["n_prompts"] for k in ("qa", "caption")] == [8, 4]
    assert sum(k["tokens"] for k in bench.by_kind.values()) == bench.tokens
    assert all(k["identical_fraction"] == 1.0 for k in bench.by_kind.values())
    solo = speculative.benchmark(target, draft, images[0::3], prompts[0::3], max_new_tokens=16, chain=4)
    assert bench.by_kind["caption"]["tau"] == solo.tau and bench.by_kind["caption"]["tokens"] == solo.tokens
    m = bench.metrics()
    assert m["n_prompts_qa"] == 8 and m["tokens_caption"] == solo.tokens and "speedup_caption" in m
    assert speculative.benchmark(target, draft, images, prompts, max_new_tokens=16, chain=4).by_kind == {}
    with pytest.raises(ValueError, match="11 kinds for 12 prompts"):
        speculative.benchmark(target, draft, images, prompts, max_new_tokens=16, chain=4, kinds=kinds[:11])


def test_answers_that_end_within_the_delay_run_no_draft_round():
    """With ``delay`` target-only steps, an answer of at most delay + 1 tokens (eos included) is decoded
    without a draft round; a longer one drafts after them, and both are the target's own answer."""
    torch.set_num_threads(1)
    target = _target(seed=0)  # its answers: some of one token, some running to the limit
    draft = Draft.from_target(target, DraftConfig.for_target(target, fusion="meta", zero_init=False)).eval()
    images, prompts = _prompts(12, 12)
    lengths = set()
    for img, prompt in zip(images, prompts):
        plain = target.generate(img[None], [prompt], 12)[0]
        emitted = len(plain) + (len(plain) < 12)  # tokens decoded, the eos included when the answer ends
        lengths.add(emitted)
        for delay in (0, 2, 11):
            res = speculative.generate(target, draft, img[None], prompt, max_new_tokens=12, chain=4, delay=delay)
            assert res.tokens == plain
            assert (len(res.rounds) == 0) == (emitted <= 1 + delay)
    assert min(lengths) <= 3 < max(lengths)  # both cases were exercised at delay 2


def _bigram_pair() -> tuple[Understanding, Draft]:
    """A target whose layers add nothing (next token = f(current token)) and a draft that reads the
    token embedding only: the draft predicts the target exactly."""
    target = _target(vocab=16, layers=4, seed=3)
    for layer in target.lm.model.layers:
        torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
        torch.nn.init.zeros_(layer.mlp.down_proj.weight)
    draft = Draft.from_target(target, DraftConfig.for_target(target, fusion="fc", draft_layers=1,
                                                             init_from_target=True, zero_init=True))
    with torch.no_grad():
        d = target.cfg.hidden
        draft.fc2.weight.zero_()
        draft.fc2.weight[:, d:] = torch.eye(d)
    # eos never wins, so every answer runs to max_new_tokens
    with torch.no_grad():
        target.lm.lm_head.weight[target.cfg.eos_id] -= 100.0
        draft.lm_head.weight.copy_(target.lm.lm_head.weight)
    return target, draft.eval()


def test_a_perfect_draft_is_accepted_in_full():
    torch.set_num_threads(1)
    target, draft = _bigram_pair()
    images, prompts = _prompts(6, 16)
    bench = speculative.benchmark(target, draft, images, prompts, max_new_tokens=25, chain=10)
    assert bench.identical_fraction == 1.0
    assert bench.alpha == [1.0] * 10
    # 25 tokens: the prefill's token, two rounds of 10 drafts + 1, a last one of 2 drafts + 1
    assert bench.tau == pytest.approx((11 + 11 + 3) / 3)


def test_tau_and_alpha_conventions():
    res = [SpecResult([], rounds=[[True, True, False], [False], [True, True, True]])]
    assert speculative.tau(res) == pytest.approx((3 + 1 + 4) / 3)
    a = speculative.alphas(res, 4)
    assert a[:3] == [pytest.approx(2 / 3), 1.0, pytest.approx(1 / 2)]
    assert a[3] != a[3]  # nan: no round proposed a 4th draft token


def _exact_distribution(target: Understanding, image: torch.Tensor, prompt: list[int], n: int) -> dict:
    """P(first n tokens) of the target's own sampling (a sequence ends at eos)."""
    eos, vocab = target.cfg.eos_id, target.cfg.vocab_size
    img = target.encoder(image)
    emb = target.lm.get_input_embeddings()
    out: dict[tuple[int, ...], float] = {}
    with torch.no_grad():
        def walk(prefix: list[int], prob: float) -> None:
            if len(prefix) == n or (prefix and prefix[-1] == eos):
                out[tuple(prefix)] = out.get(tuple(prefix), 0.0) + prob
                return
            x = torch.cat([img, emb(torch.tensor([prompt + prefix]))], dim=1)
            p = torch.softmax(target.lm(inputs_embeds=x).logits[0, -1].double(), -1)
            for t in range(vocab):
                walk(prefix + [t], prob * float(p[t]))
        walk([], 1.0)
    return out


@pytest.mark.parametrize("chain,stop_below,seed,check_rejections", [(2, 0.0, 0, True), (3, 0.5, 1, False)],
                         ids=["fixed-chain", "dynamic-chain"])
def test_sampling_keeps_the_target_distribution(chain, stop_below, seed, check_rejections):
    torch.set_num_threads(1)
    target = _target(vocab=5, layers=2, seed=5)
    with torch.no_grad():
        target.lm.lm_head.weight.mul_(6.0)  # a peaked target
    draft = Draft.from_target(target, DraftConfig.for_target(target, fusion="meta", zero_init=False)).eval()
    image, prompt = torch.zeros(1, 3, 64, 64), [3, 4, 1]
    exact = _exact_distribution(target, image, prompt, 3)
    g = torch.Generator().manual_seed(seed)
    n = 1200
    counts: dict[tuple[int, ...], int] = {}
    rejected = 0
    for _ in range(n):
        res = speculative.generate(target, draft, image, prompt, max_new_tokens=3, chain=chain, mode="sample",
                                   generator=g, stop_below=stop_below)
        seq = tuple(res.tokens[:3]) if len(res.tokens) == 3 else tuple(res.tokens) + (2,)
        counts[seq] = counts.get(seq, 0) + 1
        rejected += sum(not ok for r in res.rounds for ok in r)
    if check_rejections:
        assert rejected > n // 10  # the draft is wrong often: the rejection path is exercised
    # chi-square over cells with an expected count >= 5, the rest pooled
    big = [k for k, p in exact.items() if p * n >= 5]
    rest = 1.0 - sum(exact[k] for k in big)
    obs = [counts.get(k, 0) for k in big] + [n - sum(counts.get(k, 0) for k in big)]
    exp = [exact[k] * n for k in big] + [rest * n]
    chi2 = sum((o - e) ** 2 / e for o, e in zip(obs, exp) if e > 0)
    dof = len(big)
    assert chi2 < dof + 5 * (2 * dof) ** 0.5, (chi2, dof)  # ~ p > 1e-4


def test_bad_mode_and_batch_are_refused():
    target = _target()
    draft = Draft.from_target(target, DraftConfig.for_target(target))
    with pytest.raises(ValueError, match="greedy"):
        speculative.generate(target, draft, torch.zeros(1, 3, 64, 64), [3, 1], mode="beam")
    with pytest.raises(ValueError, match="batch 1"):
        speculative.generate(target, draft, torch.zeros(2, 3, 64, 64), [3, 1])


def test_the_bigram_pair_is_what_it_claims():
    target, draft = _bigram_pair()
    ids = list(itertools.islice(itertools.cycle(range(3, 16)), 8))
    with torch.no_grad():
        t = target.lm(input_ids=torch.tensor([ids])).logits[0].argmax(-1)
        d = draft.logits(draft.step(torch.zeros(1, 8, 32), draft.embed(torch.tensor([ids])), torch.arange(8),
                                    None)).argmax(-1)[0]
    assert torch.equal(t, d)


@pytest.mark.parametrize("stop_below", [0.2, 0.6])
def test_a_dynamic_chain_stays_lossless_and_drafts_less(stop_below):
    """Stopping a round once the draft's confidence falls below ``stop_below`` shortens chains but
    leaves the greedy output the target's own."""
    torch.set_num_threads(1)
    target = _target(seed=7)
    draft = Draft.from_target(target, DraftConfig.for_target(target, fusion="meta", zero_init=False)).eval()
    images, prompts = _prompts(12, 12, seed=4)
    fixed = [speculative.generate(target, draft, images[i:i + 1], p, 20, chain=10) for i, p in enumerate(prompts)]
    dyn = [speculative.generate(target, draft, images[i:i + 1], p, 20, chain=10, stop_below=stop_below)
           for i, p in enumerate(prompts)]
    with torch.no_grad():
        ref = [target.generate(images[i:i + 1], [p], 20)[0] for i, p in enumerate(prompts)]
    assert [r.tokens for r in dyn] == ref == [r.tokens for r in fixed]
    assert all(k == 10 for res in fixed for k in res.drafted[:-1])   # the last round may be cut by the length
    assert all(k >= 1 for res in dyn for k in res.drafted)
    per_round = lambda rs: sum(sum(r.drafted) for r in rs) / sum(len(r.drafted) for r in rs)  # noqa: E731
    assert per_round(dyn) < per_round(fixed)
    # a perfect draft, confident everywhere (a peaked head for both), still runs full chains
    t2, d2 = _bigram_pair()
    with torch.no_grad():
        t2.lm.lm_head.weight.mul_(50.0)
        d2.lm_head.weight.copy_(t2.lm.lm_head.weight)
    im, pr = _prompts(2, 16)
    b = speculative.benchmark(t2, d2, im, pr, max_new_tokens=25, chain=10, stop_below=stop_below)
    assert b.identical_fraction == 1.0 and b.alpha == [1.0] * 10


@pytest.mark.parametrize("seed", [0, 7])
def test_a_token_tree_is_lossless_and_a_one_wide_tree_is_the_chain(seed):
    """Greedy verification of a token tree gives the target's own answer whatever the draft; with
    one child per node and room for the whole depth the tree is the chain, round for round."""
    torch.set_num_threads(1)
    target = _target(seed=seed)
    draft = Draft.from_target(target, DraftConfig.for_target(target, fusion="meta", zero_init=False)).eval()
    images, prompts = _prompts(10, 12, seed=seed + 2)
    with torch.no_grad():
        ref = [target.generate(images[i:i + 1], [p], 20)[0] for i, p in enumerate(prompts)]
    for i, p in enumerate(prompts):
        chain = speculative.generate(target, draft, images[i:i + 1], p, 20, chain=6)
        line = speculative.generate(target, draft, images[i:i + 1], p, 20, chain=6, tree_topk=1, tree_nodes=6)
        assert line.tokens == chain.tokens == ref[i]
        assert line.rounds == chain.rounds and line.drafted == chain.drafted
        for topk, nodes, delay in ((2, 8, 0), (3, 30, 1), (4, 3, 0)):
            tree = speculative.generate(target, draft, images[i:i + 1], p, 20, chain=6, delay=delay,
                                        tree_topk=topk, tree_nodes=nodes)
            assert tree.tokens == ref[i]
            assert all(1 <= k <= nodes for k in tree.drafted) and all(len(r) <= 6 for r in tree.rounds)


def test_every_tree_row_reads_its_prefix_and_ancestors_only(monkeypatch):
    """The tree masks of draft and target: a row at rotary position p reads exactly p + 1 slots (the
    verified prefix, its ancestors, itself: one per position before it; a sibling's or a cousin's
    would be one more); the draft stops expanding once no node can enter the verified set."""
    from components.models.kv_decoder import LayerStack

    torch.set_num_threads(1)
    target = _target(seed=0)
    draft = Draft.from_target(target, DraftConfig.for_target(target, fusion="meta", zero_init=False)).eval()
    images, prompts = _prompts(6, 12)
    seen = {"rows": 0, "calls": 0}
    forward = LayerStack.forward

    def checked(self, h, positions, key_valid=None, hidden=False, attend=None):
        if attend is not None:
            seen["calls"] += 1
            assert attend.sum(-1).tolist() == (positions[0] + 1).tolist()
            seen["rows"] += attend.shape[0]
        return forward(self, h, positions, key_valid, hidden, attend)

    monkeypatch.setattr(LayerStack, "forward", checked)
    with torch.no_grad():
        ref = [target.generate(images[i:i + 1], [p], 16)[0] for i, p in enumerate(prompts)]
    for i, p in enumerate(prompts):
        assert speculative.generate(target, draft, images[i:i + 1], p, 16, chain=5, tree_topk=3,
                                    tree_nodes=12).tokens == ref[i]
    assert seen["rows"] > 0
    # with room for 2 nodes only, depth 8: a tree round runs fewer draft expansions than 7
    seen["calls"] = 0
    res = speculative.generate(target, draft, images[:1], prompts[0], 16, chain=8, tree_topk=3, tree_nodes=2)
    assert res.tokens == ref[0] and 0 < seen["calls"] < 8 * len(res.rounds)


def test_a_token_tree_accepts_a_perfect_draft_in_full_and_is_benchmarked_alongside_the_chain():
    torch.set_num_threads(1)
    target, draft = _bigram_pair()
    with torch.no_grad():  # a confident draft: the frontier follows the target's path at every depth
        target.lm.lm_head.weight.mul_(50.0)
        draft.lm_head.weight.copy_(target.lm.lm_head.weight)
    images, prompts = _prompts(4, 16)
    kinds = ["qa", "caption", "qa", "caption"]
    bench = speculative.benchmark(target, draft, images, prompts, max_new_tokens=25, chain=10, kinds=kinds,
                                  tree_topk=2, tree_nodes=40)  # 40 nodes: the whole tree (2 + 9 x 4) is verified
    t = bench.tree
    assert (t["topk"], t["nodes"], t["depth"]) == (2, 40, 10) and t["identical_fraction"] == 1.0
    assert t["alpha"] == [1.0] * 10 and t["tau"] == pytest.approx((11 + 11 + 3) / 3) == bench.tau
    assert set(t["by_kind"]) == {"qa", "caption"} and t["by_kind"]["qa"]["n_prompts"] == 2
    m = bench.metrics()
    assert m["tree_tau"] == t["tau"] and m["tree_topk"] == 2.0 and "tree_speedup_caption" in m
    assert bench.report()["tree"] is t
    assert speculative.benchmark(target, draft, images, prompts, max_new_tokens=5, chain=3).tree == {}
    with pytest.raises(ValueError, match="greedily"):
        speculative.generate(target, draft, images[:1], prompts[0], 5, mode="sample", tree_topk=2, tree_nodes=4)
    with pytest.raises(ValueError, match="tree_nodes"):
        speculative.generate(target, draft, images[:1], prompts[0], 5, tree_topk=2)


def test_drafting_stops_at_an_end_of_answer():
    """A perfect draft of a target that does end its answers: the round that drafts eos stops there
    (nothing after an end of answer can be accepted), and the output is still the target's."""
    torch.set_num_threads(1)
    target, draft = _bigram_pair()
    images, prompts = _prompts(24, 16)
    t = target.generate(images[:1], prompts[:1], 40)[0][1]  # a token the answers reach
    with torch.no_grad():  # eos now wins wherever t did, for target and draft alike
        head = target.lm.lm_head.weight
        head[target.cfg.eos_id] = head[t] * 1.01
        draft.lm_head.weight.copy_(head)
    ended = 0
    for img, prompt in zip(images, prompts):
        res = speculative.generate(target, draft, img[None], prompt, max_new_tokens=40, chain=10)
        tree = speculative.generate(target, draft, img[None], prompt, max_new_tokens=40, chain=10, tree_topk=2,
                                    tree_nodes=12)
        plain = target.generate(img[None], [prompt], 40)[0]
        assert res.tokens == plain == tree.tokens
        if len(plain) < 39 and len(res.rounds) > 0:  # the answer ended with eos inside a round
            ended += 1
            last = res.rounds[-1]
            assert all(last) and res.drafted[-1] == len(last) <= 10
            assert all(tree.rounds[-1]) and len(tree.rounds[-1]) == len(last)  # the tree's path ends at eos too
    assert ended > 0


def test_the_oracle_decodes_as_a_perfect_draft_does_and_accepts_every_token():
    """``oracle_generate`` proposes the target's own answer: every draft accepted, ``chain`` + 1 tokens
    a round, the target's output; it decodes what a perfect real draft decodes, round for round; and
    its τ bounds an untrained draft's on the same prompts."""
    torch.set_num_threads(1)
    target, draft = _bigram_pair()  # a draft that is the target's next-token function
    images, prompts = _prompts(6, 16)
    for i, prompt in enumerate(prompts):
        ref = target.generate(images[i:i + 1], [prompt], 25)[0]
        res = speculative.oracle_generate(target, images[i:i + 1], prompt, ref, max_new_tokens=25, chain=10)
        real = speculative.generate(target, draft, images[i:i + 1], prompt, max_new_tokens=25, chain=10)
        assert res.tokens == ref == real.tokens
        assert all(all(r) for r in res.rounds) and res.rounds == real.rounds and res.drafted == real.drafted
    bench = speculative.oracle_benchmark(target, images, prompts, max_new_tokens=25, chain=10,
                                         kinds=["qa", "caption"] * 3)
    assert bench.identical_fraction == 1.0 and bench.n_prompts == 6 and bench.alpha == [1.0] * 10
    assert bench.tau == pytest.approx((11 + 11 + 3) / 3)  # 25 tokens: two full rounds and one of 2 drafts
    assert set(bench.by_kind) == {"qa", "caption"} and bench.speedup > 0
    # an untrained draft accepts less on other prompts of an ordinary target; the oracle accepts all
    target = _target(seed=0)
    weak = Draft.from_target(target, DraftConfig.for_target(target, fusion="meta", zero_init=False)).eval()
    images, prompts = _prompts(12, 12)
    oracle = speculative.oracle_benchmark(target, images, prompts, max_new_tokens=16, chain=4)
    real = speculative.benchmark(target, weak, images, prompts, max_new_tokens=16, chain=4)
    assert oracle.identical_fraction == 1.0 and oracle.tokens == real.tokens
    assert oracle.tau >= real.tau and all(a == 1.0 or math.isnan(a) for a in oracle.alpha)
    with pytest.raises(ValueError, match="2 kinds for 12 prompts"):
        speculative.oracle_benchmark(target, images, prompts, max_new_tokens=4, kinds=["qa", "qa"])
