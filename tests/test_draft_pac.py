"""The `draft-pac` sampler (a drafter's drafts in pac's token tree): it must emit exactly `auto`'s
tokens whatever the drafter (the Gumbel rule), keep the drafter's cache right across ragged steps,
count both models' forwards per row as if alone, and be lossless by chi-square."""

import pytest
import torch

from argen.errors import ArgenError
from argen.samplers import ARSampler, SamplingParams, get_sampler
from argen.samplers.auto import AutoSampler, gumbel_noise
from argen.samplers.draft_pac import DraftPACSampler
from argen.samplers.logits import process_logits
from argen.samplers.rng import make_streams

from helpers import assert_rows_as_if_alone, left_padded_captions, tiny_gpt, tiny_t2i
from test_pac import PARAMS
from test_speculative import assert_matches_exact_and_ar

TREES = ["draft-pac:L=2,K=1,D=1", "draft-pac:L=4,K=1,D=1", "draft-pac", "draft-pac:L=8,K=3,D=3,F=2",
         "draft-pac:L=6,K=2,D=4,F=4"]


def draft_pac(spec, drafter):
    return get_sampler(spec).prepare(draft=drafter)


@pytest.mark.parametrize("params", PARAMS, ids=["plain", "cfg_topk", "interval_topp", "schedule"])
def test_emits_exactly_the_gumbel_ar_tokens_with_a_different_drafter(params):
    """Drafts decide only how far each forward gets: the tokens are auto's for every tree, and a
    sampler whose drafter's keys or scores were misplaced would still have to match them."""
    model, drafter = tiny_gpt(), tiny_gpt(seed=3, n_layer=1)
    cond, seeds = torch.tensor([3, 3, 6, 1, 9]), [21, 22, 23, 24, 25]
    base = AutoSampler(window=1)(model, cond, params=params, seeds=seeds)
    for spec in TREES:
        out = draft_pac(spec, drafter)(model, cond, params=params, seeds=seeds)
        assert torch.equal(out.tokens, base.tokens), spec
        assert out.num_forward_passes == int(out.forwards_per_sample.max())
        assert out.forwards_per_sample.double().mean() < model.num_positions  # the drafts help
    # a drafter close to the target (the target, slightly perturbed) needs fewer target forwards than pac alone
    close = tiny_gpt()
    with torch.no_grad():
        for p in close.parameters():
            p.add_(0.01 * torch.randn_like(p))
    pac = get_sampler("pac:L=8,K=3,D=2")(model, cond, params=params, seeds=seeds)
    near = draft_pac("draft-pac:L=8,K=3,D=2", close)(model, cond, params=params, seeds=seeds)
    assert torch.equal(near.tokens, base.tokens)
    assert near.forwards_per_sample.sum() < pac.forwards_per_sample.sum()


def test_t2i_matches_auto_and_rows_as_if_alone():
    model, drafter = tiny_t2i(), tiny_t2i(seed=5, n_layer=1)
    feats, mask = left_padded_captions(4, 6, 12, lengths=[6, 2, 4, 1])
    params, seeds = SamplingParams(cfg_scale=2.0, top_k=30), [5, 6, 7, 8]
    base = AutoSampler(window=1)(model, feats, cond_mask=mask, params=params, seeds=seeds)
    sampler = draft_pac("draft-pac:L=6,K=3,D=2", drafter)
    batch = sampler(model, feats, cond_mask=mask, params=params, seeds=seeds)
    assert torch.equal(batch.tokens, base.tokens)
    for i in (1, 3):
        alone = sampler(model, feats[i:i + 1], cond_mask=mask[i:i + 1], params=params, seeds=seeds[i:i + 1])
        assert torch.equal(alone.tokens[0], batch.tokens[i])
        assert alone.draft_forward_passes == int(batch.draft_forwards_per_sample[i])


@pytest.mark.parametrize("params", PARAMS[:2], ids=["plain", "cfg_topk"])
def test_ragged_batch_equals_batch_of_one(params):
    model, drafter = tiny_gpt(), tiny_gpt(seed=3, n_layer=1)
    cond, seeds = torch.tensor([3, 3, 6, 1, 9]), [21, 22, 23, 24, 25]
    sampler = draft_pac("draft-pac:L=6,K=3,D=2", drafter)
    batch = sampler(model, cond, params=params, seeds=seeds)
    assert_rows_as_if_alone(sampler, model, cond, params, seeds, batch)


def test_the_target_as_its_own_drafter_accepts_every_window_and_counts_both_models():
    """The drafter's cache bookkeeping: drafting with the target itself, every main-chain draft is
    right, so each forward emits a whole window; a stale or misplaced drafter key would break a run."""
    model = tiny_gpt()  # 16 positions
    params = SamplingParams(cfg_scale=2.0)
    out = draft_pac("draft-pac:L=4,K=2,D=2", model)(model, torch.tensor([2, 7]), params=params, seeds=[0, 1])
    # token 0 from the prefill, then windows of 4 (3 drafts + bonus) over 15 tokens: 4, 4, 4, 3
    assert out.accepted_per_forward == [4, 4, 4, 3] and out.num_forward_passes == 5
    # drafter: its prefill, then per window a chain of 3 + 3 + 3 + 2 forwards (only the drafts the next
    # window verifies) and one tree forward re-drafting the branch's depth-2 token (4 windows)
    assert out.draft_forward_passes == 16 and out.draft_forwards_per_sample.tolist() == [16, 16]


class Recording(DraftPACSampler):
    """draft-pac that records each forward's tree tokens and the committed count before it."""

    def tree_tokens(self, tree, seq, stale, noise, emitted):
        tokens = super().tree_tokens(tree, seq, stale, noise, emitted)
        self.steps.append((tree, tokens.clone(), emitted.clone(), seq.clone()))
        return tokens


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(cfg_scale=2.0, top_k=12)], ids=["plain", "cfg_topk"])
def test_each_tree_token_is_its_parents_ranked_drafter_pick(params):
    """Every token of a drafted tree is the r-th best of the drafter's scores (processed logits +
    the position's noise) after the token's own path: for the main chain and for branches alike.
    Recomputed here by feeding each path to the drafter from scratch."""
    model, drafter = tiny_gpt(), tiny_gpt(seed=3, n_layer=1)
    cond, seed = torch.tensor([4]), 11
    sampler = Recording(window=5, branches=3, depth=3, levels=2).prepare(draft=drafter)
    sampler.steps = []
    sampler(model, cond, params=params, seeds=[seed])
    n = model.num_positions
    noise = gumbel_noise(make_streams(1, [seed], None), 1, n, model.vocab_size, "cpu", scratch=6)[0]
    checked = 0
    for tree, tokens, emitted, seq in sampler.steps[:3]:
        e = int(emitted[0])
        for i in range(1, len(tree.parents)):
            path = [tree.paths[i][j] for j in range(tree.depths[i])]  # the token's ancestors, root first
            if e + tree.depths[i] - 1 >= n:
                continue
            prefix = torch.cat([seq[0, :e - 1], tokens[0, path]])
            scores = path_scores(drafter, cond, prefix, params) + noise[e + tree.depths[i] - 1]
            assert int(tokens[0, i]) == int(scores.topk(3).indices[tree.ranks[i]]), (e, i)
            checked += 1
    assert checked > 30


def path_scores(model, cond, prefix, params):
    """The model's processed next-token logits after image tokens `prefix`, fed in one forward."""
    both = torch.cat([cond, model.null_condition(cond)]) if params.uses_cfg else cond
    cache = model.new_cache(both.shape[0], model.condition_length(cond) + model.num_positions)
    model.prefill(both, cache, None)
    x = prefix[None].expand(both.shape[0], -1)
    pos = torch.arange(prefix.shape[0]) + model.condition_length(cond)
    return process_logits(model.decode(x, pos, cache)[:, -1:], params, params.uses_cfg)[0, 0]


def test_short_images():
    model, drafter = tiny_gpt(), tiny_gpt(seed=3, n_layer=1)
    sampler = draft_pac("draft-pac:L=6,K=2,D=2", drafter)
    out = sampler(model, torch.tensor([1, 2]), num_tokens=5, seeds=[0, 1])
    assert torch.equal(out.tokens, AutoSampler(window=1)(model, torch.tensor([1, 2]), num_tokens=5, seeds=[0, 1]).tokens)
    two = sampler(model, torch.tensor([1]), num_tokens=2, seeds=[0])
    assert two.num_forward_passes == 2 and two.draft_forward_passes == 1  # no draft to make: the prefill only


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(cfg_scale=2.5, top_k=8, top_p=0.9)],
                         ids=["plain", "cfg_filters"])
def test_lossless_on_tiny_gpt_with_a_different_drafter(params):
    model = tiny_gpt(vocab_size=16, dim=32, n_layer=1, multiple_of=32, block_size=9)
    drafter = tiny_gpt(seed=2, vocab_size=16, dim=32, n_layer=1, multiple_of=32, block_size=9)
    n, cond = 4000, 3
    conds = torch.full((n,), cond)
    torch.manual_seed(7)
    out = draft_pac("draft-pac:L=6,K=3,D=2", drafter)(model, conds, params=params)
    ar = ARSampler()(model, conds, params=params)
    assert out.forwards_per_sample.double().mean() < ar.num_forward_passes - 1
    assert_matches_exact_and_ar(model, out.tokens, ar.tokens, cond, params)


def test_options_and_refusals():
    assert repr(get_sampler("draft-pac:L=8,K=3,D=2")) == "DraftPACSampler(window=8, branches=3, depth=2)"
    with pytest.raises(ArgenError, match="sampler 'draft-pac' needs a draft model") as err:
        get_sampler("draft-pac")(tiny_gpt(), torch.tensor([1]), seeds=[0])
    assert "\n" not in str(err.value)
    with pytest.raises(ArgenError, match="vocab_size"):
        draft_pac("draft-pac", tiny_gpt(vocab_size=32))(tiny_gpt(), torch.tensor([1]), seeds=[0])
    with pytest.raises(ArgenError):
        get_sampler("draft-pac:L=4,D=4")  # pac's own tree checks
