"""The shipped FlexTok tokenizer (`default-flextok`) and the class-conditional GPT on its codes
(`flextok-c2i`): a few test images through the tokenizer, a few images per sampler and prefix length.
Each part is skipped when its asset is absent."""

import json

import numpy as np
import pytest
import torch

from argen.cli.main import main
from argen.data.fashion_mnist import load_fashion_mnist
from argen.hub import ASSETS, SHIPPED_MODELS, resolve_model_dir

needs_tokenizer = pytest.mark.skipif(not (ASSETS / "default-flextok" / "config.json").is_file(),
                                     reason="default-flextok not shipped")
needs_c2i = pytest.mark.skipif(not (ASSETS / "flextok-c2i" / "pipeline.json").is_file(),
                               reason="flextok-c2i not shipped")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pipe():
    from argen.pipeline import ARPipeline

    return ARPipeline.from_pretrained("flextok-c2i")


@needs_tokenizer
def test_shipped_flextok_reconstructs_as_its_card_says():
    from argen.tokenizers import FlexTokTokenizer
    from argen.train.tokenizer import evaluate_tokenizer

    assert "default-flextok" in SHIPPED_MODELS
    tok = FlexTokTokenizer.from_pretrained("default-flextok").float()
    assert tok.num_tokens == 32 and tok.grid is None and tok.accepts_prefixes and tok.vocab_size == 1000
    images, _ = load_fashion_mnist("test")
    card = json.loads((resolve_model_dir("default-flextok") / "metrics.json").read_text())
    measured_with = card["run"]["flextok_config"]  # the decoding the training's evaluation used
    tok.set_decoding(steps=measured_with["flow_steps"], guidance_scale=measured_with["guidance_scale"])
    m = evaluate_tokenizer(tok, images[:100])
    recorded = card["test"]
    # the first 100 images (same seeds) against the card's 1,000-image figure: within 1 dB
    assert abs(m["psnr_db"] - recorded["psnr_db"]) < 1.0, (m["psnr_db"], recorded["psnr_db"])
    one = evaluate_tokenizer(tok, images[:100], num_tokens=1)
    assert one["num_tokens"] == 1 and one["psnr_db"] != m["psnr_db"]  # the prefix is decoded, not the whole


@needs_c2i
def test_flextok_c2i_is_a_1d_generator_on_the_shipped_tokenizer(pipe):
    assert pipe.tokenizer.accepts_prefixes and pipe.tokenizer.num_tokens == 32
    assert pipe.generator.grid is None and pipe.generator.num_positions == 32
    assert pipe.generator.vocab_size == pipe.tokenizer.vocab_size == 1000
    assert json.loads((resolve_model_dir("flextok-c2i") / "pipeline.json").read_text())["tokenizer"] == "default-flextok"


@needs_c2i
def test_flextok_c2i_reads_the_codes_the_shipped_tokenizer_gives(pipe):
    """The generator was trained on default-flextok's codes: its teacher-forced loss on the codes the
    shipped tokenizer gives the test images is the one its training recorded (a tokenizer whose
    encoder had moved, e.g. a decoder fine-tune that was not decoder-only, would break this)."""
    from argen.train.gpt import _test_loss, encode_images

    images, labels = load_fashion_mnist("test")
    codes = encode_images(pipe.tokenizer, images[:300]).long()
    loss = _test_loss(pipe.generator.float(), codes, labels[:300], None)
    recorded = json.loads((resolve_model_dir("flextok-c2i") / "metrics.json").read_text())["test_loss_fp16_export"]
    assert abs(loss - recorded) < 0.1, (loss, recorded)  # 300 of the 2,000 images it was measured on


@needs_c2i
@pytest.mark.parametrize("sampler", ["ar", "sjd", "mcsjd", "gsd:G=3", "auto", "pac"])
@pytest.mark.parametrize("k", [1, 4, 32])
def test_every_sampler_generates_any_prefix(pipe, sampler, k):
    if sampler == "pac" and k == 1:
        pytest.skip("pac drafts a tree: it needs at least 2 tokens (one-line refusal, tested below)")
    out = pipe(class_labels=["trouser", "bag"], num_images=1, sampler=sampler, seed=3, progress=False, num_tokens=k)
    assert out.tokens.shape == (2, k)
    assert all(img.size == (28, 28) for img in out.images)


@needs_c2i
def test_cli_generate_num_tokens(tmp_path, capsys):
    assert main(["generate", "--model", "flextok-c2i", "--class", "bag", "--num-images", "2", "--num-tokens", "4",
                 "--out", str(tmp_path / "bag.png")]) == 0
    assert "4 forward passes" in capsys.readouterr().out
    assert len(list((tmp_path / "bag").glob("*.png"))) == 2
    assert main(["generate", "--model", "flextok-c2i", "--class", "bag", "--num-images", "1", "--num-tokens", "33",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "num_tokens" in capsys.readouterr().err
    assert main(["generate", "--model", "flextok-c2i", "--class", "bag", "--num-images", "1", "--num-tokens", "1",
                 "--sampler", "pac", "--out", str(tmp_path / "y.png")]) == 2


@needs_c2i
def test_cli_decoder_settings_change_the_image_and_are_recorded(tmp_path, capsys):
    """--flow-steps / --decoder-guidance reach the flow decoder (another image for the same seed and
    tokens), are recorded with eval samples (a resume with other settings refuses), and a one-pass
    decoder refuses them with a one-line error."""
    from PIL import Image

    base = ["generate", "--model", "flextok-c2i", "--class", "bag", "--num-tokens", "4", "--seed", "5"]
    assert main(base + ["--out", str(tmp_path / "a.png")]) == 0
    assert main(base + ["--flow-steps", "2", "--decoder-guidance", "2", "--out", str(tmp_path / "b.png")]) == 0
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in "ab")
    assert a.shape == b.shape and (a != b).any()
    capsys.readouterr()
    assert main(["generate", "--model", "default-c2i", "--class", "bag", "--flow-steps", "2",
                 "--out", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "decodes in one pass" in err and len(err.splitlines()) == 1 and not (tmp_path / "c.png").exists()

    sample = ["eval", "sample", "--model", "flextok-c2i", "--num-samples", "2", "--batch-size", "2", "--num-tokens", "2",
              "--threads", "1", "--out", str(tmp_path / "s")]
    assert main(sample + ["--flow-steps", "3", "--decoder-guidance", "1.5", "--decoder-dtype", "bf16"]) == 0
    run = json.loads((tmp_path / "s" / "sampling.json").read_text())
    # the shipped first guided step (1) is kept: only what was given changes
    assert run["decoding"] == {"flow_steps": 3, "guidance_scale": 1.5, "guidance_start": 1}
    assert run["decoder_dtype"] == "bf16"
    capsys.readouterr()
    assert main(sample + ["--flow-steps", "4", "--decoder-guidance", "1.5", "--decoder-dtype", "bf16"]) == 2
    assert "decoding" in capsys.readouterr().err


@needs_tokenizer
def test_shipped_flextok_decodes_an_image_alike_in_any_batch_on_five_threads():
    """On five threads ATen's tanh-GELU split a batch of the flow network's activations between threads off
    its vector width, and all 10 images decoded at batch 1 or 3 differed from batch 10; the activation now
    runs image by image when sampling (`argen.tokenizers.layers.image_by_image`)."""
    from argen.tokenizers import FlexTokTokenizer

    tok = FlexTokTokenizer.from_pretrained("default-flextok").float().eval()
    codes = torch.randint(0, tok.vocab_size, (10, 8), generator=torch.Generator().manual_seed(0))
    seeds = list(range(10))
    torch.set_num_threads(5)
    try:
        with torch.no_grad():
            together = tok.decode(codes, seeds=seeds)
            for size in (1, 3):
                alone = torch.cat([tok.decode(codes[i:i + size], seeds=seeds[i:i + size])
                                   for i in range(0, 10, size)])
                assert torch.equal(alone, together)
    finally:
        torch.set_num_threads(1)
