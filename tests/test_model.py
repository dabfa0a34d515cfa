"""Model pieces, the optimizer, the schedule and late QAT."""
import math

import pytest
import torch

import train_gpt as tg
from conftest import TINY_ENV


def tiny_hp(**kw) -> tg.Hyperparameters:
    return tg.Hyperparameters.from_env({**TINY_ENV, **{k.upper(): str(v) for k, v in kw.items()}})


def test_env_parsing_and_errors():
    hp = tiny_hp(ln_scale="0", matrix_lr="0.5")
    assert hp.ln_scale is False and hp.matrix_lr == 0.5 and hp.num_layers == 2
    with pytest.raises(tg.ConfigError, match="NUM_LAYERS='two'"):
        tg.Hyperparameters.from_env({"NUM_LAYERS": "two"})


@pytest.mark.parametrize("shape", [(3, 64, 64), (2, 96, 32), (4, 32, 128)])
def test_newton_schulz_singular_values_near_one(shape):
    torch.manual_seed(0)
    n, rows, cols = shape
    k = min(rows, cols)
    U = torch.linalg.qr(torch.randn(n, rows, k)).Q
    V = torch.linalg.qr(torch.randn(n, cols, k)).Q
    G = 7.0 * U @ torch.diag_embed(torch.logspace(-1, 0, k).expand(n, k)) @ V.mT  # singular values spread 10x
    sv = torch.linalg.svdvals(tg.newton_schulz(G, 5).float())
    assert sv.min() > 0.6 and sv.max() < 1.25
    assert abs(sv.mean().item() - 0.9) < 0.15


def test_xsa_output_is_orthogonal_to_own_value():
    torch.manual_seed(0)
    y, v = torch.randn(2, 5, 8, 16), torch.randn(2, 5, 4, 16)
    out = tg.remove_self_value(y, v)
    vn = torch.nn.functional.normalize(v, dim=-1).repeat_interleave(2, dim=2)  # GQA: head h reads kv h // 2
    assert (out * vn).sum(-1).abs().max() < 1e-5
    assert not torch.allclose(out, y)
    # the removed part is along v only: what remains of y orthogonal to v is unchanged
    assert torch.allclose(out, y - (y * vn).sum(-1, keepdim=True) * vn, atol=1e-6)


def test_layer_indexed_features_follow_num_layers():
    for layers in (1, 2, 3, 11):
        hp = tiny_hp(num_layers=layers)
        m = tg.GPT(hp, dtype=torch.float32)
        xsa = [b.attn.xsa for b in m.blocks]
        assert xsa == [i >= layers - 4 for i in range(layers)]
        assert m.ve_first == max(0, layers - 2)
        ids = torch.randint(0, 320, (2, 16))
        assert torch.isfinite(m(ids, ids))


def test_grouping_of_parameters_for_optimizers():
    m = tg.GPT(tiny_hp(), dtype=torch.float32)
    muon, adam = tg.build_optimizers(m, tiny_hp(), 0, 1, compile_ns=False)
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    assert id(m.blocks[0].attn.c_q.weight) in muon_ids and id(m.tok_emb.weight) not in muon_ids
    assert id(m.blocks[0].resid_mix) not in muon_ids and id(m.skip_weights) not in muon_ids
    tables, scalars = adam.param_groups
    assert {id(m.tok_emb.weight), id(m.bigram.embed.weight), id(m.ve.embed.weight)} == {id(p) for p in tables["params"]}
    total = len(muon_ids) + len(tables["params"]) + len(scalars["params"])
    assert total == len(list(m.parameters()))


def test_schedule_has_the_same_shape_for_any_budget():
    hp = tiny_hp()
    for frac in (0.0, 0.1, 0.3, 0.51, 0.6, 0.9, 1.0):
        # the same fraction of a 150 s and a 600 s run (or of 1,000 and 7,100 steps) gives the same values
        for budget in (150.0, 600.0, 1000, 7100):
            assert tg.lr_scale(frac * budget / budget, hp.warmdown_frac) == tg.lr_scale(frac, hp.warmdown_frac)
    assert tg.lr_scale(0.5, 0.49) == 1.0 and tg.lr_scale(0.755, 0.49) == pytest.approx(0.5) and tg.lr_scale(1.0, 0.49) == 0
    assert tg.muon_momentum(0.0, hp) == 0.92 and tg.muon_momentum(0.105, hp) == pytest.approx(0.955)
    assert tg.muon_momentum(0.5, hp) == 0.99
    # the EMA time constant is a fraction of the run: 0.997 per step at the record's ~7,100 steps
    assert tg.ema_decay(1 / 7100, 0.047) == pytest.approx(0.997, abs=1e-4)
    assert tg.ema_decay(1 / 1000, 0.047) ** 1000 == pytest.approx(tg.ema_decay(1 / 7100, 0.047) ** 7100)


def test_qat_switch_changes_the_compiled_forward():
    torch.manual_seed(0)
    hp = tiny_hp()
    m = tg.GPT(hp, dtype=torch.float32)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # weights off the int6 grid, so fake quantisation shows
    layers = tg.quantized_linears(m, hp.quant_min_numel)
    assert len(layers) == 6 * hp.num_layers  # q, k, v, out, fc, proj in every block
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    ids = torch.randint(0, 320, (2, 32))
    off = compiled(ids, ids)
    for layer in layers:
        layer.qat = (6, hp.percentiles, 0.0)
    on = compiled(ids, ids)
    eager_on = m(ids, ids)
    for layer in layers:
        layer.qat = None
    assert not torch.allclose(on, off)
    assert torch.allclose(on, eager_on, atol=1e-5)
    assert torch.allclose(compiled(ids, ids), off, atol=1e-6)  # and it really turns off again


def test_muon_shards_like_one_rank():
    """Each rank orthogonalises its slice; gathered together they equal the single-rank update."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(16, 8)) for _ in range(5)]
    for p in ps:
        p.grad = torch.randn_like(p)
    ref = [p.detach().clone() for p in ps]
    opt = tg.Muon(ps, lr=0.1, momentum=0.9, ns_steps=5, wd=0.0)
    opt.step()
    G = torch.stack([p.grad + 0.9 * p.grad for p in ps])
    expected = [r - 0.1 * u * math.sqrt(2) for r, u in zip(ref, tg.newton_schulz(G, 5).float().unbind(0))]
    for p, e in zip(ps, expected):
        assert torch.allclose(p, e, atol=1e-6)
