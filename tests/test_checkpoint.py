"""Loading weights: official formats, stray keys, clear errors, no pickle execution."""

import argparse
import os

import pytest
import torch
from safetensors.torch import save_file

from argen.errors import ArgenError, CheckpointError
from argen.models import GPT
from argen.tokenizers import VQTokenizer

from helpers import tiny_gpt

ARGS = dict(dim=64, n_layer=2, n_head=4, vocab_size=64, num_classes=10, block_size=16)


@pytest.fixture(scope="module")
def model():
    return tiny_gpt()


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_official_pt_with_args_namespace_loads_without_unpickling_code(model, tmp_path):
    path = tmp_path / "c2i_tiny.pt"
    torch.save({"model": model.state_dict(), "steps": 10, "args": argparse.Namespace(lr=1e-4, gpt_model="GPT-B")}, path)
    with pytest.raises(Exception):  # plain weights-only loading refuses the Namespace
        torch.load(path, weights_only=True)
    assert same_weights(GPT.from_llamagen(path, **ARGS), model)


def test_ema_raw_fsdp_prefixed_and_stray_keys(model, tmp_path):
    state = model.state_dict()
    other = tiny_gpt(seed=7).state_dict()
    torch.save({"model": state, "ema": other}, tmp_path / "both.pt")
    assert same_weights(GPT.from_llamagen(tmp_path / "both.pt", **ARGS), model)  # "model" first, as official
    assert same_weights(GPT.from_llamagen(tmp_path / "both.pt", prefer_ema=True, **ARGS), tiny_gpt(seed=7))
    torch.save({"ema": state}, tmp_path / "ema.pt")
    assert same_weights(GPT.from_llamagen(tmp_path / "ema.pt", **ARGS), model)
    stray = dict(state, freqs_cis=torch.zeros(17, 8, 2), **{
        "layers.0.attention.kv_cache.k_cache": torch.zeros(2, 4, 24, 16),
        "layers.0.attention.kv_cache.v_cache": torch.zeros(2, 4, 24, 16)})
    torch.save(stray, tmp_path / "consolidated.pth")  # FSDP: raw state dict
    assert same_weights(GPT.from_llamagen(tmp_path / "consolidated.pth", **ARGS), model)
    save_file({f"_orig_mod.{k}": v.contiguous() for k, v in state.items()}, tmp_path / "compiled.safetensors")
    assert same_weights(GPT.from_llamagen(tmp_path / "compiled.safetensors", **ARGS), model)


def test_mismatches_are_listed(model):
    state = dict(model.state_dict())
    wrong = dict(state, **{"tok_embeddings.weight": torch.zeros(65, 64)})
    with pytest.raises(CheckpointError, match=r"shape mismatch.*tok_embeddings.weight \(65, 64\) vs \(64, 64\)"):
        GPT.from_llamagen(wrong, **ARGS)
    missing = {k: v for k, v in state.items() if k != "norm.weight"}
    with pytest.raises(CheckpointError, match="missing keys: norm.weight"):
        GPT.from_llamagen(missing, **ARGS)
    extra = dict(state, **{"layers.9.attention.wo.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="unexpected keys: layers.9.attention.wo.weight"):
        GPT.from_llamagen(extra, **ARGS)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        GPT.from_llamagen(state, **dict(ARGS, vocab_size=128))


def test_not_a_checkpoint_and_truncated_files(model, tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("hello, I am not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        GPT.from_llamagen(text, **ARGS)
    full = tmp_path / "full.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, full)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(full.read_bytes()[: os.path.getsize(full) // 2])
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        GPT.from_llamagen(cut, **ARGS)
    with pytest.raises(CheckpointError, match="not found"):
        GPT.from_llamagen(tmp_path / "absent.pt", **ARGS)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="no state dict"):
        GPT.from_llamagen(tmp_path / "list.pt", **ARGS)


class _Exploit:
    """A pickle payload: unpickling it would create a file via os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_never_executes(model, tmp_path):
    marker = tmp_path / "pwned"
    torch.save(_Exploit(marker), tmp_path / "evil.pt")
    with pytest.raises(CheckpointError):
        GPT.from_llamagen(tmp_path / "evil.pt", **ARGS)
    # hidden next to real weights: still refused, still not run
    torch.save({"model": model.state_dict(), "args": _Exploit(marker)}, tmp_path / "evil_wrapped.pt")
    with pytest.raises(CheckpointError, match="refusing to load.*system"):
        GPT.from_llamagen(tmp_path / "evil_wrapped.pt", **ARGS)
    assert not marker.exists()


def test_save_pretrained_round_trip_fp16_and_atomic(model, tmp_path):
    target = tmp_path / "gpt"
    model.save_pretrained(target)
    assert sorted(p.name for p in target.iterdir()) == [".argen-output.json", "config.json", "model.safetensors"]
    assert same_weights(GPT.from_pretrained(target), model)
    model.save_pretrained(target, dtype=torch.float16)  # overwrite in place
    half = GPT.from_pretrained(target)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half.output.weight, model.output.weight.half().float())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt"]  # no temp folders left behind
    from argen.atomic import UMASK

    for path in [target, *target.iterdir()]:  # the user's umask, not tempfile's 0600/0700 or safetensors' 0600
        assert path.stat().st_mode & 0o777 == (0o777 if path.is_dir() else 0o666) & ~UMASK, path
    (target / "MY_NOTES.md").write_text("mine")  # a user's file inside: the folder is no longer argen's alone
    with pytest.raises(ArgenError, match="not written by argen"):
        model.save_pretrained(target)
    assert (target / "MY_NOTES.md").read_text() == "mine"


def test_save_pretrained_failure_leaves_old_model(model, tmp_path):
    target = tmp_path / "gpt"
    model.save_pretrained(target)
    before = (target / "model.safetensors").read_bytes()
    with pytest.raises(TypeError):
        model.save_pretrained(target, extra_files={"card.md": object()})  # fails mid-write
    assert (target / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt"]


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(ArgenError, match="no model directory"):
        GPT.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        GPT.from_pretrained(tmp_path / "empty")
    vq = VQTokenizer(codebook_size=16, ch=32, z_channels=32, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2), image_size=8)
    vq.save_pretrained(tmp_path / "vq")
    with pytest.raises(CheckpointError, match="holds a VQTokenizer"):
        GPT.from_pretrained(tmp_path / "vq")
    again = VQTokenizer.from_pretrained(tmp_path / "vq")
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.equal(again.encode(images), vq.eval().encode(images))
    assert again.grid == (4, 4)
