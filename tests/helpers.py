"""Tiny random models for tests. The official init zeroes the output layer (all logits 0), so
every weight is redrawn to give the model non-trivial, input-dependent logits."""

import torch

from argen.models import GPT, GPTConfig


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
