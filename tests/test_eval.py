"""Sliding-window scoring: every prediction scored exactly once, each with the context the rule gives it, and the
score-then-adapt hook's order."""
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
@pytest.mark.parametrize("span", [0, 1, 50, 333])
def test_spans_come_in_order_and_ranks_split_each_span(world, span):
    chunks = tg.scored_chunks(1000, 64, 16)
    per_rank = [list(tg.eval_spans(1000, 64, 16, span, r, world)) for r in range(world)]
    spans = [s for s, _ in per_rank[0]]
    assert all([s for s, _ in p] == spans for p in per_rank)  # every rank walks the same spans
    assert spans[0][0] == 0 and spans[-1][1] == 1000 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    if span:
        assert all(e - s <= max(span, 64) for s, e in spans)  # at most span predictions, or one chunk
    got = []
    for i, (s, e) in enumerate(spans):
        mine = [c for p in per_rank for c in p[i][1]]
        assert mine == [c for c in chunks if s <= c[0] < e]  # the ranks' parts, in rank order, are the span
        got += mine
    assert got == chunks


class ContextProbe(nn.Module):
    """Its loss at each position is the number of tokens it sees there (the position in its window + 1), so a
    scored token's loss is its context length; every token is one byte."""

    def forward(self, x, y, per_token=False):
        return torch.arange(1, x.size(1) + 1, dtype=torch.float64).expand(x.shape)


class Recorder(tg.Adapter):
    """Records each scored token (tokens are their own positions: the target of prediction j is j + 1) with its
    loss, and each adapt call."""

    def __init__(self, span_preds=0):
        self.span_preds, self.events = span_preds, []

    def scored(self, x, y, mask, losses):
        self.events.append(("scored", dict(zip((y[mask] - 1).tolist(), losses[mask].tolist()))))

    def adapt(self, start, end):
        self.events.append(("adapt", start, end))


def expected_context(j: int, num_preds: int, seq_len: int, stride: int) -> int:
    """The sliding rule: the first seq_len predictions see their whole prefix; after that the stream goes in
    strides, each scored by the window of seq_len inputs that ends at the stride's end (or the stream's)."""
    if j < seq_len:
        return j + 1
    end = min(num_preds, seq_len + math.ceil((j + 1 - seq_len) / stride) * stride)
    return seq_len - (end - 1 - j)


def one_byte_tables(vocab):
    return torch.ones(vocab, dtype=torch.int32), torch.zeros(vocab, dtype=torch.bool), torch.zeros(vocab, dtype=torch.bool)


@pytest.mark.parametrize("num_preds, seq_len, stride, batch", [(1000, 64, 16, 3), (1000, 64, 64, 4), (500, 64, 1, 7),
                                                               (40, 64, 16, 2), (999, 32, 7, 5)])
def test_every_scored_token_gets_the_context_of_the_sliding_rule(num_preds, seq_len, stride, batch):
    tokens = torch.arange(num_preds + 1)
    rec = Recorder()
    loss, bpb = tg.evaluate(ContextProbe(), tokens, one_byte_tables(num_preds + 1), seq_len, stride, batch, 0, 1, rec)
    seen = {}
    for _, got in (e for e in rec.events if e[0] == "scored"):
        assert not set(got) & set(seen)  # no token scored twice
        seen.update(got)
    want = {j: expected_context(j, num_preds, seq_len, stride) for j in range(num_preds)}
    assert seen == want
    assert all(c >= min(j + 1, seq_len - stride + 1) for j, c in seen.items())  # stride bounds the context lost
    assert loss == pytest.approx(sum(want.values()) / num_preds, rel=1e-12)
    assert bpb == pytest.approx(sum(want.values()) / (math.log(2) * num_preds), rel=1e-12)


def test_adapt_comes_after_its_span_is_scored_and_never_changes_the_score():
    """Score first: each adapt(start, end) follows the scoring of exactly the predictions [start, end), spans in
    stream order; a hook that learns nothing leaves the score as one span gives it."""
    tokens = torch.arange(1001)
    tables = one_byte_tables(1001)
    whole = tg.evaluate(ContextProbe(), tokens, tables, 64, 16, 3, 0, 1)
    rec = Recorder(span_preds=100)
    assert tg.evaluate(ContextProbe(), tokens, tables, 64, 16, 3, 0, 1, rec) == pytest.approx(whole, rel=1e-12)
    pending, last_end = set(), 0
    for event in rec.events:
        if event[0] == "scored":
            pending |= set(event[1])
        else:
            _, start, end = event
            assert start == last_end and pending == set(range(start, end))
            pending, last_end = set(), end
    assert last_end == 1000 and sum(e[0] == "adapt" for e in rec.events) > 5


def test_bytes_follow_the_tokenizers_table(sp):
    """bpb divides by the byte table's count: the leading-space rule and boundary tokens included."""
    tables = tg.build_byte_tables(sp)
    tokens = torch.tensor([t for d in ["a fox", "the quick brown dog", "über café"] * 40 for t in [1] + sp.encode(d)])
    loss, bpb = tg.evaluate(ContextProbe(), tokens, tables, 64, 16, 4, 0, 1)
    nbytes = tg.count_bytes(tokens[:-1], tokens[1:], tables).sum().item()
    assert bpb == pytest.approx(loss * (tokens.numel() - 1) / (math.log(2) * nbytes), rel=1e-12)
