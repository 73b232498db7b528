"""Layers the tokenizers share."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.base import weights_key


PACKED_SHAPES = 4


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` that always runs oneDNN's kernel on the CPU, so an image decodes (and encodes) to the
    same floats whatever its batch (VQ and TiTok). PyTorch picks a CPU convolution's algorithm by batch
    size (its own kernel for one small image, oneDNN's for more; 1x1 kernels on one thread only from 16
    images), and they round differently: default-vq decoded 64 code maps at batch 1 and at batch 64 up
    to 1.3e-6 apart, which moved 1 uint8 pixel in 65,536 by a level. No public switch selects the
    algorithm, hence the ATen ops (docs/architecture.md, data flow).

    Without autograd (sampling, evaluation) the weight is also packed once into oneDNN's blocked layout
    (`_convolution_pointwise` on a reordered weight, what inductor's freezing calls): the public op reorders
    it at every call, a quarter of a default-vq decode at batch 1. The packed op returns channels-last
    activations, which the next convolution takes as they are; `GroupNorm` below makes them contiguous, as
    its channels-last kernel rounds by batch on two threads (what made sessions 26 and 37's packed decoders
    batch-dependent). Images then decode alike in any batch, on one thread or two (tested), fp32 within 2e-6
    of the public op's floats; default-vq decodes 1.22-1.31x faster at batch 1 and 1.16-1.20x at batch 16
    (docs/history/token-shuffle.md, session 39). Training runs the public op, which has a backward.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and self.padding_mode == "zeros" and _onednn_takes(x.dtype):
            if torch.is_grad_enabled() or torch.compiler.is_compiling():
                return torch.ops.aten.mkldnn_convolution(x, self.weight, self.bias, self.padding, self.stride,
                                                         self.dilation, self.groups)
            return torch.ops.mkldnn._convolution_pointwise(x, self._packed_weight(x), self.bias, self.padding,
                                                          self.stride, self.dilation, self.groups, "none", [], "")
        return super().forward(x)

    def _packed_weight(self, x: torch.Tensor) -> torch.Tensor:
        """The weight in the layout oneDNN picks for x's shape, rebuilt when the weight changes (`weights_key`: a
        load, an optimizer step, a cast). Per shape: packed for one image, fp32 batches of 16 decoded at 0.82x
        the public op's speed on two threads, packed for their shape at 0.97x (session 39, before the channels-
        last activations); the floats are the same either way. The last PACKED_SHAPES shapes are kept
        (default-vq's decoder: 3 MB a shape)."""
        key = weights_key((self.weight,) if self.bias is None else (self.weight, self.bias))
        cached = self.__dict__.get("_packed")
        if cached is None or cached[0] != key:
            cached = (key, OrderedDict())
            self.__dict__["_packed"] = cached  # not a buffer: derived, never saved
        by_shape, shape = cached[1], tuple(x.shape)
        if shape in by_shape:
            by_shape.move_to_end(shape)  # the most recently used last
        else:
            if len(by_shape) == PACKED_SHAPES:
                by_shape.popitem(last=False)
            by_shape[shape] = torch._C._nn.mkldnn_reorder_conv2d_weight(
                self.weight.detach().to_mkldnn(), self.padding, self.stride, self.dilation, self.groups, list(shape))
        return by_shape[shape]

    def __getstate__(self) -> dict:
        # a packed weight is an opaque oneDNN tensor, which neither copies nor pickles (an EMA's deepcopy)
        return {k: v for k, v in super().__getstate__().items() if k != "_packed"}


class GroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` on a contiguous copy of a channels-last input (`Conv2d`'s packed outputs): its channels-last
    CPU kernel splits work between threads by batch size, and an image then normalises to other floats alone than
    in a batch (session 33). On NCHW input it rounds alike in any batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.contiguous())


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
