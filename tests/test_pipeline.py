"""ARPipeline and `argen generate` end to end on tiny saved pipelines (and the shipped ones when present)."""

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from argen.cli.main import main
from argen.data.fashion_mnist import CLASS_NAMES
from argen.errors import ArgenError
from argen.hub import ASSETS
from argen.pipeline import ARPipeline
from argen.registry import load_component
from argen.tokenizers import VQTokenizer
from argen.tokenizers.layers import PACKED_SHAPES, Conv2d

from helpers import tiny_gpt


def tiny_vq():
    torch.manual_seed(0)
    return VQTokenizer(codebook_size=64, codebook_embed_dim=8, ch=32, z_channels=32, encoder_ch_mult=(1, 2, 2),
                       decoder_ch_mult=(1, 2, 2), num_res_blocks=1, in_channels=1, image_size=16).eval()


@pytest.mark.parametrize("which", ["tiny", "default-vq", "titok-fmnist-k16"])
def test_conv_tokenizers_decode_an_image_alike_in_any_batch(which):
    """The same floats for an image decoded alone, in threes or in a batch of 24: PyTorch's own choice of
    CPU convolution algorithm goes by batch size and rounds differently (this failed for all three before
    `argen.tokenizers.layers.Conv2d`)."""
    tok = tiny_vq() if which == "tiny" else load_component(ASSETS / which).eval()
    codes = torch.randint(0, tok.vocab_size, (24, tok.num_tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        together = tok.decode(codes)
        assert torch.equal(torch.cat([tok.decode(codes[i:i + 1]) for i in range(24)]), together)
        assert torch.equal(torch.cat([tok.decode(codes[i:i + 3]) for i in range(0, 24, 3)]), together)
        images = together[:8].clamp(-1, 1)
        assert torch.equal(torch.cat([tok.encode(images[i:i + 1]) for i in range(8)]), tok.encode(images))


@pytest.mark.parametrize("which", ["tiny", "default-vq"])
def test_conv_tokenizers_decode_an_image_alike_in_any_batch_on_three_threads(which):
    """From three threads on, ATen's silu splits a batch between threads at boundaries off its vector
    width, and the scalar tails round differently: 3 of 16 default-vq images decoded alone differed from
    the same images in a batch of 16. `layers.silu` runs it image by image when sampling."""
    tok = tiny_vq() if which == "tiny" else load_component(ASSETS / which).eval()
    codes = torch.randint(0, tok.vocab_size, (16, tok.num_tokens), generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with torch.no_grad():
            together = tok.decode(codes)
            for size in (1, 5):
                assert torch.equal(torch.cat([tok.decode(codes[i:i + size]) for i in range(0, 16, size)]), together)
    finally:
        torch.set_num_threads(before)


def test_conv_tokenizers_decode_alike_on_one_thread_or_two_and_follow_their_weights():
    """Sampling convolutions run on weights packed once (`layers.Conv2d`): an image decodes to the same floats
    on one thread and on two and in inference mode, and a load into the tokenizer is decoded with, not the packed
    copy of the old weights. A deepcopy (an EMA) leaves the packed weights behind."""
    tok, other = tiny_vq(), tiny_vq()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01 * torch.randn_like(p))
    codes = torch.randint(0, tok.vocab_size, (6, tok.num_tokens), generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    try:
        with torch.no_grad():
            images = []
            for threads in (1, 2):
                torch.set_num_threads(threads)
                images.append(tok.decode(codes))
            assert torch.equal(*images)
        with torch.inference_mode():  # inference tensors keep no version counter (`weights_key`)
            assert torch.equal(tok.decode(codes), images[0])
        with torch.no_grad():  # more batch sizes than packed shapes kept: the oldest go, the floats stay
            for size in range(1, PACKED_SHAPES + 3):
                assert torch.equal(tok.decode(codes[:size]), images[0][:size])
        decoding = [m for m in tok.modules() if isinstance(m, Conv2d) and "_packed" in m.__dict__]  # not the encoder's
        assert decoding and all(len(m.__dict__["_packed"][1]) == PACKED_SHAPES for m in decoding)
        with torch.no_grad():
            expected = other.decode(codes)
            assert not torch.equal(expected, images[0])
            copied = copy.deepcopy(tok)
            tok.load_state_dict(other.state_dict())
            assert torch.equal(tok.decode(codes), expected)
            assert torch.equal(copied.decode(codes), images[0])
    finally:
        torch.set_num_threads(before)


def test_caption_embedding_is_the_same_in_any_batch():
    """One sentence embedding per caption is one row per image through the caption MLP, and MKL rounds 1 to 3
    rows otherwise than 4 or more: its linears pad (`BatchInvariantLinear`)."""
    from argen.models.gpt import CaptionEmbedder

    torch.manual_seed(0)
    embedder = CaptionEmbedder(caption_dim=384, dim=256, dropout_prob=0.0, token_num=1).eval()
    features = torch.randn(16, 1, 384)
    with torch.no_grad():
        together = embedder(features)
        for size in (1, 2, 3):
            assert torch.equal(torch.cat([embedder(features[i:i + size]) for i in range(0, 16, size)]), together)


@pytest.fixture(scope="module")
def c2i_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipes") / "c2i"
    ARPipeline(tiny_gpt(), tiny_vq(), class_names=CLASS_NAMES, defaults={"cfg_scale": 2.0}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def t2i_dir(tmp_path_factory):
    from argen.text import load_text_encoder

    encoder = load_text_encoder("minilm", max_length=12)
    path = tmp_path_factory.mktemp("pipes") / "t2i"
    gpt = tiny_gpt(model_type="t2i", cls_token_num=12, caption_dim=encoder.feature_dim)
    ARPipeline(gpt, tiny_vq(), encoder).save_pretrained(path)
    return path


def test_c2i_pipeline_seeds_independent_of_batch_size(c2i_dir):
    pipe = ARPipeline.from_pretrained(c2i_dir)
    a = pipe(class_labels=["sneaker", 3], num_images=3, seed=7, batch_size=6, progress=False)
    b = pipe(class_labels=["Sneaker", "3"], num_images=3, seed=7, batch_size=1, progress=False)
    assert torch.equal(a.tokens, b.tokens)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.images, b.images))  # the PNGs too
    assert a.labels == [7, 7, 7, 3, 3, 3] and a.seeds == list(range(7, 13))
    assert len(a.images) == 6 and a.images[0].size == (16, 16) and a.images[0].mode == "L"
    assert a.num_forward_passes == 16  # one batch of 6, 16 tokens each
    assert not torch.equal(a.tokens[0], a.tokens[1])
    # the pipeline's generator served the class prefixes from memory; its own forwards sample the same tokens
    assert pipe.generator.remembers_class_prefixes and "_prefix_memo" in pipe.generator.__dict__
    pipe.generator.remembers_class_prefixes = False
    assert torch.equal(pipe(class_labels=["sneaker", 3], num_images=3, seed=7, batch_size=1, progress=False).tokens,
                       a.tokens)


def test_decoder_dtype_bf16_decodes_the_same_tokens_to_nearly_the_same_images(c2i_dir):
    """decoder_dtype="bf16": the generator (and so the tokens) untouched, the tokenizer in bfloat16,
    the images within bf16 rounding of fp32's; a one-pass decoder refuses flow settings."""
    fp32 = ARPipeline.from_pretrained(c2i_dir)
    bf16 = ARPipeline.from_pretrained(c2i_dir, decoder_dtype="bf16")
    assert (fp32.decoder_dtype, bf16.decoder_dtype) == ("fp32", "bf16") and bf16.dtype == torch.float32
    a = fp32(class_labels=[3], num_images=2, seed=4, progress=False)
    b = bf16(class_labels=[3], num_images=2, seed=4, progress=False)
    assert torch.equal(a.tokens, b.tokens)
    pixels = lambda out: torch.stack([torch.from_numpy(np.asarray(x)).int() for x in out.images])  # noqa: E731
    diff = pixels(a) - pixels(b)
    assert 0 < diff.abs().max() < 26 and diff.abs().float().mean() < 2.5  # uint8 pixels
    with pytest.raises(ArgenError, match="decoder dtype"):
        ARPipeline.from_pretrained(c2i_dir, decoder_dtype="fp16")
    with pytest.raises(ArgenError, match="decodes in one pass"):
        ARPipeline.from_pretrained(c2i_dir, decoding={"steps": 4})


def test_pipeline_input_errors(c2i_dir, t2i_dir):
    c2i = ARPipeline.from_pretrained(c2i_dir)
    for bad in ("spaceship", 10, -1, "42"):
        with pytest.raises(ArgenError):
            c2i(class_labels=bad, progress=False)
    with pytest.raises(ArgenError, match="class-conditional"):
        c2i(prompt="a shoe", progress=False)
    t2i = ARPipeline.from_pretrained(t2i_dir)
    with pytest.raises(ArgenError, match="empty prompt"):
        t2i(prompt="   ", progress=False)
    with pytest.raises(ArgenError, match="too long"):
        t2i(prompt="a very long description of a shoe " * 5, progress=False)
    with pytest.raises(ArgenError, match="text-to-image"):
        t2i(class_labels=1, progress=False)


def test_t2i_pipeline(t2i_dir):
    pipe = ARPipeline.from_pretrained(t2i_dir)
    out = pipe(prompt=["a sneaker", "a dark bag"], num_images=2, seed=0, progress=False)
    assert out.tokens.shape == (4, 16) and out.labels == [0, 0, 1, 1]
    alone = pipe(prompt="a dark bag", num_images=2, seed=2, progress=False)
    assert torch.equal(alone.tokens, out.tokens[2:])


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "argen", *args], capture_output=True, text=True, timeout=300)


def test_cli_generate_writes_grid_and_images(c2i_dir, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["generate", "--model", str(c2i_dir), "--class", "bag", "--class", "0", "--num-images", "3",
                 "--out", str(out), "--grid-scale", "2"]) == 0
    grid = Image.open(out)
    assert grid.size[0] > 32
    files = sorted(p.name for p in (tmp_path / "grid").iterdir() if not p.name.startswith("."))
    assert files == [f"{i:04d}_seed{i}.png" for i in range(6)]


@pytest.mark.parametrize("args, message", [
    (["--class", "spaceship"], "unknown"),
    (["--class", "12"], "out of range"),
    (["--class", "1", "--cfg-scale", "nan"], "finite"),  # (a missing --out folder is now created)
    (["--class", "1", "--out", "x.jpg"], ".png"),
    (["--class", "1", "--num-images", "0"], "num-images"),
    (["--class", "1", "--model", "no/such/model"], "no model directory"),
    (["--class", "1", "--top-p", "0"], "--top-p"),
])
def test_cli_generate_bad_input(c2i_dir, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    model = [] if "--model" in args else ["--model", str(c2i_dir)]
    out = [] if "--out" in args else ["--out", "o.png"]
    assert main(["generate", *args, *model, *out]) == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_cli_generate_prompt_errors_in_a_real_process(tmp_path):
    for args, message in ((["   "], "empty prompt"), ([], "prompt")):
        out = run_cli("generate", *args, "--out", str(tmp_path / "o.png"))
        assert out.returncode == 2 and message in out.stderr
        assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == []


shipped = pytest.mark.skipif(not (ASSETS / "default-c2i" / "pipeline.json").is_file(), reason="shipped models not built yet")


@shipped
def test_shipped_c2i_cli(tmp_path):
    out = run_cli("generate", "--class", "sneaker", "--num-images", "2", "--out", str(tmp_path / "s.png"))
    assert out.returncode == 0, out.stderr
    assert "generated 2 images" in out.stdout
    assert len(list((tmp_path / "s").glob("*.png"))) == 2
    # a lossless speculative sampler by spec; per-sample seeds, so the counts are deterministic
    spec = run_cli("generate", "--class", "sneaker", "--num-images", "2", "--sampler", "mcsjd:L=8",
                   "--out", str(tmp_path / "m.png"))
    assert spec.returncode == 0, spec.stderr
    assert "sampler mcsjd:L=8" in spec.stdout and "generated 2 images" in spec.stdout


@pytest.mark.skipif(not (ASSETS / "default-t2i" / "pipeline.json").is_file(), reason="shipped models not built yet")
def test_shipped_t2i_cli(tmp_path):
    out = run_cli("generate", "a pair of running shoes", "--num-images", "2", "--out", str(tmp_path / "t.png"))
    assert out.returncode == 0, out.stderr
    assert Image.open(tmp_path / "t.png").size[0] > 0


def test_a_default_guidance_schedule_applies_unless_one_is_given(tmp_path):
    """pipeline.json's "cfg_schedule" is the default of every sampling call; an explicit schedule wins,
    and the images follow the schedule actually used."""

    linear = ARPipeline(tiny_gpt(), tiny_vq(), class_names=CLASS_NAMES,
                        defaults={"cfg_scale": 3.0, "cfg_schedule": "linear"})
    linear.save_pretrained(tmp_path / "lin")
    again = ARPipeline.from_pretrained(tmp_path / "lin")
    assert again.sampling_params().cfg_schedule == "linear" and again.sampling_params().cfg_scale == 3.0
    assert again.sampling_params(cfg_schedule="constant").cfg_schedule == "constant"
    plain = ARPipeline.from_pretrained(tmp_path / "lin")
    plain.defaults.pop("cfg_schedule")
    assert plain.sampling_params().cfg_schedule == "constant"
    default = again(class_labels=1, num_images=2, progress=False).tokens
    assert torch.equal(default, again(class_labels=1, num_images=2, progress=False, cfg_schedule="linear").tokens)
    assert not torch.equal(default, again(class_labels=1, num_images=2, progress=False, cfg_schedule="constant").tokens)
    out = {}
    for flags in ([], ["--cfg-schedule", "linear"], ["--cfg-schedule", "constant"]):
        path = tmp_path / f"{len(flags)}{''.join(flags)}.png"
        assert main(["generate", "--model", str(tmp_path / "lin"), "--class", "1", *flags, "--out", str(path)]) == 0
        out[" ".join(flags)] = path.read_bytes()
    assert out[""] == out["--cfg-schedule linear"] != out["--cfg-schedule constant"]
    # a bad default is refused when the pipeline is read, naming its file
    meta = json.loads((tmp_path / "lin" / "pipeline.json").read_text())
    meta["defaults"]["cfg_schedule"] = "ramp"
    (tmp_path / "lin" / "pipeline.json").write_text(json.dumps(meta))
    with pytest.raises(ArgenError, match=r"pipeline\.json: defaults: unknown cfg_schedule 'ramp'"):
        ARPipeline.from_pretrained(tmp_path / "lin")


def test_crop_and_saved_defaults(tmp_path):
    pipe = ARPipeline(tiny_gpt(), tiny_vq(), class_names=CLASS_NAMES, defaults={"cfg_scale": 3.0}, crop=12)
    pipe.save_pretrained(tmp_path / "p")
    again = ARPipeline.from_pretrained(tmp_path / "p")
    assert again.crop == 12 and again.defaults == {"cfg_scale": 3.0}
    out = again(class_labels=1, num_images=1, progress=False)
    assert out.images[0].size == (12, 12)
