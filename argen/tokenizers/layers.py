"""Layers the tokenizers share."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.base import weights_key


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` that always runs oneDNN's kernel on the CPU, so an image decodes (and encodes) to the
    same floats whatever its batch (VQ and TiTok). PyTorch picks a CPU convolution's algorithm by batch
    size (its own kernel for one small image, oneDNN's for more; 1x1 kernels on one thread only from 16
    images), and they round differently: default-vq decoded 64 code maps at batch 1 and at batch 64 up
    to 1.3e-6 apart, which moved 1 uint8 pixel in 65,536 by a level. No public switch selects the
    algorithm, hence the ATen ops (docs/architecture.md, data flow).

    Without autograd (sampling, evaluation) the weight is also packed once into oneDNN's blocked layout:
    the public op reorders it at every call, which at batch 1 is a quarter of a default-vq decode
    (bf16 decoder 4.6 -> 3.4 ms an image, fp32 alike; batch 16 unchanged; docs/history/token-shuffle.md,
    session 39). The packed op returns channels-last activations, on which the GroupNorm that follows
    rounds by batch on two threads (session 33), so they are made contiguous again; then images decode
    alike in any batch and on one thread or two (tested). Training runs the op with a backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and self.padding_mode == "zeros" and _onednn_takes(x.dtype):
            if torch.is_grad_enabled() or torch.compiler.is_compiling():
                return torch.ops.aten.mkldnn_convolution(x, self.weight, self.bias, self.padding, self.stride,
                                                         self.dilation, self.groups)
            return torch.ops.mkldnn._convolution_pointwise(x, self._packed_weight(x), self.bias, self.padding,
                                                          self.stride, self.dilation, self.groups, "none", [],
                                                          "").contiguous()
        return super().forward(x)

    def _packed_weight(self, x: torch.Tensor) -> torch.Tensor:
        """The weight in the layout oneDNN picks for one image of x's shape (the same layout for every batch:
        batch invariance), rebuilt when the weight changes (`weights_key`: a load, an optimizer step, a cast)."""
        key = (tuple(x.shape[1:]), weights_key((self.weight,) if self.bias is None else (self.weight, self.bias)))
        cached = self.__dict__.get("_packed")
        if cached is None or cached[0] != key:
            packed = torch._C._nn.mkldnn_reorder_conv2d_weight(self.weight.detach().to_mkldnn(), self.padding,
                                                              self.stride, self.dilation, self.groups,
                                                              [1, *x.shape[1:]])
            cached = (key, packed)
            self.__dict__["_packed"] = cached  # not a buffer: derived, never saved
        return cached[1]

    def __getstate__(self) -> dict:
        # a packed weight is an opaque oneDNN tensor, which neither copies nor pickles (an EMA's deepcopy)
        return {k: v for k, v in super().__getstate__().items() if k != "_packed"}


def _onednn_takes(dtype: torch.dtype) -> bool:
    """Whether oneDNN is on and runs convolutions in `dtype` on this CPU (bf16 needs AVX-512)."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def image_by_image(op, x: torch.Tensor) -> torch.Tensor:
    """op(x) for an elementwise `op`, one image (index of the first dimension) at a time when sampling, so
    an image's activations do not depend on its batch.

    ATen's silu, sigmoid and tanh-GELU run a vectorised loop over most elements and a scalar loop over each
    thread's leftover tail, and the two round differently (exp, tanh and erf-GELU did not, measured). A
    batch splits between threads at boundaries that depend on its size, and off a multiple of the vector
    width an element's rounding then depends on the batch: default-vq decoded 3-10 of 16 images differently
    alone than in a batch of 16 on three threads, FlexTok all of 10 on five (session 26,
    docs/architecture.md). One image at a time, every image is split the same way whatever its batch, and
    the floats are those of one call wherever its split was aligned (one or two threads here). Training
    (autograd on) takes the one-call path."""
    if x.shape[0] == 1 or torch.is_grad_enabled():
        return op(x)
    out = torch.empty_like(x)
    for image, result in zip(x, out):
        result.copy_(op(image))
    return out


def silu(x: torch.Tensor) -> torch.Tensor:
    return image_by_image(F.silu, x)
