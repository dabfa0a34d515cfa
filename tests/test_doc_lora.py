"""Per-document LoRA test-time training (TTT_MODE=lora): documents are scored on their own, a chunk is scored
before its document's deltas learn from it, documents never influence each other, ranks take whole batches and
agree with one process, the budget stops adapting, and the artifact's weights never change."""
import functools
import re

import pytest
import torch

import train_gpt as tg
from conftest import TINY_ENV, on_ranks
from test_eval import one_byte_tables
from test_ttt import tiny_model

BOS = 1
DOC_LENGTHS = (150, 40, 9, 70, 1, 130, 25)  # tokens after each BOS; 150 and 130 are longer than the 64-token window


def lora_hp(**env) -> tg.Hyperparameters:
    return tg.Hyperparameters.from_env({**TINY_ENV, "TTT_MODE": "lora", "TTT_LORA_CHUNK": "16", "TTT_LORA_DOCS": "3",
                                        "TTT_LORA_LR": "0.05", "TTT_LORA_TARGETS": "q,k,v,o,up,down,head",
                                        "TTT_BUDGET_SECONDS": "0", **{k: str(v) for k, v in env.items()}})


def doc_stream(seed=1, lengths=DOC_LENGTHS) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([torch.cat([torch.tensor([BOS]), torch.randint(2, 320, (n,), generator=gen)]) for n in lengths])


class Recording(tg.DocLoRA):
    """DocLoRA that keeps each scored prediction's loss by its position in the stream."""

    def __init__(self, *args):
        super().__init__(*args)
        self.by_pos, self.plan = {}, []

    def spans(self, *args):
        for span, rows in super().spans(*args):
            self.plan.append(rows)
            yield span, rows

    def scored(self, x, y, mask, losses):
        super().scored(x, y, mask, losses)
        T = self.hp.eval_seq_len
        for r, (s, e, floor) in enumerate(self.plan[-1]):
            w = max(floor, e - T)
            for p in range(s, e):
                self.by_pos[p] = losses[r, p - w].item()


class Peeking(Recording):
    """A broken DocLoRA that trains on each chunk before scoring it: the checks below must catch it."""

    def spans(self, *args):
        for span, rows in super().spans(*args):
            x, y, mask = tg.window_batch(self.tokens, rows, self.hp.eval_seq_len, self.batch_seqs)
            self.rows = (self.model(x, y, per_token=True), mask)
            Recording.adapt(self, *span)
            yield span, rows


def lora_losses(tokens, adapter=Recording, world=1, rank=0, **env):
    hp = lora_hp(**env)
    model, lines = tiny_model(hp), []
    ad = adapter(model, model, tokens, hp, world, rank, lines.append, BOS)
    result = tg.evaluate(model, tokens, one_byte_tables(320), hp.eval_seq_len, hp.eval_stride, 4, rank, world, ad)
    ad.finish()
    return ad.by_pos, result, ad, lines


def test_documents_cover_every_prediction_once():
    tokens = doc_stream()
    docs = tg.document_spans(tokens, BOS)
    assert [e - s for s, e in docs] == [n + 1 for n in DOC_LENGTHS[:-1]] + [DOC_LENGTHS[-1]]
    assert all(tokens[s] == BOS for s, _ in docs) and docs[0][0] == 0 and docs[-1][1] == tokens.numel() - 1
    assert tg.document_spans(torch.tensor([5, 6, BOS, 7, 8]), BOS) == [(0, 2), (2, 4)]  # no BOS first: one more document


def test_every_prediction_is_scored_once_and_the_first_chunk_as_without_ttt():
    tokens = doc_stream()
    still, still_result, _, _ = lora_losses(tokens, TTT_LORA_LR=0)
    learned, result, ad, _ = lora_losses(tokens)
    assert sorted(learned) == sorted(still) == list(range(tokens.numel() - 1))
    # batches of 3, longest first: 151 131 71 | 41 25 10 | 2 predictions: 10, 3, 1 chunks, no step on each batch's last
    assert ad.adapted == ad.steps == 9 + 2 + 0
    first = [p for s, e in tg.document_spans(tokens, BOS) for p in range(s, min(s + 16, e))]
    assert all(learned[p] == still[p] for p in first)  # B starts at zero: nothing changes before a step
    assert any(abs(learned[p] - still[p]) > 1e-4 for p in learned if p not in first)
    assert result != still_result


class StepsOnLast(Recording):
    """DocLoRA that also steps after each batch's last chunk, as it did before that step was dropped."""

    def __init__(self, *args):
        super().__init__(*args)
        self.skip_last = 0


def test_no_step_after_a_batch_s_last_chunk_and_no_score_misses_it():
    tokens = doc_stream()
    learned, result, ad, _ = lora_losses(tokens)
    every, every_result, every_ad, _ = lora_losses(tokens, adapter=StepsOnLast)
    assert every_ad.adapted == 10 + 3 + 1 and ad.adapted == 9 + 2 + 0
    assert learned == every and result == every_result  # fresh deltas: the dropped steps fed nothing
    warm = lora_losses(tokens, TTT_LORA_RESET="warm_a")[2]
    assert warm.adapted == warm.steps == 10 + 3 + 1  # A is carried over: its last step feeds the next batch


def test_a_token_changes_only_its_own_document_and_only_after_it_is_scored():
    """Changing token k (inside the 150-token first document) leaves every prediction before k - 1 (whose target it
    is) and every other document's predictions as they were; the predictions of its document that cannot see token k
    through their 64-token window change only because the document's deltas learned from it after it was scored. A
    DocLoRA that trains on a chunk before scoring it fails this check."""
    k = 20
    tokens = doc_stream()
    changed = tokens.clone()
    changed[k] = 2 + (tokens[k] - 2 + 1) % 318
    first_doc_end = DOC_LENGTHS[0] + 1
    for lr, must_differ in ((0, False), (0.05, True)):
        before, _, _, _ = lora_losses(tokens, TTT_LORA_LR=lr)
        after, _, _, _ = lora_losses(changed, TTT_LORA_LR=lr)
        assert all(before[p] == after[p] for p in before if p < k - 1 or p >= first_doc_end)
        far = [p for p in range(k + 64, first_doc_end)]
        assert any(abs(before[p] - after[p]) > 1e-6 for p in far) == must_differ
    peek, peek_changed = lora_losses(tokens, Peeking)[0], lora_losses(changed, Peeking)[0]
    assert any(peek[p] != peek_changed[p] for p in range(16, k - 1))


@pytest.mark.parametrize("mode", ["chunk", "lora", "phased"])
def test_the_ttt_score_counts_the_bytes_and_tokens_of_the_sliding_score(mode):
    """With byte counts that vary by token (a leading space, BOS a boundary), a TTT score divides by the same
    tokens and bytes as the sliding one: val_loss / bpb is the same ratio (a LoRA chunk longer than the window once
    left predictions unscored: 426 of 1,095 on the quickstart's val; TTT_LORA_CHUNK <= EVAL_SEQ_LEN rules it out)."""
    gen = torch.Generator().manual_seed(3)
    tables = (torch.randint(1, 4, (320,), generator=gen, dtype=torch.int32), torch.rand(320, generator=gen) < 0.5,
              torch.arange(320) == BOS)
    hp, tokens = lora_hp(TTT_CHUNK_TOKENS=200, TTT_LORA_PHASES="0.5" if mode == "phased" else ""), doc_stream()
    model = tiny_model(hp)
    plain = tg.evaluate(model, tokens, tables, hp.eval_seq_len, hp.eval_stride, 4, 0, 1)
    ad = tg.ChunkTTT(model, model, tokens, hp, 1, 0, lambda _: None) if mode == "chunk" else \
        tg.DocLoRA(model, model, tokens, hp, 1, 0, lambda _: None, BOS)
    ttt = tg.evaluate(model, tokens, tables, hp.eval_seq_len, hp.eval_stride, 4, 0, 1, ad)
    assert ttt[0] != plain[0] and ttt[1] / ttt[0] == pytest.approx(plain[1] / plain[0], rel=1e-12)


def test_a_document_that_repeats_itself_learns_it():
    """The second half of a document that is one sequence twice scores better with LoRA TTT than without."""
    gen = torch.Generator().manual_seed(5)
    half = torch.randint(2, 320, (96,), generator=gen)
    tokens = torch.cat([torch.tensor([BOS]), half, half, torch.tensor([BOS]), half[:10]])
    second = range(97, 193)
    still = lora_losses(tokens, TTT_LORA_LR=0)[0]
    learned = lora_losses(tokens, TTT_LORA_LR=0.02)[0]
    gain = sum(still[p] - learned[p] for p in second) / len(second)
    assert gain > 0.5, gain


def test_the_artifact_weights_never_change_and_the_model_is_restored():
    hp = lora_hp()
    model = tiny_model(hp)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    ad = tg.DocLoRA(model, model, doc_stream(), hp, 1, 0, lambda _: None, BOS)
    tg.evaluate(model, doc_stream(), one_byte_tables(320), hp.eval_seq_len, hp.eval_stride, 4, 0, 1, ad)
    assert len(ad.mods) == 2 * 6 + 1 and ad.adapted > 0
    ad.finish()
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())
    assert all(m.lora is None for m in model.modules() if hasattr(m, "lora"))
    assert all(p.requires_grad for p in model.parameters())


def test_the_budget_stops_adapting_and_says_so():
    tokens = doc_stream()
    _, still = lora_losses(tokens, TTT_LORA_LR=0)[:2]
    _, result, ad, lines = lora_losses(tokens, TTT_BUDGET_SECONDS=1e-9)
    assert result == pytest.approx(still, rel=1e-12) and ad.adapted == 0
    assert any(re.search(r"TTT_BUDGET_SECONDS=1e-09 reached after 0 of \d+ steps", line) for line in lines)


@pytest.mark.parametrize("setting, message", [(dict(TTT_LORA_TARGETS="q,x"), "TTT_LORA_TARGETS='q,x' must be a"),
                                              (dict(TTT_LORA_RANK=0), "TTT_LORA_RANK=0 must be at least 1"),
                                              (dict(TTT_LORA_LR=-1), "TTT_LORA_LR=-1.0 must not be negative"),
                                              (dict(TTT_LORA_CHUNK=65), "TTT_LORA_CHUNK=65 must be at most EVAL_SEQ_LEN=64"),
                                              (dict(TTT_LORA_RESET="keep"), "TTT_LORA_RESET='keep' is not one of"),
                                              (dict(TTT_LORA_PHASES="0.6,0.3"), "TTT_LORA_PHASES='0.6,0.3' must be"),
                                              (dict(TTT_LORA_PHASES="1"), "TTT_LORA_PHASES='1' must be increasing")])
def test_bad_lora_settings_are_config_errors(setting, message):
    with pytest.raises(tg.ConfigError, match=re.escape(message)):
        lora_hp(**setting)


def lora_result(world=1, rank=0, **env):
    return lora_losses(doc_stream(), world=world, rank=rank, **env)[1]


@pytest.mark.parametrize("env, rel", [({}, 1e-9), (dict(TTT_LORA_PHASES="0.5", TTT_LR=0.05), 1e-5)])
def test_two_processes_score_as_one(tmp_path, env, rel):
    """Ranks take whole batches of documents, and a batch starts from the same deltas on any rank, so the score
    is one process's up to the order of the sums (with phases, also the ranks' gradient sums)."""
    assert on_ranks(functools.partial(lora_result, **env), 2, tmp_path) == pytest.approx(lora_result(**env), rel=rel)


def test_ranks_share_batches_by_their_steps():
    """Batches come longest first; each goes to the least-loaded rank, so the ranks end together (a contiguous
    slice gave the first rank every long document: on the proxy val with 8 ranks, 132 of 222 steps)."""
    costs = [10, 9, 4, 3, 3, 1]
    shares = [tg.balanced_share(costs, lambda c: c, r, 3) for r in range(3)]
    assert shares == [[10], [9, 1], [4, 3, 3]] and [sum(x) for x in shares] == [10, 10, 10]
    assert [sum(tg.rank_slice(costs, r, 3)) for r in range(3)] == [19, 7, 4]


PART_ONE = sum(n + 1 for n in DOC_LENGTHS[:4])  # TTT_LORA_PHASES=0.5 cuts the 7 documents after 4 (round(3.5))


class PhaseOnEverything(Recording):
    """A broken phased DocLoRA whose phase trains on the whole stream, the unscored part too: the check must fail."""

    def phase(self, start, end):
        super().phase(start, self.tokens.numel() - 2)


def test_a_phase_learns_from_the_scored_part_only():
    """LoRA off (lr 0), phases on: the first part scores as without phases; the second part scores otherwise (the
    base weights learned from the first); a token changed in the second part changes no prediction of the first
    part, nor of another document, nor before it; one changed in the first part changes the second part. A phase
    that trains on unscored tokens fails this check."""
    tokens, k = doc_stream(), PART_ONE + 30  # inside the sixth document (130 tokens)
    changed = tokens.clone()
    changed[k] = 2 + (tokens[k] - 2 + 1) % 318
    phased = dict(TTT_LORA_LR=0, TTT_LORA_PHASES="0.5", TTT_LR=0.05, TTT_CHUNK_TOKENS=100)
    plain = lora_losses(tokens, TTT_LORA_LR=0)[0]
    before, _, ad, lines = lora_losses(tokens, **phased)
    assert sorted(before) == list(range(tokens.numel() - 1)) and ad.sgd.adapted == 3
    assert all(before[p] == plain[p] for p in range(PART_ONE))
    assert all(abs(before[p] - plain[p]) > 1e-9 for p in range(PART_ONE, tokens.numel() - 1))
    assert any(re.fullmatch(rf"ttt: phase on predictions \[0, {PART_ONE}\): 3 SGD chunks in \d+\.\ds", x) for x in lines)
    sixth_end = PART_ONE + DOC_LENGTHS[4] + 1 + DOC_LENGTHS[5] + 1
    for adapter, must_hold in ((Recording, True), (PhaseOnEverything, False)):
        before, after = lora_losses(tokens, adapter, **phased)[0], lora_losses(changed, adapter, **phased)[0]
        same = all(before[p] == after[p] for p in before if p < k - 1 or p >= sixth_end)
        assert same == must_hold
    early = tokens.clone()
    early[30] = 2 + (tokens[30] - 2 + 1) % 318
    after = lora_losses(early, **phased)[0]
    assert all(abs(before[p] - after[p]) > 0 for p in range(sixth_end, tokens.numel() - 1))


def test_warm_a_keeps_each_rows_a_from_batch_to_batch():
    """TTT_LORA_RESET=warm_a: the first batch (the three longest documents) scores as with fresh deltas, the next
    batches' documents of more than one chunk otherwise (their rows start from the A the row before learned; B is
    zero for every first chunk)."""
    tokens = doc_stream()
    docs = sorted(tg.document_spans(tokens, BOS), key=lambda d: d[0] - d[1])
    fresh, warm = lora_losses(tokens)[0], lora_losses(tokens, TTT_LORA_RESET="warm_a")[0]
    for i, (s, e) in enumerate(docs):
        assert all(fresh[p] == warm[p] for p in range(s, e)) == (i < 3 or e - s <= 16)


@pytest.mark.parametrize("mode", ["chunk", "lora", "phased"])
def test_the_warm_up_compiles_every_graph_ttt_runs(mode):
    """TTT compiles its graphs before its clock starts: after the sliding score and the warm-up, scoring with TTT
    compiles nothing more (a warm-up that passed one tensor as both inputs and targets compiled for aliased inputs,
    and the real rows compiled again inside the clock)."""
    hp = lora_hp(TTT_MODE="lora" if mode == "phased" else mode, TTT_CHUNK_TOKENS=200,
                 TTT_LORA_PHASES="0.5" if mode == "phased" else "")
    model, tokens = tiny_model(hp), doc_stream()
    compiled = torch.compile(model, backend="eager", dynamic=False, fullgraph=True)
    score = lambda ad=None: tg.evaluate(compiled, tokens, one_byte_tables(320), hp.eval_seq_len, hp.eval_stride, 4, 0,
                                        1, ad)
    score()
    ttt = tg.ChunkTTT(compiled, model, tokens, hp, 1, 0, lambda _: None) if mode == "chunk" else \
        tg.DocLoRA(compiled, model, tokens, hp, 1, 0, lambda _: None, BOS)
    with torch._dynamo.config.patch(error_on_recompile=True):
        score(ttt)
    assert ttt.adapted == ttt.steps > 0
