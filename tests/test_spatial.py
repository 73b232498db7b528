"""The spatially parallel (ZipAR-style) sampler: step counts, index alignment, hidden slots, batching."""

import pytest
import torch

from argen.errors import ArgenError
from argen.samplers import ARSampler, SamplingParams, get_sampler
from argen.samplers.spatial import SpatialSampler

from helpers import left_padded_captions, tiny_gpt, tiny_t2i


@pytest.mark.parametrize("cfg,schedule", [(1.0, "constant"), (3.0, "constant"), (3.0, "linear")])
def test_window_of_a_full_row_is_greedy_ar(cfg, schedule):
    """w >= W decodes one row after the other: with one-hot targets it must reproduce greedy AR
    token for token (any off-by-one in positions, stand-ins, visibility or guidance scale per
    position would show)."""
    model = tiny_gpt()  # 4 x 4 grid
    params = SamplingParams(cfg_scale=cfg, top_k=1, cfg_schedule=schedule)
    cond = torch.tensor([1, 4, 9])
    greedy = ARSampler(sample=False)(model, cond, params=params).tokens
    for w in (4, 9):
        out = SpatialSampler(window=w)(model, cond, params=params, seeds=[3, 4, 5])
        assert torch.equal(out.tokens, greedy)
        assert out.num_forward_passes == 16


@pytest.mark.parametrize("w,nfe", [(1, 7), (2, 10), (3, 13)])
def test_forward_count_is_rows_times_window_plus_a_row(w, nfe):
    model = tiny_gpt()
    out = SpatialSampler(window=w)(model, torch.tensor([1, 2]), seeds=[0, 1])
    assert out.num_forward_passes == nfe == 3 * w + 4
    assert out.forwards_per_sample.tolist() == [nfe, nfe]
    assert sum(out.accepted_per_forward) == pytest.approx(15)  # every token after the prefill one


def test_hidden_slots_are_never_read():
    """Slots of tokens not generated yet (and stand-ins) must be invisible: filling the cache with
    garbage before sampling changes nothing."""
    model = tiny_gpt()
    params = SamplingParams(cfg_scale=2.0)
    cond, seeds = torch.tensor([0, 5, 8]), [1, 2, 3]
    clean = SpatialSampler(window=2)(model, cond, params=params, seeds=seeds)
    original = model.new_cache

    def noisy(*args, **kwargs):
        cache = original(*args, **kwargs)
        for t in cache.k + cache.v:
            t.normal_(0, 100.0)
        return cache

    model.new_cache = noisy
    dirty = SpatialSampler(window=2)(model, cond, params=params, seeds=seeds)
    del model.new_cache
    assert torch.equal(clean.tokens, dirty.tokens)


def test_rows_below_see_the_rows_above():
    """A row that starts early must still condition on what is above it: with w=1 the greedy
    image differs from one where every row is sampled blind to the rows above (control), and
    the last token of each finished row is fed (its key) before rows below go on."""
    model = tiny_gpt()
    params = SamplingParams(cfg_scale=2.0, top_k=1)
    cond = torch.arange(6)
    fed = []
    original = model.decode

    def recording(tokens, input_pos, cache):
        fed.append(input_pos.clone())
        return original(tokens, input_pos, cache)

    model.decode = recording
    SpatialSampler(window=1)(model, cond, params=params, seeds=list(range(6)))
    del model.decode
    positions = torch.cat([p.flatten() for p in fed]).tolist()
    for r in range(3):  # the last token of rows 0..2 (image index 4r+3, sequence position 1 + 4r + 3)
        assert 1 + 4 * r + 3 in positions


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(cfg_scale=3.0, top_k=20),
                                    SamplingParams(cfg_scale=2.0, cfg_interval=4, top_p=0.8)],
                         ids=["plain", "cfg_topk", "interval_topp"])
def test_batch_equals_batch_of_one(params):
    model = tiny_gpt()
    cond, seeds = torch.tensor([3, 3, 6, 1]), [21, 22, 23, 24]
    sampler = SpatialSampler(window=2)
    batch = sampler(model, cond, params=params, seeds=seeds)
    for i in range(len(seeds)):
        alone = sampler(model, cond[i:i + 1], params=params, seeds=seeds[i:i + 1])
        assert torch.equal(alone.tokens[0], batch.tokens[i])


def test_t2i_and_short_images():
    model = tiny_t2i()
    feats, mask = left_padded_captions(3, 6, 12, lengths=[6, 2, 4])
    params = SamplingParams(cfg_scale=2.0)
    batch = SpatialSampler(window=1)(model, feats, cond_mask=mask, params=params, seeds=[5, 6, 7])
    alone = SpatialSampler(window=1)(model, feats[1:2], cond_mask=mask[1:2], params=params, seeds=[6])
    assert torch.equal(alone.tokens[0], batch.tokens[1])
    short = SpatialSampler(window=1)(model, feats, cond_mask=mask, params=params, seeds=[5, 6, 7], num_tokens=7)
    assert short.tokens.shape == (3, 7)
    assert short.num_forward_passes == 4  # row 0 in 4 forwards (prefill included); row 1 (3 tokens) runs alongside


def test_options_and_refusals():
    assert repr(get_sampler("spatial:w=3")) == "SpatialSampler(window=3)"
    assert repr(get_sampler("zipar")) == "SpatialSampler(window=2)"
    for bad in ("spatial:w=0", "spatial:w=1.5", "spatial:L=3"):
        with pytest.raises(ArgenError):
            get_sampler(bad)
    one_d = tiny_gpt(rope_type="1d")
    assert one_d.grid is None
    with pytest.raises(ArgenError, match="2D token grid"):
        SpatialSampler()(one_d, torch.tensor([1]), seeds=[0])
