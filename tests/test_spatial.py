"""The spatially parallel (ZipAR-style) sampler: step counts, index alignment, hidden slots, batching;
and stacked with Jacobi windows (L >= 2): tokens independent of L, auto's tokens in AR order."""

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


@pytest.mark.parametrize("w,L", [(2, 1), (1, 3), (2, 4)])
def test_hidden_slots_are_never_read(w, L):
    """Slots of tokens not generated yet (and stand-ins, and rejected drafts) must be invisible:
    filling the cache with garbage before sampling changes nothing."""
    model = tiny_gpt()
    params = SamplingParams(cfg_scale=2.0)
    cond, seeds = torch.tensor([0, 5, 8]), [1, 2, 3]
    sampler = SpatialSampler(window=w, jacobi_window=L)
    clean = sampler(model, cond, params=params, seeds=seeds)
    assert torch.equal(clean.tokens, sample_over_garbage(sampler, model, cond, params=params, seeds=seeds).tokens)


def sample_over_garbage(sampler, model, *args, **kwargs):
    """`sampler(model, ...)` with every KV cache it makes filled with large random values first."""
    original = model.new_cache

    def noisy(*cache_args, **cache_kwargs):
        cache = original(*cache_args, **cache_kwargs)
        for t in cache.k + cache.v:
            t.normal_(0, 100.0)
        return cache

    model.new_cache = noisy
    try:
        return sampler(model, *args, **kwargs)
    finally:
        del model.new_cache


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
@pytest.mark.parametrize("L", [1, 4])
def test_batch_equals_batch_of_one(params, L):
    model = tiny_gpt()
    cond, seeds = torch.tensor([3, 3, 6, 1]), [21, 22, 23, 24]
    sampler = SpatialSampler(window=2, jacobi_window=L)
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
    assert repr(get_sampler("spatial:w=1,L=4")) == "SpatialSampler(window=1, jacobi_window=4)"
    assert repr(get_sampler("spatial:w=2,L=1")) == "SpatialSampler(window=2)"
    for bad in ("spatial:w=0", "spatial:w=1.5", "spatial:L=0", "spatial:L=2.5", "spatial:K=3"):
        with pytest.raises(ArgenError):
            get_sampler(bad)
    one_d = tiny_gpt(rope_type="1d")
    assert one_d.grid is None
    for spec in ("spatial", "spatial:w=1,L=4"):
        with pytest.raises(ArgenError, match="2D token grid"):
            get_sampler(spec)(one_d, torch.tensor([1]), seeds=[0])


# ---- L = 1: what the sampler drew before Jacobi windows existed ------------------------------

# Recorded with the pre-Jacobi sampler (main at 34b424e, argen/samplers/spatial.py as of 0efabbe)
# by exactly these calls: cond [1, 4, 9], seeds [3, 4, 5] on tiny_gpt(); the t2i case below.
L1_CASES = {
    "spatial:w=1": (dict(), [[3, 51, 27, 33, 42, 48, 26, 35, 5, 61, 61, 4, 3, 10, 11, 39],
                             [23, 59, 9, 20, 35, 33, 0, 48, 12, 36, 32, 30, 28, 14, 9, 0],
                             [40, 13, 49, 51, 51, 27, 13, 15, 18, 4, 49, 2, 11, 33, 22, 11]]),
    "spatial:w=2,L=1": (dict(cfg_scale=3.0, top_k=20), [[3, 55, 35, 32, 51, 20, 47, 33, 54, 0, 38, 53, 46, 4, 55, 55],
                                                        [14, 50, 8, 31, 30, 1, 47, 21, 25, 16, 13, 11, 0, 8, 35, 49],
                                                        [50, 8, 48, 48, 31, 8, 30, 27, 48, 4, 4, 51, 4, 62, 4, 46]]),
    "spatial:w=3": (dict(cfg_scale=2.0, cfg_interval=4, top_p=0.8), [[3, 53, 24, 16, 12, 34, 40, 4, 27, 47, 6, 43, 57, 31, 33, 21],
                                                                     [14, 56, 10, 20, 2, 47, 22, 47, 29, 13, 2, 12, 51, 38, 30, 12],
                                                                     [50, 9, 50, 47, 9, 15, 22, 17, 15, 44, 59, 25, 41, 54, 1, 6]]),
    "zipar:w=2": (dict(cfg_scale=3.0, cfg_schedule="linear"), [[3, 51, 28, 36, 52, 19, 34, 34, 61, 3, 27, 52, 39, 1, 51, 58],
                                                               [23, 59, 9, 22, 29, 1, 49, 28, 27, 24, 16, 9, 0, 9, 27, 48],
                                                               [40, 12, 54, 48, 35, 9, 22, 33, 47, 1, 8, 53, 6, 58, 2, 27]]),
}


@pytest.mark.parametrize("spec", list(L1_CASES))
def test_one_token_per_row_samples_what_it_always_did(spec):
    params, expected = L1_CASES[spec]
    out = get_sampler(spec)(tiny_gpt(), torch.tensor([1, 4, 9]), params=SamplingParams(**params), seeds=[3, 4, 5])
    assert out.tokens.tolist() == expected


def test_one_token_per_row_samples_what_it_always_did_t2i_short():
    feats, mask = left_padded_captions(3, 6, 12, lengths=[6, 2, 4])
    out = get_sampler("spatial:w=1,L=1")(tiny_t2i(), feats, cond_mask=mask, params=SamplingParams(cfg_scale=2.0),
                                         seeds=[5, 6, 7], num_tokens=7)
    assert out.tokens.tolist() == [[49, 13, 48, 60, 55, 22, 14], [38, 26, 62, 62, 29, 61, 29], [22, 60, 46, 8, 52, 43, 5]]


# ---- L >= 2: stacked with Jacobi windows ---------------------------------------------------

PARAMS = [SamplingParams(), SamplingParams(cfg_scale=3.0, top_k=20),
          SamplingParams(cfg_scale=2.0, cfg_interval=4, top_p=0.8), SamplingParams(cfg_scale=3.0, cfg_schedule="cosine")]
PARAM_IDS = ["plain", "cfg_topk", "interval_topp", "cosine"]


@pytest.mark.parametrize("params", PARAMS, ids=PARAM_IDS)
@pytest.mark.parametrize("w", [1, 2, 3])
def test_jacobi_tokens_do_not_depend_on_the_window(params, w):
    """The Gumbel rule makes each token a function of its (spatial) context and its noise only, so
    every L >= 2 emits the same tokens, in at most the forwards of L = 1 (a running row emits at
    least one token per forward, and no row opens later than one token per row would open it)."""
    model = tiny_gpt(block_size=24, grid_size=(4, 6))  # rows longer than the windows
    cond, seeds = torch.tensor([1, 4, 9, 2]), [3, 4, 5, 6]
    outs = [SpatialSampler(window=w, jacobi_window=L)(model, cond, params=params, seeds=seeds) for L in (2, 3, 4, 8)]
    for out in outs[1:]:
        assert torch.equal(out.tokens, outs[0].tokens)
    one = SpatialSampler(window=w)(model, cond, params=params, seeds=seeds)
    assert one.num_forward_passes == 3 * w + 6
    for out in outs:
        assert out.num_forward_passes <= one.num_forward_passes
        assert bool((out.forwards_per_sample <= out.num_forward_passes).all())


@pytest.mark.parametrize("w,nfe", [(1, 36), (2, 48), (3, 60)])
def test_jacobi_windows_save_forwards(w, nfe):
    """Drafts do get accepted (this model and these seeds, without guidance): fewer forwards per
    image than one token per row (`nfe`: the L = 1 total over the four images)."""
    model = tiny_gpt(block_size=24, grid_size=(4, 6))
    cond, seeds = torch.tensor([1, 4, 9, 2]), [3, 4, 5, 6]
    assert int(SpatialSampler(window=w)(model, cond, seeds=seeds).forwards_per_sample.sum()) == nfe
    for L in (2, 4):
        assert int(SpatialSampler(window=w, jacobi_window=L)(model, cond, seeds=seeds).forwards_per_sample.sum()) < nfe


@pytest.mark.parametrize("params", PARAMS, ids=PARAM_IDS)
def test_jacobi_in_raster_order_is_auto(params):
    """w >= W opens a row only when the one above is complete: the AR dependency structure, so
    the Jacobi windows must give exactly `auto`'s tokens (AR under the same Gumbel noise)."""
    model = tiny_gpt()  # 4 x 4 grid
    cond, seeds = torch.tensor([1, 4, 9]), [7, 8, 9]
    expected = get_sampler("auto:L=1")(model, cond, params=params, seeds=seeds).tokens
    for w, L in ((4, 2), (4, 4), (9, 3)):
        out = SpatialSampler(window=w, jacobi_window=L)(model, cond, params=params, seeds=seeds)
        assert torch.equal(out.tokens, expected)
        assert out.num_forward_passes < 16


def test_jacobi_short_images_and_t2i():
    model = tiny_t2i()
    feats, mask = left_padded_captions(3, 6, 12, lengths=[6, 2, 4])
    params = SamplingParams(cfg_scale=2.0)
    sampler = SpatialSampler(window=1, jacobi_window=4)
    full = sampler(model, feats, cond_mask=mask, params=params, seeds=[5, 6, 7])
    alone = sampler(model, feats[1:2], cond_mask=mask[1:2], params=params, seeds=[6])
    assert torch.equal(alone.tokens[0], full.tokens[1])
    # a 7-token prefix: row 0 and three tokens of row 1, each from the same context and noise as in the full image
    short = sampler(model, feats, cond_mask=mask, params=params, seeds=[5, 6, 7], num_tokens=7)
    assert torch.equal(short.tokens, full.tokens[:, :7])
    assert torch.equal(SpatialSampler(window=1, jacobi_window=2)(model, feats, cond_mask=mask, params=params,
                                                                  seeds=[5, 6, 7], num_tokens=7).tokens, short.tokens)


@pytest.mark.parametrize("grid", [(1, 16), (8, 2)])
def test_jacobi_on_thin_grids(grid):
    model = tiny_gpt(grid_size=grid)
    cond, seeds, params = torch.tensor([2, 5]), [1, 2], SamplingParams(cfg_scale=2.0)
    auto = get_sampler("auto:L=1")(model, cond, params=params, seeds=seeds).tokens
    assert torch.equal(SpatialSampler(window=grid[1], jacobi_window=3)(model, cond, params=params, seeds=seeds).tokens, auto)
    narrow = [SpatialSampler(window=1, jacobi_window=L)(model, cond, params=params, seeds=seeds).tokens for L in (2, 4)]
    assert torch.equal(narrow[0], narrow[1])


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(cfg_scale=2.5, top_k=6)], ids=["plain", "cfg_topk"])
def test_jacobi_samples_the_distribution_of_one_token_per_row(params):
    """L >= 2 draws with the Gumbel rule, L = 1 with inverse-CDF uniforms: different samples of the
    same spatial structure, so the same distribution. Two-sample chi-square (p > 1e-4) on the joint
    of the first two tokens of row 1 (the stand-in's token and the one after it, both conditioned
    on row 0) and on every position's marginal."""
    from scipy.stats import chi2_contingency

    model = tiny_gpt(vocab_size=8, dim=32, n_layer=1, multiple_of=32, block_size=8, grid_size=(2, 4))
    n, conds = 3000, torch.full((3000,), 3)
    one = SpatialSampler(window=1)(model, conds, params=params, seeds=list(range(n))).tokens
    out = SpatialSampler(window=1, jacobi_window=3)(model, conds, params=params, seeds=list(range(n, 2 * n)))
    assert out.forwards_per_sample.double().mean() < 5  # L = 1 takes 1 + 4 forwards: drafts were accepted
    pairs = [t[:, 4] * 8 + t[:, 5] for t in (one, out.tokens)]
    for k in [None] + list(range(8)):
        cells = 64 if k is None else 8
        table = torch.stack([torch.bincount(p if k is None else t[:, k], minlength=cells)
                             for p, t in zip(pairs, (one, out.tokens))])
        table = table[:, table.sum(0) > 0]
        assert chi2_contingency(table.numpy())[1] > 1e-4, f"position {k}"


# ---- k codes per grid cell (token-shuffle) ---------------------------------------------------


def shuffle_grid():
    """A tiny random token-shuffle generator: s = 2 over 8 x 8 codes, so a 4 x 4 grid of positions
    with 4 codes each."""
    from argen.models import TokenShuffleConfig, TokenShuffleGPT

    from helpers import randomize

    torch.manual_seed(0)
    cfg = TokenShuffleConfig(shuffle=2, dim=32, n_layer=1, n_head=2, multiple_of=32, vocab_size=8, num_classes=10,
                             block_size=64, shuffle_mlp_blocks=1)
    return randomize(TokenShuffleGPT(cfg), 2)


def test_codes_per_cell():
    """On k codes per cell: w >= W with one-hot targets is greedy AR and with Jacobi windows it is
    `auto`'s codes; one drawn cell per row takes (H - 1) * w + W forwards; unwritten slots stay
    unread; a sample does not depend on its batch."""
    model = shuffle_grid()
    assert model.grid == (4, 4) and model.tokens_per_position == 4
    cond, seeds = torch.tensor([1, 4, 9]), [3, 4, 5]
    greedy_params = SamplingParams(cfg_scale=3.0, top_k=1, cfg_schedule="linear")
    greedy = ARSampler(sample=False)(model, cond, params=greedy_params).tokens
    assert torch.equal(SpatialSampler(window=4)(model, cond, params=greedy_params, seeds=seeds).tokens, greedy)
    params = SamplingParams(cfg_scale=2.0, top_k=6)
    auto = get_sampler("auto:L=1")(model, cond, params=params, seeds=seeds).tokens
    assert torch.equal(SpatialSampler(window=4, jacobi_window=3)(model, cond, params=params, seeds=seeds).tokens, auto)
    for w, L in ((1, 1), (2, 1), (1, 3), (2, 4)):
        out = SpatialSampler(window=w, jacobi_window=L)(model, cond, params=params, seeds=seeds)
        assert out.tokens.shape == (3, 64)
        if L == 1:
            assert out.num_forward_passes == 3 * w + 4
        alone = SpatialSampler(window=w, jacobi_window=L)(model, cond[1:2], params=params, seeds=seeds[1:2])
        assert torch.equal(alone.tokens[0], out.tokens[1])
        dirty = sample_over_garbage(SpatialSampler(window=w, jacobi_window=L), model, cond, params=params, seeds=seeds)
        assert torch.equal(dirty.tokens, out.tokens)
