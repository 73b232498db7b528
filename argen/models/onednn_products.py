"""An inductor pass that runs a frozen graph's fp32 linears through oneDNN's packed kernel, not MKL's.

When inductor freezes a graph's weights (argen's max-autotune modes) it prepacks each constant linear
weight. For bf16 it packs for oneDNN; for fp32 it packs for MKL's packed GEMM (`mkl._mkl_linear`)
whenever torch has MKL, and turns to oneDNN only when the batch size is dynamic or the graph is
compiled ahead of time. No setting picks oneDNN for a static fp32 graph. On the AMD EPYC of
docs/history/decode.md, oneDNN's fp32 kernel is the faster one at every row count a decode step has:
default-c2i's 21 products at 32 rows (batch 16 with CFG) take 2.6 ms against MKL's 3.3-3.5 ms, and a
whole compiled step is 1.2x faster (issue 12, session 29). So `OneDNNProducts` rewrites every
`mkl._mkl_linear` node into the oneDNN node inductor emits itself for a dynamic batch,
`mkldnn._linear_pointwise` over the same weight packed by `mkldnn._reorder_linear_weight`.

Hand-written because no inductor option or library does this; it uses inductor's documented hook for
custom passes (`post_grad_custom_post_pass`). It relies on the shape of inductor's MKL node in the
pinned torch: a node that does not match is left as it was (still correct, only MKL's speed), and a
test checks that the products of a compiled step do run through oneDNN.
"""

from __future__ import annotations

import torch
from torch._inductor.constant_folding import replace_node_with_constant
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

MKL_LINEAR = (torch.ops.mkl._mkl_linear, torch.ops.mkl._mkl_linear.default)


class OneDNNProducts(CustomGraphPass):
    """Inductor post-grad pass: each `mkl._mkl_linear(x, mkl_packed, weight, bias, rows)` of a frozen
    graph becomes `mkldnn._linear_pointwise(x, onednn_packed, bias)` (see the module docstring)."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        module = graph.owning_module
        repacked = {}  # the MKL-packed constant node -> its oneDNN-packed replacement
        for node in list(graph.nodes):
            if node.target not in MKL_LINEAR or len(node.args) != 5:
                continue
            x, packed, weight, bias, rows = node.args
            if not (packed.op == weight.op == "get_attr" and isinstance(rows, int)):
                continue
            if packed not in repacked:
                onednn = torch.ops.mkldnn._reorder_linear_weight(getattr(module, weight.target), rows)
                replace_node_with_constant(module, packed, onednn)  # the same node, now oneDNN's packing
                replacement = node.args[1]
                replacement.meta["val"] = weight.meta["val"]  # the product's shapes are the weight's
                repacked[packed] = repacked[replacement] = replacement  # (other linears of this weight see either)
            with graph.inserting_before(node):
                product = graph.call_function(torch.ops.mkldnn._linear_pointwise.default,
                                              (x, repacked[packed], bias, "none", [], ""))
            product.meta.update(node.meta)
            node.replace_all_uses_with(product)
            graph.erase_node(node)
        graph.eliminate_dead_code()

    def uuid(self):
        return get_hash_for_files((__file__,))
