"""Weight formats for a generator's linear layers: fp32 (as trained), fp32-packed, bf16, or
weight-only int8.

A batch-1 decode step reads every weight matrix once and does two multiply-adds per weight, so
its time is the bytes of weights divided by memory bandwidth. Storing the matrices in fewer bytes
is the direct way to a faster step; everything else (norms, RoPE, attention, the KV cache,
embeddings, logits) stays in the model's dtype, and the samplers never see the difference.

* ``fp32-packed``: the same fp32 matrix, prepacked once for oneDNN (as ``bf16`` below; both run
  products of fewer than 4 rows zero-padded to 4, `PackedLinear`). On CPUs whose MKL 1- and 2-row kernels stream the
  weights slowly (the AMD EPYC measured in docs/benchmarks.md) this reads a large model's weights
  much faster; the results equal MKL's to float32 rounding (another summation order), not bit for
  bit, so plain ``fp32`` (MKL ``F.linear``, its small products padded the same way: `BatchInvariantLinear`)
  stays the exact reference. For small matrices oneDNN's
  per-call cost outweighs the gain.
* ``bf16``: the matrix is kept in bfloat16 and prepacked once for oneDNN
  (`torch.ops.mkldnn._reorder_linear_weight`). On this kind of CPU (AVX512-BF16/AMX) the packed
  bf16 GEMV streams at fp32's bandwidth, so a step reads half the bytes; the plain bf16
  `F.linear` path is ~1.5x slower than packed (measured, docs/history/decode.md).
* ``int8``: per-output-channel symmetric quantisation, as gpt-fast's ``WeightOnlyInt8Linear``:
  ``w ≈ int8 * scale[out]`` with ``scale = max|w_row| / 127``. The product runs in
  `torch._weight_int8pack_mm`, torch's own CPU kernel for weight-only int8 (the one torchao's
  ``int8_weight_only`` uses); it wants bfloat16 activations and scales (its float32 path is a slow
  fallback, ~5x slower than the bf16 one here), so inputs are cast to bf16 for the product only.

Each returns the input dtype, so a converted layer is a drop-in `nn.Linear` replacement.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ArgenError

WEIGHT_FORMATS = ("fp32", "fp32-packed", "bf16", "int8")
# "auto" picks fp32 or fp32-packed from the weights' size and device (`auto_weight_format`).
WEIGHT_CHOICES = ("auto",) + WEIGHT_FORMATS

# Decode-step fp32 weights of at least this many bytes (the last-level cache of the EPYC of
# docs/history/decode.md) are streamed from memory at every step, where oneDNN's packed kernel reads
# them faster than MKL's 2-row product: a step at batch 1 with CFG was 1.3-1.4x faster packed at 34
# and 60 MiB, 1.8-2.1x for GPT-B (372 MiB); a smaller model's weights stay in cache and oneDNN's
# per-call cost makes it slower (default-c2i, 13 MiB: 0.8-0.95x).
AUTO_PACK_BYTES = 32 * 2**20


def check_weight_format(fmt: str, allow_auto: bool = False) -> str:
    choices = WEIGHT_CHOICES if allow_auto else WEIGHT_FORMATS
    if fmt not in choices:
        raise ArgenError(f"unknown weight format {fmt!r}; choose one of {', '.join(choices)}")
    return fmt


def auto_weight_format(linears) -> str:
    """"fp32-packed" for fp32 CPU linears holding at least AUTO_PACK_BYTES, else "fp32": the
    faster of the two formats that keep the trained fp32 numbers (to rounding)."""
    weights = [m.weight for m in linears]
    fp32_cpu = all(w.dtype == torch.float32 and onednn_packable(w) for w in weights)
    if fp32_cpu and sum(w.numel() * 4 for w in weights) >= AUTO_PACK_BYTES:
        return "fp32-packed"
    return "fp32"


def onednn_packable(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and torch.backends.mkldnn.is_available()


def with_min_rows(product, x: torch.Tensor, min_rows: int, multiple: int = 1) -> torch.Tensor:
    """product(x) for a 2D x, zero-padded to at least `min_rows` rows and to a multiple of `multiple`
    (the padding rows are computed and dropped)."""
    rows = x.shape[0]
    target = max(min_rows, -(-rows // multiple) * multiple)
    if rows == target:
        return product(x)
    return product(F.pad(x, (0, 0, 0, target - rows)))[:rows]


ROW_MULTIPLE = 4  # see BatchInvariantLinear


def batch_invariant(product, x: torch.Tensor) -> torch.Tensor:
    """product(x) for a 2D x zero-padded to a multiple of `ROW_MULTIPLE` rows: what makes an fp32
    product's rows the same bits at any row count (`BatchInvariantLinear`). For several products in a
    row (an FFN, a folded head), pad once around all of them."""
    return with_min_rows(product, x, ROW_MULTIPLE, ROW_MULTIPLE)


class BatchInvariantLinear(nn.Linear):
    """`nn.Linear` whose products are zero-padded to a multiple of 4 rows: the generators' fp32
    linears (the `fp32` format, MKL's product).

    MKL sums a product of 1 to 3 rows in another order than one of 4 or more; and on several
    threads it splits the rows between them, so counts such as 5-7 and 9-11 (on 2 threads; more on
    16 or 32) leave a thread fewer than 4 and round apart too. Every multiple of 4 gave each row the
    same bits as in a 300-row product (1, 2, 3, 4, 8, 16 and 32 threads, 1 to 256 rows, every linear shape of the
    shipped models and GPT-B). Without the padding a decode step at batch 1 (2 rows with CFG) gave
    each logit ~1e-6 apart from the same row's in a batch, enough to flip a sampled token now and
    then: 1 of 64 default-c2i images differed between batch 1 and 16, and 1 of 64 between batch 3
    and 16 on two threads (docs/architecture.md, "The generation path"). Padded, a row's logits are
    the same bits at any batch size. Same parameters and state dict keys as `nn.Linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows % ROW_MULTIPLE == 0 and rows:
            return super().forward(x)
        y = batch_invariant(lambda part: F.linear(part, self.weight, self.bias), x.reshape(rows, self.in_features))
        return y.reshape(*x.shape[:-1], self.out_features)

    def store_column_major(self, column_major: bool = True) -> None:
        """Keep the weight [out, in] column-major (its transpose contiguous), or row-major as trained and saved.

        MKL multiplies x by a row-major W's transpose as an "NT" product; column-major, the same product is a
        plain "NN" one, which the AMD EPYC measured runs 1.1-1.2x faster inside a decode step, bit for bit the
        same (every linear shape of the shipped models, 4 to 256 rows, 1 and 2 threads; docs/history/decode.md,
        session 38), so the padding argument above holds unchanged. The other weight formats and compiled steps
        convert from the row-major layout they were written for (`GPT.set_weight_format`, `compile_decode`)."""
        w = self.weight.data
        self.weight.data = w.t().contiguous().t() if column_major else w.contiguous()


class PackedLinear(nn.Module):
    """y = x @ W^T with W prepacked once for oneDNN (`mkldnn._reorder_linear_weight`) in
    `compute_dtype`; x is cast to that dtype for the product, y back to x's dtype.

    Products of fewer than `min_rows` rows are zero-padded to `min_rows` (the padding rows are
    computed and dropped): oneDNN's packed kernel for a handful of rows streams the weights faster
    than its 1- and 2-row kernels (measured, docs/history/decode.md), and each row's result is then
    the same whatever the batch size, 1 row included (oneDNN's 1-row kernel sums differently from
    its many-row ones for some shapes; tested). A subclass fixes the dtype and the format name;
    0 or 1 `min_rows` turns padding off."""

    weight_format = ""
    compute_dtype = torch.float32
    min_rows = 4

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ArgenError(f"{type(self).__name__} takes bias-free linears (every GPT linear is)")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", linear.weight.detach().to(self.compute_dtype).contiguous())
        # The packed copy is an opaque oneDNN tensor: not a buffer (it never enters a state dict).
        self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight) if onednn_packable(self.weight) else None

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """The product alone, x already in `compute_dtype` and 2D (what the bench's floor streams)."""
        if self._packed is not None and x.device.type == "cpu" and not torch.compiler.is_compiling():
            return with_min_rows(lambda rows: torch.ops.mkldnn._linear_pointwise(rows, self._packed, None, "none", [], ""),
                                 x, self.min_rows)
        # Under torch.compile the opaque packed tensor cannot be a graph input (inductor packs
        # constant weights itself when freezing, for oneDNN under max-autotune: onednn_products);
        # the plain product is traced instead.
        return F.linear(x, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(self.compute_dtype)
        return self.matmul(flat).reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.weight_format}"


class BF16Linear(PackedLinear):
    """W stored in bfloat16, oneDNN-packed; x cast to bf16 for the product."""

    weight_format = "bf16"
    compute_dtype = torch.bfloat16


class FP32PackedLinear(PackedLinear):
    """The fp32 weights themselves, oneDNN-packed: the same numbers as `nn.Linear` to float32
    rounding (oneDNN sums in another order than MKL, so the last bits differ), read faster."""

    weight_format = "fp32-packed"
    compute_dtype = torch.float32


class Int8Linear(nn.Module):
    """Weight-only int8 with one scale per output channel (gpt-fast's WeightOnlyInt8Linear)."""

    weight_format = "int8"
    compute_dtype = torch.bfloat16

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ArgenError("Int8Linear takes bias-free linears (every GPT linear is)")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scales = quantize_int8(linear.weight.detach())
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """The product alone, x already bf16 and 2D."""
        if x.device.type == "cpu":
            return torch._weight_int8pack_mm(x, self.weight, self.scales)
        return F.linear(x, self.weight.to(x.dtype)) * self.scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        return self.matmul(flat).reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scales.float()[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_int8(weight: torch.Tensor):
    """Symmetric per-output-channel int8: returns (int8 [out, in], bf16 scales [out]).

    The scale is rounded to bf16 first and the weights quantised against the rounded scale, so
    int8 * scale reproduces the weight to half a quantisation step exactly as stored.
    """
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).to(torch.bfloat16)
    q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scales


FORMAT_CLASSES = {"fp32-packed": FP32PackedLinear, "bf16": BF16Linear, "int8": Int8Linear}


def weight_format_of(linear: nn.Module) -> str:
    """The weight format a (converted or plain) linear runs in."""
    return getattr(linear, "weight_format", "fp32")


def float_weight(linear: nn.Module) -> torch.Tensor:
    """The float32 matrix a linear of any format multiplies by (int8 dequantised, bf16 widened)."""
    if isinstance(linear, Int8Linear):
        return linear.dequantized()
    return linear.weight.detach().float()


def convert_linears(modules: Iterable[tuple], fmt: str) -> int:
    """Replace each (parent, attribute name) nn.Linear by its `fmt` counterpart; returns the count."""
    check_weight_format(fmt)
    if fmt == "fp32":
        return 0
    cls = FORMAT_CLASSES[fmt]
    count = 0
    for parent, name in modules:
        linear = getattr(parent, name)
        if not isinstance(linear, nn.Linear):
            raise ArgenError(f"{name} is already converted ({type(linear).__name__}); weight formats apply once, to fp32 weights")
        setattr(parent, name, cls(linear))
        count += 1
    return count
