"""The `auto` sampler: Gumbel-coupled Jacobi decoding whose samples do not depend on the window,
exactness (chi-square, as tests/test_speculative.py), and the cost model's choices."""

import pytest
import torch

from argen.errors import ArgenError
from argen.samplers import ARSampler, SamplingParams, get_sampler
from argen.samplers import auto
from argen.samplers.auto import TRIAL_STEPS, AutoSampler, acceptance_counts, expected_tokens, model_state, skew

from helpers import left_padded_captions, tiny_gpt, tiny_t2i
from test_speculative import MARKOV_PARAMS, MarkovModel, assert_matches_exact_and_ar, assert_pairs_exact

PARAMS = [SamplingParams(), SamplingParams(cfg_scale=3.0, top_k=20),
          SamplingParams(cfg_scale=2.0, cfg_interval=4, top_p=0.8, temperature=0.9),
          SamplingParams(cfg_scale=3.0, cfg_schedule="linear")]


@pytest.mark.parametrize("params", PARAMS, ids=["plain", "cfg_topk", "interval_topp", "schedule"])
def test_samples_do_not_depend_on_window_or_batch(params):
    """Every width, the cost-model choice and batch of one give the same tokens per seed."""
    model = tiny_gpt()
    cond, seeds = torch.tensor([3, 3, 6, 1, 9]), [21, 22, 23, 24, 25]
    base = AutoSampler(window=1)(model, cond, params=params, seeds=seeds)
    assert base.num_forward_passes == 16
    for sampler in (AutoSampler(window=3), AutoSampler(window=16), AutoSampler()):
        out = sampler(model, cond, params=params, seeds=seeds)
        assert torch.equal(out.tokens, base.tokens), repr(sampler)
    wide = AutoSampler(window=8)(model, cond, params=params, seeds=seeds)
    assert len(set(wide.forwards_per_sample.tolist())) > 1  # ragged
    for i in (0, 2, 4):
        alone = AutoSampler(window=5)(model, cond[i:i + 1], params=params, seeds=seeds[i:i + 1])
        assert torch.equal(alone.tokens[0], base.tokens[i])


def test_t2i_and_global_rng():
    model = tiny_t2i()
    feats, mask = left_padded_captions(4, 6, 12, lengths=[6, 2, 4, 1])
    params = SamplingParams(cfg_scale=2.0, top_k=30)
    a = AutoSampler(window=1)(model, feats, cond_mask=mask, params=params, seeds=[5, 6, 7, 8])
    b = AutoSampler(window=7)(model, feats, cond_mask=mask, params=params, seeds=[5, 6, 7, 8])
    assert torch.equal(a.tokens, b.tokens)
    torch.manual_seed(3)
    c = AutoSampler(window=4)(model, feats, cond_mask=mask, params=params)
    torch.manual_seed(3)
    d = AutoSampler(window=9)(model, feats, cond_mask=mask, params=params)
    assert torch.equal(c.tokens, d.tokens)


@pytest.mark.parametrize("window", [1, 5, "auto"])
@pytest.mark.parametrize("setting", list(MARKOV_PARAMS))
def test_lossless_on_markov_chain(window, setting):
    torch.manual_seed(1234)
    model, params, n = MarkovModel(), MARKOV_PARAMS[setting], 20000
    out = AutoSampler(window=window)(model, torch.full((n,), 1), params=params)
    if window == 5:  # ("auto" may rightly run AR here: 20000 rows make every window dear)
        assert out.forwards_per_sample.double().mean() < model.num_positions - 1
    assert_pairs_exact(model, out.tokens, 1, params)


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(cfg_scale=2.5, top_k=8, top_p=0.9)],
                         ids=["plain", "cfg_filters"])
def test_lossless_on_tiny_gpt(params):
    model = tiny_gpt(vocab_size=16, dim=32, n_layer=1, multiple_of=32, block_size=9)
    n, cond = 4000, 3
    conds = torch.full((n,), cond)
    torch.manual_seed(7)
    spec = AutoSampler(window=6)(model, conds, params=params)
    ar = ARSampler()(model, conds, params=params)
    assert spec.forwards_per_sample.double().mean() < ar.num_forward_passes - 1
    assert_matches_exact_and_ar(model, spec.tokens, ar.tokens, cond, params)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_greedy_is_greedy_ar(schedule):
    """top_k=1 leaves one token: every width, the AR loop included, must give greedy AR's tokens
    (under a guidance schedule too: each position's own scale)."""
    model = tiny_gpt()
    params = SamplingParams(cfg_scale=3.0, top_k=1, cfg_schedule=schedule)
    cond = torch.tensor([1, 4, 9])
    greedy = ARSampler(sample=False)(model, cond, params=params).tokens
    for window in (1, 5):
        assert torch.equal(AutoSampler(window=window)(model, cond, params=params, seeds=[0, 1, 2]).tokens, greedy)


def test_cost_model_falls_back_to_ar_and_widens_when_cheap(monkeypatch):
    monkeypatch.setattr(auto, "COLD_STEPS", 0)  # book from the first steps: this image is 16 tokens
    monkeypatch.setattr(auto, "JACOBI_WARMUP", 0)
    model = tiny_gpt()
    sampler = AutoSampler(max_window=8)
    cond = torch.tensor([1, 2])
    state = model_state(model)
    sampler(model, cond, seeds=[0, 1])  # measures and caches the costs for this shape
    (key,) = state["costs"]
    assert 1 in state["costs"][key] and set(state["costs"][key]) <= {1, 2, 4, 8}
    def verified():  # every window tried already (and its gain measured): the estimates decide
        return {"tried": {w: TRIAL_STEPS for w in (2, 4, 8)},
                "gain": {w: [0.5 * TRIAL_STEPS, TRIAL_STEPS] for w in (2, 4, 8)}, "slow": [0.0, 0.0],
                "cold": [0.0, 0]}

    state["books"][key] = verified()
    state["costs"][key] = {1: 1.0, 2: 5.0, 4: 9.0, 8: 20.0}  # windows far dearer than their tokens
    out = sampler(model, cond, seeds=[0, 1])
    assert sampler.last_widths == [1] * 15 and out.num_forward_passes == 16
    assert 0.69 < state["costs"][key][1] < 0.71  # AR's estimate moved toward its real step (~ms, not 1 s)
    state["costs"][key] = {1: 1.0, 2: 1.0, 4: 1.0, 8: 1.0}  # windows free: the widest
    state["books"][key] = verified()
    out = sampler(model, cond, seeds=[0, 1])
    assert sampler.last_widths[0] == 8 and out.num_forward_passes < 16
    assert set(sampler.last_widths) <= {1, 2, 4, 8}  # probed widths only, the image's end too (one graph each)
    # a used width's estimate moves toward what its steps really took (here ~ms, not 1 s), an unused one stays
    assert state["costs"][key][8] < 0.75
    assert all(state["costs"][key][w] == 1.0 for w in {2, 4} - set(sampler.last_widths))
    slowest, mean = state["books"][key]["slow"]  # the slowest row's extra tokens, booked against a mean row's
    assert mean > 0 and slowest >= 0 and 0 < skew(state["books"][key]) <= 1
    # a call's first COLD_STEPS steps are not timed (they run slow), and the first JACOBI_WARMUP
    # windows in a row add no gain (their drafts are blind, or predicted from blind ones)
    for cold, warmup in ((100, 0), (0, 100)):
        monkeypatch.setattr(auto, "COLD_STEPS", cold)
        monkeypatch.setattr(auto, "JACOBI_WARMUP", warmup)
        state["books"][key] = verified()
        before = dict(state["costs"][key])
        gains = {w: list(v) for w, v in state["books"][key]["gain"].items()}
        sampler(model, cond, seeds=[0, 1])
        assert (state["costs"][key] == before) == (cold == 100)
        assert (state["books"][key]["gain"] == gains) == (warmup == 100)
        # the first run of windows started cold (at the image's start): its warm-up steps are the
        # cold record (the narrower windows near the image's end follow windows, not AR)
        widths = sampler.last_widths
        first_run = next((i for i, w in enumerate(widths) if w != widths[0]), len(widths))
        assert widths[0] > 1 and state["books"][key]["cold"][1] == min(warmup, first_run)


class Width2:
    """A tiny model whose batch-2 costs (widths 1 and 2) are probed, and a way to run `auto` on it
    with set estimates and records (acceptance data cleared)."""

    def __init__(self):
        self.model, self.sampler, self.cond = tiny_gpt(), AutoSampler(max_window=2), torch.tensor([1, 2])
        self.state = model_state(self.model)
        self.sampler(self.model, self.cond, seeds=[0, 1])
        (self.key,) = self.state["costs"]
        self.state["hits"].clear()
        self.state["tries"].clear()

    def widths(self, costs, tried=None, gain=None, slow=(0.0, 0.0)) -> list:
        self.state["costs"][self.key] = dict(costs)
        self.state["books"][self.key] = {"tried": dict(tried or {}), "slow": list(slow), "cold": [0.0, 0],
                                         "gain": {w: list(v) for w, v in (gain or {}).items()}}
        self.sampler(self.model, self.cond, seeds=[0, 1])
        return self.sampler.last_widths


def test_a_window_the_probe_may_have_misjudged_is_tried():
    """AR by the estimates, but a window that would pay at PROBE_DOUBT x its probed cost is tried
    for TRIAL_STEPS steps on this shape; a tried one is left alone."""
    run = Width2()
    costs = {1: 1.0, 2: 1.6}  # prior: 1.5 tokens for 1.6x the cost, 1.5 / (0.7 * 1.6) would pay
    tried = {2: TRIAL_STEPS}
    assert run.widths(costs, tried, gain={2: [0.5 * TRIAL_STEPS, TRIAL_STEPS]}) == [1] * 15  # tried: AR
    assert 2 in run.widths(costs) and run.state["books"][run.key]["tried"][2] >= 1
    # a trial that ran its steps is not run again
    assert run.widths(costs, tried) == [1] * 15
    # nor one the estimates ended early: once its measured gain says it loses, the chooser leaves it
    book = {"tried": {2: 6}, "gain": {2: [0.0, 6]}, "slow": [0.0, 0.0], "cold": [0.0, 0]}  # none right in 6 steps
    assert run.sampler._choose({1: 1.0, 2: 2.0}, run.state, 10, 16, book, previous=2) == 1
    assert book["tried"][2] == TRIAL_STEPS


def test_windows_are_judged_by_the_slowest_rows_progress():
    """The acceptance model promises a row 2 tokens per width-2 step (learnt elsewhere, e.g. at
    batch 1), which pays at 1.2x AR's cost. On this shape the slowest row has gained a tenth of a
    mean row's extra tokens, so a window does not pay: AR. With no such record, the promise: windows."""
    run = Width2()
    costs, tried = {1: 1.0, 2: 1.2}, {2: TRIAL_STEPS}
    for slow, widths in (([10.0, 100.0], {1}), ([0.0, 0.0], {2})):
        run.state["hits"][:], run.state["tries"][:] = [1e6], [1e6]
        assert set(run.widths(costs, tried, {2: [1.0 * TRIAL_STEPS, TRIAL_STEPS]}, slow)[:5]) == widths
    # and a width's own real steps outweigh the promise: acceptance learnt elsewhere says a
    # width-2 draft is right 10% of the time (no pay), but here it was right in 40 steps of 40
    for gain, widths in (({2: [40.0, 40]}, {2}), ({2: [0.1 * TRIAL_STEPS, TRIAL_STEPS]}, {1})):
        run.state["hits"][:], run.state["tries"][:] = [1e5], [1e6]
        assert set(run.widths(costs, tried, gain)[:5]) == widths


def test_skew_is_one_at_batch_one_and_shrinks_to_the_prior():
    assert skew({"slow": [0.0, 0.0]}) == 1.0
    assert skew({"slow": [30.0, 30.0]}) == 1.0
    assert skew({"slow": [1.0, 100.0]}) == pytest.approx(3 / 102)


def test_expected_tokens_follows_acceptance():
    assert expected_tokens([], [], 3) == pytest.approx([1.0, 1.5, 1.75])  # prior 0.5 per depth
    assert expected_tokens([1e5, 0.0], [1e5, 1e5], 3) == pytest.approx([1.0, 2.0, 2.0], abs=1e-3)
    # a few early misses do not outvote the prior: 4 rows failing once leave depth 1 near 0.5
    assert expected_tokens([0.0], [4.0], 2)[1] > 1.4


def test_only_predicted_drafts_count_as_acceptance_data():
    """A blind draft (never predicted by a forward) is not evidence about windows: depth j counts
    only when j <= informed. Row 0: 3 drafts right, only the first 2 predicted; row 1: all blind."""
    state = {"costs": {}, "hits": [], "tries": []}
    n, lengths = torch.tensor([3, 0]), torch.tensor([4, 4])
    AutoSampler._observe(state, acceptance_counts(n, lengths, 4, informed=torch.tensor([2, 0])))
    assert state["tries"] == [1.0, 1.0, 0.0] and state["hits"] == [1.0, 1.0, 0.0]


def test_bad_options():
    for bad in ("auto:L=0", "auto:L=fast", "auto:max_window=0", "auto:repeats=0", "auto:G=3"):
        with pytest.raises(ArgenError):
            get_sampler(bad)
    assert repr(get_sampler("gumbel:L=4")) == "AutoSampler(window=4, max_window=32)"


def test_a_cold_start_pays_its_warm_up():
    """Width 2 makes 2 tokens a step once under way, at 1.8x AR's cost: it wins warm (1.11x AR's
    rate), but started from AR its first JACOBI_WARMUP steps make 1 token each (the prior), and over
    the 15 tokens left it loses (16.2 step costs against 15). Measured cold progress near 2 a step
    makes it pay again; and an image nearly done is not worth a cold start."""
    run = Width2()
    costs = {1: 1.0, 2: 1.8}
    book = {"tried": {2: TRIAL_STEPS}, "gain": {2: [1000.0, 1000]}, "slow": [0.0, 0.0], "cold": [0.0, 0]}
    assert run.sampler._choose(costs, run.state, 1, 16, book, previous=2) == 2  # under way
    assert run.sampler._choose(costs, run.state, 1, 16, book, previous=1) == 1  # cold
    book["cold"] = [30.0, 30]  # warm-up steps have made ~1.9 tokens each on this shape
    assert run.sampler._choose(costs, run.state, 1, 16, book, previous=1) == 2
    book["cold"] = [0.0, 0]
    assert run.sampler._choose({1: 1.0, 2: 1.2}, run.state, 1, 16, book, previous=1) == 2
    assert run.sampler._choose({1: 1.0, 2: 1.2}, run.state, 14, 16, book, previous=1) == 1


def test_a_short_ar_stretch_does_not_move_ars_estimate():
    """An AR stretch's first step after windows runs slow, and 1-step stretches at images' ends had
    raised AR's estimate by 40%: such a step is not booked (a longer stretch is, from its 2nd step)."""
    model, sampler = tiny_gpt(), AutoSampler(max_window=2)
    state = model_state(model)
    sampler(model, torch.tensor([1]), seeds=[0])
    (key,) = state["costs"]
    ended_in_ar = 0
    for seed in range(20):  # windows cheap: width 2 until one token is left, then one AR step
        state["costs"][key] = {1: 1.0, 2: 0.5}
        state["books"][key] = {"tried": {2: TRIAL_STEPS}, "gain": {2: [5.0, 10]}, "slow": [0.0, 0.0],
                               "cold": [10.0, 10]}
        sampler(model, torch.tensor([1]), seeds=[seed])
        if sampler.last_widths[-1] == 1 and sampler.last_widths[-2] == 2:
            ended_in_ar += 1
            assert state["costs"][key][1] == 1.0
    assert ended_in_ar > 0
