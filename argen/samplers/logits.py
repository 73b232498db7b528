"""The one path from model logits to next-token probabilities, shared by every sampler.

Order of operations is the official LlamaGen one: classifier-free guidance on float32 logits
(`uncond + s * (cond - uncond)`, conditional half first in the batch), then temperature, then
top-k, then top-p, then softmax. Every function works on logits of shape [..., V], so a
speculative sampler can process a whole window of positions at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..checks import check_number
from ..errors import ArgenError

# Guidance beyond this overflows float32 logits into NaN (LlamaGen uses 1.5 to 10).
MAX_CFG_SCALE = 100.0

# How the guidance scale moves over the image (Token-Shuffle ramps it up: strong guidance on the
# first tokens causes artifacts). t = position / (positions - 1) in [0, 1]; s = cfg_scale.
CFG_SCHEDULES = {
    "constant": lambda s, t: s,
    "linear": lambda s, t: 1.0 + (s - 1.0) * t,                              # 1 at the first position, s at the last
    "cosine": lambda s, t: 1.0 + (s - 1.0) * (1.0 - math.cos(math.pi * t)) / 2,  # the same ends, slow start and finish
}


@dataclass(frozen=True)
class SamplingParams:
    """How a next-token distribution is shaped. Defaults are plain sampling without guidance.

    cfg_interval: guidance is used for image tokens 0..cfg_interval+1 and not after; -1 means
    always (LlamaGen semantics: the prefill token plus decode steps 0..cfg_interval).
    cfg_schedule: "constant" (cfg_scale at every position), "linear" or "cosine" (ramps from 1 at
    the first position to cfg_scale at the last; `CFG_SCHEDULES`). Positions, not codes: the k
    codes of one position share a scale.
    top_k: 0 disables; top_p: 1.0 disables.
    """

    cfg_scale: float = 1.0
    cfg_interval: int = -1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg_schedule: str = "constant"

    def __post_init__(self):
        if not isinstance(self.cfg_schedule, str) or self.cfg_schedule not in CFG_SCHEDULES:
            raise ArgenError(f"unknown cfg_schedule {self.cfg_schedule!r}; choose one of {', '.join(CFG_SCHEDULES)}")
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

    def cfg_scale_at(self, index: int, num_positions: int) -> float:
        """The schedule's guidance scale at image position `index` of `num_positions` (ignores
        cfg_interval; see `guidance_at`)."""
        t = min(max(index, 0) / max(num_positions - 1, 1), 1.0)
        return float(CFG_SCHEDULES[self.cfg_schedule](self.cfg_scale, t))

    def guidance_at(self, index: int, num_positions: int):
        """What `apply_cfg` takes for image position `index`: the bool of `guided_at` under the
        constant schedule (the original path, bit for bit), else the scheduled scale (1.0 = the
        conditional logits, also past cfg_interval)."""
        if self.cfg_schedule == "constant" or not self.uses_cfg:
            return self.guided_at(index)
        return self.cfg_scale_at(index, num_positions) if self.guided_at(index) else 1.0

    def guidance_rows(self, index: torch.Tensor, num_positions: int) -> torch.Tensor:
        """`guidance_at` for a tensor of positions (a speculative window): float32 scales,
        the same values as the scalar path."""
        scales = [self.guidance_at(i, num_positions) for i in range(num_positions)]
        table = torch.tensor([float(s) for s in scales], dtype=torch.float32, device=index.device)
        return table[index.clamp(0, num_positions - 1)]


def apply_cfg(logits: torch.Tensor, params: SamplingParams, guided) -> torch.Tensor:
    """[2B, ..., V] (conditional rows first) -> [B, ..., V]. `guided`: a bool or a bool tensor
    broadcastable to [B, ..., 1] (per position, for windows that straddle `cfg_interval`) to use
    cfg_scale or not; or, under a guidance schedule, a float or float tensor of scales (a scale of
    1.0 gives the conditional logits exactly)."""
    if not params.uses_cfg:
        return logits
    cond, uncond = logits.float().chunk(2, dim=0)
    if isinstance(guided, float):
        return cond if guided == 1.0 else uncond + (cond - uncond) * guided
    if isinstance(guided, torch.Tensor) and guided.is_floating_point():
        return torch.where(guided == 1.0, cond, uncond + (cond - uncond) * guided)
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
