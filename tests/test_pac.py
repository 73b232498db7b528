"""The `pac` sampler (token-tree proactive drafting): it must emit exactly `auto`'s tokens (the same
Gumbel-max rule, any tree), keep exactly the AR cache, and be lossless by chi-square."""

import pytest
import torch

from argen.errors import ArgenError
from argen.samplers import ARSampler, SamplingParams, get_sampler
from argen.samplers.auto import AutoSampler
from argen.samplers.pac import PACSampler, build_tree

from helpers import left_padded_captions, tiny_gpt, tiny_t2i
from test_speculative import MARKOV_PARAMS, MarkovCache, MarkovModel, assert_matches_exact_and_ar, assert_pairs_exact

PARAMS = [SamplingParams(), SamplingParams(cfg_scale=3.0, top_k=20),
          SamplingParams(cfg_scale=2.0, cfg_interval=4, top_p=0.8, temperature=0.9),
          SamplingParams(cfg_scale=3.0, cfg_schedule="cosine")]
TREES = [PACSampler(), PACSampler(window=4, branches=2, depth=1), PACSampler(window=8, branches=5, depth=4),
         PACSampler(window=2, branches=1, depth=1), PACSampler(window=8, branches=3, depth=3, levels=2),
         PACSampler(window=6, branches=2, depth=4, levels=4)]


@pytest.mark.parametrize("params", PARAMS, ids=["plain", "cfg_topk", "interval_topp", "schedule"])
def test_emits_exactly_the_gumbel_ar_tokens(params):
    """Tree attention, path selection and key copying all feed the verification: one wrong key or
    mask and some argmax moves. Every tree must give `auto`'s tokens, per seed, batch or alone."""
    model = tiny_gpt()
    cond, seeds = torch.tensor([3, 3, 6, 1, 9]), [21, 22, 23, 24, 25]
    base = AutoSampler(window=1)(model, cond, params=params, seeds=seeds)
    for sampler in TREES:
        out = sampler(model, cond, params=params, seeds=seeds)
        assert torch.equal(out.tokens, base.tokens), repr(sampler)
        assert out.num_forward_passes == int(out.forwards_per_sample.max())
    alone = TREES[2](model, cond[2:3], params=params, seeds=seeds[2:3])
    assert torch.equal(alone.tokens[0], base.tokens[2])


def test_t2i_matches_auto():
    model = tiny_t2i()
    feats, mask = left_padded_captions(4, 6, 12, lengths=[6, 2, 4, 1])
    params = SamplingParams(cfg_scale=2.0, top_k=30)
    a = AutoSampler(window=1)(model, feats, cond_mask=mask, params=params, seeds=[5, 6, 7, 8])
    b = PACSampler(window=6, branches=3, depth=2)(model, feats, cond_mask=mask, params=params, seeds=[5, 6, 7, 8])
    assert torch.equal(a.tokens, b.tokens)


def test_kept_cache_is_the_ar_cache():
    model = tiny_gpt()
    params = SamplingParams(cfg_scale=2.0)
    cond = torch.tensor([0, 5, 8])
    made = []
    original = model.new_cache

    def new_cache(*args, **kwargs):
        made.append(original(*args, **kwargs))
        return made[-1]

    model.new_cache = new_cache
    out = PACSampler(window=6, branches=3, depth=2)(model, cond, params=params, seeds=[10, 11, 12])
    del model.new_cache
    assert out.num_forward_passes < 16
    cache = made[0]
    tokens = torch.cat([out.tokens, out.tokens])
    ref = model.new_cache(6, 17)
    model.prefill(torch.cat([cond, model.null_condition(cond)]), ref)
    model.decode(tokens[:, :-1], torch.arange(1, 16), ref)
    for layer in range(len(ref.k)):  # positions 0..15 (condition + every image token but the last)
        torch.testing.assert_close(cache.k[layer][:, :, :16], ref.k[layer][:, :, :16], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(cache.v[layer][:, :, :16], ref.v[layer][:, :, :16], atol=1e-5, rtol=1e-4)


class TreeMarkovCache(MarkovCache):
    def set_tree(self, parents, scratch):  # a Markov token depends on its parent only: nothing to mask
        pass

    def keep_path(self, slots, positions):
        pass


class TreeMarkovModel(MarkovModel):
    def new_cache(self, rows, max_len=None):
        return TreeMarkovCache(rows, max_len)


@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("setting", list(MARKOV_PARAMS))
def test_lossless_on_markov_chain(setting, levels):
    torch.manual_seed(1234)
    model, params, n = TreeMarkovModel(), MARKOV_PARAMS[setting], 20000
    out = PACSampler(window=5, branches=3, depth=2, levels=levels)(model, torch.full((n,), 1), params=params)
    assert out.forwards_per_sample.double().mean() < model.num_positions - 1
    assert_pairs_exact(model, out.tokens, 1, params)


@pytest.mark.parametrize("params,levels", [(SamplingParams(), 1), (SamplingParams(cfg_scale=2.5, top_k=8, top_p=0.9), 1),
                                           (SamplingParams(cfg_scale=2.5, top_k=8, top_p=0.9), 2)],
                         ids=["plain", "cfg_filters", "cfg_filters_two_levels"])
def test_lossless_on_tiny_gpt(params, levels):
    model = tiny_gpt(vocab_size=16, dim=32, n_layer=1, multiple_of=32, block_size=9)
    n, cond = 4000, 3
    conds = torch.full((n,), cond)
    torch.manual_seed(7)
    spec = PACSampler(window=6, branches=3, depth=2, levels=levels)(model, conds, params=params)
    ar = ARSampler()(model, conds, params=params)
    assert spec.forwards_per_sample.double().mean() < ar.num_forward_passes - 1
    assert_matches_exact_and_ar(model, spec.tokens, ar.tokens, cond, params)


def test_options_and_tree_checks():
    assert repr(get_sampler("pac:L=8,K=3,D=2")) == "PACSampler(window=8, branches=3, depth=2)"
    assert repr(get_sampler("pac:L=8,K=3,D=2,F=2")) == "PACSampler(window=8, branches=3, depth=2, levels=2)"
    for bad in ("pac:L=1", "pac:K=0", "pac:D=0", "pac:L=4,D=4", "pac:G=2", "pac:D=2,F=3", "pac:F=0",
                "pac:L=64,K=20,D=4,F=4"):
        with pytest.raises(ArgenError):
            get_sampler(bad)
    cache = tiny_gpt().new_cache(2, 20)
    with pytest.raises(ValueError):
        cache.set_tree([-1, 1], 10)  # a parent after its child
    with pytest.raises(ValueError):
        cache.set_tree([-1] + list(range(10)), 15)  # does not fit
    assert PACSampler().layout(4, 2) == ([-1, 0, 1, 2, 0, 4, 0, 6, 0, 8], [0, 1, 2, 3, 1, 2, 1, 2, 1, 2])
    # two branching levels: every pair of candidates for the first two drafts, then the chain
    tree = build_tree(4, 2, 2, 2)
    assert tree.parents == (-1, 0, 1, 2, 1, 0, 5, 5) and tree.ranks == (0, 0, 0, 0, 1, 1, 0, 1)
    # the path through a branch token: its ancestors, its rank-0 child, then the main chain
    assert tree.paths[4] == (0, 1, 4, 3) and tree.paths[5] == (0, 5, 6, 3) and tree.paths[7] == (0, 5, 7, 3)
