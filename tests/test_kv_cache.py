"""The sampling contract (prefill / decode / rewind) agrees with teacher forcing."""

import pytest
import torch

from argen.models import GPT, GPTConfig
from argen.samplers import ARSampler, SamplingParams, get_sampler

from helpers import left_padded_captions, tiny_gpt, tiny_t2i

TOL = dict(atol=1e-5, rtol=1e-5)


def cached_logits_one_by_one(model, cond, tokens, cond_mask=None):
    """Logits predicting tokens[:, 0..N-1], fed one token per forward."""
    t = model.condition_length(cond)
    cache = model.new_cache(cond.shape[0], t + tokens.shape[1])
    out = [model.prefill(cond, cache, cond_mask)]
    for n in range(tokens.shape[1] - 1):
        out.append(model.decode(tokens[:, n:n + 1], torch.tensor([t + n]), cache)[:, -1])
    return torch.stack(out, dim=1)


def teacher_forced(model, cond, tokens, cond_mask=None):
    t = model.condition_length(cond)
    return model(tokens[:, :-1], cond, mask=cond_mask)[:, t - 1:]


@pytest.mark.parametrize("overrides", [
    {},  # square grid, 2D RoPE
    {"rope_type": "1d", "block_size": 12},
    {"block_size": 12, "grid_size": (3, 4)},  # non-square grid
])
@torch.no_grad()
def test_c2i_decode_matches_teacher_forcing(overrides):
    model = tiny_gpt(**overrides)
    n = model.num_positions
    cond = torch.tensor([1, 5, 10])  # 10 = null class
    tokens = torch.randint(0, 64, (3, n))
    torch.testing.assert_close(cached_logits_one_by_one(model, cond, tokens), teacher_forced(model, cond, tokens), **TOL)


@torch.no_grad()
def test_t2i_left_padded_decode_matches_teacher_forcing():
    model = tiny_t2i()
    feats, mask = left_padded_captions(3, 6, 12, lengths=[6, 3, 1])
    tokens = torch.randint(0, 64, (3, 16))
    expected = teacher_forced(model, feats, tokens, mask)
    torch.testing.assert_close(cached_logits_one_by_one(model, feats, tokens, mask), expected, **TOL)
    # the mask matters: without it the padded slots would be attended to
    assert not torch.allclose(cached_logits_one_by_one(model, feats, tokens, None), expected, atol=1e-3)


@torch.no_grad()
def test_window_decode_and_rewind_match_one_token_decode():
    model = tiny_gpt()
    cond, tokens = torch.tensor([2, 7]), torch.randint(0, 64, (2, 16))
    reference = cached_logits_one_by_one(model, cond, tokens)
    cache = model.new_cache(2, 17)
    model.prefill(cond, cache)
    # verify a window of 6 drafts at once: first 3 are "right" (the real tokens), rest garbage
    window = torch.cat([tokens[:, :3], torch.randint(0, 64, (2, 3))], dim=1)
    logits = model.decode(window, torch.arange(1, 7), cache)
    torch.testing.assert_close(logits[:, :3], reference[:, 1:4], **TOL)
    cache.rewind(4)  # keep condition + 3 tokens; the 3 garbage slots are dropped
    assert cache.lengths.tolist() == [4, 4]
    logits = model.decode(tokens[:, 3:8], torch.arange(4, 9), cache)
    torch.testing.assert_close(logits, reference[:, 4:9], **TOL)
    with pytest.raises(ValueError):
        cache.rewind(12)


@torch.no_grad()
def test_per_row_positions_ragged():
    """Rows at different positions in one forward (ragged speculative batches)."""
    model = tiny_gpt()
    cond, tokens = torch.tensor([3, 4]), torch.randint(0, 64, (2, 16))
    reference = cached_logits_one_by_one(model, cond, tokens)
    cache = model.new_cache(2, 17)
    model.prefill(cond, cache)
    model.decode(tokens[:, :5], torch.arange(1, 6), cache)
    cache.rewind(torch.tensor([6, 3]))  # row 0 kept 5 tokens, row 1 only 2
    pos = torch.tensor([[6, 7], [3, 4]])
    window = torch.stack([tokens[0, 5:7], tokens[1, 2:4]])
    logits = model.decode(window, pos, cache)
    torch.testing.assert_close(logits[0], reference[0, 6:8], **TOL)
    torch.testing.assert_close(logits[1], reference[1, 3:5], **TOL)


@torch.no_grad()
def test_cache_is_not_left_on_the_model():
    model = tiny_gpt()
    keys = set(model.state_dict())
    cond, tokens = torch.tensor([1]), torch.randint(0, 64, (1, 16))
    before = model(tokens[:, :-1], cond)
    ARSampler()(model, torch.tensor([1, 2]), params=SamplingParams(cfg_scale=2.0), seeds=[0, 1])
    assert set(model.state_dict()) == keys
    torch.testing.assert_close(model(tokens[:, :-1], cond), before, atol=0, rtol=0)


def test_named_sizes_have_official_parameter_counts():
    # exact counts from the official constructors (shared/docs/llamagen.md, table 2.1)
    expected = {"GPT-B": 110_888_448, "GPT-L": 342_910_976}
    for name, count in expected.items():
        config = GPTConfig.from_name(name, vocab_size=16384, num_classes=1000, block_size=256)
        with torch.device("meta"):
            model = GPT(config)
        assert model.num_parameters() == count, name
    assert GPTConfig.from_name("GPT-3B").head_dim == 100
    assert GPTConfig.from_name("GPT-XL").ffn_hidden_dim == 3584


@torch.no_grad()
def test_compiled_decode_matches_eager_and_samples_the_same_tokens():
    eager = tiny_gpt()
    compiled = tiny_gpt()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_decode()
    assert "decode" in vars(compiled) and "decode" not in vars(eager)  # only this instance changed
    cond = torch.tensor([1, 5, 10])
    tokens = torch.randint(0, 64, (3, eager.num_positions))
    torch.testing.assert_close(cached_logits_one_by_one(compiled, cond, tokens),
                               cached_logits_one_by_one(eager, cond, tokens), **TOL)
    params = SamplingParams(cfg_scale=2.0, top_k=0)
    labels = torch.tensor([1, 5])
    for sampler in (ARSampler(), get_sampler("mcsjd:L=4")):  # one static shape; several window widths
        expect = sampler(eager, labels, params=params, seeds=[3, 4]).tokens
        assert torch.equal(sampler(compiled, labels, params=params, seeds=[3, 4]).tokens, expect)
