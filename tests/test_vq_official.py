"""VQTokenizer against the official LlamaGen VQModel on what the shared fixtures leave out: a 4-level
(downsample 8) encoder/decoder, a codebook without L2 normalisation, and non-square images decoded
from [B, h, w] codes (`decode_code(codes, shape=[B, C, h, w])`). See tests/data/vq_nonsquare/README.md."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from argen.errors import ArgenError
from argen.tokenizers import VQTokenizer

DATA = Path(__file__).parent / "data" / "vq_nonsquare"
TOL = dict(atol=1e-4, rtol=1e-4)
IMAGES = ["a", "b", "c"]  # [2, 3, 48, 32], [1, 3, 32, 48], [1, 3, 64, 16]


@pytest.fixture(scope="module")
def fixture():
    meta = json.loads((DATA / "vq_ds8_tiny.json").read_text())
    args = dict(meta["vq_model_args"])
    args.update({k: v for k, v in meta["encoder_decoder_overrides"].items() if k != "how"})
    # image_size only sets the default (square) grid: 32 -> 4 x 4; the fixture's images are not 32 x 32
    vq = VQTokenizer.from_llamagen(DATA / "vq_ds8_tiny.safetensors", **args, image_size=32)
    return vq, meta, load_file(DATA / "vq_ds8_tiny_io.safetensors")


def test_official_key_names_load_unchanged(fixture):
    vq, meta, _ = fixture
    assert {k: list(v.shape) for k, v in vq.state_dict().items()} == {k: s for k, s, _ in meta["state_dict_keys"]}
    assert vq.downsample_factor == 8 and vq.grid == (4, 4)


@pytest.mark.parametrize("key", IMAGES)
@torch.no_grad()
def test_non_square_encode_and_decode_match_official(fixture, key):
    vq, meta, io = fixture
    image = io[f"{key}.image"]
    b, _, hgt, wid = image.shape
    h, w = meta["images"][key]["latent_hw"]
    torch.testing.assert_close(vq.encoder(image), io[f"{key}.encoder_out"], **TOL)
    codes = vq.encode(image)
    assert codes.shape == (b, h * w)
    assert torch.equal(codes.flatten(), io[f"{key}.indices"])  # raster order over the h x w grid
    decoded = vq.decode(codes.view(b, h, w))
    assert decoded.shape == (b, 3, hgt, wid)
    torch.testing.assert_close(decoded, io[f"{key}.decoded_from_codes"], **TOL)


@torch.no_grad()
def test_forward_and_unnormalised_lookup_match_official(fixture):
    vq, _, io = fixture
    image = io["a.image"]
    _, z, z_q = vq.quantize.nearest(vq.encode_latent(image))
    torch.testing.assert_close((z + (z_q - z)).permute(0, 3, 1, 2), io["a.quant"], **TOL)
    recon, _, _, indices = vq(image)
    torch.testing.assert_close(recon, io["a.forward_recon"], **TOL)
    assert torch.equal(indices.flatten(), io["a.indices"])
    # no L2 norm: the codebook is used as stored
    assert torch.equal(vq.codebook_embeddings(), vq.quantize.embedding.weight)


@torch.no_grad()
def test_grid_comes_from_the_codes_shape(fixture):
    """Image c is 64 x 16: an 8 x 2 code map with as many codes (16) as the default 4 x 4 grid. [B, h, w]
    codes must decode on their own grid (they were once flattened and read as 4 x 4); flat [B, 16] codes
    mean the default grid."""
    vq, _, io = fixture
    codes = io["c.indices"].view(1, 8, 2)
    torch.testing.assert_close(vq.decode(codes), io["c.decoded_from_codes"], **TOL)
    assert vq.decode(codes.reshape(1, 16)).shape == (1, 3, 32, 32)


def test_bad_codes_are_one_line_errors(fixture):
    vq, _, io = fixture
    codes = io["a.indices"].view(2, 24)
    with pytest.raises(ArgenError, match=r"\[B, h, w\] for another grid") as err:
        vq.decode(codes)  # flat codes of a 6 x 4 map: the grid cannot be guessed
    assert "\n" not in str(err.value)
    with pytest.raises(ArgenError, match="h, w >= 1"):
        vq.decode(torch.zeros(1, 0, 4, dtype=torch.long))
    with pytest.raises(ArgenError, match="out of range"):
        vq.decode(torch.full((1, 6, 4), 64))
