"""The `draft-gsd` sampler: the drafter's drafts under GSD's grouped acceptance test.

It is lossy by design, so no chi-square test applies; what is tested is that it is exactly `draft`
at G = 1, that the grouped test really replaces the token test (a group covering the whole
vocabulary accepts every draft, so the tokens are the drafter's own samples), and that batching and
options behave like the other samplers'.
"""

import pytest
import torch

from argen.errors import ArgenError
from argen.samplers import SamplingParams, get_sampler

from helpers import assert_rows_as_if_alone, tiny_gpt

PARAMS = SamplingParams(cfg_scale=2.5, top_k=12)


def models():
    return tiny_gpt(vocab_size=16, dim=32, n_layer=2, multiple_of=32, block_size=16), \
        tiny_gpt(seed=2, vocab_size=16, dim=32, n_layer=1, multiple_of=32, block_size=16)


def test_group_of_one_is_the_draft_sampler():
    model, drafter = models()
    cond, seeds = torch.tensor([1, 5, 5, 8]), [10, 11, 12, 13]
    plain = get_sampler("draft:L=5").prepare(draft=drafter)
    grouped = get_sampler("draft-gsd:L=5,G=1").prepare(draft=drafter)
    a, b = plain(model, cond, params=PARAMS, seeds=seeds), grouped(model, cond, params=PARAMS, seeds=seeds)
    assert torch.equal(a.tokens, b.tokens)
    assert a.forwards_per_sample.tolist() == b.forwards_per_sample.tolist()
    assert 0.05 < plain.acceptance < 0.95 and grouped.acceptance == plain.acceptance


def test_a_group_over_the_whole_vocabulary_accepts_every_draft():
    """sum_W p / sum_W q = 1 when W is every token (G//2 = 16 on either side of the draft in
    the rank order of p covers all 16) and nothing is filtered: the target's test
    passes whatever the drafter proposed, so the image is the drafter's own sample (token 0 aside,
    which the target's prefill draws) and every window is full."""
    model, drafter = models()
    sampler = get_sampler("draft-gsd:L=4,G=32,prob_threshold=2,embed_quantile=1").prepare(draft=drafter)
    params = SamplingParams(cfg_scale=2.0)  # no filter: a filtered-out draft (p = 0) is never accepted
    out = sampler(model, torch.tensor([3, 6]), params=params, seeds=[0, 1])
    assert sampler.acceptance == 1.0
    assert out.accepted_per_forward == [4, 4, 4, 3]  # 15 tokens after the prefill's, 3 drafts + bonus per forward
    lossless = get_sampler("draft:L=4").prepare(draft=drafter)
    exact = lossless(model, torch.tensor([3, 6]), params=params, seeds=[0, 1])
    assert lossless.acceptance < 1.0 and exact.num_forward_passes > out.num_forward_passes


def test_ragged_batch_equals_batch_of_one():
    model, drafter = models()
    sampler = get_sampler("draft-gsd:L=6,G=4").prepare(draft=drafter)
    cond, seeds = torch.tensor([2, 2, 7, 9]), [5, 6, 7, 8]
    batch = sampler(model, cond, params=PARAMS, seeds=seeds)
    assert_rows_as_if_alone(sampler, model, cond, PARAMS, seeds, batch)


def test_options_and_refusals():
    sampler = get_sampler("draft-gsd:L=24,G=25,embed_quantile=0.35,stop=0.1")
    assert (sampler.window, sampler.grouped.group_size, sampler.grouped.embed_quantile, sampler.stop) == \
        (24, 25, 0.35, 0.1)
    with pytest.raises(ArgenError, match="group_size"):
        get_sampler("draft-gsd:G=0")
    model, _ = models()
    with pytest.raises(ArgenError, match="draft model"):
        get_sampler("draft-gsd:L=4")(model, torch.tensor([1]))
