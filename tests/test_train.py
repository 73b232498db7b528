"""Training loops: a tiny run learns, a stopped-and-resumed run is bit-identical, CLI errors are one line.

Everything is tiny (a few dozen Fashion-MNIST images, models of a few thousand parameters) and
runs on one thread so the tests stay fast and leave the CPU to others.
"""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file

from argen.cli.main import main
from argen.errors import ArgenError
from argen.tokenizers.vq import VQTokenizer
from argen.train.common import (
    EMA,
    StepBatchSampler,
    epoch_permutation,
    latest_checkpoint,
    list_checkpoints,
    read_log,
    warmup_cosine,
)
from argen.train.gpt import train_gpt
from argen.train.tokenizer import train_tokenizer

from helpers import launch_two_processes

torch.set_num_threads(1)

TINY_VQ = dict(ch=8, ch_mult=(1, 1, 1, 1), z_channels=8, codebook_size=32, codebook_dim=4, norm_groups=4)
TINY_GPT = dict(dim=32, n_layer=1, n_head=2)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_vq_dir(tmp_path_factory):
    """An untrained tiny VQ (4x4 codes, 32 entries): enough to produce codes for GPT training."""
    torch.manual_seed(0)
    vq = VQTokenizer(codebook_size=32, codebook_embed_dim=4, encoder_ch_mult=(1, 1, 1, 1),
                     decoder_ch_mult=(1, 1, 1, 1), z_channels=8, ch=8, num_res_blocks=1, in_channels=1,
                     norm_groups=4, image_size=32)
    folder = tmp_path_factory.mktemp("vq") / "model"
    vq.save_pretrained(folder)
    return folder


def _tensors(path):
    return load_file(str(path))


def _assert_same_state(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


# -- pieces --------------------------------------------------------------------------------


def test_schedule_warms_up_then_decays_to_the_floor():
    f = warmup_cosine(10, 110, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55)
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_data_order_is_a_function_of_seed_and_epoch():
    assert torch.equal(epoch_permutation(50, 3, 2), epoch_permutation(50, 3, 2))
    assert not torch.equal(epoch_permutation(50, 3, 2), epoch_permutation(50, 3, 1))
    full = list(StepBatchSampler(20, 6, seed=1, start=0, stop=7))
    tail = list(StepBatchSampler(20, 6, seed=1, start=4, stop=7))
    assert full[4:] == tail
    assert full[3][0][0] == 1  # 3 batches per epoch: batch 3 is epoch 1


def test_ema_tracks_parameters_and_copies_buffers():
    m = torch.nn.BatchNorm1d(3)
    ema = EMA(m, decay=0.5)
    with torch.no_grad():
        m.weight.fill_(3.0)
        m.running_mean.fill_(7.0)
    ema.num_updates = 100
    ema.update(m)
    assert torch.allclose(ema.shadow["weight"], torch.full((3,), 2.0))
    assert torch.equal(ema.shadow["running_mean"], torch.full((3,), 7.0))


# -- tokenizer -----------------------------------------------------------------------------


def test_tokenizer_tiny_run_learns_and_exports(tmp_path):
    out = tmp_path / "vq"
    metrics = train_tokenizer(out, steps=16, batch_size=8, lr=3e-3, warmup_steps=2, limit=64, test_limit=16,
                              log_every=2, ckpt_every=8, restart_every=4, progress=False, **TINY_VQ)
    rows = read_log(out / "log.csv")
    assert [r["step"] for r in rows] == list(range(2, 17, 2))
    assert rows[-1]["rec_mse"] < rows[0]["rec_mse"]
    assert {"psnr_db", "codebook_usage"} <= set(metrics["test"])
    assert json.loads((out / "metrics.json").read_text())["test"]["codes_used"] >= 1
    vq = VQTokenizer.from_pretrained(out / "model")
    assert vq.grid == (4, 4)
    assert (out / "model" / "reconstructions.png").is_file()
    card = (out / "model" / "MODEL_CARD.md").read_text()
    # the card describes this run's grid (TINY_VQ downsamples 8x), not default-vq's 8x8
    assert "4x4 codes" in card and "downsample 8" in card and "[B, 4, 4]" in card and "Why 8x8" not in card
    assert "Reconstruction FID" not in card  # only with rfid=True
    assert [p.name for p in list_checkpoints(out)] == ["step_000008", "step_000016"]


def test_tokenizer_card_reports_the_reconstruction_fid(tmp_path):
    out = tmp_path / "vq"
    metrics = train_tokenizer(out, steps=2, batch_size=4, warmup_steps=1, limit=8, test_limit=12, progress=False,
                              rfid=True, **TINY_VQ)
    card = (out / "model" / "MODEL_CARD.md").read_text()
    assert f"12 reconstructed 28x28 test images vs the test split's statistics): **{metrics['test']['rfid']:.2f}**" in card


def test_tokenizer_resume_is_bit_exact(tmp_path):
    kw = dict(steps=8, batch_size=8, lr=3e-3, warmup_steps=2, limit=48, test_limit=8, log_every=2, ckpt_every=4,
              restart_every=2, progress=False, **TINY_VQ)
    train_tokenizer(tmp_path / "a", **kw)
    assert train_tokenizer(tmp_path / "b", stop_at_step=4, **kw) == {"stopped_at": 4}
    train_tokenizer(tmp_path / "b", resume=True, **kw)
    for name in ("model.safetensors", "ema.safetensors", "extra.safetensors"):
        _assert_same_state(tmp_path / "a/checkpoints/step_000008" / name, tmp_path / "b/checkpoints/step_000008" / name)
    log_a = read_log(tmp_path / "a/log.csv")
    log_b = read_log(tmp_path / "b/log.csv")
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]


TINY_TITOK = dict(arch="titok", num_latent_tokens=4, patch_size=8, width=16, enc_layers=1, dec_layers=1, heads=2,
                  codebook_size=16, codebook_dim=4)


def test_titok_tiny_run_learns_and_exports(tmp_path):
    from argen.tokenizers import TiTokTokenizer

    out = tmp_path / "titok"
    metrics = train_tokenizer(out, steps=16, batch_size=8, lr=3e-3, warmup_steps=2, limit=64, test_limit=16,
                              log_every=2, ckpt_every=8, restart_every=4, progress=False, **TINY_TITOK)
    rows = read_log(out / "log.csv")
    assert [r["step"] for r in rows] == list(range(2, 17, 2))
    assert rows[-1]["rec_mse"] < rows[0]["rec_mse"]
    record = json.loads((out / "metrics.json").read_text())
    assert record["run"]["kind"] == "titok-tokenizer" and "vq_config" not in record["run"]
    assert record["run"]["titok_config"]["is_legacy"] is False
    tok = TiTokTokenizer.from_pretrained(out / "model")
    assert tok.grid is None and tok.num_tokens == 4 and tok.vocab_size == 16 and tok.image_channels == 1
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    assert tok.encode(x).shape == (3, 4) and tok.decode(tok.encode(x)).shape == (3, 1, 32, 32)
    assert 0 < metrics["test"]["codes_used"] <= 16
    card = (out / "model" / "MODEL_CARD.md").read_text()
    assert "K = 4" in card and "--arch titok" in card
    assert (out / "model" / "reconstructions.png").is_file()


def test_titok_resume_is_bit_exact(tmp_path):
    kw = dict(steps=8, batch_size=8, lr=3e-3, warmup_steps=2, limit=48, test_limit=8, log_every=2, ckpt_every=4,
              restart_every=2, progress=False, **TINY_TITOK)
    train_tokenizer(tmp_path / "a", **kw)
    assert train_tokenizer(tmp_path / "b", stop_at_step=4, **kw) == {"stopped_at": 4}
    train_tokenizer(tmp_path / "b", resume=True, **kw)
    for name in ("model.safetensors", "ema.safetensors", "extra.safetensors"):
        _assert_same_state(tmp_path / "a/checkpoints/step_000008" / name, tmp_path / "b/checkpoints/step_000008" / name)
    assert [r["loss"] for r in read_log(tmp_path / "a/log.csv")] == [r["loss"] for r in read_log(tmp_path / "b/log.csv")]
    # another K is another model: refused in one line
    with pytest.raises(ArgenError, match="titok_config"):
        train_tokenizer(tmp_path / "b", resume=True, **{**kw, "num_latent_tokens": 5})


TINY_FLEXTOK = dict(arch="flextok", num_latent_tokens=4, patch_size=8, width=16, enc_layers=1, dec_layers=1, heads=2,
                    fsq_levels=(5, 5, 3))


def test_flextok_tiny_run_learns_exports_and_resumes(tmp_path):
    from argen.tokenizers import FlexTokTokenizer

    kw = dict(steps=12, batch_size=8, lr=3e-3, warmup_steps=2, limit=64, test_limit=8, log_every=2, ckpt_every=6,
              progress=False, **TINY_FLEXTOK)
    out = tmp_path / "a"
    metrics = train_tokenizer(out, **kw)
    rows = read_log(out / "log.csv")
    assert rows[-1]["loss"] < rows[0]["loss"]  # the flow loss falls
    record = json.loads((out / "metrics.json").read_text())
    assert record["run"]["kind"] == "flextok-tokenizer" and record["run"]["restart_every"] == 0
    assert record["run"]["flextok_config"]["num_registers"] == 4
    tok = FlexTokTokenizer.from_pretrained(out / "model")
    assert tok.num_tokens == 4 and tok.vocab_size == 75 and tok.accepts_prefixes
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    assert tok.decode(tok.encode(x)[:, :1], seeds=[0, 1]).shape == (2, 1, 32, 32)
    assert metrics["test"]["codebook_size"] == 75 and 0 < metrics["test"]["codes_used"] <= 75
    assert (out / "model" / "prefixes.png").is_file()
    assert "1 to 4 ordered 1D tokens" in (out / "model/MODEL_CARD.md").read_text()
    # stopped and resumed: the same weights and losses as the uninterrupted run
    assert train_tokenizer(tmp_path / "b", stop_at_step=6, **kw) == {"stopped_at": 6}
    train_tokenizer(tmp_path / "b", resume=True, **kw)
    for name in ("model.safetensors", "ema.safetensors"):
        _assert_same_state(out / "checkpoints/step_000012" / name, tmp_path / "b/checkpoints/step_000012" / name)
    assert [r["loss"] for r in rows] == [r["loss"] for r in read_log(tmp_path / "b/log.csv")]



def test_flextok_decoder_only_keeps_every_code_and_stores_its_decoding(tmp_path):
    """--train-decoder-only on FlexTok: encoder, registers and FSQ projection frozen (every image keeps
    its codes, so a generator trained on them stays valid), the flow decoder trains; the decoding
    defaults given to the run are stored with the model and named on its card."""
    from argen.data.fashion_mnist import load_fashion_mnist
    from argen.tokenizers import FlexTokTokenizer
    from argen.train.tokenizer import ImageBatches

    kw = dict(batch_size=8, lr=3e-3, warmup_steps=1, limit=32, test_limit=8, log_every=2, ckpt_every=4,
              progress=False, export_dtype="float32", **TINY_FLEXTOK)
    train_tokenizer(tmp_path / "src", steps=4, **kw)
    train_tokenizer(tmp_path / "ft", steps=4, init_from=str(tmp_path / "src/model"), decoder_only=True,
                    nested_dropout="pow2-long", nested_full_share=0.3, flow_steps=3, decoder_guidance=2.5, **kw)
    src = FlexTokTokenizer.from_pretrained(tmp_path / "src/model")
    ft = FlexTokTokenizer.from_pretrained(tmp_path / "ft/model")
    trained = {n for n, _ in ft.named_parameters() if n.startswith(ft.decoder_param_prefixes)}
    assert "decoder.0.attn.to_q.weight" in trained and "dec_code_embed.weight" in trained
    for name, value in src.state_dict().items():
        assert torch.equal(value, ft.state_dict()[name]) == (name not in trained), name
    images, _ = load_fashion_mnist("test")
    x = ImageBatches(images[:32]).batch(torch.arange(32))
    assert torch.equal(src.encode(x), ft.encode(x))
    assert ft.decoding_settings == {"flow_steps": 3, "guidance_scale": 2.5}
    record = json.loads((tmp_path / "ft/metrics.json").read_text())["run"]
    assert record["decoder_only"]["trainable_parameters"] == sum(p.numel() for n, p in ft.named_parameters()
                                                                 if n in trained)
    card = (tmp_path / "ft/model/MODEL_CARD.md").read_text()
    assert "Decoder only (`--train-decoder-only`)" in card and "guidance scale 2.5 on the registers" in card
    assert "Nested dropout (pow2-long, and all 4 on 30% of the images)" in card
    assert ft.config.nested_full_share == 0.3 and src.config.nested_full_share == 0.0  # a warm start may change it

def test_tokenizer_init_from_starts_at_the_source_weights(tmp_path, capsys):
    """--init-from: the new run starts from the source's weights (decoding/training-only settings may
    change, the architecture may not), and the card says where it started."""
    from argen.tokenizers import FlexTokTokenizer

    kw = dict(batch_size=8, lr=3e-3, warmup_steps=2, limit=32, test_limit=8, log_every=2, ckpt_every=6,
              progress=False, **TINY_FLEXTOK)
    train_tokenizer(tmp_path / "src", steps=6, **kw)
    source = FlexTokTokenizer.from_pretrained(tmp_path / "src" / "model").float()
    # one step at a tiny learning rate: the weights stay next to the source's, far from a fresh init
    train_tokenizer(tmp_path / "warm", steps=1, **{**kw, "lr": 1e-9, "warmup_steps": 0, "time_mean": 1.0},
                    init_from=str(tmp_path / "src" / "model"))
    warm = load_file(str(tmp_path / "warm/checkpoints/step_000001/model.safetensors"))
    for name, value in source.state_dict().items():
        assert torch.allclose(warm[name], value, atol=1e-4), name
    fresh = FlexTokTokenizer(**{k: v for k, v in source.config.items() if not k.startswith("_")})
    assert not all(torch.allclose(warm[n], v, atol=1e-4) for n, v in fresh.state_dict().items() if v.is_floating_point())
    record = json.loads((tmp_path / "warm/metrics.json").read_text())
    assert record["run"]["init_from"]["folder"] == str(tmp_path / "src" / "model")
    card = (tmp_path / "warm/model/MODEL_CARD.md").read_text()
    assert "Started from the weights of" in card and "on top of an earlier run (a warm start" in card
    # another architecture, another class: one line each
    with pytest.raises(ArgenError, match="width"):
        train_tokenizer(tmp_path / "w", steps=1, **{**kw, "width": 8}, init_from=str(tmp_path / "src" / "model"))
    assert not (tmp_path / "w").exists()  # refused before the run folder was made
    with pytest.raises(ArgenError, match="FlexTokTokenizer"):
        train_tokenizer(tmp_path / "v", steps=1, **{k: v for k, v in kw.items() if k not in TINY_FLEXTOK},
                        **TINY_VQ, init_from=str(tmp_path / "src" / "model"))
    assert "--init-from" in _one_line_error(capsys, ["train", "tokenizer", "--arch", "flextok", "--init-from",
                                                     str(tmp_path / "none"), "--out", str(tmp_path / "n"),
                                                     "--steps", "1"])


def test_flextok_warm_start_may_add_decoder_blocks_that_start_as_the_identity(tmp_path):
    """--init-from with more --dec-layers: the source's blocks are copied, the new ones start as the
    identity (adaLN-Zero), so the grown tokenizer decodes exactly as the source; fewer blocks, or
    growing anything else, is refused."""
    from argen.tokenizers import FlexTokTokenizer
    from argen.train.tokenizer import _init_line, init_tokenizer_weights

    arch = dict(image_size=32, in_channels=1, patch_size=8, num_registers=4, fsq_levels=(5, 5, 3), enc_width=16,
                enc_layers=1, enc_heads=2, dec_width=16, dec_heads=2)
    torch.manual_seed(0)
    src = FlexTokTokenizer(**arch, dec_layers=2)
    with torch.no_grad():  # trained-looking blocks: adaLN gates away from their zero init
        for p in src.parameters():
            p.add_(0.1 * torch.randn_like(p))
    src.save_pretrained(tmp_path / "src", dtype=torch.float32)
    grown = FlexTokTokenizer(**arch, dec_layers=4)
    info = init_tokenizer_weights(grown, str(tmp_path / "src"))
    assert info["grown"] == {"dec_layers": [2, 4]}
    assert "dec_layers 2 -> 4, the new blocks starting as the identity" in _init_line({"init_from": info})
    codes = torch.randint(0, 75, (3, 4))
    assert torch.equal(src.decode(codes, seeds=[0, 1, 2], num_steps=2, guidance_scale=2.0),
                       grown.decode(codes, seeds=[0, 1, 2], num_steps=2, guidance_scale=2.0))
    assert torch.equal(grown.decoder[1].norm1.linear.weight, src.decoder[1].norm1.linear.weight)
    assert not grown.decoder[2].norm1.linear.weight.any()  # a new block, still at its zero gate
    with pytest.raises(ArgenError, match="dec_layers"):
        init_tokenizer_weights(FlexTokTokenizer(**arch, dec_layers=1), str(tmp_path / "src"))
    with pytest.raises(ArgenError, match="enc_layers"):
        init_tokenizer_weights(FlexTokTokenizer(**{**arch, "enc_layers": 2}, dec_layers=4), str(tmp_path / "src"))


def test_fsq_saturation_penalty_is_zero_in_range_and_added_to_the_loss(tmp_path):
    from argen.tokenizers import FlexTokTokenizer
    from argen.train.tokenizer import fsq_saturation

    assert float(fsq_saturation(torch.tensor([[-2.0, 0.5, 1.9, 2.0]]))) == 0.0
    assert float(fsq_saturation(torch.tensor([[3.0, -4.0, 0.0, 1.0]]))) == pytest.approx((1 + 4) / 4)
    # a source whose FSQ latents are blown up (most past |z| = 2), as a long run without the penalty
    src = FlexTokTokenizer(image_size=32, in_channels=1, patch_size=8, num_registers=4, fsq_levels=(5, 5, 3),
                           enc_width=16, enc_layers=1, enc_heads=2, dec_width=16, dec_layers=1, dec_heads=2)
    with torch.no_grad():
        src.to_fsq.weight.mul_(20)
    src.save_pretrained(tmp_path / "src", dtype=torch.float32)
    kw = dict(steps=4, batch_size=8, lr=1e-3, warmup_steps=1, limit=32, test_limit=8, log_every=1, ckpt_every=4,
              progress=False, **TINY_FLEXTOK, init_from=str(tmp_path / "src"))
    train_tokenizer(tmp_path / "w", fsq_saturation_weight=0.5, **kw)
    rows = read_log(tmp_path / "w/log.csv")
    assert rows[0]["saturated"] > 0.3 and rows[0]["fsq_saturation"] > 0.1
    for row in rows:  # the logged total is the flow loss plus the weighted penalty
        assert row["loss"] == pytest.approx(row["flow"] + 0.5 * row["fsq_saturation"], rel=1e-4)
    assert json.loads((tmp_path / "w/metrics.json").read_text())["run"]["fsq_saturation_weight"] == 0.5
    assert "--fsq-saturation-weight" in (tmp_path / "w/model/MODEL_CARD.md").read_text()
    train_tokenizer(tmp_path / "off", **kw)
    assert all(row["loss"] == row["flow"] for row in read_log(tmp_path / "off/log.csv"))
    with pytest.raises(ArgenError, match="fsq_saturation_weight"):
        train_tokenizer(tmp_path / "t", steps=1, fsq_saturation_weight=1.0, **TINY_VQ)


def test_titok_restarts_revive_dead_codes(tmp_path):
    """With restarts every step, dead codes are moved onto encoder outputs: more codes in use than without."""
    kw = dict(steps=6, batch_size=8, lr=1e-3, warmup_steps=1, limit=48, test_limit=48, log_every=6, ckpt_every=6,
              progress=False, **{**TINY_TITOK, "codebook_size": 64})
    off = train_tokenizer(tmp_path / "off", restart_every=0, **kw)
    on = train_tokenizer(tmp_path / "on", restart_every=1, restart_until=1.0, **kw)
    assert on["test"]["codes_used"] > off["test"]["codes_used"]


# -- GPT ----------------------------------------------------------------------------------


def test_gpt_c2i_tiny_run_lowers_the_loss(tmp_path, tiny_vq_dir):
    out = tmp_path / "c2i"
    metrics = train_gpt(out, model_type="c2i", vq=str(tiny_vq_dir), steps=20, batch_size=16, lr=3e-3,
                        warmup_steps=2, limit=64, log_every=2, ckpt_every=10, progress=False,
                        samples_per_class=1, eval_items=16, accuracy_per_class=1, **TINY_GPT)
    rows = read_log(out / "log.csv")
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.2
    assert (out / "codes_train.safetensors").is_file()
    from argen.pipeline import ARPipeline

    pipe = ARPipeline.from_pretrained(out / "model")  # the exported folder is a whole pipeline
    assert not pipe.is_text_to_image and len(pipe.class_names) == 10
    assert pipe(class_labels="sneaker", num_images=2, progress=False).images[0].size == (28, 28)
    assert (out / "model" / "samples.png").is_file() and (out / "model" / "MODEL_CARD.md").is_file()
    assert metrics["export_dtype"] in ("float16", "float32")
    acc = metrics["class_accuracy"]
    assert acc is None or (acc["samples"] == 10 and 0 <= acc["accuracy"] <= 1)


def test_gpt_trains_on_a_1d_tokenizer(tmp_path):
    """Any registered tokenizer: a 1D TiTok (no grid) gives a GPT with 1D RoPE whose exported
    folder is a pipeline that generates images."""
    from argen.pipeline import ARPipeline
    from argen.tokenizers import TiTokTokenizer

    torch.manual_seed(0)
    titok = TiTokTokenizer(image_size=32, in_channels=1, num_latent_tokens=6, codebook_size=16, token_size=4,
                           enc_patch_size=8, enc_width=16, enc_layers=1, enc_heads=2, dec_patch_size=8, dec_width=16,
                           dec_layers=1, dec_heads=2, is_legacy=False)
    titok.save_pretrained(tmp_path / "titok")
    train_gpt(tmp_path / "run", model_type="c2i", vq=str(tmp_path / "titok"), steps=4, batch_size=8, warmup_steps=1,
              limit=32, log_every=2, ckpt_every=10, progress=False, samples_per_class=1, eval_items=8,
              accuracy_per_class=0, **TINY_GPT)
    pipe = ARPipeline.from_pretrained(tmp_path / "run" / "model")
    assert pipe.generator.grid is None and pipe.generator.num_positions == 6
    assert type(pipe.tokenizer) is TiTokTokenizer
    out = pipe(class_labels="bag", num_images=2, progress=False)
    assert out.tokens.shape == (2, 6) and out.images[0].size == (28, 28)


def test_gpt_t2i_resume_is_bit_exact(tmp_path, tiny_vq_dir):
    kw = dict(model_type="t2i", vq=str(tiny_vq_dir), steps=6, batch_size=8, lr=3e-3, warmup_steps=2, limit=32,
              log_every=1, ckpt_every=3, progress=False, dropout=0.1, samples_per_class=1, eval_items=8, accuracy_per_class=0, **TINY_GPT)
    train_gpt(tmp_path / "a", **kw)
    assert train_gpt(tmp_path / "b", stop_at_step=3, **kw) == {"stopped_at": 3}
    train_gpt(tmp_path / "b", resume=True, **kw)
    for name in ("model.safetensors", "ema.safetensors"):
        _assert_same_state(tmp_path / "a/checkpoints/step_000006" / name, tmp_path / "b/checkpoints/step_000006" / name)
    assert [r["loss"] for r in read_log(tmp_path / "a/log.csv")] == [r["loss"] for r in read_log(tmp_path / "b/log.csv")]
    folder = tmp_path / "a" / "model"
    assert json.loads((folder / "text_encoder.json").read_text())["feature_dim"] == 384
    assert json.loads((folder / "pipeline.json").read_text())["text_encoder"]["name"] == "minilm"
    # the export embeds the class descriptions once, and the loaded pipeline reads prompts against them
    from argen.pipeline import CLASS_DESCRIPTIONS_FILE, ARPipeline, load_class_descriptions

    pipe = ARPipeline.from_pretrained(folder)
    assert (folder / CLASS_DESCRIPTIONS_FILE).is_file()
    assert load_class_descriptions(folder, pipe.text_encoder, pipe.class_names) is not None


# -- CLI -----------------------------------------------------------------------------------


def _one_line_error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("argen: error:")
    return err


def test_cli_missing_vq_dir(tmp_path, capsys):
    err = _one_line_error(capsys, ["train", "gpt", "--model-type", "c2i", "--vq", str(tmp_path / "nope"),
                                   "--out", str(tmp_path / "o"), "--steps", "2"])
    assert "nope" in err


def test_cli_bad_arguments(tmp_path, capsys):
    _one_line_error(capsys, ["train", "tokenizer", "--out", str(tmp_path / "o")])  # no --steps/--epochs
    _one_line_error(capsys, ["train", "gpt", "--model-type", "x2i", "--vq", "default-vq", "--out", "o", "--steps", "1"])
    _one_line_error(capsys, ["train", "tokenizer", "--out", str(tmp_path / "o"), "--steps", "0"])
    _one_line_error(capsys, ["train", "tokenizer", "--out", str(tmp_path / "o"), "--steps", "3", "--ch-mult", "1,a"])
    assert "--test-limit" in _one_line_error(capsys, ["train", "tokenizer", "--out", str(tmp_path / "o"), "--steps",
                                                      "3", "--test-limit", "1"])
    assert "--limit" in _one_line_error(capsys, ["train", "gpt", "--model-type", "c2i", "--vq", "default-vq", "--out",
                                                 str(tmp_path / "o"), "--steps", "1", "--limit", "0"])


def test_cli_tokenizer_arch_options(tmp_path, capsys):
    out = str(tmp_path / "o")
    assert "--ch does not apply to --arch titok" in _one_line_error(
        capsys, ["train", "tokenizer", "--arch", "titok", "--ch", "8", "--out", out, "--steps", "2"])
    assert "--num-latent-tokens, --width do not apply to --arch vq" in _one_line_error(
        capsys, ["train", "tokenizer", "--num-latent-tokens", "8", "--width", "32", "--out", out, "--steps", "2"])
    assert "--patch-size 5" in _one_line_error(
        capsys, ["train", "tokenizer", "--arch", "titok", "--patch-size", "5", "--out", out, "--steps", "2"])
    assert "--heads" in _one_line_error(
        capsys, ["train", "tokenizer", "--arch", "titok", "--width", "30", "--heads", "4", "--out", out, "--steps", "2"])
    assert "--fsq-levels does not apply to --arch titok" in _one_line_error(
        capsys, ["train", "tokenizer", "--arch", "titok", "--fsq-levels", "8,5,5", "--out", out, "--steps", "2"])
    assert "--codebook-size does not apply to --arch flextok" in _one_line_error(
        capsys, ["train", "tokenizer", "--arch", "flextok", "--codebook-size", "64", "--out", out, "--steps", "2"])
    assert "fsq_levels" in _one_line_error(
        capsys, ["train", "tokenizer", "--arch", "flextok", "--fsq-levels", "2,5", "--out", out, "--steps", "2"])
    assert "--fsq-saturation-weight does not apply to --arch titok" in _one_line_error(
        capsys, ["train", "tokenizer", "--arch", "titok", "--fsq-saturation-weight", "1", "--out", out, "--steps", "2"])


def test_cli_trains_a_titok(tmp_path, capsys):
    out = tmp_path / "t"
    code = main(["train", "tokenizer", "--arch", "titok", "--num-latent-tokens", "3", "--patch-size", "16", "--width",
                 "8", "--enc-layers", "1", "--dec-layers", "1", "--heads", "2", "--codebook-size", "8",
                 "--codebook-dim", "4", "--out", str(out), "--steps", "2", "--batch-size", "4", "--limit", "8",
                 "--test-limit", "4", "--no-progress", "--threads", "1", "--warmup-steps", "1"])
    assert code == 0
    assert "tokenizer (titok)" in capsys.readouterr().out
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["_class_name"] == "TiTokTokenizer" and config["num_latent_tokens"] == 3
    assert config["enc_patch_size"] == 16 and config["dec_width"] == 8


def test_cli_refuses_a_guided_export_without_a_null_condition_before_training(tmp_path, capsys, tiny_vq_dir):
    """The export samples its grid at --cfg-scale; without class dropout there is no null class to guide
    with, which used to fail only after the whole run."""
    out = tmp_path / "run"
    argv = ["train", "gpt", "--model-type", "c2i", "--vq", str(tiny_vq_dir), "--out", str(out), "--steps", "2",
            "--limit", "32", "--batch-size", "8", "--dim", "16", "--n-layer", "1", "--n-head", "2", "--class-dropout", "0"]
    assert "--class-dropout" in _one_line_error(capsys, argv) and not out.exists()


def test_two_processes_train_as_one_process_with_twice_the_batch(tmp_path, capsys, tiny_vq_dir):
    """`accelerate launch` with 2 CPU processes is one run: one log and one export, `num_processes` 2 in the
    checkpoint, and (no dropout) the steps of one process with twice the batch, as global step s takes the
    same items either way. Before session 23 each process came up alone and trained the whole run twice."""
    common = ["train", "gpt", "--model-type", "c2i", "--vq", tiny_vq_dir, "--steps", "4", "--limit", "64", "--dim", "16",
              "--n-layer", "1", "--n-head", "2", "--ckpt-every", "2", "--log-every", "1", "--no-progress",
              "--threads", "1", "--dropout", "0", "--class-dropout", "0", "--cfg-scale", "1",
              "--export-dtype", "float32"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([str(a) for a in [*common, "--out", one, "--batch-size", "16"]]) == 0
    capsys.readouterr()
    proc = launch_two_processes([*common, "--out", two, "--batch-size", "8"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("gpt (c2i)") == 1  # only the main process reports
    log_one, log_two = read_log(one / "log.csv"), read_log(two / "log.csv")
    assert [r["step"] for r in log_two] == [1, 2, 3, 4] and log_two[-1]["epoch"] == 1
    assert all(abs(a["loss"] - b["loss"]) < 1e-5 for a, b in zip(log_one, log_two))
    assert json.loads((latest_checkpoint(two) / "state.json").read_text())["num_processes"] == 2
    w_one, w_two = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    assert max((w_one[k] - w_two[k]).abs().max().item() for k in w_one) < 1e-6


def test_cli_refuses_to_overwrite_a_run_without_resume(tmp_path, capsys, tiny_vq_dir):
    out = tmp_path / "run"
    argv = ["train", "gpt", "--model-type", "c2i", "--vq", str(tiny_vq_dir), "--out", str(out), "--steps", "2",
            "--limit", "32", "--batch-size", "8", "--dim", "16", "--n-layer", "1", "--n-head", "2",
            "--ckpt-every", "1", "--no-progress", "--threads", "1"]
    train_gpt(out, model_type="c2i", vq=str(tiny_vq_dir), steps=2, batch_size=8, limit=32, dim=16, n_layer=1,
              n_head=2, ckpt_every=1, progress=False, stop_at_step=1)
    assert latest_checkpoint(out).name == "step_000001"
    err = _one_line_error(capsys, argv)
    assert "--resume" in err
    # resuming with another architecture or other data is refused in one line, before any weight is loaded
    bigger = [("32" if a == "16" and argv[i - 1] == "--dim" else a) for i, a in enumerate(argv)]
    assert "gpt_config" in _one_line_error(capsys, bigger + ["--resume"])
    fewer = [("24" if a == "32" and argv[i - 1] == "--limit" else a) for i, a in enumerate(argv)]
    assert "train_items" in _one_line_error(capsys, fewer + ["--resume"])


def test_t2i_from_c2i_fits_captions_to_class_embeddings(tmp_path, tiny_vq_dir, monkeypatch):
    """--init-from a c2i model: the transformer is copied and the caption projection maps each
    class's captions to that class's embedding, before any training step."""
    from argen.models import GPT
    from argen.train import gpt as train_mod

    monkeypatch.setitem(train_mod.RICH_POOL_SIZES, "mean", 20)
    kw = dict(vq=str(tiny_vq_dir), batch_size=8, lr=3e-3, warmup_steps=2, limit=32, progress=False,
              samples_per_class=1, eval_items=8, accuracy_per_class=0, **TINY_GPT)
    train_gpt(tmp_path / "c2i", model_type="c2i", steps=2, **kw)
    source = GPT.from_pretrained(tmp_path / "c2i" / "model").float()

    encoder = train_mod._load_encoder("minilm", 64, "mean")
    caption_set = train_mod.caption_table(encoder, "rich", 0)
    model = GPT(train_mod.GPTConfig(**{**source.gpt_config.__dict__, "model_type": "t2i", "caption_dim": 384,
                                       "caption_token_num": 1}))
    info = train_mod.init_weights(model, tmp_path / "c2i" / "model", caption_set)
    assert info["copied"] == len(model.state_dict()) - 3  # all but the caption MLP (2) and null buffer
    torch.testing.assert_close(model.layers[0].attention.wqkv.weight, source.layers[0].attention.wqkv.weight)
    table = source.cls_embedding.embedding_table.weight
    with torch.no_grad():
        mapped = model.cls_embedding.cap_proj(caption_set.feats[:, 0])
    nearest = torch.cdist(mapped, table[:-1]).argmin(1)
    assert (nearest == caption_set.labels).float().mean() > 0.9

    metrics = train_gpt(tmp_path / "t2i", model_type="t2i", steps=2, text_pooling="mean", text_max_length=64,
                        captions="rich", init_from=str(tmp_path / "c2i" / "model"), **kw)
    assert metrics["step"] == 2
    assert json.loads((tmp_path / "t2i" / "model" / "text_encoder.json").read_text())["pooling"] == "mean"
    with pytest.raises(Exception, match="one condition slot"):
        train_gpt(tmp_path / "bad", model_type="t2i", steps=2, init_from=str(tmp_path / "c2i" / "model"), **kw)


def test_cli_eval_tokenizer_reports_reconstruction_fid(tmp_path, capsys):
    """`argen eval tokenizer`: PSNR, usage, rFID of any tokenizer folder; a missing one is a one-line error."""
    out = tmp_path / "t"
    train_tokenizer(out, steps=2, batch_size=4, warmup_steps=1, limit=8, test_limit=4, progress=False, **TINY_TITOK)
    assert main(["eval", "tokenizer", "--tokenizer", str(out / "model"), "--num-images", "40", "--threads", "1",
                 "--json", str(tmp_path / "m.json")]) == 0
    text = capsys.readouterr().out
    assert "4 tokens/image" in text and "rFID" in text and "(N=40)" in text
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["test_images"] == 40 and m["rfid"] > 0 and 0 <= m["recon_class_accuracy"] <= 1
    err = _one_line_error(capsys, ["eval", "tokenizer", "--tokenizer", str(tmp_path / "nope")])
    assert "nope" in err
    err = _one_line_error(capsys, ["eval", "tokenizer", "--tokenizer", str(out / "model"), "--flow-steps", "2"])
    assert "decodes in one pass" in err


def test_cli_eval_tokenizer_takes_flow_decoding_settings(tmp_path, capsys):
    """--flow-steps / --decoder-guidance reach FlexTok's decoder: the figures equal a direct evaluation
    at those settings and are recorded with them."""
    from argen.data.fashion_mnist import load_fashion_mnist
    from argen.tokenizers import FlexTokTokenizer
    from argen.train.tokenizer import evaluate_tokenizer

    out = tmp_path / "f"
    train_tokenizer(out, steps=2, batch_size=4, warmup_steps=1, limit=8, test_limit=4, progress=False, **TINY_FLEXTOK)
    assert main(["eval", "tokenizer", "--tokenizer", str(out / "model"), "--num-images", "6", "--threads", "1",
                 "--flow-steps", "2", "--decoder-guidance", "2.5", "--json", str(tmp_path / "m.json")]) == 0
    assert "flow steps 2, guidance scale 2.5)" in capsys.readouterr().out
    m = json.loads((tmp_path / "m.json").read_text())
    assert (m["flow_steps"], m["guidance_scale"]) == (2, 2.5)
    images, _ = load_fashion_mnist("test")
    tok = FlexTokTokenizer.from_pretrained(out / "model").float()
    direct = evaluate_tokenizer(tok.set_decoding(steps=2, guidance_scale=2.5), images[:6])
    default = evaluate_tokenizer(tok.set_decoding(steps=8, guidance_scale=1.0), images[:6])
    assert m["psnr_db"] == pytest.approx(direct["psnr_db"], abs=1e-9) and m["psnr_db"] != default["psnr_db"]
    # --seed s: image i decodes from seed s + i (the decoder's noise alone moves the figures)
    assert main(["eval", "tokenizer", "--tokenizer", str(out / "model"), "--num-images", "6", "--threads", "1",
                 "--flow-steps", "2", "--decoder-guidance", "2.5", "--seed", "3", "--json", str(tmp_path / "s.json")]) == 0
    shifted = json.loads((tmp_path / "s.json").read_text())
    assert shifted["seed"] == 3 and shifted["psnr_db"] != m["psnr_db"]
    tok.set_decoding(steps=2, guidance_scale=2.5)
    assert shifted["psnr_db"] == pytest.approx(evaluate_tokenizer(tok, images[:6], seed=3)["psnr_db"], abs=1e-9)
    # --decoder-guidance-start 1: the first step unguided, recorded with the figures
    assert main(["eval", "tokenizer", "--tokenizer", str(out / "model"), "--num-images", "6", "--threads", "1",
                 "--flow-steps", "2", "--decoder-guidance", "2.5", "--decoder-guidance-start", "1",
                 "--json", str(tmp_path / "g.json")]) == 0
    later = json.loads((tmp_path / "g.json").read_text())
    assert later["guidance_start"] == 1 and later["psnr_db"] != m["psnr_db"]
    tok.set_decoding(steps=2, guidance_scale=2.5, guidance_start=1)
    assert later["psnr_db"] == pytest.approx(evaluate_tokenizer(tok, images[:6])["psnr_db"], abs=1e-9)
