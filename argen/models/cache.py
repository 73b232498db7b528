"""Static KV cache owned by a sampling call (gpt-fast style: preallocated, `update(pos, k, v)`).

Keys are addressed by sequence position: slot p holds the key/value of position p. A query at
position q sees every slot p <= q whose key is valid (caption padding is invalid), plus itself.
Because visibility is decided by position, a speculative sampler that wrote a window of drafts
and kept only some of them needs no data movement to "rewind": the rejected slots lie beyond
the next query's position until the next forward overwrites them. `rewind` only records the
kept length per row (used for bookkeeping and checks).

Samplers that need more than these position rules narrow them per query for one forward
(`set_query_mask`): the same mask computation, with one more AND.
"""

from __future__ import annotations

from typing import Optional

import torch


class KVCache:
    def __init__(self, n_layer: int, batch_size: int, n_head: int, max_len: int, head_dim: int, device, dtype):
        shape = (batch_size, n_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.batch_size, self.max_len, self.device = batch_size, max_len, torch.device(device)
        self.dtype = dtype
        self.positions = torch.arange(max_len, device=device)
        self.key_valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.span = self.positions  # the slots a forward attends over (see `attend_upto`)
        self.tree = None  # (ancestors [T, T] bool, first scratch slot) while a token tree is fed (`set_tree`)
        self.query_mask = None  # [B, T, max_len] bool for the next forward only (`set_query_mask`)

    def attend_upto(self, input_pos: Optional[torch.Tensor], top: Optional[int] = None,
                    for_graph: bool = False) -> None:
        """Limit the next forward's attention to slots < max(input_pos) + 1 (all slots for None).

        On the CPU this halves the attention work of an average decode step for the price of
        one tiny host read. A compiled step cannot read a position back to size its loops, so
        its caller sets the span on the host before the graph runs (`with_attention_span` in
        argen.models.base) and the graph takes the span's length as a dynamic size: one graph for
        every span. Keys past a query's position are masked to exact zeros, and a compiled step sums over
        the keys in order, so there how many of them a span includes does not change a row's floats
        (eager MKL products can round by the key count, ~1e-6; compiled default-c2i at batch 16 attended
        over all 65 slots at every step before, 22% of its fp32 step; docs/history/decode.md,
        session 27). On accelerators the full static length is kept: static shapes are what CUDA
        graphs want, and reading the position would force a sync. `for_graph`: the span goes to a
        compiled step, which takes it as a dynamic size (an eager forward needs no marking).
        """
        if torch.compiler.is_compiling():
            return  # set on the host before the graph
        if self.tree is not None:  # the tree's keys sit in scratch slots after every position
            n = self.tree[1] + self.tree[0].shape[0]
        elif input_pos is None or input_pos.device.type != "cpu":
            n = self.max_len
        else:
            n = (int(input_pos.max()) if top is None else top) + 1  # top: the caller's read of it
        self.span = self.positions[:n]
        if for_graph and self.device.type == "cpu":
            # unbacked, the size takes no guards; merely dynamic, a span of the whole cache broke one
            # (a reshape's check) and the last step compiled a second graph
            torch._dynamo.decorators.mark_unbacked(self.span, 0, min=1, max=self.max_len)

    @property
    def active_len(self):
        """How many slots the next forward attends over (an int, or a dynamic size in a compiled graph)."""
        return self.span.shape[0]

    def set_condition_mask(self, cond_len: int, cond_mask: Optional[torch.Tensor]) -> None:
        """Mark which of the first `cond_len` slots hold real condition tokens (t2i padding)."""
        if cond_len > self.max_len:
            raise ValueError(f"condition of {cond_len} tokens does not fit a cache of {self.max_len}")
        self.key_valid.fill_(True)
        if cond_mask is not None:
            self.key_valid[:, :cond_len] = cond_mask.to(device=self.device, dtype=torch.bool)

    def set_visible(self, positions: torch.Tensor, visible: torch.Tensor) -> None:
        """Mark whether the keys at `positions` [B, S] may be seen by later queries (visible [B, S]).

        For samplers that fill the sequence out of raster order (argen.samplers.spatial): a slot
        whose token is not generated yet, or holds a stand-in, is hidden from every query but its
        own. Plain AR and the speculative samplers never call it (every written slot is visible)."""
        self.key_valid.scatter_(1, positions.to(self.device), visible.to(device=self.device, dtype=torch.bool))

    def set_query_mask(self, mask: torch.Tensor) -> None:
        """Narrow what each query of the next forward sees: query t of batch row b may see slot s
        only if mask[b, t, s] ([B, T, max_len] bool), on top of the rules above (position,
        `set_visible`, `set_tree`). For one forward: building its attention mask consumes it.

        For a sampler whose queries of one forward need different key sets (argen.samplers.spatial
        with Jacobi windows: a row's drafts are seen by the later tokens of its own window only,
        and each query sees its own share of the rows above). Keep each query's own slot in its
        mask: a query that sees no key has no defined output."""
        if mask.dim() != 3 or mask.shape[0] != self.batch_size or mask.shape[2] != self.max_len:
            raise ValueError(f"query mask of shape {tuple(mask.shape)}: expected [{self.batch_size}, T, {self.max_len}]")
        self.query_mask = mask.to(device=self.device, dtype=torch.bool)

    def set_tree(self, parents, scratch: int) -> None:
        """Feed the next forward's T tokens as a tree (speculative drafts with alternatives).

        parents [T]: the index of each token's parent in the window (-1 for the root, token 0).
        Several tokens may share a sequence position, so their keys/values go to the scratch
        slots scratch .. scratch+T-1 (the cache must hold them), not to their positions; a token
        sees the cache before the root's position plus its own ancestors and itself. After the
        forward, `keep_path` copies the accepted tokens' keys to their positions and ends tree mode."""
        parents = torch.as_tensor(parents, dtype=torch.long).tolist()
        size = len(parents)
        if scratch + size > self.max_len:
            raise ValueError(f"a tree of {size} tokens at slot {scratch} does not fit a cache of {self.max_len}")
        ancestors = torch.eye(size, dtype=torch.bool)
        for i, parent in enumerate(parents):
            if parent >= i:
                raise ValueError("a tree token's parent must come before it")
            if parent >= 0:
                ancestors[i] |= ancestors[parent]
        self.tree = (ancestors.to(self.device), scratch)

    def keep_path(self, slots: torch.Tensor, positions: torch.Tensor) -> None:
        """Copy the keys/values of tree tokens `slots` [B, D] (window indices) to sequence
        `positions` [B, D] (rows may point several unused entries at one spare position) and
        leave tree mode."""
        scratch = self.tree[1]
        rows = torch.arange(self.batch_size, device=self.device)[:, None]
        src, dst = slots.to(self.device) + scratch, positions.to(self.device)
        for kc, vc in zip(self.k, self.v):
            kc[rows, :, dst] = kc[rows, :, src]
            vc[rows, :, dst] = vc[rows, :, src]
        self.tree = None

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [B, H, T, hd] at `input_pos` ([T] shared, or [B, T] per row); return the full cache."""
        kc, vc = self.k[layer], self.v[layer]
        if self.tree is not None:
            slots = torch.arange(self.tree[1], self.tree[1] + k.shape[2], device=kc.device)
            kc.index_copy_(2, slots, k)
            vc.index_copy_(2, slots, v)
        elif input_pos.dim() == 1:
            kc.index_copy_(2, input_pos, k)  # one kernel; advanced-index assignment costs several ops
            vc.index_copy_(2, input_pos, v)
        else:
            rows = torch.arange(kc.shape[0], device=kc.device)[:, None]
            kc[rows, :, input_pos] = k.transpose(1, 2)
            vc[rows, :, input_pos] = v.transpose(1, 2)
        if layer == 0:
            end = (input_pos.max(-1).values if input_pos.dim() == 2 else input_pos.max()) + 1
            self.lengths = torch.maximum(self.lengths, end)
        return kc[:, :, : self.active_len], vc[:, :, : self.active_len]

    def attention_mask(self, input_pos: torch.Tensor) -> torch.Tensor:
        """Additive float mask [B, 1, T, active_len] (0 visible, -inf hidden) for queries at `input_pos`.

        Additive rather than boolean because attention would otherwise convert a boolean mask to
        exactly this in every layer; converting once per forward gives the same numbers.
        """
        if self.tree is not None:
            ancestors, scratch = self.tree
            root = input_pos[..., :1] if input_pos.dim() == 2 else input_pos[None, :1]  # [B or 1, 1]
            before = (self.positions[:scratch] < root)[:, None, :] & self.key_valid[:, None, :scratch]  # [B, 1, S]
            visible = torch.cat([before.expand(-1, ancestors.shape[0], -1),
                                 ancestors.expand(before.shape[0], -1, -1)], dim=-1)
        else:
            positions = self.span
            qpos = input_pos[..., None]  # [T, 1] or [B, T, 1]
            causal = positions <= qpos
            if causal.dim() == 2:
                causal = causal[None]
            visible = (causal & self.key_valid[:, None, : self.active_len]) | (positions == qpos)
        if self.query_mask is not None:
            narrow, self.query_mask = self.query_mask, None
            if narrow.shape[1] != visible.shape[1]:
                raise ValueError(f"query mask for {narrow.shape[1]} queries, the forward has {visible.shape[1]}")
            visible = visible & narrow[:, :, : visible.shape[-1]]
        hidden = torch.zeros(visible.shape, dtype=self.dtype, device=self.device)
        return hidden.masked_fill_(~visible, float("-inf"))[:, None]

    def rewind(self, lengths) -> None:
        """Keep only the first `lengths` positions of each row (int, or tensor [B])."""
        lengths = torch.as_tensor(lengths, device=self.device).expand(self.batch_size)
        if bool((lengths > self.lengths).any()):
            raise ValueError("cannot rewind a cache forward")
        self.lengths = lengths.clone()
