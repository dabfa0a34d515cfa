"""Sliding-window coverage and exact scoring."""
import math

import pytest
import torch
from torch import nn

import train_gpt as tg


@pytest.mark.parametrize("num_preds", [1, 63, 64, 65, 200, 1000])
@pytest.mark.parametrize("seq_len, stride", [(64, 64), (64, 16), (64, 1), (32, 7), (64, 63)])
def test_every_prediction_scored_exactly_once(num_preds, seq_len, stride):
    chunks = tg.scored_chunks(num_preds, seq_len, stride)
    counts = torch.zeros(num_preds, dtype=torch.long)
    for s, e in chunks:
        start = max(0, e - seq_len)
        assert e - start <= seq_len and s < e
        if s > 0:
            assert s - start >= min(seq_len - stride, s)  # each scored token keeps at least seq_len - stride context
        counts[s:e] += 1
    assert torch.all(counts == 1)


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_rank_slices_partition_the_chunks(world):
    chunks = tg.scored_chunks(1000, 64, 16)
    parts = [tg.rank_slice(chunks, r, world) for r in range(world)]
    assert sum(parts, []) == chunks


class Unigram(nn.Module):
    """Predicts from the current token only, so any window gives the same per-token loss."""

    def __init__(self, vocab):
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab))

    def forward(self, x, y, per_token=False):
        return nn.functional.cross_entropy(self.table[x].transpose(1, 2), y, reduction="none")


@pytest.mark.parametrize("stride, batch", [(64, 4), (16, 3), (5, 7)])
def test_evaluate_is_exact_for_any_stride_and_batch(sp, stride, batch):
    torch.manual_seed(0)
    tables = tg.build_byte_tables(sp)
    tokens = torch.tensor([t for d in ["a fox", "the quick brown dog", "über café"] * 40 for t in [1] + sp.encode(d)])
    model = Unigram(320)
    loss, bpb = tg.evaluate(model, tokens, tables, 64, stride, batch, 0, 1)
    with torch.no_grad():
        ref = model(tokens[None, :-1], tokens[None, 1:]).double()
    nbytes = tg.count_bytes(tokens[:-1], tokens[1:], tables).sum().item()
    assert loss == pytest.approx(ref.mean().item(), rel=1e-9)
    assert bpb == pytest.approx(ref.sum().item() / (math.log(2) * nbytes), rel=1e-9)
