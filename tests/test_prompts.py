"""Prompt understanding of text-to-image models: the sentence-embedding condition, the held-out
prompt set, `argen eval prompts`, and the notice for prompts that name nothing the model knows."""

import json
import os
import re
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from argen.cli.main import main
from argen.data import captions
from argen.data.fashion_mnist import CLASS_NAMES
from argen.errors import ArgenError
from argen.eval.prompts import HELDOUT_PROMPT_FILE, load_labelled_prompts, prompt_accuracy
from argen.hub import ASSETS
from argen.pipeline import CLASS_DESCRIPTIONS_FILE, ARPipeline, _class_descriptions, save_class_descriptions
from argen.text import load_text_encoder, text_encoder_from_config
from argen.tokenizers import VQTokenizer

from helpers import tiny_gpt


@pytest.fixture(scope="module")
def sentence_encoder():
    return load_text_encoder("minilm", max_length=64, pooling="mean")


def tiny_vq32():
    """32x32 images (what the Fashion-MNIST classifier takes), 8x8 = 64 tokens."""
    torch.manual_seed(0)
    return VQTokenizer(codebook_size=64, codebook_embed_dim=8, ch=8, z_channels=8, encoder_ch_mult=(1, 1, 1),
                       decoder_ch_mult=(1, 1, 1), num_res_blocks=1, in_channels=1, image_size=32,
                       norm_groups=8).eval()


@pytest.fixture(scope="module")
def t2i_dir(tmp_path_factory, sentence_encoder):
    path = tmp_path_factory.mktemp("pipes") / "t2i-mean"
    gpt = tiny_gpt(model_type="t2i", cls_token_num=1, caption_token_num=1, block_size=64,
                   caption_dim=sentence_encoder.feature_dim)
    ARPipeline(gpt, tiny_vq32(), sentence_encoder, class_names=CLASS_NAMES, crop=28).save_pretrained(path)
    return path


# -- the sentence-embedding condition ---------------------------------------------------


def test_mean_pooling_is_the_normalised_token_mean(sentence_encoder):
    prompts = ["a pair of running shoes", "boots"]
    feats, mask = sentence_encoder.encode(prompts)
    assert feats.shape == (2, 1, 384) and mask.all() and sentence_encoder.num_slots == 1
    batch = sentence_encoder.tokenizer(prompts, padding=True, return_tensors="pt")
    hidden = sentence_encoder.model(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    expected = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
    torch.testing.assert_close(feats[:, 0] / 384**0.5, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sentence_encoder.sentence_embeddings(prompts), expected, atol=1e-5, rtol=1e-5)
    # padding a batch does not change a prompt's embedding
    torch.testing.assert_close(sentence_encoder.encode(["boots"])[0][0], feats[1], atol=1e-5, rtol=1e-5)


def test_pooling_round_trips_through_the_config(sentence_encoder):
    config = sentence_encoder.config()
    assert config["pooling"] == "mean" and config["max_length"] == 64
    again = text_encoder_from_config(json.loads(json.dumps(config)))
    assert again.pooling == "mean" and again.num_slots == 1
    assert "pooling" not in load_text_encoder("minilm").config()  # token features: the old layout
    with pytest.raises(ArgenError, match="unknown text-encoder pooling"):
        load_text_encoder("minilm", pooling="max")


# -- the held-out prompt set -------------------------------------------------------------


def test_heldout_prompts_are_many_balanced_and_never_trained_on():
    prompts = load_labelled_prompts()
    assert len(prompts) >= 100 and len({p for p, _ in prompts}) == len(prompts)
    counts = torch.bincount(torch.tensor([label for _, label in prompts]), minlength=10)
    assert counts.min() >= 10
    trained = {c.lower() for label in range(10) for c in captions.all_train_captions(label)}
    pool = captions.rich_caption_pool(300)
    trained |= {c.lower() for group in pool.values() for c in group}
    assert not {p.lower() for p, _ in prompts} & trained
    assert all(len(group) == 300 for group in pool.values())


def test_rich_caption_pool_is_deterministic_and_labelled_by_group():
    a, b = captions.rich_caption_pool(50, seed=1), captions.rich_caption_pool(50, seed=1)
    assert a == b and a != captions.rich_caption_pool(50, seed=2)
    assert set(a) == {(label, shade) for label in range(10) for shade in captions.ATTRIBUTES}
    # the measured shade word only appears in its own group
    dark = [re.search(r"\bdark\b", c) is not None for c in a[(3, "dark")] + a[(3, "light")]]
    assert any(dark[:50]) and not any(dark[50:])


# -- argen eval prompts ------------------------------------------------------------------


class Always:
    """A stand-in classifier that calls every image class `label`."""

    def __init__(self, label):
        self.label = label

    def __call__(self, images):
        logits = torch.zeros(images.shape[0], 10)
        logits[:, self.label] = 1
        return logits


def test_prompt_accuracy_counts_per_prompt_and_class(t2i_dir):
    pipe = ARPipeline.from_pretrained(t2i_dir)
    prompts = [("sneakers", 7), ("a tote bag", 8), ("trainers for jogging", 7)]
    result = prompt_accuracy(pipe, prompts, num_images=2, classifier=Always(7))
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["per_class"] == {"Sneaker": 1.0, "Bag": 0.0}
    assert [r["correct"] for r in result["per_prompt"]] == [2, 0, 2]
    assert result["images"] == 6 and result["per_prompt"][1]["predicted"] == ["Sneaker", "Sneaker"]
    real = prompt_accuracy(pipe, prompts, num_images=1)  # the shipped classifier on 28x28 crops
    assert 0.0 <= real["accuracy"] <= 1.0 and len(real["per_prompt"]) == 3


def test_cli_eval_prompts(t2i_dir, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "sneakers", "label": "sneaker"}\n{"prompt": "a red dress", "label": 3}\n')
    out = tmp_path / "r.json"
    assert main(["eval", "prompts", "--model", str(t2i_dir), "--prompts", str(prompts), "--num-images", "2",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["images"] == 4 and set(result["per_class"]) == {"Sneaker", "Dress"}
    assert "prompt accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("content, name, extra, message", [
    (None, "missing.jsonl", [], "not found"),
    ("sneakers\n", "p.txt", [], "needs labelled prompts"),
    ('{"prompt": "sneakers"}\n', "p.jsonl", [], "without a label"),
    ('{"prompt": "sneakers", "label": "car"}\n', "p.jsonl", [], "unknown Fashion-MNIST class"),
    ('{"prompt": "sneakers", "label": 7}\n', "p.jsonl", ["--num-images", "0"], "--num-images: must be in [1, inf], got 0"),
])
def test_cli_eval_prompts_bad_input(t2i_dir, tmp_path, capsys, content, name, extra, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    code = main(["eval", "prompts", "--model", str(t2i_dir), "--prompts", str(path), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1


# -- prompts that name nothing the model knows -------------------------------------------


def test_read_prompt_and_unknown_prompt_notice(t2i_dir, tmp_path, capsys):
    pipe = ARPipeline.from_pretrained(t2i_dir)
    shoes = pipe.read_prompt("a pair of running shoes")
    assert shoes.known and shoes.class_name == "Sneaker"
    assert pipe.read_prompt("a leather purse with handles").label == 8
    car = pipe.read_prompt("a red sports car")
    assert not car.known and car.similarity < shoes.similarity

    assert main(["generate", "a red sports car", "--model", str(t2i_dir), "--num-images", "1",
                 "--out", str(tmp_path / "car.png")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(lines) == 1
    assert "only knows Fashion-MNIST garments" in lines[0] and f"read as the nearest one, {car.class_name}" in lines[0]
    assert (tmp_path / "car.png").is_file()  # it still generates

    assert main(["generate", "sneakers", "--model", str(t2i_dir), "--num-images", "1",
                 "--out", str(tmp_path / "s.png")]) == 0
    assert "note:" not in capsys.readouterr().out


def test_every_heldout_prompt_is_read_as_known(t2i_dir):
    pipe = ARPipeline.from_pretrained(t2i_dir)
    prompts = load_labelled_prompts(HELDOUT_PROMPT_FILE)
    assert all(pipe.read_prompt(p).known for p, _ in prompts)


def _embedded_texts(pipe, monkeypatch) -> list:
    """Record how many texts each call of the pipeline's sentence encoder embeds."""
    calls, embed = [], pipe.text_encoder.sentence_embeddings
    monkeypatch.setattr(pipe.text_encoder, "sentence_embeddings", lambda texts: calls.append(len(texts)) or embed(texts))
    return calls


def test_a_saved_pipeline_reads_prompts_from_its_saved_class_descriptions(t2i_dir, monkeypatch):
    """save_pretrained embeds the class descriptions once; a loaded pipeline reads prompts against the
    saved embeddings (one probe description and the prompt are all it embeds) with the readings of
    embedding every description again."""
    assert (t2i_dir / CLASS_DESCRIPTIONS_FILE).is_file()
    pipe = ARPipeline.from_pretrained(t2i_dir)
    calls = _embedded_texts(pipe, monkeypatch)
    prompts = ["a pair of running shoes", "a red sports car", "a warm winter coat"]
    readings = [pipe.read_prompt(p) for p in prompts]
    assert calls == [1, 1, 1, 1]  # the probe, then each prompt

    fresh = ARPipeline.from_pretrained(t2i_dir)
    fresh._folder = None  # as a pipeline built in memory: every description embedded
    fresh_calls = _embedded_texts(fresh, monkeypatch)
    for prompt, reading in zip(prompts, readings):
        again = fresh.read_prompt(prompt)
        assert (again.label, again.known) == (reading.label, reading.known)
        assert abs(again.similarity - reading.similarity) < 1e-5
    assert fresh_calls[0] == len(_class_descriptions(CLASS_NAMES)[0]) > 400


@pytest.mark.parametrize("damage", ["other-embeddings", "other-classes", "not-safetensors"])
def test_saved_class_descriptions_that_do_not_match_are_embedded_again(t2i_dir, tmp_path, monkeypatch, damage):
    """A saved file that is not this encoder's embeddings of these descriptions is never used."""
    folder = tmp_path / "copy"
    shutil.copytree(t2i_dir, folder)
    path = folder / CLASS_DESCRIPTIONS_FILE
    if damage == "other-embeddings":  # the key matches, the numbers do not (other weights, same name)
        with safe_open(str(path), "pt") as handle:
            metadata, labels = handle.metadata(), handle.get_tensor("labels")
            embeddings = handle.get_tensor("embeddings")
        save_file({"embeddings": embeddings.roll(1, dims=0).contiguous(), "labels": labels}, str(path), metadata)
    elif damage == "other-classes":
        pipe = ARPipeline.from_pretrained(folder)
        save_class_descriptions(folder, pipe.text_encoder, ["Sneaker", "Bag"])
    else:
        path.write_bytes(b"not a safetensors file")
    pipe = ARPipeline.from_pretrained(folder)
    calls = _embedded_texts(pipe, monkeypatch)
    reading = pipe.read_prompt("a pair of running shoes")
    assert reading.known and reading.class_name == "Sneaker"
    assert len(_class_descriptions(CLASS_NAMES)[0]) in calls


@pytest.mark.skipif(not (ASSETS / "default-t2i" / "pipeline.json").is_file(), reason="shipped models not built yet")
def test_the_shipped_t2i_pipeline_has_its_class_descriptions_saved(monkeypatch):
    pipe = ARPipeline.from_pretrained("default-t2i")
    calls = _embedded_texts(pipe, monkeypatch)
    assert pipe.read_prompt("a pair of running shoes").class_name == "Sneaker"
    assert calls == [1, 1]


# -- the README's prompt with the shipped model ------------------------------------------


@pytest.mark.skipif(not (ASSETS / "default-t2i" / "pipeline.json").is_file(), reason="shipped models not built yet")
def test_readme_quickstart_prompt_draws_sneakers():
    """README Quickstart: `argen generate "a pair of running shoes" --num-images 16 --seed 0`."""
    from argen.eval.fmnist_classifier import load_fmnist_classifier

    pipe = ARPipeline.from_pretrained("default-t2i")
    out = pipe(prompt="a pair of running shoes", num_images=16, seed=0, progress=False)
    with torch.no_grad():
        predicted = load_fmnist_classifier()(pipe.tokens_to_images(out.tokens, seeds=out.seeds)).argmax(-1)
    assert int((predicted == CLASS_NAMES.index("Sneaker")).sum()) >= 14
