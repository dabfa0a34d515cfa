"""Parallel residual lanes (PARALLEL_RESID_START), against explicit references."""
import copy
import re

import pytest
import torch

import train_gpt as tg
from conftest import failure_tail, run_train
from test_model import four_layers, tiny_hp


def randomised(model: tg.GPT, keep=("lanes",)) -> tg.GPT:
    """Every parameter but `keep` drawn at random, so that no zero-initialised projection hides a path."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(keep):
                p.normal_(0, 0.2)
    return model


class GPTJBlock(torch.nn.Module):
    """A block as GPT-J's parallel form: attention and MLP both read the mixed input, and both outputs are added."""

    def __init__(self, block: tg.Block):
        super().__init__()
        self.b = block

    def forward(self, x, x0, ve):
        b = self.b
        x = b.resid_mix[0] * x + b.resid_mix[1] * x0
        return x + b.attn_scale * b.attn(tg.rms_norm(x) * b.ln_scale, ve) + b.mlp_scale * b.mlp(tg.rms_norm(x) * b.ln_scale)


def test_lanes_at_init_are_gptj_parallel_blocks():
    """All-ones lane weights keep the two lanes equal: from PARALLEL_RESID_START on, every block is GPT-J's parallel
    block, and the layers before it are today's."""
    hp = four_layers(parallel_resid_start=2, skip_gates=1)
    model = randomised(tg.GPT(hp, dtype=torch.float64).double())
    assert [b.lanes is not None for b in model.blocks] == [False, False, True, True]
    ref = tg.GPT(four_layers(skip_gates=1), dtype=torch.float64).double()
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith("lanes")})
    ref.blocks[2], ref.blocks[3] = GPTJBlock(ref.blocks[2]), GPTJBlock(ref.blocks[3])
    ids = torch.randint(0, 320, (2, 12))
    assert torch.allclose(model.hidden(ids), ref.hidden(ids), atol=1e-10)
    sequential = copy.deepcopy(ref)
    sequential.blocks[2], sequential.blocks[3] = ref.blocks[2].b, ref.blocks[3].b
    assert not torch.allclose(model.hidden(ids), sequential.hidden(ids), atol=1e-3)  # the parallel form differs


def test_each_lane_gets_each_output_by_its_weight():
    """lanes[i, j] weighs output j (0: attention, which reads lane 0; 1: MLP, which reads lane 1) into lane i."""
    hp = tiny_hp(num_layers=2, parallel_resid_start=1)
    model = randomised(tg.GPT(hp, dtype=torch.float64).double(), keep=())
    block = model.blocks[1]
    x, x0 = torch.randn(2, 3, 5, hp.model_dim, dtype=torch.float64), torch.randn(3, 5, hp.model_dim, dtype=torch.float64)
    mixed = block.resid_mix[0] * x + block.resid_mix[1] * x0
    attn = block.attn_scale * block.attn(tg.rms_norm(mixed[0]) * block.ln_scale, None)
    mlp = block.mlp_scale * block.mlp(tg.rms_norm(mixed[1]) * block.ln_scale)
    w = block.lanes
    want = torch.stack((mixed[0] + w[0, 0] * attn + w[0, 1] * mlp, mixed[1] + w[1, 0] * attn + w[1, 1] * mlp))
    assert torch.allclose(block(x, x0, None), want, atol=1e-10)


def test_lane_weights_are_exported_as_fp32_and_the_start_is_a_decoder_layer():
    assert tg.Quantizer.from_hp(tiny_hp()).kind("blocks.7.lanes", torch.ones(2, 2)) == "fp32"
    with pytest.raises(tg.ConfigError, match="PARALLEL_RESID_START=1 must be 0 \\(off\\) or a decoder layer \\(2 to 3\\)"):
        four_layers(parallel_resid_start=1)


def unrolled_hidden(m: tg.GPT, ids, order):
    """GPT.hidden written out for a layer order: a layer's first pass takes and gives the U-Net skips, a repeated
    pass (the n-th time the layer runs) uses the n-th untied MLP of that layer, if any."""
    dtype = m.dtype
    x = m.smear(tg.rms_norm(m.tok_emb(ids).to(dtype) + m.bigram(ids, dtype)))
    x0, ve, skips, runs = x, m.ve(ids, dtype), [], {}
    for i in order:
        n = runs[i] = runs.get(i, -1) + 1
        if n == 0 and i >= m.n_enc:
            x = x + m.skip_weights[i - m.n_enc] * skips.pop()
        mlp = m.recur_mlps[(n - 1) * len(m.recur) + m.recur.index(i)] if n and m.recur_mlps is not None else None
        x = m.blocks[i](x, x0, ve * m.ve_layer_scales[i - m.ve_first] if i >= m.ve_first else None, mlp)
        if n == 0 and i < m.n_enc:
            skips.append(x)
    return tg.rms_norm(x)


@pytest.mark.parametrize("untie", [0, 1])
def test_recurrence_equals_the_unrolled_layers(untie):
    """RECUR_LAYERS=1,2 with 2 extra passes on 4 layers runs 0, 1, 2, 1, 2, 1, 2, 3; with fewer passes on, fewer."""
    hp = four_layers(recur_layers="1,2", recur_loops=2, recur_untie_mlp=untie)
    m = randomised(tg.GPT(hp, dtype=torch.float64).double(), keep=())
    ids = torch.randint(0, 320, (2, 12))
    assert m.loops_on == 2  # built with every pass on (the evaluation's model); training sets it by the schedule
    for loops, order in ((2, [0, 1, 2, 1, 2, 1, 2, 3]), (1, [0, 1, 2, 1, 2, 3]), (0, [0, 1, 2, 3])):
        m.loops_on = loops
        assert torch.allclose(m.hidden(ids), unrolled_hidden(m, ids, order), atol=1e-10), loops
    assert not torch.allclose(unrolled_hidden(m, ids, [0, 1, 2, 1, 2, 3]), unrolled_hidden(m, ids, [0, 1, 2, 3]))


def test_recurrence_adds_no_weights_unless_its_mlps_are_untied():
    plain = set(tg.GPT(four_layers()).state_dict())
    assert set(tg.GPT(four_layers(recur_layers="1,2", recur_loops=2)).state_dict()) == plain
    untied = set(tg.GPT(four_layers(recur_layers="1,2", recur_loops=2, recur_untie_mlp=1)).state_dict())
    assert untied - plain == {f"recur_mlps.{k}.{w}.weight" for k in range(4) for w in ("fc", "proj")}


def test_recurrence_passes_switch_on_at_their_fractions():
    sched = tg.Schedule.from_hp(four_layers(recur_layers="1,2", recur_loops=2, recur_start_frac="0.5,0.65"))
    assert [sched.recur_loops(p) for p in (0.0, 0.49, 0.5, 0.64, 0.65, 0.99)] == [0, 0, 1, 1, 2, 2]
    assert tg.Schedule.from_hp(four_layers(recur_layers="1,2", recur_loops=2)).recur_starts == (0.5, 0.5)
    assert tg.Schedule.from_hp(four_layers(recur_start_frac="0.3")).recur_loops(0.9) == 0  # off
    assert sched.recur_counts(0.0) == [0, 1, 2] and sched.recur_counts(0.6) == [1, 2] and sched.recur_counts(0.7) == [2]
    single = tg.Schedule.from_hp(four_layers(recur_layers="1,2", recur_loops=2, recur_start_frac="0.35"))
    assert single.recur_counts(0.0) == [0, 2] and single.recur_counts(0.2) == [0, 2]  # both passes at once: no graph for 1
    for bad, message in ((dict(recur_layers="1,3"), "RECUR_LAYERS='1,3' must be consecutive layers"),
                         (dict(recur_layers="2,3", parallel_resid_start=3), "all before or all from"),
                         (dict(recur_layers="1", recur_start_frac="0.5,0.6"), "RECUR_START_FRAC='0.5,0.6' must be one"),
                         (dict(recur_layers="1", recur_start_frac="1"), "must be one fraction in [0, 1)")):
        with pytest.raises(tg.ConfigError, match=re.escape(message)):
            four_layers(**bad)


def test_the_warm_up_compiles_each_pass_count_with_and_without_qat_as_the_run_meets_them(tmp_path, dataset, tokenizer):
    """A second pass that switches on after late QAT (0.9 > 1 - 0.5 * 0.49): QAT meets 1 and 2 passes, so both
    graphs are compiled before the clock starts, and the run switches at 30% and 90%."""
    r = run_train(tmp_path, dataset, tokenizer, ITERATIONS=30, COMPRESSOR="zstd", NUM_LAYERS=4, PARALLEL_RESID_START=0,
                  RECUR_LAYERS="1,2", RECUR_LOOPS=2, RECUR_START_FRAC="0.3,0.9", LATE_QAT_THRESHOLD=0.5, WARMUP_STEPS=5)
    assert r.returncode == 0, failure_tail(r)
    assert "graphs (extra passes, QAT): 0 1 2 1+qat 2+qat\n" in r.stdout
    steps = [int(m) for m in re.findall(r"recur:\d extra passes of layers 1,2 from step:(\d+) ", r.stdout)]
    assert steps == [9, 27] and "ms/step after the last switch" in r.stdout
