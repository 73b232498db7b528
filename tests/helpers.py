"""Tiny random models for tests. The official init zeroes the output layer (all logits 0), so
every weight is redrawn to give the model non-trivial, input-dependent logits."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from argen.models import GPT, GPTConfig

REPO = Path(__file__).resolve().parents[1]


def randomize(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.25 * torch.randn(p.shape, generator=g))
            elif p.dim() == 2 and "embedding" not in name and "tok_embeddings" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def tiny_gpt(seed: int = 1, **overrides) -> GPT:
    fields = dict(dim=64, n_layer=2, n_head=4, vocab_size=64, num_classes=10, block_size=16)
    fields.update(overrides)
    torch.manual_seed(0)
    return randomize(GPT(GPTConfig(**fields)), seed)


def tiny_t2i(seed: int = 1, **overrides) -> GPT:
    fields = dict(model_type="t2i", cls_token_num=6, caption_dim=12)
    fields.update(overrides)
    return tiny_gpt(seed, **fields)


def left_padded_captions(batch: int, tokens: int, dim: int, lengths, seed: int = 3):
    """Caption features with the real tokens at the end (LlamaGen left padding) and their mask."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, tokens, dim, generator=g)
    mask = torch.zeros(batch, tokens, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, tokens - n:] = True
    return feats * mask[..., None], mask


def assert_rows_as_if_alone(sampler, model, cond, params, seeds, batch, ragged: bool = True) -> None:
    """Each row of a speculative batch, sampled alone with its own seed, gives the batch's tokens and
    counts (target forwards; drafter forwards for a draft sampler). ragged: the rows really
    finished at different steps, and the batch ran as long as its slowest row."""
    if ragged:
        assert len(set(batch.forwards_per_sample.tolist())) > 1
        assert batch.num_forward_passes == int(batch.forwards_per_sample.max())
    for i in range(len(seeds)):
        alone = sampler(model, cond[i:i + 1], params=params, seeds=seeds[i:i + 1])
        assert torch.equal(alone.tokens[0], batch.tokens[i])
        assert alone.num_forward_passes == int(batch.forwards_per_sample[i])
        if batch.draft_forwards_per_sample is not None:
            assert alone.draft_forward_passes == int(batch.draft_forwards_per_sample[i])


def launch_two_processes(argv, cwd, timeout: int = 240) -> subprocess.CompletedProcess:
    """`accelerate launch` of `python -m argen ARGV` as 2 CPU processes, 1 thread each. (`accelerate launch --cpu`
    always starts a single process; on a CPU machine the multi-process launcher is `--multi_gpu`, and argen then
    picks the gloo CPU backend.)"""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port), "-m", "argen", *map(str, argv)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


@torch.no_grad()
def assert_titok_matches_official(model, io, tol: dict) -> torch.Tensor:
    """TiTok's path against an official `_io` file: encoder output, codes, quantised latent, the decoder
    from the latent and from [B, 1, K] tokens (and argen's [B, K]). Returns the decoded latent."""
    z = model.encode_latent(io["image"])
    torch.testing.assert_close(z, io["encoder_out"], **tol)
    z_q, result = model.quantize(z)
    assert torch.equal(result["min_encoding_indices"], io["indices"])
    torch.testing.assert_close(z_q, io["z_quantized"], **tol)
    decoded = model.decode_latent(z_q)
    assert decoded.shape == io["decoded"].shape
    torch.testing.assert_close(decoded, io["decoded"], **tol)
    torch.testing.assert_close(model.decode_tokens(io["indices"]), io["decoded_from_tokens"], **tol)
    torch.testing.assert_close(model.decode_tokens(io["indices"][:, 0]), io["decoded_from_tokens"], **tol)
    return decoded
