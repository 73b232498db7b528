"""FlexTok (argen/tokenizers/flextok.py): FSQ codes, the register-causal encoder, nested dropout,
seeded prefix decoding, save/load, and `num_tokens` through the pipeline, every sampler and the CLI.
All models are tiny."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from argen.cli.main import main
from argen.data.fashion_mnist import CLASS_NAMES
from argen.errors import ArgenError
from argen.models import GPT
from argen.models.gpt import GPTConfig
from argen.pipeline import ARPipeline, pipeline_json, to_pil
from argen.registry import load_component
from argen.samplers import SamplingParams
from argen.tokenizers import FlexTokTokenizer, ImageTokenizer
from argen.tokenizers.flextok import powers_of_two, register_causal_mask

from helpers import randomize

K = 8
LEVELS = (8, 5, 5, 5)
TINY = dict(image_size=16, in_channels=1, patch_size=4, num_registers=K, fsq_levels=LEVELS, enc_width=32,
            enc_layers=2, enc_heads=2, dec_width=32, dec_layers=2, dec_heads=2, flow_steps=3)


def tiny_flextok(seed: int = 1, **overrides) -> FlexTokTokenizer:
    torch.manual_seed(0)
    # randomised: the adaLN-Zero init makes an untrained decoder's output independent of its inputs
    return randomize(FlexTokTokenizer(**{**TINY, **overrides}), seed).eval()


def images(n: int, seed: int = 0, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def tok():
    return tiny_flextok()


# ---- FSQ -----------------------------------------------------------------------------------------


def test_fsq_codes_round_trip_and_follow_the_flextok_index_formula(tok):
    latent = tok.encode_latent(images(5))
    values, codes = tok.quantize(latent)
    assert codes.shape == (5, K) and codes.dtype == torch.int64
    # the codes decode back to exactly the quantised values
    assert torch.equal(tok.fsq.indices_to_codes(codes), values.detach())
    # every id round-trips, and the vocabulary is the product of the levels
    assert tok.vocab_size == math.prod(LEVELS) == 1000
    ids = torch.arange(tok.vocab_size)
    assert torch.equal(tok.fsq.codes_to_indices(tok.fsq.indices_to_codes(ids)).long(), ids)
    assert tok.codebook_embeddings().shape == (1000, len(LEVELS))
    # index = sum_j (q_j * (L_j // 2) + L_j // 2) * basis_j, basis = cumprod([1, L_0, L_1, ...]) (FlexTok's FSQ)
    half = torch.tensor([lv // 2 for lv in LEVELS])
    basis = torch.tensor([1, 8, 40, 200])
    expected = ((values.detach() * half + half).round().long() * basis).sum(-1)
    assert torch.equal(codes, expected)
    # bound: tanh with the half-level offset, so level 8 takes 8 values {-4..3}/4 and level 5 takes 5
    big = tok.quantize(torch.tensor([[[50.0, 50.0, 50.0, 50.0], [-50.0, -50.0, -50.0, -50.0]]]))[0][0]
    assert big[0].tolist() == [0.75, 1.0, 1.0, 1.0] and big[1].tolist() == [-1.0, -1.0, -1.0, -1.0]


def test_encode_checks_its_input(tok):
    with pytest.raises(ArgenError, match=r"images must be \[B, 1, 16, 16\]"):
        tok.encode(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ArgenError, match="code id out of range"):
        tok.decode(torch.full((1, 3), 1000), seeds=[0])
    with pytest.raises(ArgenError, match=r"n <= 8"):
        tok.decode(torch.zeros(1, 9, dtype=torch.long), seeds=[0])
    with pytest.raises(ArgenError, match="2 seeds for 1 images"):
        tok.decode(torch.zeros(1, 2, dtype=torch.long), seeds=[0, 1])
    with pytest.raises(ArgenError, match="flow steps"):
        tok.decode(torch.zeros(1, 2, dtype=torch.long), seeds=[0], num_steps=0)


# ---- encoder: registers causal among themselves ----------------------------------------------


def test_register_mask_and_encoder_prefix_independence(tok):
    mask = register_causal_mask(3, 2)  # True = blocked
    assert mask[:3, 3:].all() and not mask[:3, :3].any()  # patches see patches only
    assert not mask[3:, :3].any()  # registers see every patch
    assert mask[3, 4] and not mask[4, 3]  # register 0 does not see register 1; 1 sees 0
    x = images(2)
    before = tok.encode_latent(x)
    saved = tok.registers.detach().clone()
    with torch.no_grad():
        tok.registers[5:] += torch.randn(K - 5, TINY["enc_width"])  # later registers change ...
    try:
        after = tok.encode_latent(x)
    finally:
        with torch.no_grad():
            tok.registers.copy_(saved)
    assert torch.allclose(before[:, :5], after[:, :5], atol=1e-6)  # ... the first five do not
    assert not torch.allclose(before[:, 5:], after[:, 5:], atol=1e-3)


# ---- nested dropout ----------------------------------------------------------------------------


def test_nested_dropout_masks_exactly_the_tail(tok):
    values = tok.fsq.indices_to_codes(torch.randint(0, 1000, (3, K)))
    other = values.clone()
    other[:, 3:] = -values[:, 3:] + 0.25  # different codes after position 3
    keep = torch.tensor([3, 3, 3])
    a = tok.register_slots(values, keep, 3)
    b = tok.register_slots(other, keep, 3)
    assert torch.equal(a[:, 3:], b[:, 3:])  # the tail is the mask token whatever the codes
    mask_row = tok.mask_token + tok.dec_register_pos
    assert torch.allclose(a[:, 3:], mask_row[3:].expand(3, -1, -1))
    assert not torch.allclose(a[:, :3], mask_row[:3].expand(3, -1, -1))  # the head is the codes
    assert torch.allclose(a[:, :3], tok.dec_code_embed(values[:, :3]) + tok.dec_register_pos[:3])
    # per-row keep, and keep 0 is the null condition (every slot masked)
    rows = tok.register_slots(values, torch.tensor([0, 1, K]), 3)
    assert torch.allclose(rows[0], mask_row) and torch.allclose(rows[1, 1:], mask_row[1:])
    assert not torch.allclose(rows[2, -1], mask_row[-1])
    # a prefix of n codes is the same input as all K codes with keep = n
    assert torch.equal(tok.register_slots(values[:, :3], torch.tensor([3, 3, 3]), 3), a)


def test_training_keeps_powers_of_two_and_the_null_condition():
    assert powers_of_two(32) == [1, 2, 4, 8, 16, 32] and powers_of_two(12) == [1, 2, 4, 8, 12]
    tok = tiny_flextok(cfg_dropout=0.25)
    torch.manual_seed(3)
    keep = tok.sample_keep(4000)
    assert set(keep.tolist()) == {0, 1, 2, 4, 8}
    assert abs((keep == 0).float().mean().item() - 0.25) < 0.03
    uniform = tiny_flextok(nested_dropout="uniform", cfg_dropout=0.0).sample_keep(4000)
    assert set(uniform.tolist()) == set(range(1, K + 1))
    # pow2-long: the same values, P(2^i) proportional to i + 1 (long prefixes trained more)
    long = tiny_flextok(nested_dropout="pow2-long", cfg_dropout=0.0).sample_keep(8000)
    choices = powers_of_two(K)
    shares = torch.tensor([(long == c).float().mean().item() for c in choices])
    expected = torch.arange(1, len(choices) + 1) / sum(range(1, len(choices) + 1))
    assert set(long.tolist()) == set(choices) and torch.allclose(shares, expected, atol=0.02), shares
    # uniform-long: every k in 1..K, P(k) proportional to k
    linear = tiny_flextok(nested_dropout="uniform-long", cfg_dropout=0.0).sample_keep(8000)
    shares = torch.tensor([(linear == k).float().mean().item() for k in range(1, K + 1)])
    expected = torch.arange(1, K + 1) / sum(range(1, K + 1))
    assert set(linear.tolist()) == set(range(1, K + 1)) and torch.allclose(shares, expected, atol=0.02), shares


def test_full_share_keeps_all_registers_on_its_share_and_is_off_by_default():
    torch.manual_seed(5)
    plain = tiny_flextok(nested_dropout="uniform", cfg_dropout=0.2).sample_keep(8000)
    torch.manual_seed(5)
    off = tiny_flextok(nested_dropout="uniform", cfg_dropout=0.2, nested_full_share=0.0).sample_keep(8000)
    assert torch.equal(plain, off)  # share 0 draws exactly as before the option existed
    full = tiny_flextok(nested_dropout="uniform", cfg_dropout=0.2, nested_full_share=0.5).sample_keep(8000)
    # K on half the images plus uniform's own 1/K of the other half, then the null condition on 20% of all
    assert abs((full == K).float().mean().item() - 0.8 * (0.5 + 0.5 / K)) < 0.03
    assert abs((full == 0).float().mean().item() - 0.2) < 0.03
    assert set(full.tolist()) == set(range(0, K + 1))
    assert set(tiny_flextok(nested_full_share=1.0, cfg_dropout=0.0).sample_keep(100).tolist()) == {K}
    with pytest.raises(ArgenError, match="nested_full_share"):
        tiny_flextok(nested_full_share=1.5)


def test_training_forward_has_no_gradient_through_dropped_registers():
    tok = tiny_flextok().train()
    x = images(4)
    torch.manual_seed(0)
    latent = tok.encode_latent(x)
    latent.retain_grad()
    values, _ = tok.quantize(latent)
    slots = tok.register_slots(values, torch.tensor([1, 2, 4, 8]), 4)
    v = tok.velocity(tok.patchify(x), torch.full((4,), 0.5), slots)
    v.square().mean().backward()
    grad = latent.grad.abs().sum(-1)  # [B, K]
    for row, k in enumerate([1, 2, 4, 8]):
        assert (grad[row, :k] > 0).all() and (grad[row, k:] == 0).all()
    loss, codes, keep, _, last_step = tok(x)
    assert last_step is None
    assert loss.ndim == 0 and torch.isfinite(loss) and codes.shape == (4, K) and keep.shape == (4,)


# ---- decoding ----------------------------------------------------------------------------------


def test_decode_is_deterministic_per_seed_and_independent_of_batch_size(tok):
    codes = tok.encode(images(4))
    together = tok.decode(codes, seeds=[5, 6, 7, 8])
    alone = torch.cat([tok.decode(codes[i:i + 1], seeds=[s]) for i, s in enumerate([5, 6, 7, 8])])
    # exactly: one time-embedding row at any batch (`velocity`), so no product's row count depends on it
    assert torch.equal(together, alone)
    assert torch.equal(tok.decode(codes, seeds=[5, 6, 7, 8]), together)
    other = tok.decode(codes, seeds=[9, 6, 7, 8])
    assert not torch.allclose(other[0], together[0], atol=1e-3) and torch.allclose(other[1:], together[1:], atol=1e-5)
    # without seeds every image decodes from seed 0's noise: again independent of its batch
    assert torch.equal(tok.decode(codes), torch.cat([tok.decode(codes[i:i + 1]) for i in range(4)]))
    assert torch.allclose(tok.decode(codes[:1]), tok.decode(codes[:1], seeds=[0]))


def test_every_prefix_decodes_to_finite_images(tok):
    codes = tok.encode(images(3))
    outs = []
    for k in range(1, K + 1):
        out = tok.decode(codes[:, :k], seeds=[0, 1, 2])
        assert out.shape == (3, 1, 16, 16) and torch.isfinite(out).all() and out.abs().max() <= 1
        outs.append(out)
    assert not torch.allclose(outs[0], outs[-1], atol=1e-3)  # the later tokens change the image
    guided = tok.decode(codes[:, :2], seeds=[0, 1, 2], guidance_scale=3.0)
    assert guided.shape == (3, 1, 16, 16) and torch.isfinite(guided).all()
    assert not torch.allclose(guided, outs[1], atol=1e-3)
    assert not torch.allclose(tok.decode(codes, seeds=[0, 1, 2], num_steps=1), outs[-1], atol=1e-3)


def test_decode_runs_the_scheduler_steps_it_is_given(tok, monkeypatch):
    calls = []
    original = FlexTokTokenizer.velocity

    def counting(self, *args):
        calls.append(args[0].shape[0])
        return original(self, *args)

    monkeypatch.setattr(FlexTokTokenizer, "velocity", counting)
    codes = tok.encode(images(2))
    tok.decode(codes, seeds=[0, 1], num_steps=5)
    assert calls == [2] * 5
    calls.clear()
    tok.decode(codes, seeds=[0, 1], num_steps=2, guidance_scale=2.0)
    assert calls == [4] * 2  # conditional and null halves in one pass per step
    calls.clear()
    tok.decode(codes, seeds=[0, 1])
    assert calls == [2] * TINY["flow_steps"]  # the stored default


def test_guidance_start_leaves_the_noisiest_steps_unguided(tok, monkeypatch):
    """guidance_start s: the first s Euler steps run one unguided pass, the rest are guided. s = 0 is
    the plain guided decode; s >= the step count is exactly the unguided decode."""
    calls = []
    original = FlexTokTokenizer.velocity

    def counting(self, *args):
        calls.append(args[0].shape[0])
        return original(self, *args)

    codes, seeds = tok.encode(images(2)), [3, 4]
    guided = tok.decode(codes, seeds=seeds, num_steps=3, guidance_scale=2.5)
    assert torch.equal(tok.decode(codes, seeds=seeds, num_steps=3, guidance_scale=2.5, guidance_start=0), guided)
    unguided = tok.decode(codes, seeds=seeds, num_steps=3, guidance_scale=1.0)
    assert torch.equal(tok.decode(codes, seeds=seeds, num_steps=3, guidance_scale=2.5, guidance_start=3), unguided)
    monkeypatch.setattr(FlexTokTokenizer, "velocity", counting)
    later = tok.decode(codes, seeds=seeds, num_steps=3, guidance_scale=2.5, guidance_start=1)
    assert calls == [2, 4, 4]  # one plain pass, then conditional and null halves in one pass per step
    assert not torch.allclose(later, guided) and not torch.allclose(later, unguided)
    # as a stored default: set_decoding, decoding_settings (recorded only when set), config
    assert "guidance_start" not in tok.decoding_settings
    try:
        tok.set_decoding(guidance_scale=2.5, guidance_start=1)
        assert tok.decoding_settings == {"flow_steps": 3, "guidance_scale": 2.5, "guidance_start": 1}
        assert tok.decoder_passes == sum(calls) // 2 == 5  # image-rows through the network, per image
        assert torch.equal(tok.decode(codes, seeds=seeds, num_steps=3), later)
    finally:
        tok.set_decoding(guidance_scale=1.0, guidance_start=0)
    assert tok.set_decoding(steps=3).decoder_passes == 3 and tok.set_decoding(guidance_scale=2.5).decoder_passes == 6
    tok.set_decoding(guidance_scale=1.0)
    stored = tiny_flextok(guidance_scale=2.5, guidance_start=1)
    assert torch.equal(stored.decode(codes, seeds=seeds), later)
    for bad in (-1, 1.5, True):
        with pytest.raises(ArgenError, match="first guided flow step"):
            tok.decode(codes, seeds=seeds, guidance_start=bad)


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_last_step_images_are_the_stored_decodings_last_step(guidance):
    """With one flow step the last step is the whole decoding (from sigma = 1, pure noise, so x0 plays
    no part): the adversarial loss's images must then be exactly what `decode` returns, guided as stored."""
    one_step = tiny_flextok(flow_steps=1, guidance_scale=guidance)
    codes = one_step.encode(images(3))
    seeds = [4, 5, 6]
    noise = one_step.initial_noise(seeds, torch.float32, "cpu")
    slots = one_step.register_slots(one_step.fsq.indices_to_codes(codes), torch.full((3,), K), 3)
    landed = one_step.last_step_images(torch.randn_like(noise), noise, slots)
    assert torch.allclose(landed.clamp(-1, 1), one_step.decode(codes, seeds=seeds), atol=1e-6)
    # with more steps it starts from the noised image at sigma = 1 / steps: x0 now matters
    three_steps = tiny_flextok(guidance_scale=guidance)
    x0 = three_steps.patchify(images(3))
    assert not torch.allclose(three_steps.last_step_images(x0, noise, slots),
                              three_steps.last_step_images(-x0, noise, slots))
    out = three_steps(images(3), keep=torch.full((3,), K), last_step=True)
    assert out.last_step.shape == (3, 1, TINY["image_size"], TINY["image_size"])
    assert torch.isfinite(out.last_step).all()


def test_save_load_round_trip(tok, tmp_path):
    tok.set_decoding(steps=4)
    try:
        tok.save_pretrained(tmp_path / "ft")
    finally:
        tok.set_decoding(steps=TINY["flow_steps"])
    loaded = load_component(tmp_path / "ft", ImageTokenizer)
    assert isinstance(loaded, FlexTokTokenizer) and loaded.accepts_prefixes
    assert loaded.decode_steps == TINY["flow_steps"]  # set_decoding changes an instance, not its config
    x = images(2)
    assert torch.equal(loaded.encode(x), tok.encode(x))
    codes = tok.encode(x)
    assert torch.allclose(loaded.decode(codes[:, :3], seeds=[1, 2]), tok.decode(codes[:, :3], seeds=[1, 2]))


def test_bad_configs_are_one_line_errors():
    with pytest.raises(ArgenError, match="fsq_levels"):
        FlexTokTokenizer(**{**TINY, "fsq_levels": (2, 5)})
    with pytest.raises(ArgenError, match="patch_size"):
        FlexTokTokenizer(**{**TINY, "patch_size": 5})
    with pytest.raises(ArgenError, match="nested_dropout"):
        FlexTokTokenizer(**{**TINY, "nested_dropout": "all"})


def test_compiled_decoder_draws_eager_images_whatever_the_batch():
    """`compile_decoder` (the pipeline's --compile): the same images as eager decoding, guided and not, and
    an image does not depend on its batch; the compiled network serves decode only, never training."""
    tok = tiny_flextok(guidance_scale=2.5, guidance_start=1)
    codes, seeds = tok.encode(images(3)), [5, 6, 7]
    eager = tok.decode(codes[:, :4], seeds=seeds)
    calls = []
    tok.compile_decoder()
    compiled = tok._compiled_velocity
    tok._compiled_velocity = lambda *args: calls.append(args[0].shape[0]) or compiled(*args)
    together = tok.decode(codes[:, :4], seeds=seeds)
    alone = tok.decode(codes[:1, :4], seeds=seeds[:1])
    assert calls == [3, 6, 6, 1, 2, 2]  # every decoder pass went through the compiled network
    assert torch.allclose(together, eager, atol=1e-5) and torch.equal(alone, together[:1])
    slots = tok.register_slots(tok.fsq.indices_to_codes(codes).float(), torch.full((3,), K), 3)
    x0, noise = torch.rand(3, tok.num_patches, tok.patch_dim), torch.randn(3, tok.num_patches, tok.patch_dim)
    tok.last_step_images(x0, noise, slots)  # the training path runs the eager network
    assert len(calls) == 6
    with pytest.raises(ArgenError, match="compile mode"):
        tok.compile_decoder("fastest")


# ---- num_tokens through the pipeline, every sampler and the CLI ---------------------------------


def _pipeline(tok, **gpt_overrides):
    torch.manual_seed(0)
    gpt = randomize(GPT(GPTConfig(**{**dict(dim=32, n_layer=2, n_head=2, vocab_size=tok.vocab_size, num_classes=10,
                                           block_size=K, rope_type="1d", class_dropout_prob=0.1),
                                     **gpt_overrides})), 2).eval()
    return ARPipeline(gpt, tok, class_names=CLASS_NAMES, defaults={"cfg_scale": 2.0}, crop=12)


SAMPLERS = ["ar", "sjd", "mcsjd", "gsd:G=3", "auto", "pac"]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_samples_a_prefix(tok, sampler):
    pipe = _pipeline(tok)
    conds = pipe.conditions(class_labels=[1, 7], num_images=2)
    full = pipe.sample_tokens(conds, [0, 1, 2, 3], sampler, SamplingParams(cfg_scale=2.0))
    part = pipe.sample_tokens(conds, [0, 1, 2, 3], sampler, SamplingParams(cfg_scale=2.0), num_tokens=3)
    assert full.tokens.shape == (4, K) and part.tokens.shape == (4, 3)
    # AR draws one number per position from each image's stream, auto and pac fix per-position Gumbel
    # noise: their first k tokens do not depend on how many follow. SJD/MC-SJD draw per window and GSD
    # is lossy, so theirs are a different (equally distributed, for SJD/MC-SJD) sample.
    if sampler in ("ar", "auto", "pac"):
        assert torch.equal(part.tokens, full.tokens[:, :3])
    images_ = pipe.tokens_to_images(part.tokens, conds, [0, 1, 2, 3])
    assert images_.shape == (4, 1, 12, 12) and torch.isfinite(images_).all()


def test_pipeline_compile_compiles_the_flow_decoder(tok):
    pipe = _pipeline(tiny_flextok())
    assert pipe.tokenizer._compiled_velocity is None
    pipe.compile()
    assert pipe.tokenizer._compiled_velocity is not None


def test_ar_prefix_costs_fewer_forwards(tok):
    pipe = _pipeline(tok)
    conds = pipe.conditions(class_labels=[3], num_images=2)
    assert pipe.sample_tokens(conds, [0, 1], "ar", num_tokens=2).num_forward_passes == 2
    assert pipe.sample_tokens(conds, [0, 1], "ar").num_forward_passes == K
    out = pipe(class_labels=[3], num_images=2, num_tokens=2, progress=False)
    assert out.tokens.shape == (2, 2) and len(out.images) == 2 and out.images[0].size == (12, 12)


def tiny_titok():
    """A 1D tokenizer of K codes that decodes whole sequences only (no prefixes)."""
    from argen.tokenizers import TiTokTokenizer

    return TiTokTokenizer(image_size=16, in_channels=1, num_latent_tokens=K, codebook_size=1000, token_size=4,
                          enc_patch_size=8, enc_width=16, enc_layers=1, enc_heads=2, dec_patch_size=8,
                          dec_width=16, dec_layers=1, dec_heads=2, is_legacy=False).eval()

def test_num_tokens_is_refused_without_a_prefix_tokenizer(tok):
    titok = tiny_titok()
    pipe = _pipeline(titok)
    with pytest.raises(ArgenError, match="TiTokTokenizer.*not prefixes"):
        pipe(class_labels=[1], num_tokens=3, progress=False)
    with pytest.raises(ArgenError, match="num_tokens"):
        _pipeline(tok)(class_labels=[1], num_tokens=9, progress=False)



def test_bench_samplers_times_a_prefix_next_to_a_whole_sequence_model(tok, tmp_path):
    """`argen bench samplers --num-tokens k`: a prefix model samples k tokens per image (k forwards
    under AR), a whole-sequence model in the same run all of its own; both say so in the table."""
    from argen.bench.samplers import bench_samplers, markdown_table, parse_spec
    titok = tiny_titok()
    pipes = {"whole": _pipeline(titok), "flex": _pipeline(tok)}
    records = bench_samplers(pipes, [parse_spec("ar"), parse_spec("mcsjd:L=2")], [2], 2,
                             SamplingParams(cfg_scale=2.0), rounds=1, log=lambda m: None, num_tokens=2)
    by = {(r.model, r.sampler): r for r in records}
    assert by["whole", "ar"].nfe_per_image == K and by["whole", "ar"].num_tokens is None
    assert by["flex", "ar"].nfe_per_image == 2 and by["flex", "ar"].num_tokens == 2
    assert by["flex", "mcsjd"].nfe_per_image <= 2
    assert "| flex (k = 2) | ar |" in markdown_table(records)
    with pytest.raises(ArgenError, match="not prefixes"):  # no model decodes prefixes
        bench_samplers({"whole": pipes["whole"]}, [parse_spec("ar")], [1], 1, SamplingParams(), rounds=1,
                       log=lambda m: None, num_tokens=2)
    with pytest.raises(ArgenError, match="num_tokens"):
        bench_samplers(pipes, [parse_spec("ar")], [1], 1, SamplingParams(), rounds=1, log=lambda m: None,
                       num_tokens=K + 1)

def _save_pipeline(tok, folder):
    pipe = _pipeline(tok)
    pipe.generator.save_pretrained(folder, extra_files={"pipeline.json": pipeline_json(
        tokenizer="tokenizer", class_names=CLASS_NAMES, defaults={"cfg_scale": 2.0}, crop=12)})
    tok.save_pretrained(folder / "tokenizer")
    return folder


def test_cli_generate_num_tokens(tok, tmp_path, capsys):
    model = _save_pipeline(tok, tmp_path / "m")
    out = tmp_path / "g.png"
    assert main(["generate", "--model", str(model), "--class", "1", "--num-images", "2", "--num-tokens", "3",
                 "--out", str(out)]) == 0
    assert "3 forward passes" in capsys.readouterr().out  # prefill + 2 decode steps, not K
    assert len(list((tmp_path / "g").glob("*.png"))) == 2
    # a tokenizer without prefixes: one line, exit code 2
    meta = json.loads((model / "pipeline.json").read_text())
    assert meta["tokenizer"] == "tokenizer"
    code = main(["generate", "--class", "1", "--num-images", "1", "--num-tokens", "3", "--out", str(tmp_path / "v.png")])
    err = capsys.readouterr().err
    assert code == 2 and "not prefixes" in err and len(err.strip().splitlines()) == 1


def test_cli_eval_sample_num_tokens(tok, tmp_path, capsys):
    """`argen eval sample --num-tokens k` samples k-token prefixes (k forwards with AR), records k in the
    run, and a resume with another k is refused in one line."""
    model = _save_pipeline(tok, tmp_path / "m")
    out = tmp_path / "ev"
    args = ["eval", "sample", "--model", str(model), "--num-samples", "3", "--batch-size", "2", "--out", str(out)]
    assert main(args + ["--num-tokens", "2"]) == 0
    capsys.readouterr()
    run = json.loads((out / "sampling.json").read_text())
    assert run["num_tokens"] == 2
    assert len(list((out / "samples").glob("*.png"))) == 3
    # the images are the decodes of the 2-token AR prefixes of the same seeds
    pipe = _pipeline(tok)
    conds = pipe.conditions(class_labels=[0], num_images=1)
    tokens = pipe.sample_tokens(conds, [0], "ar", pipe.sampling_params(), num_tokens=2).tokens
    expected = np.asarray(to_pil(pipe.tokens_to_images(tokens, conds, [0]))[0])
    assert np.array_equal(np.asarray(Image.open(out / "samples" / "000000.png")), expected)
    code = main(args + ["--num-tokens", "3"])
    err = capsys.readouterr().err
    assert code == 2 and "num_tokens" in err and len(err.strip().splitlines()) == 1
