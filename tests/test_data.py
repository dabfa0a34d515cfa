"""Shards, the loader, the tokenizer checks and exact byte counting."""
import numpy as np
import pytest
import torch

import build_shards
import train_gpt as tg


def test_shard_round_trip(tmp_path):
    toks = np.random.default_rng(0).integers(0, 65536, size=5000)
    build_shards.write_shard(tmp_path / "a.bin", toks)
    assert (tmp_path / "a.bin").stat().st_size == 1024 + 2 * 5000
    np.testing.assert_array_equal(tg.read_shard(str(tmp_path / "a.bin")), toks)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:500], "shorter than the 1024-byte shard header"),
    (lambda b: (7).to_bytes(4, "little") + b[4:], "bad magic 7"),
    (lambda b: b[:4] + (2).to_bytes(4, "little") + b[8:], "unsupported shard version 2"),
    (lambda b: b[:-10], "truncated or corrupt"),
    (lambda b: b + b"\0\0", "truncated or corrupt"),
])
def test_bad_shards_fail_clearly(tmp_path, damage, message):
    build_shards.write_shard(tmp_path / "s.bin", np.arange(100))
    (tmp_path / "s.bin").write_bytes(damage((tmp_path / "s.bin").read_bytes()))
    with pytest.raises(tg.DataError, match=message):
        tg.read_shard(str(tmp_path / "s.bin"))


def test_missing_shards_say_how_to_download(tmp_path):
    with pytest.raises(tg.DataError, match="cached_challenge_fineweb.py"):
        tg.list_shards(str(tmp_path), "train")


def test_tokenizer_checks(tmp_path, tokenizer):
    with pytest.raises(tg.DataError, match="has vocab 320, but VOCAB_SIZE=1024"):
        tg.load_tokenizer(tokenizer, 1024)
    with pytest.raises(tg.DataError, match="not found"):
        tg.load_tokenizer(str(tmp_path / "none.model"), 320)


def test_val_shorter_than_one_sequence(tmp_path):
    build_shards.write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(50))
    with pytest.raises(tg.DataError, match="fewer than one sequence"):
        tg.load_val_tokens(str(tmp_path), 64)


@pytest.mark.parametrize("world, accum", [(1, 1), (2, 2), (4, 1), (3, 2)])
def test_loader_slices_are_disjoint_and_cover_the_batch(tmp_path, world, accum):
    seq, local = 8, 16  # 2 sequences per rank and micro-step
    batch = local * world * accum
    build_shards.write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(10_000) % 65536)
    files = [str(tmp_path / "fineweb_train_000000.bin")]
    loaders = [tg.TrainLoader(files, r, world, accum, batch, seq, torch.device("cpu")) for r in range(world)]
    for step in range(3):
        seen = []
        for loader in loaders:
            for x, y in loader.next_step():
                assert x.shape == (local // seq, seq)
                assert torch.equal(y.flatten()[:-1], x.flatten()[1:])  # targets are the next tokens
                seen.append(torch.cat((x.flatten(), y.flatten()[-1:])))
        got = torch.sort(torch.cat(seen)).values
        span = (local + 1) * world * accum
        assert torch.equal(got, torch.arange(step * span, (step + 1) * span))  # disjoint and covering


def test_loader_reset_starts_again_from_the_first_token(tmp_path):
    """The warm-up reads batches, then reset() must give the training run the same first batches (the
    prefetched step is dropped)."""
    build_shards.write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(5_000) % 65536)
    loader = tg.TrainLoader([str(tmp_path / "fineweb_train_000000.bin")], 0, 1, 2, 64, 8, torch.device("cpu"))
    first = [loader.next_step() for _ in range(3)]
    loader.reset()
    again = [loader.next_step() for _ in range(3)]
    for a, b in zip(first, again):
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert first[0][0][0][0, 0] == 0 and first[1][0][0][0, 0] == 66  # step 2 starts after 2 x (32 + 1) tokens


def test_stream_wraps_across_shards(tmp_path):
    build_shards.write_shard(tmp_path / "a.bin", np.arange(10))
    build_shards.write_shard(tmp_path / "b.bin", np.arange(10, 15))
    s = tg.TokenStream([str(tmp_path / "a.bin"), str(tmp_path / "b.bin")])
    np.testing.assert_array_equal(s.take(12), np.arange(12))
    np.testing.assert_array_equal(s.take(6), [12, 13, 14, 0, 1, 2])


def test_byte_count_equals_utf8_length_of_decoded_documents(sp):
    tables = tg.build_byte_tables(sp)
    docs = ["the quick café über fox", "  zoë 42 résumé ☃ 𝄞 fjord!", "naïve   birds\n\nsing", "x"]
    for doc in docs:
        ids = torch.tensor([1] + sp.encode(doc))  # BOS, then the document
        counted = int(tg.count_bytes(ids[:-1], ids[1:], tables).sum())
        assert counted == len(sp.decode(ids[1:].tolist()).encode("utf-8")), doc
    # a stream of documents counts the sum of the documents
    stream = torch.tensor([t for d in docs for t in [1] + sp.encode(d)])
    total = int(tg.count_bytes(stream[:-1], stream[1:], tables).sum())
    assert total == sum(len(sp.decode(sp.encode(d)).encode("utf-8")) for d in docs)


def test_byte_table_marks_control_and_byte_tokens(sp):
    base, space, boundary = tg.build_byte_tables(sp)
    assert boundary[0] and boundary[1] and boundary[2] and boundary[3]  # pad, BOS, EOS, UNK
    assert base[1] == 0 and int(base[4]) == 1 and not boundary[4]  # <0x00> is one byte
