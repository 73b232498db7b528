"""Speculative samplers (SJD, GSD, MC-SJD): exactness, step bookkeeping, cache rewind, ragged batches.

Exactness is tested two ways, each with a chi-square test at a fixed seed (deterministic):
* on a Markov chain posing as a generator (image token k depends on the class, k and token
  k-1), whose exact per-position pair distributions are matrix products: every consecutive pair
  (x_{k-1}, x_k) of 20000 samples must fit, p > 1e-4 per pair (<= 2e-3 family-wise per config);
* on a tiny random GPT (vocab 16, 9 tokens): the joint of image tokens (1, 2), computed exactly by teacher
  forcing, must fit 4000 samples (p > 1e-3), and every position's marginal must match 4000 AR
  samples (two-sample chi-square, p > 1e-4 per position).
"""


from types import SimpleNamespace

import pytest
import torch
from scipy.stats import chi2, chi2_contingency

from argen.errors import ArgenError
from argen.samplers import ARSampler, SamplingParams, logits_to_probs
from argen.samplers.gsd import GSDSampler, grouped_ratio
from argen.samplers.mcsjd import MCSJDSampler
from argen.samplers import SAMPLERS

SPECULATIVE_SAMPLERS = {k: v for k, v in SAMPLERS.items() if k != "ar"}
from argen.samplers.sjd import SJDSampler
from argen.samplers.rng import sample_rows
from argen.samplers.speculative import cfg_rows, window_inputs

from helpers import assert_rows_as_if_alone, left_padded_captions, tiny_gpt, tiny_t2i

# ---- a Markov chain posing as a generator ----------------------------------------------------


class MarkovCache:
    def __init__(self, rows, max_len):
        self.max_len, self.lengths, self.cond = max_len, torch.zeros(rows, dtype=torch.long), None

    def rewind(self, lengths):
        self.lengths = torch.as_tensor(lengths).expand(len(self.lengths)).clone()


class MarkovContract:
    """What the Markov-chain generators share: the members of the generator contract that
    samplers use (argen.models.base), for a class condition whose null class is `classes`.
    Subclasses set `first` (the logits of position 0 per class), `classes`, `embeddings` and
    define `decode`."""

    supports_cfg = True
    condition_kind = "class"

    def token_embeddings(self):
        return self.embeddings.weight

    def check_condition(self, cond, cond_mask=None):
        pass

    def condition_length(self, cond):
        return 1

    def null_condition(self, cond):
        return torch.full_like(cond, self.classes)

    def new_cache(self, rows, max_len=None):
        return MarkovCache(rows, max_len)

    def prefill(self, cond, cache, cond_mask=None):
        cache.cond = cond
        return self.first[cond]


class MarkovModel(MarkovContract):
    """Image token k ~ softmax(table[class, k, token k-1]) (token 0: first[class]); the class
    `classes` is the null condition, so CFG, cfg_interval and the filters all apply."""

    tokens_per_position = 1

    def __init__(self, vocab=6, length=9, classes=2, seed=0, scale=1.5):
        g = torch.Generator().manual_seed(seed)
        self.first = torch.randn(classes + 1, vocab, generator=g) * scale
        self.table = torch.randn(classes + 1, length, vocab, vocab, generator=g) * scale
        side = int(length ** 0.5)
        self.num_positions, self.vocab_size, self.grid = length, vocab, (side, length // side)
        self.embeddings = torch.nn.Embedding(vocab, 3)
        self.classes = classes

    def decode(self, tokens, input_pos, cache):
        pos = input_pos.expand_as(tokens)
        assert int(pos.max()) < cache.max_len
        # the token at sequence position p is image token p - 1 and predicts image token p
        k = pos.clamp(max=self.num_positions - 1)
        return self.table[cache.cond[:, None], k, tokens]

    def exact_pairs(self, cls, params):
        """[(joint of image tokens k-1, k) as a [V, V] matrix] for k = 1..N-1."""
        def probs(cond_logits, uncond_logits, k):
            logits = torch.cat([cond_logits, uncond_logits]) if params.uses_cfg else cond_logits
            return logits_to_probs(logits, params, params.guided_at(k)).double()

        pi = probs(self.first[cls][None], self.first[self.classes][None], 0)[0]
        pairs = []
        for k in range(1, self.num_positions):
            step = probs(self.table[cls, k], self.table[self.classes, k], k)
            pairs.append(pi[:, None] * step)
            pi = pairs[-1].sum(0)
        return pairs


def goodness_of_fit(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square p-value of counts against probs (cells expecting < 5 are pooled; a sample in a
    zero-probability cell fails outright)."""
    counts, probs = counts.flatten().double(), probs.flatten().double()
    assert counts[probs == 0].sum() == 0, "a sample landed on a zero-probability outcome"
    expected = probs * counts.sum()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    if exp[-1] < 5:  # fold a tiny pooled cell into the smallest big one
        obs, exp = obs[:-1].clone(), exp[:-1].clone()
        obs[exp.argmin()] += counts[~big].sum()
        exp[exp.argmin()] += expected[~big].sum()
    if len(obs) < 2:  # a single possible outcome, and the samples took it
        return 1.0
    stat = float(((obs - exp) ** 2 / exp).sum())
    return float(chi2.sf(stat, len(obs) - 1))


MARKOV_PARAMS = {
    "plain": SamplingParams(),
    "cfg_topk": SamplingParams(cfg_scale=3.0, top_k=3),
    "interval_topp_temp": SamplingParams(cfg_scale=2.0, cfg_interval=3, top_p=0.8, temperature=1.3),
}


@pytest.mark.parametrize("sampler", [
    SJDSampler(window=4), SJDSampler(window=16, init="above"), MCSJDSampler(window=5),
    MCSJDSampler(window=16, init="left"),
], ids=repr)
@pytest.mark.parametrize("setting", list(MARKOV_PARAMS))
def test_lossless_on_markov_chain(sampler, setting):
    torch.manual_seed(1234)
    model, params, n = MarkovModel(), MARKOV_PARAMS[setting], 20000
    cls = 1
    out = sampler(model, torch.full((n,), cls), params=params)
    assert out.forwards_per_sample.double().mean() < model.num_positions - 1  # drafts were accepted
    assert_pairs_exact(model, out.tokens, cls, params)


def assert_pairs_exact(model, tokens, cls, params):
    """Every consecutive pair (x_{k-1}, x_k) of Markov-chain samples fits its exact joint (p > 1e-4)."""
    vocab = model.vocab_size
    for k, exact in enumerate(model.exact_pairs(cls, params), start=1):
        counts = torch.bincount(tokens[:, k - 1] * vocab + tokens[:, k], minlength=vocab * vocab)
        assert goodness_of_fit(counts, exact) > 1e-4, f"pair ({k - 1}, {k})"


# ---- the tiny GPT ---------------------------------------------------------------------------


def exact_joint_12(model, cond, params):
    """Exact joint distribution of image tokens (1, 2) for one class: [V, V]."""
    vocab = model.vocab_size
    grid = torch.cartesian_prod(torch.arange(vocab), torch.arange(vocab))  # (x0, x1)
    conds = torch.full((grid.shape[0],), cond)
    logits = model(grid, conds).detach()
    if params.uses_cfg:
        logits = torch.cat([logits, model(grid, model.null_condition(conds)).detach()])
    probs = torch.stack([logits_to_probs(logits[:, k], params, params.guided_at(k)) for k in range(3)], 1)
    p0 = probs[0, 0].double()  # every row has the same prefill distribution
    p1 = probs[::vocab, 1].double()  # [x0, x1]
    p2 = probs[:, 2].double().view(vocab, vocab, vocab)  # [x0, x1, x2]
    return (p0[:, None, None] * p1[:, :, None] * p2).sum(0)


def assert_matches_exact_and_ar(model, tokens, ar_tokens, cond, params):
    """The joint of image tokens (1, 2) fits its exact value (p > 1e-3) and every position's
    marginal matches AR samples (two-sample chi-square, p > 1e-4)."""
    vocab = model.vocab_size
    joint = torch.bincount(tokens[:, 1] * vocab + tokens[:, 2], minlength=vocab * vocab)
    assert goodness_of_fit(joint, exact_joint_12(model, cond, params)) > 1e-3
    for k in range(model.num_positions):
        table = torch.stack([torch.bincount(t[:, k], minlength=vocab) for t in (tokens, ar_tokens)])
        table = table[:, table.sum(0) > 0]
        assert chi2_contingency(table.numpy())[1] > 1e-4, f"position {k}"


@pytest.mark.parametrize("name", ["sjd", "mcsjd"])
@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(cfg_scale=2.5, top_k=8, top_p=0.9)],
                         ids=["plain", "cfg_filters"])
def test_lossless_on_tiny_gpt(name, params):
    model = tiny_gpt(vocab_size=16, dim=32, n_layer=1, multiple_of=32, block_size=9)
    n, cond = 4000, 3
    conds = torch.full((n,), cond)
    torch.manual_seed(7)
    spec = SPECULATIVE_SAMPLERS[name](window=6)(model, conds, params=params)
    ar = ARSampler()(model, conds, params=params)
    assert spec.forwards_per_sample.double().mean() < ar.num_forward_passes - 1
    assert_matches_exact_and_ar(model, spec.tokens, ar.tokens, cond, params)


class OracleSJD(SJDSampler):
    """SJD whose fresh drafts are the greedy sequence itself (one-hot q)."""

    def __init__(self, target, **kw):
        super().__init__(**kw)
        self.target = target

    def init_drafts(self, win, need, u, grid, q):
        index = win.emitted[:, None] + torch.arange(need.shape[1])
        truth = self.target.gather(1, index.clamp(max=self.target.shape[1] - 1))
        win.seq.scatter_(1, index, torch.where(need, truth, win.seq.gather(1, index)))
        q[need] = torch.nn.functional.one_hot(truth[need], q.shape[-1]).to(q.dtype)


@pytest.mark.parametrize("window,accepted", [(4, [4, 4, 4, 3]), (6, [6, 6, 3]), (16, [15])])
def test_correct_drafts_all_accepted_with_bonus_and_shrinking_window(window, accepted):
    model = tiny_gpt()
    params = SamplingParams(cfg_scale=2.0, top_k=1)  # greedy: p is one-hot
    cond = torch.tensor([2, 7])
    greedy = ARSampler(sample=False)(model, cond, params=params).tokens
    out = OracleSJD(greedy, window=window)(model, cond, params=params, seeds=[0, 1])
    assert torch.equal(out.tokens, greedy)
    assert out.accepted_per_forward == accepted  # every step: all drafts + the bonus token
    assert out.num_forward_passes == 1 + len(accepted)


@pytest.mark.parametrize("name", ["sjd", "gsd", "mcsjd"])
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_greedy_speculation_reproduces_greedy_ar(name, cfg):
    """Index alignment: with one-hot targets any off-by-one would emit a wrong token."""
    model = tiny_gpt()
    params = SamplingParams(cfg_scale=cfg, top_k=1)
    cond = torch.tensor([1, 4, 9])
    greedy = ARSampler(sample=False)(model, cond, params=params).tokens
    out = SPECULATIVE_SAMPLERS[name](window=5)(model, cond, params=params, seeds=[3, 4, 5])
    assert torch.equal(out.tokens, greedy)


def test_rewind_keeps_exactly_the_ar_cache():
    """After every step the kept cache prefix equals the cache of a plain run over the emitted
    tokens (both CFG halves), and the kept lengths are ragged across the batch."""
    model = tiny_gpt()
    params = SamplingParams(cfg_scale=2.0)
    cond = torch.tensor([0, 5, 8])
    snapshots, made = [], []
    original = model.new_cache

    def new_cache(*args, **kwargs):
        cache = original(*args, **kwargs)
        rewind = cache.rewind

        def recording_rewind(lengths):
            rewind(lengths)
            snapshots.append((cache.lengths.clone(), [k.clone() for k in cache.k], [v.clone() for v in cache.v]))
        cache.rewind = recording_rewind
        made.append(cache)
        return cache

    model.new_cache = new_cache
    out = SJDSampler(window=5)(model, cond, params=params, seeds=[10, 11, 12])
    del model.new_cache
    tokens = torch.cat([out.tokens, out.tokens])
    ref = model.new_cache(6, 17)
    model.prefill(torch.cat([cond, model.null_condition(cond)]), ref)
    model.decode(tokens[:, :-1], torch.arange(1, 16), ref)
    assert len(snapshots) == out.num_forward_passes - 1
    assert any(len(set(s[0].tolist())) > 1 for s in snapshots)  # ragged
    for lengths, ks, vs in snapshots:
        assert torch.equal(lengths[:3], lengths[3:])
        for row, length in enumerate(lengths.tolist()):
            for layer in range(len(ks)):
                torch.testing.assert_close(ks[layer][row, :, :length], ref.k[layer][row, :, :length], atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(vs[layer][row, :, :length], ref.v[layer][row, :, :length], atol=1e-5, rtol=1e-4)
    assert made[0].lengths.tolist() == [16] * 6


BATCH_PARAMS = [SamplingParams(), SamplingParams(cfg_scale=3.0, top_k=20),
                SamplingParams(cfg_scale=2.0, cfg_interval=4, top_p=0.8, temperature=0.9)]


@pytest.mark.parametrize("sampler", [SJDSampler(window=6), GSDSampler(group_size=4, window=8),
                                     MCSJDSampler(window=16, init="above")], ids=repr)
@pytest.mark.parametrize("params", BATCH_PARAMS, ids=["plain", "cfg_topk", "interval_topp"])
def test_ragged_batch_equals_batch_of_one(sampler, params):
    model = tiny_gpt()
    cond, seeds = torch.tensor([3, 3, 6, 1, 9]), [21, 22, 23, 24, 25]
    batch = sampler(model, cond, params=params, seeds=seeds)
    assert_rows_as_if_alone(sampler, model, cond, params, seeds, batch)


def test_one_row_feeds_shared_positions_and_cfg_doubles_only_per_row_ones():
    """A forward of one row takes the cache's shared-position path (the rows above show it gives the
    same samples as a batch's per-row positions); CFG doubles the tokens and only per-row positions."""
    seq = torch.arange(48).view(2, 24)  # 20 image tokens and scratch columns, as the samplers keep them
    tokens, pos = window_inputs(seq[:1], torch.tensor([5]), 4, 1, 20)
    assert torch.equal(tokens, seq[:1, 4:8]) and torch.equal(pos, torch.arange(5, 9)[None])
    for cfg in (True, False):
        both_tokens, both_pos = cfg_rows(tokens, pos, cfg)
        assert both_tokens.shape == (2 if cfg else 1, 4) and torch.equal(both_pos, torch.arange(5, 9))
    tokens, pos = window_inputs(seq, torch.tensor([5, 18]), 4, 1, 20)
    assert torch.equal(pos, torch.tensor([[5, 6, 7, 8], [18, 19, 20, 20]]))  # past the image: the spare slot
    assert torch.equal(cfg_rows(tokens, pos, True)[1], torch.cat([pos, pos]))
    assert cfg_rows(tokens, pos, False)[1] is pos


@pytest.mark.parametrize("name", ["sjd", "gsd", "mcsjd"])
def test_ragged_batch_equals_batch_of_one_t2i(name):
    model = tiny_t2i()
    feats, mask = left_padded_captions(4, 6, 12, lengths=[6, 2, 4, 1])
    seeds = [5, 6, 7, 8]
    params = SamplingParams(cfg_scale=2.0, top_k=30)
    sampler = SPECULATIVE_SAMPLERS[name](window=7)
    batch = sampler(model, feats, cond_mask=mask, params=params, seeds=seeds)
    for i in (1, 3):
        alone = sampler(model, feats[i:i + 1], cond_mask=mask[i:i + 1], params=params, seeds=seeds[i:i + 1])
        assert torch.equal(alone.tokens[0], batch.tokens[i])


def test_gsd_with_group_of_one_is_sjd():
    model = tiny_gpt()
    cond, seeds = torch.arange(6), list(range(6))
    for params in BATCH_PARAMS[:2]:
        sjd = SJDSampler(window=8)(model, cond, params=params, seeds=seeds)
        gsd = GSDSampler(group_size=1, window=8)(model, cond, params=params, seeds=seeds)
        assert torch.equal(sjd.tokens, gsd.tokens)
        assert sjd.accepted_per_forward == gsd.accepted_per_forward


def test_gsd_groups_raise_acceptance():
    model = tiny_gpt()
    cond, seeds = torch.arange(10).repeat(3), list(range(30))
    params = SamplingParams(cfg_scale=2.0, top_k=32)
    nfe = {g: GSDSampler(group_size=g, prob_threshold=1.0, embed_quantile=1.0, window=8)(
        model, cond, params=params, seeds=seeds).forwards_per_sample.double().mean() for g in (1, 4, 12)}
    assert nfe[12] < nfe[4] < nfe[1] - 1.0


def test_grouped_ratio_groups_rank_neighbours_and_filters():
    p = torch.tensor([[[0.05, 0.30, 0.10, 0.25, 0.0, 0.30]]])
    q = torch.full_like(p, 1 / 6)
    x = torch.tensor([[2]])  # p-order (ties by id): 4, 0, [2], 3, 1, 5
    inf = float("inf")
    # G=3: one below (0) and one above (3)
    torch.testing.assert_close(grouped_ratio(p, q, x, 3, 1.0, None, inf), torch.tensor([[0.40 / 0.5]]))
    # G=5: two below (4, 0), two above (3, 1); the probability filter 0.16 drops token 1 (|0.30-0.10|)
    torch.testing.assert_close(grouped_ratio(p, q, x, 5, 0.16, None, inf), torch.tensor([[0.40 / (4 / 6)]]))
    # the embedding filter: only token 3 is close to token 2
    embed = torch.tensor([[0.0], [5.0], [1.0], [1.1], [9.0], [7.0]])
    torch.testing.assert_close(grouped_ratio(p, q, x, 5, 1.0, embed, 0.5), torch.tensor([[0.35 / (2 / 6)]]))
    # a draft with p = 0 is never accepted, whatever its group holds
    assert grouped_ratio(p, q, torch.tensor([[4]]), 5, 1.0, None, inf).item() == 0.0


def test_gsd_accepts_a_codebook_and_rejects_bad_options():
    model = tiny_gpt()
    codebook = torch.nn.functional.normalize(torch.randn(64, 8), dim=-1)
    out = GSDSampler(group_size=5, embeddings=codebook)(model, torch.tensor([1, 2]), seeds=[0, 1])
    assert out.tokens.shape == (2, 16)
    with pytest.raises(ArgenError):
        GSDSampler(group_size=5, embeddings=torch.randn(10, 8))(model, torch.tensor([1]), seeds=[0])
    # embeddings="codebook": the tokenizer's codebook, handed over by prepare(); without it, one line
    with pytest.raises(ArgenError, match="no codebook"):
        GSDSampler(group_size=5, embeddings="codebook")(model, torch.tensor([1]), seeds=[0])
    tokenizer = SimpleNamespace(codebook_embeddings=lambda: codebook)
    again = GSDSampler(group_size=5, embeddings="codebook").prepare(tokenizer=tokenizer)
    assert torch.equal(again(model, torch.tensor([1, 2]), seeds=[0, 1]).tokens, out.tokens)
    for bad in (dict(group_size=0), dict(prob_threshold=0.0), dict(embed_quantile=0.0), dict(embed_quantile=1.5),
                dict(embeddings="vectors")):
        with pytest.raises(ArgenError):
            GSDSampler(**bad)
    for bad in (dict(window=0), dict(window=2.5), dict(init="diagonal")):
        with pytest.raises(ArgenError):
            SJDSampler(**bad)


@pytest.mark.parametrize("name", ["sjd", "gsd", "mcsjd"])
def test_counters_short_images_and_global_rng(name):
    model = tiny_gpt()
    sampler = SPECULATIVE_SAMPLERS[name]()
    out = sampler(model, torch.tensor([1, 2]), num_tokens=5, seeds=[0, 1])
    assert out.tokens.shape == (2, 5)
    assert len(out.accepted_per_forward) == out.num_forward_passes - 1
    assert 1 <= out.mean_accepted_per_forward <= 4
    alone = sampler(model, torch.tensor([2]), num_tokens=5, seeds=[1])
    assert sum(alone.accepted_per_forward) == pytest.approx(4)  # the 4 tokens after the prefill one
    one = sampler(model, torch.tensor([1]), num_tokens=1, seeds=[0])
    assert one.num_forward_passes == 1 and one.tokens.shape == (1, 1)
    torch.manual_seed(3)
    a = sampler(model, torch.tensor([1, 2]))
    torch.manual_seed(3)
    b = sampler(model, torch.tensor([1, 2]))
    assert torch.equal(a.tokens, b.tokens)


def test_window_of_one_is_ar_in_step_count():
    model = tiny_gpt()
    out = SJDSampler(window=1)(model, torch.tensor([1, 2]), seeds=[0, 1])
    assert out.num_forward_passes == 16 and out.accepted_per_forward == [1.0] * 15


def test_sample_rows_inverts_the_cdf():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5]])
    assert sample_rows(probs, torch.tensor([0.0], dtype=torch.float64)).item() == 1
    assert sample_rows(probs, torch.tensor([0.5], dtype=torch.float64)).item() == 3
    assert sample_rows(probs * 3, torch.tensor([0.999], dtype=torch.float64)).item() == 3


def test_covering_width_is_the_window_or_a_power_of_two_near_the_end():
    """Near the image's end the forward stays one of log2(L) + 1 widths (one compiled graph each)."""
    from argen.samplers.speculative import covering_width

    assert [covering_width(left, 16) for left in (1, 2, 3, 4, 5, 9, 16, 40)] == [1, 2, 4, 4, 8, 16, 16, 16]
    assert covering_width(5, 6) == 6 and covering_width(3, 6) == 4
