"""Round signatures inside kernels: each rank's words describing its round (a2a.runtime.protocol's
fields), compared with every peer's. The dispatch barrier, and the combine barrier of a round of
more than a2a.ops.configs.GATHER_COMPARE_MAX_TOKENS rows, compare them after the wait
(`_compare_signatures`, a2a.kernels.signal._phase_barrier); in a combine of fewer rows the gather
programs load them early and reduce them after their rows (`_load_signatures`,
`_signatures_disagree`), and the gather's last program records a difference
(a2a.kernels.signal._record_disagreement)."""

import triton
import triton.language as tl


@triton.jit
def _compare_signatures(own_row_ptr, own_signature_ptr, ranks, compared, SIGNATURE_WORDS: tl.constexpr):
    """Peers' signatures (`[EP_PAD, SIGNATURE_WORDS]` rows at own_row_ptr) against this rank's.
    Returns (mismatched ranks, bit mask of differing words over all of them, the lowest
    mismatched rank, its lowest differing word, this rank's and that rank's value of that word)."""
    words = tl.arange(0, SIGNATURE_WORDS)
    mine = tl.load(own_signature_ptr + words)
    rows = tl.load(own_row_ptr + ranks[:, None] * SIGNATURE_WORDS + words[None, :], mask=compared[:, None],
                   other=0, volatile=True)
    differs = (rows != mine[None, :]) & compared[:, None]
    mismatched = tl.max(differs.to(tl.int32), axis=1) > 0
    # The details only when some peer disagrees: six reductions off every healthy barrier's path.
    fields = tl.sum(words * 0, axis=0)  # an int32 zero
    first_rank = fields
    first_field = fields
    own_value = fields
    peer_value = fields
    if tl.max(mismatched.to(tl.int32), axis=0) > 0:
        field_hits = tl.max(differs.to(tl.int32), axis=0)
        fields = tl.sum(field_hits << words, axis=0)
        first_rank = tl.min(tl.where(mismatched, ranks, 1 << 30), axis=0)
        in_first = differs & (ranks[:, None] == first_rank)
        first_field = tl.min(tl.min(tl.where(in_first, words[None, :], 1 << 30), axis=1), axis=0)
        own_value = tl.sum(tl.where(words == first_field, mine, 0), axis=0)
        at_first = (ranks[:, None] == first_rank) & (words[None, :] == first_field)
        peer_value = tl.sum(tl.sum(tl.where(at_first, rows, 0), axis=1), axis=0)
    return mismatched, fields, first_rank, first_field, own_value, peer_value


@triton.jit
def _load_signatures(signatures_ptr, own_signature_ptr, stride_rank, ep_rank, rank_mask, EP_PAD: tl.constexpr,
                     SIGNATURE_WORDS: tl.constexpr, COMPARED_WORDS: tl.constexpr, VOLATILE: tl.constexpr):
    """The first COMPARED_WORDS words (the phase's fields; the rest are zero on every rank) of this
    phase's signature rows of every active rank, as stored in this rank's segment (`signatures_ptr`:
    the `[EP_SIZE, SIGNATURE_WORDS]` rows of segment 0) under `rank_mask` (the active ranks), and
    this rank's own: the loads of `_signatures_disagree`, issued early. Without VOLATILE they are
    plain loads that L1 may serve: only for a kernel that starts after the barrier acquired the
    peers' signals (the gather reads the peers' rows with plain loads on the same grounds)."""
    ranks = tl.arange(0, EP_PAD)
    words = tl.arange(0, COMPARED_WORDS)
    own_rows = signatures_ptr + ep_rank.to(tl.int64) * stride_rank
    mine = tl.load(own_signature_ptr + words)
    rows = tl.load(own_rows + ranks[:, None] * SIGNATURE_WORDS + words[None, :], mask=rank_mask[:, None], other=0,
                   volatile=VOLATILE)
    return rows, mine


@triton.jit
def _signatures_disagree(rows, mine, rank_mask, EP_PAD: tl.constexpr, COMPARED_WORDS: tl.constexpr):
    """Whether some active rank's signature row differs from this rank's (one reduction)."""
    differs = ((rows != mine[None, :]) & rank_mask[:, None]).to(tl.int32)
    return tl.max(tl.reshape(differs, [EP_PAD * COMPARED_WORDS]), axis=0) > 0
