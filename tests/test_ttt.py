"""Score-first test-time training (TTT_MODE=chunk): a chunk is scored before the weights learn from it, a token
never influences its own score or any earlier one, ranks split a chunk and agree with one process, the EMA scores,
and the time budget stops adapting."""
import re

import pytest
import torch

import train_gpt as tg
from conftest import TINY_ENV, on_ranks
from test_eval import one_byte_tables

N = 1200  # predictions in the test stream; with TTT_CHUNK_TOKENS=200, seq 64 and stride 16 the spans are
SPAN1 = 192  # [0, 192), [192, 384), ...: whole sliding chunks (64, then 16 each) of at most 200 predictions


def ttt_hp(**env) -> tg.Hyperparameters:
    return tg.Hyperparameters.from_env({**TINY_ENV, "TTT_MODE": "chunk", "TTT_CHUNK_TOKENS": "200", "TTT_LR": "0.1",
                                        "TTT_FREEZE_BLOCKS": "0", "TTT_BUDGET_SECONDS": "0",
                                        **{k: str(v) for k, v in env.items()}})


def tiny_model(hp: tg.Hyperparameters) -> tg.GPT:
    torch.manual_seed(0)
    model = tg.GPT(hp, "sdpa", torch.float32)
    with torch.no_grad():  # away from the zero-initialised projections, so every weight has a gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def stream(seed=1, n=N + 1) -> torch.Tensor:
    return torch.randint(2, 320, (n,), generator=torch.Generator().manual_seed(seed))


class Recording(tg.ChunkTTT):
    """ChunkTTT that keeps each scored prediction's loss (in stream order with one rank) and the weights after
    each adaptation."""

    def __init__(self, *args):
        super().__init__(*args)
        self.losses, self.start, self.after = [], [p.detach().clone() for p in self.params], []

    def scored(self, x, y, mask, losses):
        self.losses.append(losses[mask])

    def adapt(self, start, end):
        super().adapt(start, end)
        self.after.append([[p.detach().clone() for p in ws] for ws in (self.params, self.fast or [])])


class Peeking(Recording):
    """A broken TTT that also trains on the span it has not scored yet: the checks below must catch it."""

    def adapt(self, start, end):
        super().adapt(start, min(end + self.span_preds, self.tokens.numel() - 1))


def ttt_losses(tokens, adapter=Recording, world=1, rank=0, **env):
    hp = ttt_hp(**env)
    model, lines = tiny_model(hp), []
    ad = adapter(model, model, tokens, hp, world, rank, lines.append)
    result = tg.evaluate(model, tokens, one_byte_tables(320), hp.eval_seq_len, hp.eval_stride, 4, rank, world, ad)
    return torch.cat(ad.losses), result, ad, lines


class Scores(tg.Adapter):
    def __init__(self):
        self.losses = []

    def scored(self, x, y, mask, losses):
        self.losses.append(losses[mask])


def plain_losses(tokens):
    """Each prediction's loss and the (loss, bpb) of the same model without TTT."""
    hp, rec = ttt_hp(), Scores()
    result = tg.evaluate(tiny_model(hp), tokens, one_byte_tables(320), hp.eval_seq_len, hp.eval_stride, 4, 0, 1, rec)
    return torch.cat(rec.losses), result


def test_the_first_chunk_scores_as_without_ttt_and_later_ones_learn():
    tokens = stream()
    base, _ = plain_losses(tokens)
    ttt, _, ad, _ = ttt_losses(tokens)
    assert len(ttt) == len(base) == N
    assert torch.equal(ttt[:SPAN1], base[:SPAN1])  # nothing learned before the first chunk is scored
    assert not torch.allclose(ttt[SPAN1:], base[SPAN1:])
    assert ad.adapted == ad.steps == N // SPAN1  # every chunk but the last trained the weights


def test_a_token_never_changes_its_own_score_or_an_earlier_one():
    """Changing token k (inside the second span) leaves every prediction before k - 1 (the one whose target it is)
    as it was; predictions that cannot see token k through their window change only because the weights learned
    from it after it was scored. A TTT that trains on a span before scoring it fails this check."""
    k = SPAN1 + 28
    tokens = stream()
    changed = tokens.clone()
    changed[k] = 2 + (tokens[k] - 2 + 1) % 318
    base, base_changed = plain_losses(tokens)[0], plain_losses(changed)[0]
    assert torch.equal(base[k + 63:], base_changed[k + 63:])  # out of the window: no influence without TTT
    before, after = ttt_losses(tokens)[0], ttt_losses(changed)[0]
    assert torch.equal(before[:k - 1], after[:k - 1])
    assert not torch.allclose(before[k + 63:], after[k + 63:])  # the weights learned from token k, once scored
    peek, peek_changed = ttt_losses(tokens, Peeking)[0], ttt_losses(changed, Peeking)[0]
    assert not torch.equal(peek[SPAN1:k - 1], peek_changed[SPAN1:k - 1])


def test_a_repeated_document_scores_better_the_second_time():
    """The second copy of a document scores better with TTT than without, and better than a new document after
    the same first half (so the weights learned the document, not only the stream's statistics)."""
    doc = stream(seed=3, n=600)
    repeated, fresh = torch.cat([doc, doc])[:N + 1], torch.cat([doc, stream(seed=4, n=600)])[:N + 1]
    base = plain_losses(repeated)[0][600:].mean()
    ttt = ttt_losses(repeated, TTT_LR=1.0, TTT_EPOCHS=5)[0][600:].mean()
    new = ttt_losses(fresh, TTT_LR=1.0, TTT_EPOCHS=5)[0][600:].mean()
    assert ttt < base - 0.5 and ttt < new - 0.5


def test_the_ema_of_the_adapted_weights_scores():
    """TTT_EMA=d: after the first chunk the scoring weights are lerp(start, trained, 1 - d), where `trained` are the
    weights that TTT without the EMA has after that chunk."""
    tokens = stream()
    _, _, plain, _ = ttt_losses(tokens)
    _, _, ema, _ = ttt_losses(tokens, TTT_EMA=0.75)
    (trained, _), (scoring, fast) = plain.after[0], ema.after[0]
    for s, t, e, f in zip(ema.start, trained, scoring, fast):
        assert torch.allclose(f, t, atol=1e-6)  # the fast weights train as without the EMA
        assert torch.allclose(e, 0.75 * s + 0.25 * t, atol=1e-6)
    assert not all(torch.allclose(e, t, atol=1e-4) for e, t in zip(scoring, trained))


def test_the_budget_stops_adapting_and_says_so():
    tokens = stream()
    _, plain = plain_losses(tokens)
    _, result, ad, lines = ttt_losses(tokens, TTT_BUDGET_SECONDS=1e-9)
    assert result == pytest.approx(plain, rel=1e-12) and ad.adapted == 0
    assert any("TTT_BUDGET_SECONDS=1e-09 reached after 0 of" in line for line in lines)


@pytest.mark.parametrize("setting, message", [(dict(TTT_MODE="sgd"), "TTT_MODE='sgd' is not one of off, chunk, lora"),
                                              (dict(TTT_EMA=1), "TTT_EMA=1.0 must be in [0, 1)"),
                                              (dict(TTT_CHUNK_TOKENS=0), "TTT_CHUNK_TOKENS=0 must be at least 1")])
def test_bad_ttt_settings_are_config_errors(setting, message):
    with pytest.raises(tg.ConfigError, match=re.escape(message)):
        ttt_hp(**setting)


def test_frozen_parts_stay_fixed():
    _, _, ad, _ = ttt_losses(stream(), TTT_FREEZE_BLOCKS=1)
    model = ad.model
    start = tiny_model(ad.hp)
    for (name, p), q in zip(model.named_parameters(), start.parameters()):
        fixed = name.startswith("blocks.0.") or name.endswith(("emb.weight", "embed.weight"))
        assert torch.equal(p, q) == fixed, name


def ttt_result(world=1, rank=0):
    return ttt_losses(stream(), world=world, rank=rank)[1]


def test_two_processes_score_as_one(tmp_path):
    """Each rank scores its share of a span and trains on its rows of it; the summed gradients give one process's
    steps, so the score is one process's up to float rounding."""
    assert on_ranks(ttt_result, 2, tmp_path) == pytest.approx(ttt_result(), rel=1e-5)
