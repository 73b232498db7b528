"""The shipped TiTok tokenizer (`titok-fmnist-k16`) and the class-conditional GPT on its codes (`titok-c2i`).

Small and fast: a few test images through the tokenizer, a few images from the pipeline with every
sampler, the classifier on a handful of samples. Each part is skipped when its asset is absent.
"""

import json
import os

import pytest
import torch

from argen.cli.main import main
from argen.data.fashion_mnist import load_fashion_mnist
from argen.errors import ArgenError
from argen.hub import ASSETS, SHIPPED_MODELS, resolve_model_dir

# ARGEN_TITOK_C2I=<a trained titok c2i folder> runs the pipeline tests on an unshipped model
C2I = os.environ.get("ARGEN_TITOK_C2I") or "titok-c2i"
needs_c2i = pytest.mark.skipif(not (ASSETS / "titok-c2i" / "pipeline.json").is_file()
                               and "ARGEN_TITOK_C2I" not in os.environ, reason="titok-c2i not shipped")
needs_tokenizer = pytest.mark.skipif(not (ASSETS / "titok-fmnist-k16" / "config.json").is_file(),
                                     reason="titok-fmnist-k16 not shipped")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pipe():
    from argen.pipeline import ARPipeline

    return ARPipeline.from_pretrained(C2I)


@needs_tokenizer
def test_shipped_titok_tokenizer_reconstructs_as_its_card_says():
    from argen.tokenizers import TiTokTokenizer
    from argen.train.tokenizer import evaluate_tokenizer

    assert "titok-fmnist-k16" in SHIPPED_MODELS
    tok = TiTokTokenizer.from_pretrained("titok-fmnist-k16").float()
    assert tok.num_tokens == 16 and tok.grid is None and not tok.config.is_legacy and tok.image_channels == 1
    images, _ = load_fashion_mnist("test")
    m = evaluate_tokenizer(tok, images[:200])
    recorded = json.loads((resolve_model_dir("titok-fmnist-k16") / "metrics.json").read_text())["test"]
    # the first 200 images, against the 10,000-image figure of the card: within 1 dB
    assert abs(m["psnr_db"] - recorded["psnr_db"]) < 1.0, (m["psnr_db"], recorded["psnr_db"])
    assert m["codes_used"] > 300  # 200 images x 16 tokens use a good part of the codebook


@needs_c2i
def test_titok_c2i_is_a_1d_generator_on_the_shipped_tokenizer(pipe):
    from argen.tokenizers import TiTokTokenizer

    assert type(pipe.tokenizer) is TiTokTokenizer and pipe.tokenizer.num_tokens == 16
    assert pipe.generator.grid is None and pipe.generator.num_positions == 16
    assert pipe.generator.vocab_size == pipe.tokenizer.vocab_size
    meta = json.loads((resolve_model_dir(C2I) / "pipeline.json").read_text())
    assert meta["tokenizer"] == "titok-fmnist-k16"


@needs_c2i
@pytest.mark.parametrize("sampler", ["ar", "sjd", "mcsjd", "gsd:G=3", "sjd:L=4", "mcsjd:L=8", "gsd:G=10"])
def test_every_sampler_generates_from_titok_c2i(pipe, sampler):
    out = pipe(class_labels=["trouser", "bag"], num_images=1, sampler=sampler, seed=3, progress=False)
    assert out.tokens.shape == (2, 16)
    assert all(img.size == (28, 28) for img in out.images)


@needs_c2i
def test_grid_drafts_are_refused_in_one_line(pipe):
    with pytest.raises(ArgenError) as err:
        pipe(class_labels="bag", num_images=1, sampler="sjd:init=above", progress=False)
    assert len(str(err.value).splitlines()) == 1


@needs_c2i
def test_lossless_samplers_match_ar_on_titok_c2i(pipe):
    """Same seed: a lossless speculative sampler draws from AR's distribution, so the classifier sees the
    classes asked for about as often as with AR (a broken sampler on 1D codes would fall apart)."""
    from argen.eval.fmnist_classifier import load_fmnist_classifier
    clf = load_fmnist_classifier()
    labels = torch.arange(10).repeat(2)
    conds = pipe.conditions(class_labels=labels.tolist())
    seeds = list(range(100, 100 + len(labels)))
    for sampler in ("ar", "mcsjd"):
        tokens = pipe.sample_tokens(conds, seeds, sampler, pipe.sampling_params(), batch_size=20).tokens
        images = pipe.tokens_to_images(tokens, conds, seeds)
        with torch.no_grad():
            pred = clf(images.float()).argmax(1)  # [-1, 1] images, 28x28 after the pipeline's crop
        accuracy = (pred == labels).float().mean().item()
        assert accuracy >= 0.3, (sampler, accuracy)  # chance is 0.1; the shipped tokenizer alone keeps 55%


@needs_c2i
def test_cli_generates_from_titok_c2i(tmp_path, capsys):
    assert main(["generate", "--model", C2I, "--class", "sneaker", "--num-images", "2", "--out",
                 str(tmp_path / "s.png")]) == 0
    assert "generated 2 images" in capsys.readouterr().out
    assert len(list((tmp_path / "s").glob("*.png"))) == 2
