"""The sampling contract (prefill / decode / rewind) agrees with teacher forcing."""

import copy

import pytest
import torch

from argen.errors import ArgenError
from argen.models import GPT, GPTConfig
from argen.models.base import COMPILE_MODES
from argen.models.cache import KVCache
from argen.models.quant import BatchInvariantLinear
from argen.samplers import ARSampler, SamplingParams, get_sampler
from argen.samplers.ar import sample_step
from argen.samplers.auto import AutoSampler, window_step
from argen.samplers.base import compiled_step

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


def prefix_forward(model, cond, cache):
    """The condition's own forward into `cache`: what `prefill` runs for a prefix it does not remember."""
    cache.set_condition_mask(1, None)
    return model.prefix_logits(cond, torch.arange(1), cache)


@pytest.mark.parametrize("kind", ["gpt", "token-shuffle"])
def test_a_remembered_class_prefix_is_the_forwards_bits_and_follows_the_weights(kind):
    from test_token_shuffle import tiny_shuffle

    model = tiny_gpt(num_classes=40) if kind == "gpt" else tiny_shuffle(num_classes=40)
    with torch.inference_mode():  # a bare model runs every prefix's forward (its hooks see each call)
        model.prefill(torch.tensor([3]), model.new_cache(1, 8))
    assert "_prefix_memo" not in model.__dict__
    model.remembers_class_prefixes = True  # as a pipeline sets it
    batches = [[3], [3, 40], [39, 17, 40, 3, 0, 0], list(range(41))]  # 40 is the null class; ids in 3 blocks

    def check_against_the_forward():
        for ids in batches:
            cond = torch.tensor(ids)
            with torch.inference_mode():
                remembered, fresh = model.new_cache(len(ids), 8), model.new_cache(len(ids), 8)
                logits = model.prefill(cond, remembered)
                assert torch.equal(logits, prefix_forward(model, cond, fresh))
            assert all(torch.equal(a, b) for a, b in zip(remembered.k + remembered.v, fresh.k + fresh.v))
            assert torch.equal(remembered.lengths, fresh.lengths)

    check_against_the_forward()
    calls = []
    model.layers[0].register_forward_hook(lambda *args: calls.append(1))
    with torch.inference_mode():
        model.prefill(torch.tensor([5, 40, 22]), model.new_cache(3, 8))
    assert not calls  # every id's prefix came from memory: no forward ran
    with torch.no_grad():
        model.layers[1].attention.wqkv.weight.mul_(1.5)  # a weight stepped in place
    check_against_the_forward()
    assert calls  # the changed weights were run


@pytest.mark.parametrize("kind", ["gpt", "token-shuffle"])
def test_a_model_loaded_in_inference_mode_samples_as_one_loaded_outside_it(kind):
    """Weights made in inference mode keep no version counter: the derived tensors' keys (remembered prefixes,
    token-shuffle's folded head) must still work, and the samples are the same."""
    from test_token_shuffle import tiny_shuffle

    def build():
        model = tiny_gpt() if kind == "gpt" else tiny_shuffle()
        model.remembers_class_prefixes = True
        return model

    params, cond = SamplingParams(cfg_scale=2.0), torch.tensor([1, 4])
    outside = ARSampler()(build(), cond, params=params, seeds=[0, 1]).tokens
    with torch.inference_mode():
        model = build()
        assert all(p.is_inference() for p in model.parameters())
        inside = ARSampler()(model, cond, params=params, seeds=[0, 1]).tokens
    assert torch.equal(inside, outside)


def window_logits(model, cond, tokens):
    """Prefill, then one forward over every token (logits of each position)."""
    with torch.inference_mode():
        cache = model.new_cache(cond.shape[0], 1 + tokens.shape[1])
        first = model.prefill(cond, cache)
        return first, model.decode(tokens, torch.arange(1, 1 + tokens.shape[1]), cache)


@pytest.mark.parametrize("kind", ["gpt", "token-shuffle"])
def test_prepared_for_sampling_the_linears_are_column_major_and_every_logit_is_the_same(kind):
    from test_token_shuffle import tiny_shuffle

    def build():
        return tiny_gpt() if kind == "gpt" else tiny_shuffle()

    model = build()
    k = model.tokens_per_position
    cond = torch.tensor([1, 4, 10, 10])  # the last two: CFG's null class
    tokens = torch.randint(0, model.vocab_size, (4, 3) if k == 1 else (4, 3, k), generator=torch.Generator().manual_seed(0))
    bare = window_logits(model, cond, tokens)
    model.prepare_for_sampling()
    linears = [m for m in model.modules() if type(m) is BatchInvariantLinear]
    assert linears and all(m.weight.t().is_contiguous() and not m.weight.is_contiguous() for m in linears)
    prepared = window_logits(model, cond, tokens)
    assert all(torch.equal(a, b) for a, b in zip(bare, prepared))
    # a weight format converts from the layout it was written for: as from a bare model
    model.set_weight_format("bf16")
    reference = build().set_weight_format("bf16")
    assert all(torch.equal(a, b) for a, b in zip(window_logits(model, cond, tokens), window_logits(reference, cond, tokens)))


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
    # only this instance changed; the prefix's forward is compiled with the step
    assert {"decode", "prefix_logits"} <= set(vars(compiled)) and "decode" not in vars(eager)
    # a speculative sampler's windows need a graph per width: dynamo's default cap of 8 made a
    # fullgraph compile fail part-way through an MC-SJD L=16 benchmark
    assert torch._dynamo.config.recompile_limit >= 64
    cond = torch.tensor([1, 5, 10])
    tokens = torch.randint(0, 64, (3, eager.num_positions))
    torch.testing.assert_close(cached_logits_one_by_one(compiled, cond, tokens),
                               cached_logits_one_by_one(eager, cond, tokens), **TOL)
    params = SamplingParams(cfg_scale=2.0, top_k=0)
    labels = torch.tensor([1, 5])
    for sampler in (ARSampler(), get_sampler("mcsjd:L=4")):  # one static shape; several window widths
        expect = sampler(eager, labels, params=params, seeds=[3, 4]).tokens
        assert torch.equal(sampler(compiled, labels, params=params, seeds=[3, 4]).tokens, expect)
    assert sample_step in vars(compiled)["_compiled_steps"]  # AR ran its step compiled whole
    # auto compiles its window step (the forward and the Gumbel test as one graph) as decode was
    assert compiled.compiled_with[0]["fullgraph"] and eager.compile_step(lambda: None) is None
    auto = get_sampler("auto:L=4")
    expect = auto(eager, labels, params=params, seeds=[3, 4]).tokens
    assert torch.equal(auto(compiled, labels, params=params, seeds=[3, 4]).tokens, expect)
    # AR's step, sampling included, is compiled with the model too (one graph), and each compiled
    # step is cached per model; compiled again (here in another mode), the model gets steps compiled
    # like its new decode
    assert compiled_step(eager, sample_step) is None and window_step(eager) is AutoSampler._window
    first, ar_step = window_step(compiled), compiled_step(compiled, sample_step)
    assert first is not AutoSampler._window and ar_step is not None
    assert window_step(compiled) is first and compiled_step(compiled, sample_step) is ar_step
    compiled.compile_decode(mode="max-autotune")
    assert window_step(compiled) is not first and compiled_step(compiled, sample_step) is not ar_step


@torch.no_grad()
def test_a_sampling_loop_checks_every_guard_at_its_first_compiled_step_and_outside_it(monkeypatch):
    """AR's loop checks every dynamo guard at its first compiled step, then only the ones that tell graphs
    apart (`SettledGuards`: same objects, same shapes, so the rest can only pass). Outside the loop all
    are checked again: a new batch size or guidance scale still gets its own graph and the eager tokens."""
    import argen.samplers.ar as ar
    from torch._dynamo import eval_frame

    eager, compiled = tiny_gpt(), tiny_gpt()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_decode()
    settled, real = [], ar.decode_one_token

    def spy(*args, **kwargs):
        settled.append(eval_frame._stance.skip_guard_eval_unsafe)
        return real(*args, **kwargs)

    monkeypatch.setattr(ar, "decode_one_token", spy)
    for labels, cfg in ((torch.tensor([1, 5]), 2.0), (torch.tensor([1, 5]), 4.0), (torch.tensor([3, 7, 9]), 4.0)):
        settled.clear()
        params = SamplingParams(cfg_scale=cfg, top_k=0)
        seeds = list(range(len(labels)))
        tokens = ARSampler()(compiled, labels, params=params, seeds=seeds).tokens
        assert settled == [False] + [True] * (compiled.num_positions - 2)
        assert not eval_frame._stance.skip_guard_eval_unsafe
        assert torch.equal(tokens, ARSampler()(eager, labels, params=params, seeds=seeds).tokens)
    # guidance that stops midway (cfg_interval) changes the step's graph midway: that step checks every
    # guard again (a settled check would have kept the guided graph), and the tokens are eager's
    settled.clear()
    labels, params = torch.tensor([2, 6]), SamplingParams(cfg_scale=8.0, cfg_interval=5, top_k=0)
    tokens = ARSampler()(compiled, labels, params=params, seeds=[5, 6]).tokens
    assert settled[6] is False and settled[7] is True
    assert torch.equal(tokens, ARSampler()(eager, labels, params=params, seeds=[5, 6]).tokens)
    auto_ar = get_sampler("auto:L=1")  # auto's AR stretch settles its guards the same way
    assert torch.equal(auto_ar(compiled, labels, params=params, seeds=[5, 6]).tokens,
                       auto_ar(eager, labels, params=params, seeds=[5, 6]).tokens)


class WholeCache(KVCache):
    """A cache whose every forward attends over all its slots (what compiled steps did before spans)."""

    def attend_upto(self, input_pos, top=None, for_graph=False):
        if not torch.compiler.is_compiling():
            self.span = self.positions


@torch.no_grad()
def test_a_compiled_step_attends_over_the_span_its_positions_reach_in_one_graph():
    model = tiny_gpt().compile_decode()
    whole = tiny_gpt()
    whole.load_state_dict(model.state_dict())
    whole.compile_decode()

    def whole_cache(*args, **kwargs):
        cache = GPT.new_cache(whole, *args, **kwargs)
        cache.__class__ = WholeCache
        return cache

    whole.new_cache = whole_cache
    cond = torch.tensor([1, 5, 10])
    tokens = torch.randint(0, 64, (3, model.num_positions), generator=torch.Generator().manual_seed(0))
    spans, graphs = [], []
    t = model.condition_length(cond)
    cache = model.new_cache(3, t + tokens.shape[1])
    out = [model.prefill(cond, cache)]
    for n in range(tokens.shape[1] - 1):
        out.append(model.decode(tokens[:, n:n + 1], torch.tensor([t + n]), cache)[:, -1])
        spans.append(cache.active_len)
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    # the host set each step's span before its graph ran: the keys up to the query's position
    assert spans == list(range(t + 1, t + tokens.shape[1]))
    # the span is a dynamic size of one graph: no step after the first compiled another
    assert len(set(graphs)) == 1
    # keys past a query's position weigh exactly zero: the same floats as attending over every slot
    assert torch.equal(torch.stack(out, dim=1), cached_logits_one_by_one(whole, cond, tokens))


@pytest.mark.parametrize("mode", COMPILE_MODES)
@torch.no_grad()
def test_a_compiled_step_gives_a_row_the_same_logits_at_any_batch_size(mode):
    # docs/architecture.md: every --compile mode keeps the same-image-at-any-batch rule (one GEMM family each)
    model = tiny_gpt().compile_decode(mode)
    cond = torch.tensor([1, 5, 10, 3, 7, 2])
    tokens = torch.randint(0, 64, (6, model.num_positions), generator=torch.Generator().manual_seed(1))
    together = cached_logits_one_by_one(model, cond, tokens)
    assert torch.equal(cached_logits_one_by_one(model, cond[:1], tokens[:1]), together[:1])


@pytest.mark.parametrize("mode", ["default", "max-autotune"])
@torch.no_grad()
def test_a_compiled_window_gives_each_position_the_logits_of_one_token_steps(mode):
    """A speculative sampler's window and AR's one-token steps compute a position's logits alike, to the
    bit, when compiled: attention is written as products and sums, which inductor sums in one order at
    any query count (as matrix products, 1e-6 apart, and bf16 images then depended on the window widths
    `auto` chose; docs/architecture.md)."""
    model = tiny_gpt(block_size=36).compile_decode(mode)
    cond = torch.tensor([1, 5])
    tokens = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(2))
    steps = cached_logits_one_by_one(model, cond, tokens)  # steps[:, n] predicts token n
    for start, width in ((0, 2), (3, 7), (12, 7)):
        cache = model.new_cache(2)
        model.prefill(cond, cache)
        for n in range(start):  # the one-token steps' graph (already compiled): a new width costs a compile
            model.decode(tokens[:, n:n + 1], torch.tensor([n + 1]), cache)
        window = model.decode(tokens[:, start:start + width], torch.arange(start + 1, start + width + 1), cache)
        assert torch.equal(window, steps[:, start + 1:start + width + 1])


# ---- per-query key masks (set_query_mask) ------------------------------------------------------


def context_cache(model, n: int = 10):
    """A cache holding class conditions and n image tokens (keys written causally), and the tokens."""
    tokens = torch.randint(0, 64, (2, n + 3), generator=torch.Generator().manual_seed(5))
    cache = model.new_cache(2, 1 + model.num_positions)
    model.prefill(torch.tensor([2, 7]), cache)
    model.decode(tokens[:, :n], torch.arange(1, n + 1), cache)
    return cache, tokens


def copy_cache(cache):
    twin = copy.copy(cache)
    twin.k, twin.v = [k.clone() for k in cache.k], [v.clone() for v in cache.v]
    twin.key_valid = cache.key_valid.clone()
    return twin


@torch.no_grad()
def test_query_mask_is_set_visible_per_query():
    """Three queries in one forward, each with its own key set, get the logits each gets alone
    with the other keys hidden by `set_visible` (the path the mask generalises)."""
    model, n = tiny_gpt(), 10
    cache, tokens = context_cache(model, n)
    positions = torch.arange(n + 1, n + 4)  # sequence positions of the three queries
    hidden = [[4, 6], [], [2, 3, 4, 5, 9]]  # sequence positions each query must not see
    mask = torch.ones(2, 3, cache.max_len, dtype=torch.bool)
    for t, hide in enumerate(hidden):
        mask[:, t, hide] = False
        mask[:, t, [p for p in positions.tolist() if p != positions[t]]] = False  # not the other queries
    alone = []
    for t, hide in enumerate(hidden):
        twin = copy_cache(cache)
        unseen = hide + [p for p in positions.tolist() if p != positions[t]]
        twin.set_visible(torch.tensor([unseen] * 2), torch.zeros(2, len(unseen), dtype=torch.bool))
        alone.append(model.decode(tokens[:, n + t:n + t + 1], positions[t:t + 1], twin)[:, 0])
    cache.set_query_mask(mask)
    together = model.decode(tokens[:, n:n + 3], positions, cache)
    assert cache.query_mask is None  # one forward only
    for t in range(3):
        torch.testing.assert_close(together[:, t], alone[t], **TOL)
    assert not torch.allclose(alone[0], alone[1], atol=1e-3)  # the hidden keys do matter


@torch.no_grad()
def test_query_mask_shows_exactly_the_allowed_keys():
    """Garbage in slots a query may not see changes nothing, bit for bit; in a slot it may see, it
    changes its logits."""
    model, n = tiny_gpt(), 10
    cache, tokens = context_cache(model, n)
    positions = torch.tensor([[n + 1, n + 2], [n + 1, n + 2]])
    mask = torch.ones(2, 2, cache.max_len, dtype=torch.bool)
    mask[:, :, [3, 8]] = False

    def run(dirty_slots):
        twin = copy_cache(cache)
        for layer in twin.k + twin.v:
            layer[:, :, dirty_slots] = torch.randn(layer[:, :, dirty_slots].shape) * 100
        twin.set_query_mask(mask)
        return model.decode(tokens[:, n:n + 2], positions, twin)

    clean = run([])
    assert torch.equal(run([3, 8]), clean)
    assert not torch.allclose(run([5]), clean, atol=1e-3)


@torch.no_grad()
def test_all_true_query_mask_changes_nothing():
    """Where every key is allowed, each path gives bit-identical logits: a shared-position window,
    per-row positions, a token tree; and the mask is used by one forward only."""
    model, n = tiny_gpt(), 10
    everything = lambda cache, t: torch.ones(2, t, cache.max_len, dtype=torch.bool)  # noqa: E731
    cases = [
        (lambda c: None, torch.arange(n + 1, n + 4)),
        (lambda c: None, torch.tensor([[n + 1, n + 2, n + 3], [n - 2, n - 1, n]])),
        (lambda c: c.set_tree([-1, 0, 0], 14), torch.tensor([n + 1, n + 2, n + 2])),
    ]
    for prepare, positions in cases:
        plain, masked = context_cache(model, n)[0], context_cache(model, n)[0]
        tokens = torch.tensor([[5, 6, 7], [8, 9, 10]])
        prepare(plain)
        prepare(masked)
        masked.set_query_mask(everything(masked, 3))
        assert torch.equal(model.decode(tokens, positions, masked), model.decode(tokens, positions, plain))
    cache, tokens = context_cache(model, n)
    reference = copy_cache(cache)
    mask = everything(cache, 1)
    mask[:, :, 2:6] = False
    cache.set_query_mask(mask)
    narrowed = model.decode(tokens[:, n:n + 1], torch.tensor([n + 1]), cache)
    assert not torch.allclose(narrowed, model.decode(tokens[:, n:n + 1], torch.tensor([n + 1]), reference), atol=1e-3)
    # the next forward is back to the position rules: the same query again sees what it sees without a mask
    assert torch.equal(model.decode(tokens[:, n:n + 1], torch.tensor([n + 1]), cache),
                       model.decode(tokens[:, n:n + 1], torch.tensor([n + 1]), reference))


@torch.no_grad()
def test_query_mask_narrows_tree_queries_one_by_one():
    """In tree mode the mask applies per tree token: hiding a context key from token 2 only changes
    token 2's logits."""
    model, n = tiny_gpt(), 10
    out = []
    for hide in (False, True):
        cache, _ = context_cache(model, n)
        cache.set_tree([-1, 0, 0], 14)
        mask = torch.ones(2, 3, cache.max_len, dtype=torch.bool)
        mask[:, 2, 4] = not hide
        cache.set_query_mask(mask)
        out.append(model.decode(torch.tensor([[5, 6, 7], [8, 9, 10]]), torch.tensor([n + 1, n + 2, n + 2]), cache))
    assert torch.equal(out[0][:, :2], out[1][:, :2])
    assert not torch.allclose(out[0][:, 2], out[1][:, 2], atol=1e-3)


def test_query_mask_shape_is_checked():
    model = tiny_gpt()
    cache = model.new_cache(2, 17)
    with pytest.raises(ValueError):
        cache.set_query_mask(torch.ones(2, 3, 16, dtype=torch.bool))  # not the cache's length
    with pytest.raises(ValueError):
        cache.set_query_mask(torch.ones(3, 1, 17, dtype=torch.bool))  # not its batch
    model.prefill(torch.tensor([1, 2]), cache)
    cache.set_query_mask(torch.ones(2, 3, 17, dtype=torch.bool))
    with pytest.raises(ValueError):  # a mask for three queries on a one-token forward
        model.decode(torch.tensor([[1], [2]]), torch.tensor([1]), cache)


@torch.no_grad()
@pytest.mark.parametrize("fmt", ["fp32", "fp32-packed"])
def test_max_autotune_runs_onednn_products_with_the_ffn_inputs_joined(fmt):
    """Inductor packs frozen fp32 linears for MKL; argen's pass (argen.models.onednn_products) moves them
    to oneDNN's packed kernel, 1.2x a default-c2i step on the EPYC measured, and the FFN's two input
    products run as one (1.06x a step at batch 1). What a step runs, read from the profiler (inductor
    names each kernel a C++ step calls when asked to)."""
    cond, tokens = torch.tensor([1, 5]), torch.randint(0, 64, (2, 4))
    eager = cached_logits_one_by_one(tiny_gpt().set_weight_format(fmt), cond, tokens)
    model = tiny_gpt().set_weight_format(fmt).compile_decode("max-autotune", options={"cpp.enable_kernel_profile": True})
    cached_logits_one_by_one(model, cond, tokens)  # compiles
    with torch.profiler.profile() as prof:
        logits = cached_logits_one_by_one(model, cond, tokens)
    products = [e.name for e in prof.events() if "linear" in e.name]
    assert set(products) == {"aoti_torch_cpu__linear_pointwise"}, set(products)
    # one product per layer for the FFN's w1 and w3 (inductor's concat_linear): wqkv, wo, w1|w3, w2,
    # and the head, in the prefill and each of the 3 steps
    assert len(products) == 4 * (4 * model.gpt_config.n_layer + 1)
    torch.testing.assert_close(logits, eager, **TOL)
    if fmt == "fp32":  # and the joined product gives each element the floats of the two
        apart = tiny_gpt().compile_decode("max-autotune", options={"cpp.enable_concat_linear": False})
        assert torch.equal(cached_logits_one_by_one(apart, cond, tokens), logits)


@torch.no_grad()
def test_max_autotune_compile_keeps_each_models_weights(capfd):
    """mode "max-autotune" freezes weights into the graphs: two models of one shape must each keep
    their own (dynamo caches graphs per code object, shared by both instances), to rounding of eager."""
    first, second = tiny_gpt(), tiny_gpt()
    second.load_state_dict({k: v * 0.9 for k, v in first.state_dict().items()})
    cond, tokens = torch.tensor([1, 5]), torch.randint(0, 64, (2, 3))
    eager = [cached_logits_one_by_one(m, cond, tokens) for m in (first, second)]
    for model, expect in zip((first, second), eager):
        model.compile_decode(mode="max-autotune")
        assert model.compiled_with[1]  # frozen
        torch.testing.assert_close(cached_logits_one_by_one(model, cond, tokens), expect, **TOL)
    assert (eager[0] - eager[1]).abs().max() > 0.1  # the two really differ
    assert "Autotune" not in capfd.readouterr().err  # inductor's timing tables stay off a CLI's stderr
    with pytest.raises(ArgenError, match="compile mode"):
        tiny_gpt().compile_decode(mode="fast")
    # one GEMM family per mode in every format, never inductor's timed choice between ATen's and its own:
    # the two sum a row in different orders, so a mix made an image depend on its batch (docs/architecture.md)
    families = {"max-autotune": "ATEN", "max-autotune-cpp": "CPP"}
    gemms = {(mode, fmt): tiny_gpt().set_weight_format(fmt).compile_decode(mode).compiled_with[0]["options"]
             ["max_autotune_gemm_backends"] for mode in families for fmt in ("fp32", "bf16", "int8")}
    assert gemms == {(mode, fmt): families[mode] for mode, fmt in gemms}
