"""argen against outputs of the official LlamaGen code for a text-conditional GPT and a GQA one
(tests/data/llamagen_t2i, made as its README says), and official t2i weights through the pipeline."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from argen.errors import ArgenError
from argen.models import GPT
from argen.samplers import generate

DATA = Path(__file__).parent / "data" / "llamagen_t2i"
TOL = dict(atol=1e-4, rtol=1e-4)


def load(name: str, weight_format: str = "fp32"):
    meta = json.loads((DATA / f"{name}.json").read_text())
    model = GPT.from_llamagen(DATA / f"{name}.safetensors", **meta["model_args"])
    return model.set_weight_format(weight_format), meta, load_file(DATA / f"{name}_io.safetensors")


# As for the shared c2i fixture: every check runs on the exact fp32 model and on its oneDNN-packed linears.
@pytest.fixture(scope="module", params=["fp32", "fp32-packed"])
def t2i(request):
    return load("gpt_t2i_tiny", request.param)


@pytest.fixture(scope="module", params=["fp32", "fp32-packed"])
def gqa(request):
    return load("gpt_gqa_tiny", request.param)


def official_attention_mask(emb_mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """train_t2i.py's mask for [captions ; image tokens], sliced [:, :, :-1, :-1] as it feeds the forward."""
    t = emb_mask.shape[1]
    s = t + block_size
    mask = torch.tril(torch.ones(s, s, dtype=torch.bool)).repeat(emb_mask.shape[0], 1, 1)
    mask[:, :, :t] &= emb_mask.bool()[:, None, :]
    mask |= torch.eye(s, dtype=torch.bool)
    return mask[:, None, :-1, :-1]


@torch.no_grad()
def test_t2i_teacher_forced_logits(t2i):
    model, meta, io = t2i
    tokens, captions, emb_mask = io["fwd.tokens"], io["captions"], io["emb_mask"]
    assert model.gpt_config.cls_token_num == 120 and model.cls_embedding.uncond_embedding.shape == (120, 32)
    # the caption mask [B, T] (argen builds the official mask from it) and the official [B, 1, S, S] mask itself
    for mask in (emb_mask, official_attention_mask(emb_mask, 16)):
        logits = model(tokens[:, :-1], captions, mask)
        assert logits.shape == (3, 135, 64) and logits.dtype == torch.float32
        torch.testing.assert_close(logits, io["fwd.logits_masked"], **TOL)
    torch.testing.assert_close(model(tokens[:, :-1], captions), io["fwd.logits_nomask"], **TOL)


T2I_RUNS = ["greedy_nocfg", "greedy_cfg7.5", "greedy_cfg2_interval3", "greedy_cfg2_nomask", "greedy_cfg2_rightpad",
            "seeded_cfg7.5_k1000", "seeded_cfg2_t0.9_k20_p0.8"]
GQA_RUNS = ["greedy_nocfg", "greedy_cfg2_interval5", "seeded_cfg1.5_t0.9_k20_p0.8"]


def check_trace(model, meta, io, run):
    info = meta["generate"][run]
    kwargs = dict(info["generate_kwargs"])
    n = kwargs.pop("max_new_tokens")
    cond = io[info["cond"]]
    emb_masks = io[info["emb_masks"]] if info["emb_masks"] else None
    steps = []
    hook = model.output.register_forward_hook(lambda m, i, o: steps.append(o.reshape(o.shape[0], -1, o.shape[-1])[:, -1]))
    try:
        if "torch_manual_seed_before_generate" in info:
            torch.manual_seed(info["torch_manual_seed_before_generate"])
        tokens = generate(model, cond, n, emb_masks=emb_masks, **kwargs)
    finally:
        hook.remove()
    assert tokens.dtype == torch.int32 and tokens.shape == (cond.shape[0], n)
    assert torch.equal(tokens, io[f"gen.{run}.tokens"])
    torch.testing.assert_close(torch.stack(steps), io[f"gen.{run}.step_logits"], **TOL)


@pytest.mark.parametrize("run", T2I_RUNS)
def test_t2i_generate_traces(t2i, run):
    check_trace(*t2i, run)


def test_t2i_bf16_matches_the_official_cast():
    """model.to(bfloat16) as the official sampling does: the RoPE table stays float32 (a plain attribute
    there), and float32 caption features are projected as the bf16 features the official model needs."""
    model, _, io = load("gpt_t2i_tiny")
    bf16 = GPT.from_llamagen(model.state_dict(), **model.gpt_config.__dict__).to(torch.bfloat16)
    assert bf16.freqs_cis.dtype == bf16.rope_cos.dtype == torch.float32
    assert torch.equal(bf16.freqs_cis, model.freqs_cis) and torch.equal(bf16.rope_sin, model.rope_sin)
    tokens, captions, emb_mask = io["fwd.tokens"][:, :-1], io["captions"], io["emb_mask"]
    with torch.no_grad():
        logits = bf16(tokens, captions.to(torch.bfloat16), emb_mask)
        assert torch.equal(bf16(tokens, captions, emb_mask), logits)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, io["fwd_bf16.logits_masked"].float(), atol=0.25, rtol=0)


@torch.no_grad()
def test_gqa_teacher_forced_logits(gqa):
    model, meta, io = gqa
    attention = model.layers[0].attention
    assert (attention.n_head, attention.n_kv_head, attention.wqkv.out_features) == (4, 1, 48)
    assert model.layers[0].feed_forward.w1.out_features == 128  # int(1.3 * 85) = 110, up to a multiple of 32
    torch.testing.assert_close(model(io["fwd.tokens"][:, :-1], io["fwd.cond"]), io["fwd.logits"], **TOL)


@pytest.mark.parametrize("run", GQA_RUNS)
def test_gqa_generate_traces(gqa, run):
    check_trace(*gqa, run)


def _converted_t2i(llamagen_fixtures, tmp_path, encoder, caption_dim):
    from argen.convert import convert_llamagen

    vq_meta = json.loads((llamagen_fixtures / "vq_tiny.json").read_text())
    vq_args = dict(vq_meta["vq_model_args"], ch=32, num_res_blocks=1)
    gpt_args = dict(dim=32, n_layer=2, n_head=2, vocab_size=64, block_size=16, model_type="t2i",
                    caption_dim=caption_dim, cls_token_num=120)
    torch.manual_seed(1)
    source = GPT(**gpt_args)
    torch.nn.init.normal_(source.output.weight, std=0.3)  # logits that are not all zero
    save_file(source.state_dict(), tmp_path / "gpt_t2i.safetensors")  # argen's names are the official ones
    out = tmp_path / "converted"
    convert_llamagen(tmp_path / "gpt_t2i.safetensors", llamagen_fixtures / "vq_tiny.safetensors", out, image_size=16,
                     vq_args=vq_args, gpt_args=gpt_args, text_encoder=encoder, cfg_scale=2.0)
    return source, out


def test_converted_t2i_weights_generate_through_the_pipeline_and_cli(llamagen_fixtures, tmp_path):
    """Official-layout t2i weights -> pipeline folder -> prompts: the tokens `generate` draws from the encoder's
    left-padded features and mask; `argen generate` runs although the model names no classes."""
    from argen.cli.main import main
    from argen.pipeline import ARPipeline
    from argen.text import load_text_encoder

    encoder = load_text_encoder("minilm", max_length=120)
    source, out = _converted_t2i(llamagen_fixtures, tmp_path, encoder, encoder.feature_dim)
    pipe = ARPipeline.from_pretrained(out)
    assert pipe.class_names == []
    prompts = ["a red shirt", "a pair of blue trousers"]
    feats, mask = encoder.encode(prompts)
    expected = generate(source.eval(), feats, 16, emb_masks=mask, cfg_scale=2.0, top_k=1)
    result = pipe(prompt=prompts, top_k=1, progress=False)
    assert torch.equal(result.tokens.to(torch.int32), expected)
    with pytest.raises(ArgenError, match="names none"):
        pipe.read_prompt("a red shirt")
    assert main(["generate", "a red shirt", "--model", str(out), "--top-k", "1", "--num-images", "1",
                 "--out", str(tmp_path / "g.png")]) == 0


def test_convert_refuses_a_text_encoder_that_does_not_fit_the_gpt(llamagen_fixtures, tmp_path):
    from argen.text import load_text_encoder

    encoder = load_text_encoder("minilm")  # 32 slots, the GPT takes LlamaGen's 120
    with pytest.raises(ArgenError, match="32 x 384 caption features, the GPT takes 120 x 384") as err:
        _converted_t2i(llamagen_fixtures, tmp_path, encoder, encoder.feature_dim)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "converted").exists()
