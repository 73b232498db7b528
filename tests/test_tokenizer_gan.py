"""The adversarial loss of `argen train tokenizer` (`--gan-weight`, `--gan-start`) and decoder-only
fine-tuning (`--train-decoder-only`): the pieces behave, a GAN run resumes exactly, weight 0 is
the training of before, a decoder-only run keeps every code. Tiny models, one thread, seconds."""

import copy
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from argen.cli.main import main
from argen.errors import ArgenError
from argen.train.common import read_log
from argen.train.gan import AdversarialLoss, PatchDiscriminator, adaptive_weight, hinge_d_loss
from argen.train.tokenizer import train_tokenizer

TINY_TITOK = dict(arch="titok", num_latent_tokens=4, patch_size=8, width=16, enc_layers=1, dec_layers=1, heads=2,
                  codebook_size=16, codebook_dim=4)
TINY_VQ = dict(ch=8, ch_mult=(1, 1, 1, 1), z_channels=8, codebook_size=32, codebook_dim=4, norm_groups=4)
RUN = dict(batch_size=8, lr=3e-3, warmup_steps=2, limit=48, test_limit=8, log_every=1, ckpt_every=4,
           progress=False)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _disc_state(ckpt) -> dict:
    return torch.load(ckpt / "optimizer.pt", weights_only=True)["extra_modules"]["discriminator"]


def test_hinge_loss_and_a_discriminator_step():
    assert float(hinge_d_loss(torch.full((2, 1, 3, 3), 2.0), torch.full((2, 1, 3, 3), -2.0))) == 0.0
    assert float(hinge_d_loss(torch.zeros(2, 1, 3, 3), torch.zeros(2, 1, 3, 3))) == 1.0
    assert PatchDiscriminator()(torch.zeros(3, 1, 32, 32)).shape == (3, 1, 6, 6)  # 6x6 patch logits on 32x32
    gan = AdversarialLoss(weight=1.0, start=0, lr=1e-3, seed=0)
    real = torch.rand(4, 1, 32, 32) * 2 - 1
    fake = torch.rand(4, 1, 32, 32) * 0.2  # blurry grey: easy to tell apart
    before = copy.deepcopy(gan.disc)
    parts = gan.discriminator_step(real, fake)
    # the logged loss is the hinge loss of the weights before the step, and the step moved every layer
    with torch.no_grad():
        expected = float(hinge_d_loss(before(real), before(fake)))
    assert float(parts["gan_d"]) == pytest.approx(expected, rel=1e-5)
    changed = [not torch.equal(p, q) for p, q in zip(before.parameters(), gan.disc.parameters())]
    assert all(changed)
    for _ in range(15):
        last = gan.discriminator_step(real, fake)
    assert float(last["gan_d"]) < 0.5 * float(parts["gan_d"])
    assert float(last["logits_real"]) > float(last["logits_fake"])


def test_adaptive_weight_matches_the_gradient_norms_at_the_last_layer():
    torch.manual_seed(0)
    last = torch.nn.Conv2d(4, 1, 3, padding=1)
    hidden = torch.randn(2, 4, 32, 32)
    target = torch.rand(2, 1, 32, 32) * 2 - 1
    gan = AdversarialLoss(weight=0.3, start=0, lr=1e-3, seed=0)
    recon = last(hidden)
    nll = F.mse_loss(recon, target)
    term, parts = gan.generator_term(recon, nll, last.weight)
    g_nll = torch.autograd.grad(nll, last.weight, retain_graph=True)[0]
    g_adv = torch.autograd.grad(-gan.disc(recon).mean(), last.weight, retain_graph=True)[0]
    assert float(parts["adaptive_weight"]) == pytest.approx(float(g_nll.norm() / (g_adv.norm() + 1e-4)), rel=1e-5)
    # so the weighted term pushes the last layer 0.3 times as hard as the reconstruction loss
    g_term = torch.autograd.grad(term, last.weight, retain_graph=True)[0]
    assert float(g_term.norm()) == pytest.approx(0.3 * float(g_nll.norm()), rel=1e-3)
    assert float(adaptive_weight(nll, -gan.disc(recon).mean(), last.weight)) == pytest.approx(
        float(parts["adaptive_weight"]), rel=1e-6)
    # the generator's term trains the generator only
    term.backward()
    assert all(p.grad is None for p in gan.disc.parameters()) and all(p.requires_grad for p in gan.disc.parameters())


def test_gan_run_resumes_exactly_and_trains_the_discriminator(tmp_path):
    kw = dict(steps=8, gan_weight=0.5, gan_start=2, restart_every=2, **RUN, **TINY_TITOK)
    train_tokenizer(tmp_path / "a", **kw)
    assert train_tokenizer(tmp_path / "b", stop_at_step=4, **kw) == {"stopped_at": 4}
    train_tokenizer(tmp_path / "b", resume=True, **kw)
    a, b = tmp_path / "a/checkpoints/step_000008", tmp_path / "b/checkpoints/step_000008"
    for name in ("model.safetensors", "ema.safetensors"):
        assert _same_tensors(load_file(str(a / name)), load_file(str(b / name))), name
    assert _same_tensors(_disc_state(a)["discriminator"], _disc_state(b)["discriminator"])
    assert _disc_state(a)["optimizer"]["state"].keys() == _disc_state(b)["optimizer"]["state"].keys()
    # the discriminator trained between steps 4 and 8
    assert not _same_tensors(_disc_state(tmp_path / "a/checkpoints/step_000004")["discriminator"],
                             _disc_state(a)["discriminator"])
    rows = read_log(tmp_path / "a/log.csv")
    assert [r["loss"] for r in rows] == [r["loss"] for r in read_log(tmp_path / "b/log.csv")]
    # steps 1-2 are before --gan-start: nothing adversarial yet; afterwards both sides train
    assert all(r["gan_d"] == 0 and r["adaptive_weight"] == 0 for r in rows[:2])
    assert all(r["gan_d"] > 0 and r["adaptive_weight"] > 0 for r in rows[2:])
    record = json.loads((tmp_path / "a/metrics.json").read_text())
    assert record["run"]["gan"]["weight"] == 0.5 and record["run"]["gan"]["start"] == 2
    card = (tmp_path / "a/model/MODEL_CARD.md").read_text()
    assert "`--gan-weight 0.5`, from step 2" in card and "no GAN loss" not in card
    # another GAN setting, or none, is another run
    with pytest.raises(ArgenError, match="gan"):
        train_tokenizer(tmp_path / "b", resume=True, **{**kw, "gan_weight": 0.25})
    with pytest.raises(ArgenError, match="gan"):
        train_tokenizer(tmp_path / "b", resume=True, **{k: v for k, v in kw.items() if not k.startswith("gan")})


def test_gan_weight_zero_and_before_gan_start_train_as_without_it(tmp_path):
    kw = dict(steps=8, restart_every=2, **RUN, **TINY_VQ)
    train_tokenizer(tmp_path / "plain", **kw)
    train_tokenizer(tmp_path / "zero", gan_weight=0.0, **kw)
    for name in ("model.safetensors", "ema.safetensors", "extra.safetensors"):
        assert _same_tensors(load_file(str(tmp_path / "plain/checkpoints/step_000008" / name)),
                             load_file(str(tmp_path / "zero/checkpoints/step_000008" / name))), name
    assert (tmp_path / "plain/log.csv").read_text().splitlines()[0] == (tmp_path / "zero/log.csv").read_text().splitlines()[0]
    assert "gan" not in json.loads((tmp_path / "zero/metrics.json").read_text())["run"]
    # a discriminator waiting for step 4 changes nothing before it (random stream, restarts, weights)
    train_tokenizer(tmp_path / "late", gan_weight=1.0, gan_start=4, stop_at_step=4, **kw)
    assert _same_tensors(load_file(str(tmp_path / "plain/checkpoints/step_000004/model.safetensors")),
                         load_file(str(tmp_path / "late/checkpoints/step_000004/model.safetensors")))
    train_tokenizer(tmp_path / "late", gan_weight=1.0, gan_start=4, resume=True, **kw)
    assert read_log(tmp_path / "late/log.csv")[-1]["adaptive_weight"] > 0  # the VQ's decoder.conv_out is found
    assert not _same_tensors(load_file(str(tmp_path / "plain/checkpoints/step_000008/model.safetensors")),
                             load_file(str(tmp_path / "late/checkpoints/step_000008/model.safetensors")))


def test_decoder_only_keeps_every_code(tmp_path):
    from argen.data.fashion_mnist import load_fashion_mnist
    from argen.tokenizers import TiTokTokenizer
    from argen.train.tokenizer import ImageBatches

    train_tokenizer(tmp_path / "src", steps=4, export_dtype="float32", **RUN, **TINY_TITOK)
    src_dir = tmp_path / "src/model"
    train_tokenizer(tmp_path / "ft", steps=4, export_dtype="float32", init_from=str(src_dir), decoder_only=True,
                    gan_weight=0.1, **RUN, **TINY_TITOK)
    src = TiTokTokenizer.from_pretrained(src_dir)
    ft = TiTokTokenizer.from_pretrained(tmp_path / "ft/model")
    src_state, ft_state = src.state_dict(), ft.state_dict()
    for name in src_state:
        if name.startswith("decoder."):
            continue
        assert torch.equal(src_state[name], ft_state[name]), name
    assert not torch.equal(src_state["decoder.conv_out.weight"], ft_state["decoder.conv_out.weight"])
    images, _ = load_fashion_mnist("test")
    x = ImageBatches(images[:64]).batch(torch.arange(64))
    assert torch.equal(src.encode(x), ft.encode(x))
    record = json.loads((tmp_path / "ft/metrics.json").read_text())["run"]
    assert record["restart_every"] == 0
    trainable = sum(v.numel() for k, v in ft.named_parameters() if k.startswith("decoder."))
    assert record["decoder_only"]["trainable_parameters"] == trainable
    assert "Decoder only (`--train-decoder-only`)" in (tmp_path / "ft/model/MODEL_CARD.md").read_text()


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("argen: error:")
    return err


def test_cli_gan_options_are_checked(tmp_path, capsys):
    base = ["train", "tokenizer", "--out", str(tmp_path / "o"), "--steps", "2"]
    assert "--init-from" in _one_line_error(capsys, base + ["--arch", "flextok", "--train-decoder-only"])
    assert "--gan-weight" in _one_line_error(capsys, base + ["--gan-start", "1"])
    assert "never train" in _one_line_error(capsys, base + ["--gan-weight", "1", "--gan-start", "2"])
    assert "--gan-weight" in _one_line_error(capsys, base + ["--gan-weight", "-1"])
    assert "--gan-start" in _one_line_error(capsys, base + ["--gan-weight", "1", "--gan-start", "-1"])


def test_flextok_gan_judges_the_last_step_and_keeps_the_codes(tmp_path):
    """FlexTok with `--gan-weight`: the discriminator trains on the stored decoding's last step, the
    adaptive weight finds the velocity head, decoder-only keeps every code, the card says so."""
    from argen.tokenizers import FlexTokTokenizer

    flextok = dict(arch="flextok", num_latent_tokens=4, patch_size=8, width=16, enc_layers=1, dec_layers=1, heads=2,
                   fsq_levels=(5, 5, 3), flow_steps=2, decoder_guidance=2.0)
    train_tokenizer(tmp_path / "src", steps=2, export_dtype="float32", **RUN, **flextok)
    train_tokenizer(tmp_path / "ft", steps=4, export_dtype="float32", init_from=str(tmp_path / "src/model"),
                    decoder_only=True, gan_weight=0.5, gan_start=1, **RUN, **flextok)
    rows = read_log(tmp_path / "ft/log.csv")
    assert rows[0]["gan_d"] == 0 and rows[0]["adaptive_weight"] == 0  # before --gan-start
    assert all(r["gan_d"] > 0 and r["adaptive_weight"] > 0 for r in rows[1:])
    assert all(r["loss"] != r["flow"] for r in rows[1:])  # the adversarial term is in the loss
    src = FlexTokTokenizer.from_pretrained(tmp_path / "src/model")
    ft = FlexTokTokenizer.from_pretrained(tmp_path / "ft/model")
    x = torch.rand(6, 1, 32, 32) * 2 - 1
    assert torch.equal(src.encode(x), ft.encode(x))
    assert not torch.equal(src.dec_out.weight, ft.dec_out.weight)
    assert "`--gan-weight 0.5`, from step 1" in (tmp_path / "ft/model/MODEL_CARD.md").read_text()
