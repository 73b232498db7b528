"""Speculative samplers at k codes per position (token-shuffle generators: k = s²), lossless.

* A Markov chain over positions posing as a k = 2 generator: the two codes of position n are
  independent given the class and position n - 1 (both codes of it), so the exact distribution of
  every pair of consecutive positions (k codes each: a [V^k, V^k] table) is a matrix product.
  20000 samples of each sampler/setting must fit every pair (chi-square, p > 1e-4). This catches
  accepting codes one by one instead of whole positions, or resampling a rejected position's
  accepted codes.
* A tiny random TokenShuffleGPT (s = 2): each code's marginal at every position must match AR
  samples (two-sample chi-square), and greedy speculation must give exactly greedy AR; `auto` and
  `pac` (the Gumbel rule) draw the same codes whatever their window, tree or batch.
"""

import pytest
import torch
from scipy.stats import chi2_contingency

from argen.errors import ArgenError
from argen.models import TokenShuffleConfig, TokenShuffleGPT
from argen.samplers import ARSampler, SamplingParams, logits_to_probs
from argen.samplers.auto import AutoSampler
from argen.samplers.draft_pac import DraftPACSampler
from argen.samplers.gsd import GSDSampler
from argen.samplers.mcsjd import MCSJDSampler
from argen.samplers.pac import PACSampler, best_tokens
from argen.samplers.sjd import SJDSampler

from helpers import randomize
from test_pac import TreeMarkovCache
from test_speculative import MarkovContract, goodness_of_fit


class MarkovCodes(MarkovContract):
    """Position n emits k codes; code j ~ softmax(table[class, n, state(n-1), j]) where state is
    the tuple of the previous position's codes (position 0: first[class, j], so prefill gives
    [B, k, V])."""

    grid = None

    def __init__(self, vocab=3, k=2, length=5, classes=2, seed=0, scale=1.5):
        g = torch.Generator().manual_seed(seed)
        self.tokens_per_position, self.vocab_size, self.num_positions, self.classes = k, vocab, length, classes
        self.first = torch.randn(classes + 1, k, vocab, generator=g) * scale
        self.table = torch.randn(classes + 1, length, vocab ** k, k, vocab, generator=g) * scale
        self.embeddings = torch.nn.Embedding(vocab, 3)

    def state(self, tokens):
        powers = self.vocab_size ** torch.arange(self.tokens_per_position - 1, -1, -1)
        return (tokens * powers).sum(-1)

    def new_cache(self, rows, max_len=None):  # `pac` feeds trees: a position's logits depend on its own codes only
        return TreeMarkovCache(rows, max_len)

    def decode(self, tokens, input_pos, cache):
        assert tokens.shape[-1] == self.tokens_per_position
        pos = input_pos.expand(tokens.shape[:2])
        assert int(pos.max()) < cache.max_len
        n = pos.clamp(max=self.num_positions - 1)  # sequence position p holds position p - 1, predicts p
        return self.table[cache.cond[:, None], n, self.state(tokens)]  # [B, T, k, V]

    def exact_pairs(self, cls, params):
        """Joint of the states of positions (n-1, n), [V^k, V^k], for n = 1..N-1."""
        N = self.num_positions

        def state_probs(cond_logits, uncond_logits, n):  # [..., k, V] -> [..., V^k]
            logits = torch.cat([cond_logits, uncond_logits]) if params.uses_cfg else cond_logits
            p = logits_to_probs(logits, params, params.guidance_at(n, N)).double()
            joint = p[..., 0, :]
            for j in range(1, self.tokens_per_position):
                joint = (joint[..., :, None] * p[..., j, None, :]).flatten(-2)
            return joint

        pi = state_probs(self.first[cls][None], self.first[self.classes][None], 0)[0]
        pairs = []
        for n in range(1, N):
            step = state_probs(self.table[cls, n], self.table[self.classes, n], n)  # [V^k(prev), V^k]
            pairs.append(pi[:, None] * step)
            pi = pairs[-1].sum(0)
        return pairs


SETTINGS = {
    "plain": SamplingParams(),
    "cfg_topk": SamplingParams(cfg_scale=3.0, top_k=2),
    "interval_temp_linear": SamplingParams(cfg_scale=2.0, cfg_interval=1, temperature=1.3, cfg_schedule="linear"),
}


@pytest.mark.parametrize("sampler", [SJDSampler(window=3), SJDSampler(window=8), MCSJDSampler(window=4),
                                     GSDSampler(group_size=1, window=4), AutoSampler(window=3),
                                     PACSampler(window=4, branches=3, depth=2),
                                     PACSampler(window=4, branches=3, depth=2, levels=2)], ids=repr)
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_lossless_on_markov_codes(sampler, setting):
    torch.manual_seed(4321)
    model, params, n, cls = MarkovCodes(), SETTINGS[setting], 20000, 1
    out = sampler(model, torch.full((n,), cls), params=params)
    k, states = model.tokens_per_position, model.vocab_size ** model.tokens_per_position
    assert out.tokens.shape == (n, model.num_positions * k)
    assert out.forwards_per_sample.double().mean() < model.num_positions - 0.5  # positions were accepted
    state = model.state(out.tokens.view(n, model.num_positions, k))
    for pos, exact in enumerate(model.exact_pairs(cls, params), start=1):
        counts = torch.bincount(state[:, pos - 1] * states + state[:, pos], minlength=states * states)
        assert goodness_of_fit(counts, exact) > 1e-4, f"positions ({pos - 1}, {pos})"


def tiny_shuffle(seed=2):
    torch.manual_seed(0)
    cfg = TokenShuffleConfig(shuffle=2, dim=32, n_layer=1, n_head=2, multiple_of=32, vocab_size=8, num_classes=10,
                             block_size=16, shuffle_mlp_blocks=1)
    return randomize(TokenShuffleGPT(cfg), seed)


@pytest.mark.parametrize("name", ["sjd", "mcsjd", "auto", "pac"])
def test_code_marginals_match_ar_on_tiny_shuffle_gpt(name):
    model = tiny_shuffle()
    params = SamplingParams(cfg_scale=2.0, top_k=6)
    n, conds = 3000, torch.full((3000,), 4)
    torch.manual_seed(11)
    sampler = {"sjd": SJDSampler(window=4), "mcsjd": MCSJDSampler(window=4), "auto": AutoSampler(window=4),
               "pac": PACSampler(window=4, branches=3, depth=2)}[name]
    spec = sampler(model, conds, params=params)
    ar = ARSampler()(model, conds, params=params)
    assert spec.forwards_per_sample.double().mean() < ar.num_forward_passes
    for code in range(16):
        table = torch.stack([torch.bincount(t[:, code], minlength=8) for t in (spec.tokens, ar.tokens)])
        table = table[:, table.sum(0) > 0]
        assert chi2_contingency(table.numpy())[1] > 1e-4, f"code {code}"


@pytest.mark.parametrize("name", ["sjd", "gsd", "mcsjd", "auto", "pac"])
def test_greedy_speculation_reproduces_greedy_ar_with_codes(name):
    model = tiny_shuffle()
    params = SamplingParams(cfg_scale=3.0, top_k=1)
    cond = torch.tensor([1, 4, 9])
    greedy = ARSampler(sample=False)(model, cond, params=params).tokens
    sampler = {"sjd": SJDSampler, "gsd": GSDSampler, "mcsjd": MCSJDSampler, "auto": AutoSampler,
               "pac": lambda window: PACSampler(window, depth=2)}[name](window=3)
    out = sampler(model, cond, params=params, seeds=[0, 1, 2])
    assert torch.equal(out.tokens, greedy)


def test_gumbel_samplers_draw_the_same_codes_whatever_the_window_tree_or_batch():
    """`auto` and `pac` on k codes: every code is the argmax of its scores plus its own noise, so the
    codes are AR's under that noise (auto:L=1) for any window, tree, cost model or batch."""
    model = tiny_shuffle()
    params = SamplingParams(cfg_scale=2.0, top_k=6, cfg_schedule="linear")
    cond, seeds = torch.tensor([1, 4, 9, 2]), [5, 6, 7, 8]
    ar = AutoSampler(window=1)(model, cond, params=params, seeds=seeds)
    assert ar.tokens.shape == (4, model.num_codes) and ar.num_forward_passes == model.num_positions
    others = [AutoSampler(window=2), AutoSampler(window=16), AutoSampler(),
              PACSampler(window=3, branches=5, depth=2), PACSampler(window=3, branches=3, depth=2, levels=2)]
    for sampler in others:
        out = sampler(model, cond, params=params, seeds=seeds)
        assert torch.equal(out.tokens, ar.tokens), repr(sampler)
    spread = PACSampler(window=3, branches=5, depth=2)
    alone = torch.cat([spread(model, cond[i:i + 1], params=params, seeds=seeds[i:i + 1]).tokens for i in range(4)])
    assert torch.equal(alone, ar.tokens)
    with pytest.raises(ArgenError, match="does not support generators with several codes"):
        DraftPACSampler()(model, cond, seeds=seeds)  # a drafter proposes one code per position
    # more branches than code tuples (3 ** 2 = 9): the alternatives repeat, which changes nothing
    chain, classes = MarkovCodes(), torch.full((6,), 1)
    expected = AutoSampler(window=1)(chain, classes, seeds=range(6)).tokens
    for levels in (1, 2):
        wide = PACSampler(window=4, branches=20, depth=2, levels=levels)
        assert torch.equal(wide(chain, classes, seeds=range(6)).tokens, expected)


def test_best_tokens_are_the_top_code_tuples():
    """`pac`'s alternatives for a k-code position: the best tuples by summed scores, best first."""
    torch.manual_seed(0)
    scores = torch.randn(2, 3, 4, 5)  # [B, F, k, V]
    every = torch.cartesian_prod(*[torch.arange(5)] * 4)  # all 625 tuples [625, k]
    totals = scores[:, :, torch.arange(4), every].sum(-1)  # [B, F, 625]
    for count in (1, 7, 30):
        assert torch.equal(best_tokens(scores, count), every[totals.topk(count, -1).indices])
    assert torch.equal(best_tokens(scores[:, :, 0], 3), scores[:, :, 0].topk(3, -1).indices)  # one code


def test_a_sample_does_not_depend_on_its_batch():
    model = tiny_shuffle()
    params = SamplingParams(cfg_scale=2.0)
    cond = torch.tensor([0, 3, 5, 7])
    together = MCSJDSampler(window=3)(model, cond, params=params, seeds=[10, 11, 12, 13]).tokens
    alone = torch.cat([MCSJDSampler(window=3)(model, cond[i:i + 1], params=params, seeds=[10 + i]).tokens
                       for i in range(4)])
    assert torch.equal(together, alone)


def test_spatial_draft_init_is_refused_for_codes():
    with pytest.raises(ArgenError, match="not implemented for generators with 4 codes per position"):
        SJDSampler(window=3, init="left")(tiny_shuffle(), torch.tensor([1]), seeds=[0])
