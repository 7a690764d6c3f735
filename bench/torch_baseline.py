"""The pure-torch path moving the same rows on the same GPU: gather with index_select, scatter
with index_copy_ (dispatch) and index_add_ (combine), with all index tensors built beforehand."""

from __future__ import annotations

import torch

from bench.harness import Round


class TorchBaseline:
    def __init__(self, round_: Round):
        ep, tokens = len(round_.ranks), round_.tokens
        dev = round_.world.device
        src_rows, dst_rows, combine_src, combine_dst = [], [], [], []
        for source, route in enumerate(round_.routing):
            targets, slots = route.topk_target_ranks, route.topk_send_indices
            token, k = torch.nonzero(targets >= 0, as_tuple=True)
            t, slot = targets[token, k].long(), slots[token, k].long()
            src_rows.append(source * tokens + token)
            dst_rows.append(t * ep * tokens + source * tokens + slot)
            combine_src.append(t * ep * tokens + source * tokens + slot)
            combine_dst.append(source * tokens + token)
        self.src_rows = torch.cat(src_rows).to(dev)
        self.dst_rows = torch.cat(dst_rows).to(dev)
        self.combine_src = torch.cat(combine_src).to(dev)
        self.combine_dst = torch.cat(combine_dst).to(dev)
        # Every payload of a token packed into one byte row, as the kernels move them.
        self.tokens_bytes = torch.cat(
            [torch.cat([p.contiguous().view(torch.uint8) for p in payloads], dim=1) for payloads in round_.payloads]
        )
        self.recv = torch.empty(ep * ep * tokens, self.tokens_bytes.shape[1], dtype=torch.uint8, device=dev)
        self.planes = torch.cat([o.view(-1, round_.hidden) for o in round_.expert_outputs])
        self.out = torch.zeros(ep * tokens, round_.hidden, dtype=torch.bfloat16, device=dev)

    def dispatch(self) -> None:
        self.recv.index_copy_(0, self.dst_rows, self.tokens_bytes.index_select(0, self.src_rows))

    def combine(self) -> None:
        self.out.zero_()
        self.out.index_add_(0, self.combine_dst, self.planes.index_select(0, self.combine_src))
