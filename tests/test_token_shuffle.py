"""Token-Shuffle generators (`argen.models.token_shuffle`) and guidance schedules.

* s = 1 is the plain GPT: same state dict and init, same logits (teacher forcing, prefill, decode)
  and the same sampled tokens;
* the window order <-> raster order mapping round-trips on non-square grids and puts each code
  where the definition says;
* cached decoding agrees with teacher forcing, and the loss is the cross-entropy over every code;
* bad s is a one-line error (model and `argen train gpt --shuffle`); a tiny s = 2 run trains,
  resumes bit-exactly and exports a pipeline that generates;
* guidance schedules: values at given positions, constant is the old path bit for bit, and every
  sampler uses the same per-position scale.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from argen.cli.main import main
from argen.errors import ArgenError
from argen.models import GPT, GPTConfig, TokenShuffleConfig, TokenShuffleGPT
from argen.registry import load_component
from argen.samplers import ARSampler, SamplingParams, get_sampler
from argen.samplers.logits import apply_cfg

from helpers import randomize

FIELDS = dict(dim=64, n_layer=2, n_head=4, vocab_size=32, num_classes=10, block_size=16)


def tiny_shuffle(s=2, seed=1, **overrides):
    fields = {**FIELDS, **overrides}
    torch.manual_seed(0)
    return randomize(TokenShuffleGPT(TokenShuffleConfig(shuffle=s, **fields)), seed)


# ---- s = 1 is the plain GPT ----------------------------------------------------------------


def test_s1_has_the_gpt_init_and_state_dict():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(**FIELDS))
    torch.manual_seed(0)
    shuffled = TokenShuffleGPT(shuffle=1, **FIELDS)
    a, b = gpt.state_dict(), shuffled.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert shuffled.tokens_per_position == 1 and shuffled.num_positions == 16 and shuffled.grid == (4, 4)


def test_s1_equals_gpt_logits_and_tokens():
    gpt = randomize(GPT(GPTConfig(**FIELDS)), 3)
    shuffled = TokenShuffleGPT(shuffle=1, **FIELDS).eval()
    shuffled.load_state_dict(gpt.state_dict())
    codes = torch.randint(0, 32, (3, 16))
    cond = torch.tensor([0, 4, 9])
    assert torch.equal(gpt(codes[:, :-1], cond), shuffled(codes[:, :-1], cond))
    assert torch.equal(gpt.loss(codes, cond), shuffled.loss(codes, cond))
    ca, cb = gpt.new_cache(3), shuffled.new_cache(3)
    assert torch.equal(gpt.prefill(cond, ca), shuffled.prefill(cond, cb))
    pos = torch.arange(1, 6)
    assert torch.equal(gpt.decode(codes[:, :5], pos, ca), shuffled.decode(codes[:, :5], pos, cb))
    params = SamplingParams(cfg_scale=2.0, top_k=20)
    for sampler in ("ar", "sjd", "mcsjd"):
        a = get_sampler(sampler)(gpt, cond, params=params, seeds=[1, 2, 3]).tokens
        b = get_sampler(sampler)(shuffled, cond, params=params, seeds=[1, 2, 3]).tokens
        assert torch.equal(a, b), sampler


# ---- orders ---------------------------------------------------------------------------------


@pytest.mark.parametrize("grid,s", [((4, 6), 2), ((6, 4), 2), ((6, 9), 3), ((2, 8), 2)])
def test_window_order_round_trips_on_non_square_grids(grid, s):
    rows, cols = grid
    dim = 72 if s == 3 else 64  # dim/s² channels per code; head_dim divisible by 4 for 2D RoPE
    model = TokenShuffleGPT(shuffle=s, **{**FIELDS, "block_size": rows * cols, "grid_size": grid, "dim": dim,
                                          "n_head": 2})
    assert model.grid == (rows // s, cols // s) and model.tokens_per_position == s * s
    codes = torch.randint(0, 32, (3, rows * cols))
    assert torch.equal(model.tokens_to_codes(model.codes_to_tokens(codes)), codes)
    tokens = torch.randint(0, 32, (3, rows * cols))
    assert torch.equal(model.codes_to_tokens(model.tokens_to_codes(tokens)), tokens)
    # the definition: code (r, c) is code (r % s, c % s) of window (r // s, c // s)
    raster = torch.arange(rows * cols)[None]
    order = model.codes_to_tokens(raster)[0]
    for r in range(rows):
        for c in range(cols):
            window = (r // s) * (cols // s) + c // s
            assert int(order[window * s * s + (r % s) * s + c % s]) == r * cols + c


def test_bad_window_side_is_one_line():
    with pytest.raises(ArgenError, match="shuffle s=3 does not divide the 4x4 code grid"):
        TokenShuffleGPT(shuffle=3, **FIELDS)
    with pytest.raises(ArgenError, match="needs a 2D code grid"):
        TokenShuffleGPT(shuffle=2, **{**FIELDS, "rope_type": "1d"})
    with pytest.raises(ArgenError, match="divisible by s"):
        TokenShuffleGPT(shuffle=2, **{**FIELDS, "dim": 66, "n_head": 6})
    with pytest.raises(ArgenError, match="shuffle must be an integer"):
        TokenShuffleGPT(shuffle=0, **FIELDS)


# ---- the s = 2 model ------------------------------------------------------------------------


def test_cached_decode_matches_teacher_forcing_and_loss_covers_every_code():
    model = tiny_shuffle(2)
    assert model.num_positions == 4 and model.tokens_per_position == 4
    codes = torch.randint(0, 32, (2, 16))
    cond = torch.tensor([3, 7])
    tokens = model.codes_to_tokens(codes).view(2, 4, 4)
    full = model(tokens[:, :-1], cond)  # [B, 1 + 3, 4, V]
    assert full.shape == (2, 4, 4, 32)
    cache = model.new_cache(2)
    first = model.prefill(cond, cache)
    rest = model.decode(tokens[:, :-1], torch.arange(1, 4), cache)
    assert torch.allclose(torch.cat([first[:, None], rest], 1), full, atol=1e-5)
    expected = F.cross_entropy(full.reshape(-1, 32), tokens.reshape(-1))
    assert torch.allclose(model.loss(codes, cond), expected)
    # the codes of a window come from one hidden state: changing a later code of the same window
    # does not change the logits of the window (no intra-window causality), the next window's do
    other = tokens.clone()
    other[:, 1, 3] = (other[:, 1, 3] + 1) % 32
    moved = model(other[:, :-1], cond)
    assert torch.equal(moved[:, :2], full[:, :2]) and not torch.allclose(moved[:, 2], full[:, 2])


def test_text_conditional_shuffle_generates():
    from helpers import left_padded_captions

    model = tiny_shuffle(2, model_type="t2i", cls_token_num=5, caption_dim=12)
    feats, mask = left_padded_captions(2, 5, 12, [2, 5])
    out = ARSampler()(model, feats, cond_mask=mask, params=SamplingParams(cfg_scale=2.0), seeds=[0, 1])
    assert out.tokens.shape == (2, 16) and out.num_forward_passes == 4
    assert torch.isfinite(model.loss(torch.randint(0, 32, (2, 16)), feats, mask))


def test_save_load_by_class(tmp_path):
    model = tiny_shuffle(2)
    model.save_pretrained(tmp_path / "gen")
    assert json.loads((tmp_path / "gen" / "config.json").read_text())["_class_name"] == "TokenShuffleGPT"
    loaded = load_component(tmp_path / "gen").eval()
    assert type(loaded) is TokenShuffleGPT and loaded.tokens_per_position == 4
    codes, cond = torch.randint(0, 32, (2, 16)), torch.tensor([1, 2])
    assert torch.equal(loaded.loss(codes, cond), model.loss(codes, cond))


def test_folded_head_is_the_unfolded_head_and_follows_the_weights():
    shape = dict(shuffle_mlp_blocks=1, shuffle_mlp_hidden=24, ffn_dropout_p=0.0)  # no dropout: train mode comparable
    model = tiny_shuffle(2, **shape)
    assert len(model.shuffle_mlp) == len(model.unshuffle_mlp) == 1
    assert model.unshuffle_mlp[0].feed_forward.w1.out_features == 24
    assert model.unshuffle_expand.bias.abs().sum() > 0  # the bias terms of the fold are exercised
    x = torch.randn(3, 5, 64)

    def unfolded(m):
        parts = m.unshuffle_mlp[0](x).unflatten(-1, (4, -1))
        return m.output(m.norm(m.unshuffle_expand(parts))).float()

    with torch.no_grad():
        folded = model.head(x)  # eval, no grad: the sampling path
        assert "_fold" in model.__dict__
        assert folded.shape == (3, 5, 4, 32)
        assert torch.allclose(folded, unfolded(model), atol=1e-5, rtol=1e-5)
        # a load (or an optimizer step) changes the weights in place: the fold is rebuilt
        model.load_state_dict(tiny_shuffle(2, seed=7, **shape).state_dict())
        reloaded = model.head(x)
        assert torch.allclose(reloaded, unfolded(model), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(reloaded, folded, atol=1e-2)
        model.train()  # training computes the unfolded head
        assert torch.equal(model.head(x), unfolded(model))
    with pytest.raises(ArgenError, match="shuffle_mlp_hidden must be"):
        TokenShuffleConfig(shuffle=2, shuffle_mlp_hidden=0, **FIELDS)


def test_plain_blocks_are_two_products_and_keep_a_row_the_same_at_any_batch():
    model = tiny_shuffle(2, shuffle_mlp_blocks=1, shuffle_mlp_hidden=24, shuffle_mlp_kind="plain")
    block = model.unshuffle_mlp[0]
    assert sorted(n for n, _ in block.named_parameters()) == ["w1.weight", "w2.weight"]
    assert block.w1.weight.shape == (24, 64) and block.w2.weight.shape == (64, 24)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        assert torch.allclose(block(x), x + F.linear(F.silu(F.linear(x, block.w1.weight)), block.w2.weight),
                              atol=1e-6)
        # a step's logits: a row alone (2 rows with CFG, padded to 4) has the bits it has in a batch of 5
        cond, tokens = torch.tensor([1, 4, 9, 2, 0]), torch.randint(0, 32, (5, 1, 4))
        cache = model.new_cache(5)
        model.prefill(cond, cache)
        batch = model.decode(tokens, torch.tensor([1]), cache)
        for i in range(5):
            one = model.new_cache(1)
            model.prefill(cond[i:i + 1], one)
            assert torch.equal(model.decode(tokens[i:i + 1], torch.tensor([1]), one), batch[i:i + 1])
    # cached decoding is teacher forcing, as for the SwiGLU blocks
    codes = torch.randint(0, 32, (2, 16))
    tokens = model.codes_to_tokens(codes).view(2, 4, 4)
    full = model(tokens[:, :-1], cond[:2])
    cache = model.new_cache(2)
    first = model.prefill(cond[:2], cache)
    rest = model.decode(tokens[:, :-1], torch.arange(1, 4), cache)
    assert torch.allclose(torch.cat([first[:, None], rest], 1), full, atol=1e-5)
    # saved and loaded by its config
    assert TokenShuffleConfig.from_dict(model.config).shuffle_mlp_kind == "plain"
    with pytest.raises(ArgenError, match="shuffle_mlp_kind must be one of swiglu, plain, got 'gelu'"):
        TokenShuffleConfig(shuffle=2, shuffle_mlp_kind="gelu", **FIELDS)


@pytest.mark.parametrize("threads", [1, 2])
def test_sampling_looks_up_the_compressed_embeddings_with_the_bits_of_the_compress_layer(threads):
    """Sampling reads a [V, d/k] table instead of running the compress layer at every step; each entry is
    the same bits the layer gives that code in a step of any batch, and the table follows the weights."""
    model = tiny_shuffle(2, vocab_size=512).eval()

    def computed(tokens):  # what a step computed before the table
        x = model.shuffle_compress(model.tok_embeddings(tokens)).flatten(-2)
        for block in model.shuffle_mlp:
            x = block(x)
        return x

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            for batch in (1, 2, 3, 16):
                tokens = torch.randint(0, 512, (2 * batch, 3, 4), generator=torch.Generator().manual_seed(batch))
                looked_up = model.embed_tokens(tokens)
                assert "_table" in model.__dict__
                assert torch.equal(looked_up, computed(tokens))
            model.shuffle_compress.weight.mul_(2)  # an in-place change (a load, an optimizer step)
            assert torch.equal(model.embed_tokens(tokens), computed(tokens))
            assert not torch.equal(model.embed_tokens(tokens), looked_up)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("fmt", ["bf16", "int8", "fp32-packed"])
def test_every_weight_format_folds_the_head_it_multiplies_by(fmt):
    """A converted head is folded too (it once kept the unfolded head, 1.6x a plain GPT's compiled bf16
    step), from the matrix the format multiplies by: the folded logits are that matrix's float32 logits."""
    from argen.models.quant import float_weight

    model = tiny_shuffle(2).eval().set_weight_format(fmt)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        folded = model.head(x)
        assert "_fold" in model.__dict__ and model.__dict__["_fold"]["weight"].dtype == torch.float32
        for block in model.unshuffle_mlp:
            x = block(x)
        parts = x.unflatten(-1, (4, -1))
        exact = F.linear(model.norm(model.unshuffle_expand(parts)), float_weight(model.output))
        assert torch.allclose(folded, exact, atol=1e-5, rtol=1e-5)
        in_format = model.output(model.norm(model.unshuffle_expand(parts))).float()  # bf16 / int8 products round
        assert torch.allclose(folded, in_format, atol=0.1) and not torch.equal(folded, in_format)
    eager = ARSampler()(model, torch.tensor([1, 5]), params=SamplingParams(cfg_scale=2.0), seeds=[3, 4]).tokens
    model.compile_decode()
    assert torch.equal(ARSampler()(model, torch.tensor([1, 5]), params=SamplingParams(cfg_scale=2.0), seeds=[3, 4]).tokens,
                       eager)


def test_compiled_folded_head_samples_the_eager_tokens():
    model = tiny_shuffle(2)
    eager = ARSampler()(model, torch.tensor([1, 5]), params=SamplingParams(cfg_scale=2.0), seeds=[3, 4]).tokens
    model.compile_decode()
    compiled = ARSampler()(model, torch.tensor([1, 5]), params=SamplingParams(cfg_scale=2.0), seeds=[3, 4]).tokens
    assert torch.equal(compiled, eager)


# ---- training -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vq_dir(tmp_path_factory):
    from argen.tokenizers.vq import VQTokenizer

    torch.manual_seed(0)
    vq = VQTokenizer(codebook_size=32, codebook_embed_dim=4, encoder_ch_mult=(1, 1, 1, 1),
                     decoder_ch_mult=(1, 1, 1, 1), z_channels=8, ch=8, num_res_blocks=1, in_channels=1,
                     norm_groups=4, image_size=32)
    folder = tmp_path_factory.mktemp("vq") / "model"
    vq.save_pretrained(folder)
    return folder


def test_train_shuffle_resumes_bit_exact_and_exports(tmp_path, tiny_vq_dir, fmnist_available):
    from safetensors.torch import load_file

    from argen.pipeline import ARPipeline
    from argen.train.common import read_log
    from argen.train.gpt import train_gpt

    torch.set_num_threads(1)
    kw = dict(model_type="c2i", vq=str(tiny_vq_dir), steps=6, batch_size=8, lr=3e-3, warmup_steps=1, limit=32,
              log_every=1, ckpt_every=3, progress=False, samples_per_class=1, eval_items=8, accuracy_per_class=0,
              dim=32, n_layer=1, n_head=2, shuffle=2)
    train_gpt(tmp_path / "a", **kw)
    assert train_gpt(tmp_path / "b", stop_at_step=3, **kw) == {"stopped_at": 3}
    train_gpt(tmp_path / "b", resume=True, **kw)
    a, b = load_file(str(tmp_path / "a/checkpoints/step_000006/ema.safetensors")), \
        load_file(str(tmp_path / "b/checkpoints/step_000006/ema.safetensors"))
    assert any("shuffle_compress" in k for k in a) and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in read_log(tmp_path / "a/log.csv")] == [r["loss"] for r in read_log(tmp_path / "b/log.csv")]
    pipe = ARPipeline.from_pretrained(tmp_path / "a" / "model")
    assert type(pipe.generator) is TokenShuffleGPT and pipe.generator.num_positions == 4
    out = pipe(class_labels="bag", num_images=2, progress=False)
    assert out.tokens.shape == (2, 16) and out.num_forward_passes == 4 and out.images[0].size == (28, 28)
    assert "Token-Shuffle: s = 2" in (tmp_path / "a" / "model" / "MODEL_CARD.md").read_text()


def test_train_cli_refuses_a_window_that_does_not_divide_the_grid(tmp_path, tiny_vq_dir, capsys):
    code = main(["train", "gpt", "--model-type", "c2i", "--vq", str(tiny_vq_dir), "--out", str(tmp_path / "o"),
                 "--steps", "2", "--shuffle", "3"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "--shuffle 3 does not divide the tokenizer's 4x4 code grid" in err
    assert not (tmp_path / "o" / "codes_train.safetensors").exists()
    code = main(["train", "gpt", "--model-type", "c2i", "--vq", str(tiny_vq_dir), "--out", str(tmp_path / "p"),
                 "--steps", "2", "--shuffle-blocks", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "add --shuffle S" in err
    code = main(["train", "gpt", "--model-type", "c2i", "--vq", str(tiny_vq_dir), "--out", str(tmp_path / "q"),
                 "--steps", "2", "--shuffle-mlp", "plain"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "add --shuffle S" in err


# ---- guidance schedules ----------------------------------------------------------------------


def test_schedule_values_at_a_few_positions():
    n = 5  # t = 0, 0.25, 0.5, 0.75, 1
    const = SamplingParams(cfg_scale=3.0)
    linear = SamplingParams(cfg_scale=3.0, cfg_schedule="linear")
    cosine = SamplingParams(cfg_scale=3.0, cfg_schedule="cosine")
    assert [const.cfg_scale_at(i, n) for i in range(n)] == [3.0] * 5
    assert [linear.cfg_scale_at(i, n) for i in range(n)] == [1.0, 1.5, 2.0, 2.5, 3.0]
    expected = [1.0, 1 + (1 - math.cos(math.pi / 4)), 2.0, 1 + (1 - math.cos(3 * math.pi / 4)), 3.0]
    assert [cosine.cfg_scale_at(i, n) for i in range(n)] == pytest.approx(expected, abs=1e-12)
    assert cosine.cfg_scale_at(1, n) == pytest.approx(1.2928932, abs=1e-6)
    # cfg_interval still switches guidance off; scale 1 is the conditional logits exactly
    inter = SamplingParams(cfg_scale=3.0, cfg_schedule="linear", cfg_interval=1)
    assert [inter.guidance_at(i, n) for i in range(n)] == [1.0, 1.5, 2.0, 1.0, 1.0]
    assert const.guidance_at(2, n) is True  # the constant schedule keeps the original bool path
    logits = torch.randn(4, 7)
    assert torch.equal(apply_cfg(logits, linear, 1.0), logits[:2])
    assert torch.allclose(apply_cfg(logits, linear, 2.5), logits[2:] + 2.5 * (logits[:2] - logits[2:]))
    rows = linear.guidance_rows(torch.tensor([[0, 2, 9]]), n)
    assert rows.tolist() == [[1.0, 2.0, 3.0]]  # padding slots past the image clamp to the last position
    with pytest.raises(ArgenError, match="unknown cfg_schedule 'ramp'"):
        SamplingParams(cfg_schedule="ramp")


def test_schedule_changes_samples_and_every_sampler_sees_it():
    """A ramp changes AR samples; a speculative sampler under temperature 0 (greedy, deterministic)
    must give exactly AR's argmax tokens, so it used the same scale at every position."""
    model = tiny_shuffle(2)
    cond = torch.tensor([1, 5, 8])
    greedy = dict(cfg_scale=4.0, temperature=0.0)
    for schedule in ("linear", "cosine"):
        params = SamplingParams(cfg_schedule=schedule, **greedy)
        ar = ARSampler()(model, cond, params=params, seeds=[0, 1, 2]).tokens
        assert not torch.equal(ar, ARSampler()(model, cond, params=SamplingParams(**greedy), seeds=[0, 1, 2]).tokens)
        for name in ("sjd", "mcsjd"):
            assert torch.equal(get_sampler(name)(model, cond, params=params, seeds=[0, 1, 2]).tokens, ar), name


def test_cli_cfg_schedule_is_checked(capsys):
    code = main(["generate", "--model", "default-c2i", "--class", "bag", "--cfg-schedule", "ramp", "--out", "x.png"])
    assert code == 2 and "invalid choice: 'ramp'" in capsys.readouterr().err
