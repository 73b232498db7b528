"""The plug-in sockets: a generator, a tokenizer and a refiner defined here, in the test file,
registered by class and saved as a pipeline folder, run through the Python pipeline and the
`generate`, `eval fid` and `bench samplers` entry points with no change to argen's code.

* `PairGenerator`: k = 2 codes per position (as a token-shuffle generator emits), class-conditional;
* `NoisyTokenizer1D`: a 1D tokenizer (no grid) whose decoder adds noise drawn from each image's seed;
* `OffsetRefiner`: maps generator tokens to tokenizer codes (a coarse-to-fine stage's socket).
"""

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from argen.cli.main import main
from argen.data.fashion_mnist import CLASS_NAMES
from argen.errors import ArgenError
from argen.models import GPT
from argen.models.base import Generator
from argen.models.pretrained import PretrainedMixin
from argen.pipeline import ARPipeline
from argen.refiners import Refiner
from argen.registry import register
from argen.samplers import ARSampler, SamplingParams, get_sampler
from argen.tokenizers import ImageTokenizer

from helpers import tiny_gpt


class PairCache:
    """Keeps the prefix summary per row; positions are implicit in how many tokens were fed."""

    def __init__(self, rows: int):
        self.state = None

    def rewind(self, lengths):
        pass


@register
class PairGenerator(Generator, PretrainedMixin, ModelMixin, ConfigMixin):
    """A tiny recurrent generator emitting 2 codes per position: each position's logits depend
    on the class and on the running sum of the embeddings of every code before it."""

    config_name = "config.json"
    tokens_per_position = 2

    @register_to_config
    def __init__(self, vocab: int = 8, positions: int = 4, classes: int = 10, dim: int = 16):
        super().__init__()
        self.class_table = nn.Embedding(classes + 1, dim)  # the last row is the null class
        self.code_table = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, 2 * vocab)

    num_positions = property(lambda self: self.config.positions)
    vocab_size = property(lambda self: self.config.vocab)
    grid = property(lambda self: None)
    condition_kind = property(lambda self: "class")
    num_classes = property(lambda self: self.config.classes)
    supports_cfg = property(lambda self: True)

    def check_condition(self, cond, cond_mask=None):
        if cond.dim() != 1 or int(cond.max()) > self.config.classes:
            raise ArgenError("PairGenerator takes class ids [B]")

    def null_condition(self, cond):
        return torch.full_like(cond, self.config.classes)

    def condition_length(self, cond):
        return 1

    def new_cache(self, batch_size, max_len=None):
        return PairCache(batch_size)

    def _logits(self, state):
        return self.head(torch.tanh(state)).unflatten(-1, (2, self.config.vocab))

    def prefill(self, cond, cache, cond_mask=None):
        cache.state = self.class_table(cond)
        return self._logits(cache.state)  # [B, 2, V]

    def decode(self, tokens, input_pos, cache):
        steps = cache.state[:, None] + self.code_table(tokens).sum(2).cumsum(1)  # [B, T, dim]
        cache.state = steps[:, -1]
        return self._logits(steps)  # [B, T, 2, V]

    def loss(self, codes, cond, cond_mask=None):
        tokens = codes.view(codes.shape[0], -1, 2)
        state = self.class_table(cond)[:, None] + torch.cat(
            [torch.zeros_like(self.code_table(tokens[:, :1]).sum(2)), self.code_table(tokens[:, :-1]).sum(2).cumsum(1)], 1)
        logits = self._logits(state)
        return nn.functional.cross_entropy(logits.flatten(0, -2), tokens.flatten())

    def token_embeddings(self):
        return self.code_table.weight


@register
class NoisyTokenizer1D(PretrainedMixin, ModelMixin, ConfigMixin, ImageTokenizer):
    """n codes, each a 28x28 pattern; decode sums them and adds noise from the image's seed."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, vocab: int = 8, tokens: int = 8, size: int = 28, noise: float = 0.3):
        super().__init__()
        self.patterns = nn.Parameter(torch.randn(vocab, size * size))

    num_tokens = property(lambda self: self.config.tokens)
    vocab_size = property(lambda self: self.config.vocab)
    image_size = property(lambda self: self.config.size)
    image_channels = property(lambda self: 1)

    def encode(self, images):
        scores = images.flatten(1) @ self.patterns.T  # [B, vocab]
        return scores.topk(self.config.tokens, dim=-1).indices

    def decode(self, codes, *, seeds=None):
        codes = self.check_codes(codes)
        x = self.patterns[codes].mean(1).view(-1, 1, self.config.size, self.config.size)
        if seeds is None:
            raise ArgenError("NoisyTokenizer1D decodes with one seed per image")
        noise = torch.stack([torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds])
        return torch.tanh(x + self.config.noise * noise)


@register
class OffsetRefiner(PretrainedMixin, ModelMixin, ConfigMixin, Refiner):
    """Generator tokens (vocabulary 4) -> tokenizer codes (vocabulary 8): 2 * token + a coin from the seed."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, tokens: int = 8):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    in_vocab_size = property(lambda self: 4)
    vocab_size = property(lambda self: 8)
    num_tokens = property(lambda self: self.config.tokens)

    def refine(self, tokens, cond, cond_mask=None, *, seeds=None):
        coins = torch.stack([torch.randint(0, 2, tokens.shape[1:], generator=torch.Generator().manual_seed(s))
                             for s in seeds])
        return 2 * tokens + coins


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    torch.manual_seed(0)
    pipe = ARPipeline(PairGenerator(), NoisyTokenizer1D(), class_names=CLASS_NAMES, defaults={"cfg_scale": 2.0})
    folder = tmp_path_factory.mktemp("toy") / "pipeline"
    pipe.save_pretrained(folder)
    return folder


def test_toy_pipeline_saves_loads_and_samples_two_codes_per_position(toy_dir):
    meta = json.loads((toy_dir / "pipeline.json").read_text())
    assert meta["generator"] == "generator" and meta["tokenizer"] == "tokenizer" and meta["refiner"] is None
    assert json.loads((toy_dir / "generator" / "config.json").read_text())["_class_name"] == "PairGenerator"
    pipe = ARPipeline.from_pretrained(toy_dir)
    assert type(pipe.generator) is PairGenerator and type(pipe.tokenizer) is NoisyTokenizer1D
    out = pipe(class_labels=["sneaker", 3], num_images=3, seed=5, batch_size=2, progress=False)
    assert out.tokens.shape == (6, 8) and len(out.images) == 6 and out.images[0].size == (28, 28)
    assert out.num_forward_passes == 4 + 4 + 4  # three batches (2, 2, 2 images), one forward per position
    again = pipe(class_labels=["sneaker", 3], num_images=3, seed=5, batch_size=5, progress=False)
    assert torch.equal(out.tokens, again.tokens)  # the same seed gives the same sample in any batch
    assert [im.tobytes() for im in out.images] == [im.tobytes() for im in again.images]
    # the random decoder is deterministic per image seed, and the seed matters
    images = pipe.tokens_to_images(out.tokens[:1].repeat(2, 1), seeds=[7, 8])
    assert torch.equal(images[0], pipe.tokens_to_images(out.tokens[:1], seeds=[7])[0])
    assert not torch.equal(images[0], images[1])


def test_ar_emits_k_codes_from_the_right_distributions(toy_dir):
    """Each of the k codes of a position is drawn from its own row of the generator's logits."""
    pipe = ARPipeline.from_pretrained(toy_dir)
    gen = pipe.generator
    cond = torch.full((4000,), 2)
    tokens = ARSampler()(gen, cond, num_tokens=1, seeds=list(range(4000))).tokens  # first position: [N, 2]
    probs = gen.prefill(cond[:1], gen.new_cache(1)).softmax(-1)[0]  # [2, V]
    for j in range(2):
        freq = torch.bincount(tokens[:, j], minlength=gen.vocab_size).double() / len(cond)
        assert (freq - probs[j].double()).abs().max() < 0.03


def test_entry_points_run_the_toy_pipeline(toy_dir, tmp_path, capsys, fmnist_available):
    grid = tmp_path / "new" / "folder" / "grid.png"  # missing parent folders are created
    assert main(["generate", "--model", str(toy_dir), "--class", "bag", "--num-images", "3", "--out", str(grid)]) == 0
    assert grid.is_file() and len(list((grid.parent / "grid").glob("*.png"))) == 3
    run = tmp_path / "eval"
    code = main(["eval", "fid", "--model", str(toy_dir), "--num-samples", "6", "--batch-size", "4", "--out", str(run),
                 "--ref-num", "200"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["fid"] > 0 and len(list((run / "samples").glob("*.png"))) == 6
    record = tmp_path / "bench.json"
    code = main(["bench", "samplers", "ar", "--model", str(toy_dir), "--batch-sizes", "1,2", "--num-images", "2",
                 "--rounds", "1", "--json", str(record)])
    assert code == 0, capsys.readouterr().err
    assert {r["sampler"] for r in json.loads(record.read_text())["records"]} == {"ar"}
    capsys.readouterr()
    # speculative samplers verify multi-code positions (argen/samplers/speculative_codes.py), with
    # random drafts only: a spatial draft init is refused in one line, exit 2
    assert main(["generate", "--model", str(toy_dir), "--class", "1", "--sampler", "sjd:init=left", "--out",
                 str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not implemented for generators with 2 codes per position" in err


def test_refiner_stage_and_vocabulary_chain():
    torch.manual_seed(0)
    gen, tok = PairGenerator(vocab=4), NoisyTokenizer1D()
    with pytest.raises(ArgenError, match="vocabulary of 4.*takes 8"):
        ARPipeline(gen, tok)  # generator -> tokenizer without the refiner
    with pytest.raises(ArgenError, match="makes 8 codes"):
        ARPipeline(gen, NoisyTokenizer1D(tokens=6), refiner=OffsetRefiner(tokens=6))
    # fewer codes than the tokenizer decodes: refused when the chain is built, not after sampling
    with pytest.raises(ArgenError, match="makes 8 codes per image.*decodes exactly 10 .it does not decode prefixes") as err:
        ARPipeline(gen, NoisyTokenizer1D(tokens=10), refiner=OffsetRefiner())
    assert "\n" not in str(err.value)
    pipe = ARPipeline(gen, tok, class_names=CLASS_NAMES, refiner=OffsetRefiner())
    conds = pipe.conditions(class_labels=[1, 2])
    tokens = pipe.sample_tokens(conds, [3, 4]).tokens
    assert int(tokens.max()) < 4
    images = pipe.tokens_to_images(tokens, conds, [3, 4])
    codes = OffsetRefiner().refine(tokens, conds.cond, seeds=[3, 4])
    assert torch.equal(images, tok.decode(codes, seeds=[3, 4]).clamp(-1, 1))


def test_samplers_that_need_a_grid_refuse_a_1d_generator():
    model = tiny_gpt(rope_type="1d", block_size=12)
    assert model.grid is None
    with pytest.raises(ArgenError, match="needs a 2D token grid"):
        get_sampler("sjd:init=above")(model, torch.tensor([1]), seeds=[0])
    out = get_sampler("sjd:init=left")(model, torch.tensor([1]), seeds=[0])  # "left" is the previous token in 1D
    assert out.tokens.shape == (1, 12)


def test_samplers_register_themselves_with_aliases_and_prepare():
    from argen.samplers import SAMPLERS, Sampler

    class EchoSampler(Sampler):
        name = "echo-test"
        aliases = ("echo-alias",)
        option_aliases = {"N": "repeat"}

        def __init__(self, repeat: int = 1):
            self.repeat, self.components = repeat, {}

        def prepare(self, **components):
            self.components = components
            return self

        def _sample(self, model, cond, cond_mask, num_tokens, params, streams, progress):
            return ARSampler()._sample(model, cond, cond_mask, num_tokens, params, streams, progress)

    assert SAMPLERS["echo-test"] is EchoSampler and SAMPLERS["echo-alias"] is EchoSampler
    assert get_sampler("echo-alias:N=3").repeat == 3
    pipe = ARPipeline(tiny_gpt(vocab_size=8, block_size=4), NoisyTokenizer1D(tokens=4), class_names=CLASS_NAMES)
    sampler = get_sampler("echo-test")
    pipe.sample_tokens(pipe.conditions(class_labels=[0]), [0], sampler, SamplingParams())
    assert sampler.components["tokenizer"] is pipe.tokenizer  # handed over by the pipeline


def test_registry_loads_by_class_name_only(tmp_path):
    from argen.registry import load_component

    gen = PairGenerator()
    gen.save_pretrained(tmp_path / "g")
    assert type(load_component(tmp_path / "g", Generator)) is PairGenerator
    config = json.loads((tmp_path / "g" / "config.json").read_text())
    config["_class_name"] = "os.system"  # a module path in a file is never imported
    (tmp_path / "g" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArgenError, match="unknown component class 'os.system'"):
        load_component(tmp_path / "g", Generator)
    with pytest.raises(ArgenError, match="argen's"):
        register(type("GPT", (), {}))  # a user class may not take the name of argen's own
    assert type(load_component(_shipped("default-vq"))).__name__ == "VQTokenizer"


def _shipped(name):
    from argen.hub import resolve_model_dir

    return resolve_model_dir(name)
