"""TiTok legacy stage 2 (finetune_decoder: proxy-code softmax -> MaskGIT-VQGAN codebook -> pixel decoder)
against outputs of the official code, which the shared fixtures (stage 1 only) leave out. The fixture
also uses the official defaults for absent `is_legacy` / `finetune_decoder` keys (both True), encoder
and decoder of different size names, and a pixel decoder whose last level changes width (the official
`nin_shortcut` quirk). See tests/data/titok_stage2/README.md."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from argen.tokenizers import TiTokTokenizer
from helpers import assert_titok_matches_official

DATA = Path(__file__).parent / "data" / "titok_stage2"
TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def stage2():
    meta = json.loads((DATA / "titok_stage2_tiny.json").read_text())
    model = TiTokTokenizer.from_official(DATA / "titok_stage2_tiny.safetensors", meta["config"],
                                         size_table=meta["size_tables_used"], **meta["argen_overrides"])
    return model, meta, load_file(DATA / "titok_stage2_tiny_io.safetensors")


def test_official_config_builds_stage2_with_official_keys(stage2):
    model, meta, _ = stage2
    assert model.config.is_legacy and model.config.finetune_decoder and model.has_pixel_decoder
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == {k: s for k, s, _ in meta["state_dict_keys"]}
    assert model.latent_tokens.dtype == torch.float32  # float16-stored weights upcast on load


@torch.no_grad()
def test_matches_official_outputs(stage2):
    model, _, io = stage2
    decoded = assert_titok_matches_official(model, io, TOL)
    assert decoded.shape == (2, 3, 16, 16)
    z_q, _ = model.quantize(model.encode_latent(io["image"]))
    torch.testing.assert_close(model.decoder(z_q), io["proxy_logits"], **TOL)  # before the pixel path
    torch.testing.assert_close(decoded, io["forward"], **TOL)


@torch.no_grad()
def test_tokenizer_boundary_is_official_in_minus_one_one(stage2):
    model, _, io = stage2
    codes = model.encode(io["image"] * 2 - 1)
    assert codes.shape == (2, 8) and torch.equal(codes, io["indices"][:, 0])
    # decode clamps to [0, 1] in TiTok's range, as the official demo does, then maps to [-1, 1]
    torch.testing.assert_close(model.decode(codes), io["decoded_from_tokens"].clamp(0, 1) * 2 - 1, **TOL)
