"""argen against outputs of the official LlamaGen code (../shared/fixtures/llamagen)."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from argen.models import GPT
from argen.samplers import generate
from argen.tokenizers import VQTokenizer

TOL = dict(atol=1e-4, rtol=1e-4)


# Every check runs on the exact fp32 model and again with its decode-step linears oneDNN-packed
# (`--weights fp32-packed`): a faster kernel must still reproduce the official outputs.
@pytest.fixture(scope="module", params=["fp32", "fp32-packed"])
def gpt_fixture(llamagen_fixtures, request):
    meta = json.loads((llamagen_fixtures / "gpt_c2i_tiny.json").read_text())
    io = load_file(llamagen_fixtures / "gpt_c2i_tiny_io.safetensors")
    model = GPT.from_llamagen(llamagen_fixtures / "gpt_c2i_tiny.safetensors", **meta["model_args"])
    return model.set_weight_format(request.param), meta, io


@pytest.fixture(scope="module")
def vq_fixture(llamagen_fixtures):
    meta = json.loads((llamagen_fixtures / "vq_tiny.json").read_text())
    args = dict(meta["vq_model_args"])
    overrides = {k: v for k, v in meta["encoder_decoder_overrides"].items() if k != "how"}
    args.update(overrides, image_size=16)
    vq = VQTokenizer.from_llamagen(llamagen_fixtures / "vq_tiny.safetensors", **args)
    return vq, load_file(llamagen_fixtures / "vq_tiny_io.safetensors")


def test_loads_from_state_dict_too(gpt_fixture, llamagen_fixtures):
    model, meta, _ = gpt_fixture
    state = load_file(llamagen_fixtures / "gpt_c2i_tiny.safetensors")
    again = GPT.from_llamagen(state, **meta["model_args"])
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_rope_table(gpt_fixture):
    model, _, io = gpt_fixture
    torch.testing.assert_close(model.freqs_cis, io["freqs_cis"], **TOL)
    assert torch.count_nonzero(model.freqs_cis[0]) == 0  # class token row is zero, not identity


@torch.no_grad()
def test_teacher_forced_logits_and_hidden_states(gpt_fixture):
    model, meta, io = gpt_fixture
    captured = {}
    hooks = [layer.register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(f"layer{n}", o))
             for n, layer in enumerate(model.layers)]
    hooks.append(model.norm.register_forward_hook(lambda m, i, o: captured.__setitem__("final_norm", o)))
    try:
        logits = model(io["fwd.tokens"][:, :-1], io["fwd.cond"])
    finally:
        for h in hooks:
            h.remove()
    assert logits.shape == (3, 16, 64) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, io["fwd.logits"], **TOL)
    for name in ("layer0", "layer1", "final_norm"):
        torch.testing.assert_close(captured[name], io[f"fwd.hidden.{name}"], **TOL)
    loss = F.cross_entropy(logits.reshape(-1, 64), io["fwd.tokens"].reshape(-1))
    assert loss.item() == pytest.approx(meta["forward"]["loss_ce_on_sliced_logits"], abs=1e-4)


@torch.no_grad()
def test_bf16_forward(gpt_fixture):
    model, _, io = gpt_fixture
    bf16 = GPT.from_llamagen(model.state_dict(), **model.gpt_config.__dict__).to(torch.bfloat16)
    logits = bf16(io["fwd.tokens"][:, :-1], io["fwd.cond"])
    assert logits.dtype == torch.float32  # logits are always float32, as in the official code
    torch.testing.assert_close(logits, io["fwd_bf16.logits"], atol=0.25, rtol=0)


RUNS = ["greedy_nocfg", "greedy_cfg2", "greedy_cfg2_interval5", "seeded_cfg2_plain", "seeded_cfg1.5_t0.9_k20_p0.8"]


@pytest.mark.parametrize("run", RUNS)
def test_generate_traces(gpt_fixture, run):
    model, meta, io = gpt_fixture
    info = meta["generate"][run]
    kwargs = dict(info["generate_kwargs"])
    n = kwargs.pop("max_new_tokens")
    step_logits = []
    hook = model.output.register_forward_hook(lambda m, i, o: step_logits.append(o.reshape(o.shape[0], -1, o.shape[-1])[:, -1]))
    try:
        if "torch_manual_seed_before_generate" in info:
            torch.manual_seed(info["torch_manual_seed_before_generate"])
        tokens = generate(model, io[f"gen.{run}.cond"], n, **kwargs)
    finally:
        hook.remove()
    assert tokens.dtype == torch.int32 and tokens.shape == (3, n)
    assert torch.equal(tokens, io[f"gen.{run}.tokens"])
    torch.testing.assert_close(torch.stack(step_logits), io[f"gen.{run}.step_logits"], **TOL)


def test_greedy_equals_argmax_sampling(gpt_fixture):
    model, meta, io = gpt_fixture
    tokens = generate(model, io["gen.greedy_cfg2.cond"], 16, cfg_scale=2.0, sample_logits=False)
    assert torch.equal(tokens, io["gen.greedy_cfg2.tokens"])


@torch.no_grad()
def test_vq_matches_official(vq_fixture):
    vq, io = vq_fixture
    torch.testing.assert_close(vq.encoder(io["image"]), io["encoder_out"], **TOL)
    codes = vq.encode(io["image"])
    assert codes.shape == (1, 16) and vq.grid == (4, 4) and vq.num_tokens == 16  # raster order
    assert torch.equal(codes.flatten(), io["indices"])
    torch.testing.assert_close(vq.codebook_embeddings(), io["codebook_normalized"], **TOL)
    torch.testing.assert_close(vq.decode(codes), io["decoded_from_codes"], **TOL)
    recon, *_ = vq(io["image"])
    torch.testing.assert_close(recon, io["forward_recon"], **TOL)
    _, _, _, indices = vq(io["image"])
    assert torch.equal(indices.flatten(), io["indices"])


@torch.no_grad()
def test_end_to_end_image(gpt_fixture, vq_fixture, llamagen_fixtures):
    model, _, io = gpt_fixture
    vq, _ = vq_fixture
    e2e = load_file(llamagen_fixtures / "e2e_tiny.safetensors")
    tokens = generate(model, io["gen.greedy_cfg2.cond"], 16, cfg_scale=2.0, top_k=1)
    assert torch.equal(tokens, e2e["tokens"])
    torch.testing.assert_close(vq.decode(tokens.long()), e2e["image"], **TOL)


def test_converted_official_weights_generate_through_the_cli(llamagen_fixtures, tmp_path):
    """Official GPT + VQ weights -> pipeline folder -> `argen generate` reproduces the official image."""
    from argen.cli.main import main
    from argen.convert import convert_llamagen
    from argen.pipeline import ARPipeline, to_uint8

    gpt_meta = json.loads((llamagen_fixtures / "gpt_c2i_tiny.json").read_text())
    vq_meta = json.loads((llamagen_fixtures / "vq_tiny.json").read_text())
    vq_args = dict(vq_meta["vq_model_args"], ch=32, num_res_blocks=1)
    out = tmp_path / "converted"
    convert_llamagen(llamagen_fixtures / "gpt_c2i_tiny.safetensors",
                     llamagen_fixtures / "vq_tiny.safetensors", out, image_size=16, vq_args=vq_args,
                     gpt_args=gpt_meta["model_args"], cfg_scale=2.0)
    pipe = ARPipeline.from_pretrained(out)
    result = pipe(class_labels=[1, 4, 9], num_images=1, top_k=1, progress=False)
    e2e = load_file(llamagen_fixtures / "e2e_tiny.safetensors")
    assert torch.equal(result.tokens.to(torch.int32), e2e["tokens"])
    import numpy as np
    ours = np.stack([np.asarray(im) for im in result.images]).astype(int)
    # float noise of ~1e-5 can move a pixel across an integer boundary: allow 1 level
    assert np.abs(ours - to_uint8(e2e["image"]).astype(int)).max() <= 1
    assert main(["generate", "--model", str(out), "--class", "4", "--top-k", "1", "--num-images", "1",
                 "--out", str(tmp_path / "g.png")]) == 0
