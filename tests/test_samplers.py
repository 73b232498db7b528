"""The shared logits path, random streams and the AR sampler."""


import pytest
import torch

from argen.errors import ArgenError
from argen.samplers import ARSampler, SamplingParams, generate, get_sampler, logits_to_probs, process_logits
from argen.samplers.logits import filter_top_k_top_p
from argen.samplers.rng import RandomStreams, make_streams, sample_from_probs

from helpers import left_padded_captions, tiny_gpt, tiny_t2i


def test_cfg_mixes_conditional_first():
    cond, uncond = torch.tensor([[1.0, 3.0]]), torch.tensor([[2.0, 0.0]])
    params = SamplingParams(cfg_scale=3.0)
    mixed = process_logits(torch.cat([cond, uncond]), params)
    torch.testing.assert_close(mixed, uncond + 3.0 * (cond - uncond))
    # outside the guidance interval only the conditional half is used
    torch.testing.assert_close(process_logits(torch.cat([cond, uncond]), params, guided=False), cond)


def test_cfg_interval_counts_like_llamagen():
    # cfg_interval=5: the prefill token and decode steps 0..5 (tokens 0..6) are guided
    params = SamplingParams(cfg_scale=2.0, cfg_interval=5)
    assert [params.guided_at(n) for n in range(9)] == [True] * 7 + [False] * 2
    assert all(SamplingParams(cfg_scale=2.0).guided_at(n) for n in range(300))
    assert not SamplingParams(cfg_scale=1.0).guided_at(0)


def test_temperature_before_filtering():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    probs = logits_to_probs(logits, SamplingParams(temperature=0.5))
    torch.testing.assert_close(probs, torch.softmax(logits / 0.5, -1))


def test_top_k_keeps_ties_and_top_p_keeps_crossing_token():
    logits = torch.tensor([[5.0, 3.0, 3.0, 1.0]])
    kept = filter_top_k_top_p(logits, top_k=2, top_p=1.0)
    assert torch.isfinite(kept).tolist() == [[True, True, True, False]]
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = filter_top_k_top_p(probs.log(), top_k=0, top_p=0.6)
    # cumulative 0.5, 0.8, ...: the token crossing 0.6 (index 1) survives, the rest go
    assert torch.isfinite(kept).tolist() == [[True, True, False, False]]
    kept = filter_top_k_top_p(probs.log(), top_k=0, top_p=0.01)
    assert torch.isfinite(kept).tolist() == [[True, False, False, False]]


def test_bad_sampling_params():
    for bad in (dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1), dict(temperature=-1.0)):
        with pytest.raises(ArgenError):
            SamplingParams(**bad)


def test_stream_sampling_follows_probabilities_and_skips_zeros():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2]).expand(4000, 5).contiguous()
    streams = RandomStreams.from_seeds(range(4000))
    drawn = sample_from_probs(probs, streams)
    counts = torch.bincount(drawn, minlength=5).double()
    assert counts[0] == 0 and counts[2] == 0
    expected = probs[0].double() * 4000
    nz = expected > 0
    chi2 = (((counts[nz] - expected[nz]) ** 2) / expected[nz]).sum().item()
    assert chi2 < 13.8  # chi-square, 2 dof, p = 0.001


def test_buffered_streams_give_each_generator_its_own_float64_sequence():
    """Streams draw ahead in blocks; row i must still read generator i's numbers in order,
    however the calls split them (and across a block boundary, and after subset())."""
    seeds = [3, 99, 12345]
    streams = RandomStreams.from_seeds(seeds)
    sizes = [(1,), (7,), (2, 3), (RandomStreams.BLOCK - 5,), (RandomStreams.BLOCK + 40,), (13,)]
    got = torch.cat([streams.uniform(*shape).flatten(1) for shape in sizes], dim=1)
    total = got.shape[1]
    for row, seed in enumerate(seeds):
        direct = torch.rand(total, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        assert torch.equal(got[row], direct)
    part = streams.subset([2, 0])
    after = torch.cat([torch.rand(total + 9, generator=torch.Generator().manual_seed(s), dtype=torch.float64)[total:]
                       for s in (seeds[2], seeds[0])]).view(2, 9)
    assert torch.equal(part.uniform(9), after)


def test_uniform_rows_continue_each_stream_as_uniform_does():
    """`uniform_rows(n)` yields row i's next n numbers (buffered ones first), one row at a time."""
    seeds = [3, 99]
    a, b = RandomStreams.from_seeds(seeds), RandomStreams.from_seeds(seeds)
    for n in (5, RandomStreams.BLOCK, 3 * RandomStreams.BLOCK + 7, 2):  # from the buffer, past it, fresh
        rows = torch.stack([row.clone() for row in a.uniform_rows(n)])
        assert torch.equal(rows, b.uniform(n))
    assert torch.equal(a.uniform(11), b.uniform(11))


def test_make_streams_validation():
    with pytest.raises(ArgenError):
        make_streams(2, seeds=[1])
    with pytest.raises(ArgenError):
        make_streams(2, seeds=[1, 2], generator=torch.Generator())
    assert make_streams(3) is None
    assert len(make_streams(3, generator=torch.Generator().manual_seed(0))) == 3


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_per_sample_seeds_are_batch_size_invariant_c2i(cfg):
    model = tiny_gpt()
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    seeds = [100 + i for i in range(8)]
    params = SamplingParams(cfg_scale=cfg, top_k=20)
    batch = ARSampler()(model, labels, params=params, seeds=seeds).tokens
    for i in (0, 5):
        alone = ARSampler()(model, labels[i:i + 1], params=params, seeds=seeds[i:i + 1]).tokens
        assert torch.equal(alone[0], batch[i])
    assert not torch.equal(batch[0], batch[1])


def test_per_sample_seeds_are_batch_size_invariant_t2i():
    model = tiny_t2i()
    feats, mask = left_padded_captions(8, 6, 12, lengths=[6, 5, 4, 3, 2, 1, 6, 3])
    seeds = list(range(8))
    params = SamplingParams(cfg_scale=2.0, top_p=0.9)
    batch = ARSampler()(model, feats, cond_mask=mask, params=params, seeds=seeds).tokens
    alone = ARSampler()(model, feats[3:4], cond_mask=mask[3:4], params=params, seeds=seeds[3:4]).tokens
    assert torch.equal(alone[0], batch[3])


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
@torch.no_grad()
def test_fp32_logits_of_a_row_are_the_same_bits_at_any_batch_size(threads):
    """MKL sums products of 1 to 3 rows in another order than larger ones (about 1e-6 apart at
    default-c2i's shapes), enough to flip a sampled token now and then, and on two threads it splits
    5-7 or 9-11 rows into parts of fewer than 4. The generators' linears pad every product to a
    multiple of 4 rows (`BatchInvariantLinear`), so a row's prefill and decode-step logits are the
    same bits alone, in a pair (one image with CFG), in odd batches and in a batch of 16."""
    model = tiny_gpt(dim=256, n_head=4, vocab_size=1024, block_size=16)
    labels = torch.arange(16) % 10
    tokens = torch.randint(0, 1024, (16, 4), generator=torch.Generator().manual_seed(0))

    def logits(rows):
        cache = model.new_cache(len(rows), 6)
        out = [model.prefill(labels[rows], cache)]
        out += [model.decode(tokens[rows, t:t + 1], torch.tensor([1 + t]), cache)[:, -1] for t in range(4)]
        return torch.stack(out, 1)

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        batch = logits(list(range(16)))
        for rows in ([3], [0, 1], [5, 6, 7], list(range(5)), list(range(2, 8)), list(range(9, 16)),
                     list(range(1, 10)), list(range(11))):
            assert torch.equal(logits(rows), batch[rows]), f"{len(rows)} rows on {threads} thread(s)"
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def test_t2i_decode_logits_are_the_same_bits_at_any_batch_size_on_three_threads():
    """PyTorch's fused CPU attention rounded a row by how the batch split between threads: on three threads
    default-t2i's decode-step logits parted at step 7 between batch 3 and 16 (and 1 of 16 images sampled other
    tokens). Sampling attends through `masked_attention`, written out per (row, head)."""
    from argen.pipeline import ARPipeline

    pipe = ARPipeline.from_pretrained("default-t2i")
    model = pipe.generator
    conds = pipe.conditions(prompt=["a pair of sneakers", "a red dress with long sleeves", "ankle boots", "a bag"] * 4)
    tokens = torch.randint(0, model.vocab_size, (16, 12), generator=torch.Generator().manual_seed(0))

    def logits(rows):
        cache = model.new_cache(len(rows), 13)
        out = [model.prefill(conds.cond[rows], cache, conds.mask[rows] if conds.mask is not None else None)]
        out += [model.decode(tokens[rows, t:t + 1], torch.tensor([1 + t]), cache)[:, -1] for t in range(12)]
        return torch.stack(out, 1)

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        batch = logits(list(range(16)))
        for rows in ([8], [6, 7, 8], list(range(5, 10)), list(range(9, 16))):
            assert torch.equal(logits(rows), batch[rows]), f"{len(rows)} rows"
    finally:
        torch.set_num_threads(before)


def test_same_seed_same_tokens_and_counters():
    model = tiny_gpt()
    a = ARSampler()(model, torch.tensor([1, 2]), seeds=[5, 6])
    b = ARSampler()(model, torch.tensor([1, 2]), seeds=[5, 6])
    assert torch.equal(a.tokens, b.tokens)
    assert a.num_forward_passes == 16 and a.mean_accepted_per_forward == 1.0


@pytest.mark.parametrize("spec", ["ar", "auto:L=4", "mcsjd:L=4"])
def test_sampling_runs_in_inference_mode_and_hands_back_ordinary_tensors(spec):
    """The loop runs in inference mode (its speed: a dispatcher layer less per op), yet the caller gets
    tensors it may update in place and feed to autograd, and the tokens of a no_grad run."""
    model = tiny_gpt()
    modes = []
    hook = model.layers[0].register_forward_pre_hook(lambda *_: modes.append(torch.is_inference_mode_enabled()))
    sampler = get_sampler(spec)
    out = sampler(model, torch.tensor([1, 2]), params=SamplingParams(cfg_scale=2.0), seeds=[5, 6])
    hook.remove()
    assert modes and all(modes)
    assert not out.tokens.is_inference() and not out.nfe_per_sample.is_inference()
    out.tokens.add_(0)  # an inference tensor refuses this outside inference mode
    with torch.no_grad():
        old = sampler._sample(model, torch.tensor([1, 2]), None, model.num_positions, SamplingParams(cfg_scale=2.0),
                              make_streams(2, [5, 6], None), False)
    assert torch.equal(old.tokens, out.tokens)


def test_ar_sampler_matches_teacher_forced_distribution_greedy():
    """Greedy AR tokens are the argmax of the teacher-forced logits of their own sequence."""
    model = tiny_gpt()
    cond = torch.tensor([4, 9])
    tokens = ARSampler(sample=False)(model, cond).tokens
    logits = model(tokens[:, :-1], cond)
    assert torch.equal(logits.argmax(-1), tokens)


def test_generate_signature_and_errors():
    model = tiny_gpt()
    out = generate(model, torch.tensor([1, 2, 3]), 10, cfg_scale=1.5, top_k=5)
    assert out.shape == (3, 10) and out.dtype == torch.int32
    with pytest.raises(ArgenError, match="class id"):
        generate(model, torch.tensor([11]), 4)
    with pytest.raises(ArgenError, match="num_tokens"):
        generate(model, torch.tensor([1]), 17)
    with pytest.raises(ArgenError):
        get_sampler("nope")
    no_null = tiny_gpt(class_dropout_prob=0.0)
    with pytest.raises(ArgenError, match="null condition|condition dropout"):
        generate(no_null, torch.tensor([1]), 4, cfg_scale=2.0)


def test_token_id_out_of_vocab_is_rejected():
    model = tiny_gpt()
    with pytest.raises(ArgenError, match="token id"):
        model(torch.tensor([[64]]), torch.tensor([1]))


def test_get_sampler_takes_specs_with_options():
    from argen.samplers import GSDSampler, get_sampler

    gsd = get_sampler("gsd:G=3,L=8")
    assert isinstance(gsd, GSDSampler) and gsd.group_size == 3 and gsd.window == 8
    assert get_sampler("gsd:G=3", window=4).window == 4  # keyword options on top of the spec
    for bad in ("nope", "gsd:G", "ar:bogus=1"):
        with pytest.raises(ArgenError):
            get_sampler(bad)
