"""The one path from model logits to next-token probabilities, shared by every sampler.

Order of operations is the official LlamaGen one: classifier-free guidance on float32 logits
(`uncond + s * (cond - uncond)`, conditional half first in the batch), then temperature, then
top-k, then top-p, then softmax. Every function works on logits of shape [..., V], so a
speculative sampler can process a whole window of positions at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..checks import check_number

# Guidance beyond this overflows float32 logits into NaN (LlamaGen uses 1.5 to 10).
MAX_CFG_SCALE = 100.0


@dataclass(frozen=True)
class SamplingParams:
    """How a next-token distribution is shaped. Defaults are plain sampling without guidance.

    cfg_interval: guidance is used for image tokens 0..cfg_interval+1 and not after; -1 means
    always (LlamaGen semantics: the prefill token plus decode steps 0..cfg_interval).
    top_k: 0 disables; top_p: 1.0 disables.
    """

    cfg_scale: float = 1.0
    cfg_interval: int = -1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        # finite and in range (NaN passes every comparison the wrong way); plain Python numbers after
        checked = {
            "cfg_scale": check_number("cfg_scale", self.cfg_scale, 0, MAX_CFG_SCALE),
            "cfg_interval": check_number("cfg_interval", self.cfg_interval, -1, None, integer=True),
            "temperature": check_number("temperature", self.temperature, 0, None),
            "top_k": check_number("top_k", self.top_k, 0, None, integer=True),
            "top_p": check_number("top_p", self.top_p, 0, 1, lo_open=True),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @property
    def uses_cfg(self) -> bool:
        """LlamaGen builds the unconditional half only when cfg_scale > 1."""
        return self.cfg_scale > 1.0

    def guided_at(self, token_index: int) -> bool:
        """Whether image token `token_index` (0 = first) is sampled with guidance."""
        return self.uses_cfg and (self.cfg_interval < 0 or token_index <= self.cfg_interval + 1)


def apply_cfg(logits: torch.Tensor, params: SamplingParams, guided) -> torch.Tensor:
    """[2B, ..., V] (conditional rows first) -> [B, ..., V]; `guided` is a bool or a bool tensor
    broadcastable to [B, ..., 1] (per position, for windows that straddle `cfg_interval`)."""
    if not params.uses_cfg:
        return logits
    cond, uncond = logits.float().chunk(2, dim=0)
    mixed = uncond + (cond - uncond) * params.cfg_scale
    if isinstance(guided, bool):
        return mixed if guided else cond
    return torch.where(guided, mixed, cond)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set filtered logits to -inf. Ties at the k-th value survive; top-p keeps the token that
    crosses the threshold (Hugging Face convention, as LlamaGen)."""
    if top_k > 0:
        k = min(max(top_k, 1), logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative > top_p
        remove_sorted[..., 1:] = remove_sorted[..., :-1].clone()
        remove_sorted[..., 0] = False
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def process_logits(logits: torch.Tensor, params: SamplingParams, guided=True) -> torch.Tensor:
    """CFG, temperature and top-k/top-p: model logits -> the logits actually sampled from."""
    logits = apply_cfg(logits.float(), params, guided)
    logits = logits / max(params.temperature, 1e-5)
    if params.top_k > 0 or params.top_p < 1.0:
        logits = filter_top_k_top_p(logits, params.top_k, params.top_p)
    return logits


def logits_to_probs(logits: torch.Tensor, params: SamplingParams, guided=True) -> torch.Tensor:
    return F.softmax(process_logits(logits, params, guided), dim=-1)
