"""The later records' switches, each against a reference: per-layer LeakyReLU slopes, EngramLite, gated U-Net
skips, MuonEq-R and the LR floor. (Turbo-Muon and soft-round QAT, measured worse on both seeds, were removed.)"""
import math
import re

import pytest
import torch

import train_gpt as tg
from conftest import failure_tail, run_train
from logs import parse_log
from test_model import four_layers, tiny_hp

ALL_ON = dict(leaky_relu_slopes="-0.014,0.47", engram_buckets=64, engram_dim=8, skip_gates=1,
              muon_backend="polar_express", muon_backend_steps=4, muon_row_norm=1, lr_floor=0.05, late_qat_threshold=0.5,
              xsa_last_n=2, mlp_mult=3.5, qk_gain_init=4.0, muon_momentum=0.97, parallel_resid_start=1,
              recur_layers="1", recur_untie_mlp=1, recur_start_frac=0.3)


def test_each_layer_gets_its_own_slope():
    torch.manual_seed(0)
    hp = tiny_hp(leaky_relu_slopes="-0.014, 0.47")
    m = tg.GPT(hp, dtype=torch.float64).double()
    assert [b.mlp.slope for b in m.blocks] == [-0.014, 0.47]
    x = torch.randn(3, 5, hp.model_dim, dtype=torch.float64)
    for block, slope in zip(m.blocks, (-0.014, 0.47)):
        torch.nn.init.normal_(block.mlp.proj.weight)
        pre = x @ block.mlp.fc.weight.T
        want = torch.where(pre > 0, pre, slope * pre).square() @ block.mlp.proj.weight.T
        assert torch.allclose(block.mlp(x), want)
    with pytest.raises(tg.ConfigError, match="LEAKY_RELU_SLOPES='0.1' must be 2 comma-separated numbers"):
        tiny_hp(leaky_relu_slopes="0.1")


def engram(orders=2, heads=2, buckets=50, dim=4, model_dim=16):
    torch.manual_seed(0)
    e = tg.EngramLite(buckets, heads, orders, dim, model_dim)
    torch.nn.init.normal_(e.proj.weight)  # zero at init: give it weights so the output shows what it reads
    return e


@pytest.mark.parametrize("orders", [1, 2])
def test_engram_is_causal_and_reads_exactly_its_ngram(orders):
    """A position's embedding changes when its own token or one of its `orders` predecessors changes, and never
    when a later or an older token does."""
    e = engram(orders)
    ids = torch.randint(1, 300, (2, 24))
    base = e(ids, torch.float32)
    for t in (0, 5, 11, 23):
        other = ids.clone()
        other[:, t] = (other[:, t] + 7) % 300 + 1
        changed = (e(other, torch.float32) - base).abs().sum(dim=(0, 2)) > 0
        assert changed.tolist() == [t <= i <= t + orders for i in range(24)]


def test_engram_heads_and_orders_use_their_own_tables():
    e = engram(orders=2, heads=2, buckets=50)
    seen = []
    e.embed.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    e(torch.randint(1, 300, (4, 32)), torch.float32)
    rows = seen[0]  # (batch, T, orders * heads): one row index per order and head
    for slot in range(4):
        assert ((rows[..., slot] >= slot * 50) & (rows[..., slot] < (slot + 1) * 50)).all()
    assert (rows[..., 0] % 50 != rows[..., 1] % 50).float().mean() > 0.8  # the two bigram heads hash differently
    hp = tiny_hp(engram_buckets=64, engram_dim=8)
    m = tg.GPT(hp, dtype=torch.float32)
    assert m.engram.embed.weight.shape == (2 * 2 * 64, 8) and torch.all(m.engram.proj.weight == 0)
    assert tg.Quantizer.from_hp(hp).kind("engram.embed.weight", torch.zeros(256, 300)) == "int_embed"


def test_gated_skips_lerp_from_the_skip_to_the_stream():
    """SKIP_GATES: x <- (1 - g) * w * skip + g * x with g = sigmoid(gate) per dimension (0.5 at init)."""
    torch.manual_seed(0)
    hp = four_layers(skip_gates=1)
    m = tg.GPT(hp, dtype=torch.float64).double()
    assert m.skip_gates.shape == m.skip_weights.shape and torch.all(m.skip_gates == 0)
    with torch.no_grad():
        m.skip_gates.normal_()
        m.skip_weights.normal_()
    seen = {}
    for i, block in enumerate(m.blocks):
        block.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(f"in{i}", args[0]))
        block.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(f"out{i}", out))
    m.hidden(torch.randint(0, 320, (2, 8)))
    for j, (enc, dec) in enumerate(((1, 2), (0, 3))):  # layer 2 reads layer 1's output, layer 3 reads layer 0's
        g = torch.sigmoid(m.skip_gates[j])
        want = (1 - g) * m.skip_weights[j] * seen[f"out{enc}"] + g * seen[f"out{dec - 1}"]
        assert torch.allclose(seen[f"in{dec}"], want)


def test_row_norm_makes_the_update_blind_to_row_scales():
    """MUON_ROW_NORM (MuonEq-R): each row is normalised first, so scaling rows of the update changes nothing."""
    torch.manual_seed(2)
    G = torch.randn(2, 32, 48)
    D = torch.rand(2, 32, 1) * 100 + 0.01
    for method in ("newton_schulz", "polar_express"):
        a, b = (tg.orthogonalize(g, 5, method, row_norm=True) for g in (G, D * G))
        assert tg.relative_error(a, b.double()) < 0.06  # bf16 rounding of the scaled rows
        plain = [tg.orthogonalize(g, 5, method) for g in (G, D * G)]
        assert tg.relative_error(plain[0], plain[1].double()) > 0.1


def test_lr_floor_moves_the_lr_but_not_late_qat():
    s = tg.Schedule.from_hp(tiny_hp(warmdown_frac=0.5, lr_floor=0.05, late_qat_threshold=0.5,
                                    iterations=1000, max_wallclock_seconds=0))
    assert s.lr_scale(0.4) == 1.0 and s.lr_scale(0.75) == pytest.approx(0.5) and s.lr_scale(1.0) == 0.05
    assert s.lr_scale(0.99) == 0.05 and s.warmdown(0.99) == pytest.approx(0.02)
    # the floor moves the LR only: late QAT starts where the warmdown (not the floored LR) crosses 0.5
    assert not s.qat(0.749) and s.qat(0.751)


def test_qk_gain_and_momentum_settings_reach_the_model_and_the_optimizer():
    hp = tiny_hp(qk_gain_init=4.0, muon_momentum=0.97)
    m = tg.GPT(hp, dtype=torch.float32)
    assert all(torch.all(b.attn.q_gain == 4.0) for b in m.blocks)
    assert tg.Schedule.from_hp(hp).momentum(0.5) == 0.97


def test_every_switch_on_trains_exports_and_rescores(tmp_path, dataset, tokenizer):
    r = run_train(tmp_path, dataset, tokenizer, ITERATIONS=30, COMPRESSOR="zstd", **{k.upper(): v for k, v in ALL_ON.items()})
    assert r.returncode == 0, failure_tail(r)
    log = parse_log(str(tmp_path / "logs" / "t.txt"))
    curve = log["train_curve"]
    assert curve[-1][2] < curve[0][2] - 0.5 and math.isfinite(log["sliding_bpb"])
    assert "late_qat:on" in r.stdout and "qat_check" in r.stdout
    assert "recur_check" in r.stdout and re.search(r"recur:1 extra passes of layers 1 from step:(8|9|10) ", r.stdout)
    assert "graphs (extra passes, QAT): 0 1 1+qat\n" in r.stdout  # every graph the run meets compiles in the warm-up
    again = run_train(tmp_path, dataset, tokenizer, args=[str(tmp_path / "logs" / "t.int6.ptz")], RUN_ID="again")
    assert again.returncode == 0, failure_tail(again)  # the shape (engram, gates, slopes) comes from the artifact
    assert parse_log(str(tmp_path / "logs" / "again.txt"))["sliding_bpb"] == log["sliding_bpb"]


def test_the_1233_scripts_choices_as_switches():
    """BIGRAM_HASH=xor, AUX_PROJ_INIT_SCALE and NS_MARGIN=1.0 give the public 1.1233 script's versions."""
    ids = torch.randint(0, 320, (2, 20))
    bigram = tg.BigramHash(64, 16, 32, "xor")
    seen = []
    bigram.embed.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    bigram(ids, torch.float32)
    want = [[63] + [((c * 36313) ^ (p * 27191)) % 63 for p, c in zip(row[:-1], row[1:])] for row in ids.tolist()]
    assert seen[0].tolist() == want
    torch.manual_seed(0)
    base = tg.GPT(four_layers(), dtype=torch.float32).state_dict()
    torch.manual_seed(0)
    scaled = tg.GPT(four_layers(aux_proj_init_scale=1), dtype=torch.float32).state_dict()
    changed = {k for k in base if not torch.equal(base[k], scaled[k])}
    assert changed == {"bigram.proj.weight", "ve.proj.weight"}
    for k in changed:
        assert torch.allclose(scaled[k], base[k] / math.sqrt(8))
    G = torch.randn(2, 16, 24)
    for margin in (1.0, 1.01):
        want = G.bfloat16() / (G.bfloat16().norm(dim=(-2, -1), keepdim=True) * margin + 1e-7)
        assert torch.equal(tg.orthogonalize(G, 0, margin=margin), want)
    opt = tg.Optimizers(tg.GPT(tiny_hp(ns_margin=1.0), dtype=torch.float32), tiny_hp(ns_margin=1.0), 0, 1, False)
    assert opt.muon.margin == 1.0
