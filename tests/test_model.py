"""Settings, model pieces, the optimizer and late QAT."""
import functools
import re

import pytest
import torch

import train_gpt as tg
from conftest import TINY_ENV, failure_tail, on_ranks


def tiny_hp(**kw) -> tg.Hyperparameters:
    return tg.Hyperparameters.from_env({**TINY_ENV, **{k.upper(): str(v) for k, v in kw.items()}})


def four_layers(**kw) -> tg.Hyperparameters:
    """The tiny config at 4 layers, without lanes unless asked (tiny.env's PARALLEL_RESID_START=1 is an encoder layer)."""
    return tiny_hp(**{"num_layers": 4, "parallel_resid_start": 0, **kw})


def test_env_parsing_and_errors():
    hp = tiny_hp(ln_scale="off", smear_gate="Yes", matrix_lr="0.5")
    assert hp.ln_scale is False and hp.smear_gate is True and hp.matrix_lr == 0.5 and hp.num_layers == 2
    with pytest.raises(tg.ConfigError, match="NUM_LAYERS='two' is not a valid int"):
        tg.Hyperparameters.from_env({"NUM_LAYERS": "two"})
    with pytest.raises(tg.ConfigError, match="SMEAR_GATE='maybe' is not a boolean"):
        tg.Hyperparameters.from_env({"SMEAR_GATE": "maybe"})


def test_a_misspelt_setting_is_named_with_its_near_miss_on_rank_0_only(capsys):
    hp = tg.Hyperparameters.from_env({**TINY_ENV, "MLP_MUL": "4", "NUM_LAYER": "3", "PATH": "/bin"})
    assert hp.mlp_mult == tg.Hyperparameters.mlp_mult and hp.num_layers == 2  # ignored, as before
    err = capsys.readouterr().err.splitlines()
    assert err == ["warning: MLP_MUL is not a setting of train_gpt.py (did you mean MLP_MULT?); it is ignored",
                   "warning: NUM_LAYER is not a setting of train_gpt.py (did you mean NUM_LAYERS?); it is ignored"]
    tg.Hyperparameters.from_env({**TINY_ENV, "MLP_MUL": "4", "RANK": "1"})  # every rank reads the same env
    tg.Hyperparameters.from_env({**TINY_ENV, "MLP_MULT": "4"})
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("env, message", [
    ({"ITERATIONS": "0"}, "ITERATIONS=0 must be at least 1"),
    ({"TRAIN_LOG_EVERY": "0"}, "TRAIN_LOG_EVERY=0 must be at least 1"),
    ({"MATRIX_LR": "nan"}, "MATRIX_LR=nan must not be negative"),
    ({"SEED": "-1"}, "SEED=-1 must not be negative"),
    ({"WARMDOWN_FRAC": "1.5"}, "WARMDOWN_FRAC=1.5 must be between 0 and 1"),
    ({"EVAL_STRIDE": "128"}, "EVAL_STRIDE=128 must be at most EVAL_SEQ_LEN=64"),
    ({"NUM_HEADS": "3"}, "MODEL_DIM=64 must be a multiple of NUM_HEADS=3"),
    ({"ROPE_DIMS": "7"}, "ROPE_DIMS=7 must be even"),
    ({"VOCAB_SIZE": "70000"}, "at most 65536"),
    ({"QUANT_BITS": "9"}, "QUANT_BITS='9' must be mixed or between 2 and 8"),
    ({"QUANT_BITS": "mixed"}, "QUANT_BITS='mixed' needs QUANTIZER=gptq"),
    ({"MIXED_BITS": "6,5"}, "MIXED_BITS='6,5' must be increasing"),
    ({"MIXED_BITS": ""}, "MIXED_BITS='' must be increasing"),
    ({"MIXED_BITS": "5,9"}, "MIXED_BITS='5,9' must be increasing comma-separated bit widths between 2 and 8"),
    ({"COMPRESSOR": "lz4"}, "COMPRESSOR='lz4' is not one of zstd, brotli"),
    ({"QUANTIZER": "awq"}, "QUANTIZER='awq' is not one of gptq_lite, gptq"),
    ({"CLIP_MODE": "max"}, "CLIP_MODE='max' is not one of search, sdclip"),
    ({"SDCLIP_K": "0"}, "SDCLIP_K=0.0 must be positive"),
    ({"GPTQ_CALIB_BATCHES": "0"}, "GPTQ_CALIB_BATCHES=0 must be at least 1"),
    ({"QUANTIZER": "gptq", "MAX_WALLCLOCK_SECONDS": "5", "GPTQ_RESERVE_SECONDS": "5"},
     "GPTQ_RESERVE_SECONDS=5.0 must be below MAX_WALLCLOCK_SECONDS=5.0"),
    ({"CLIP_PERCENTILES": "0.99,x"}, "CLIP_PERCENTILES='0.99,x' must be a comma-separated list"),
    ({"CLIP_PERCENTILES": ""}, "CLIP_PERCENTILES='' must be a comma-separated list"),
    ({"RUN_ID": "../elsewhere"}, "RUN_ID='../elsewhere' may hold only"),
    ({"QUANTIZER": "gptq", "QUANT_BITS": "mixed", "SIZE_TARGET": "16000001"},
     "SIZE_TARGET=16000001 must be at most SIZE_LIMIT=16000000"),
    ({"QUANT_CLIP_FLOOR": "0"}, "QUANT_CLIP_FLOOR=0.0 must be positive for the size fits"),  # 10% steps from 0 stay at 0
])
def test_bad_settings_are_refused_before_anything_runs(env, message):
    with pytest.raises(tg.ConfigError, match=re.escape(message)):
        tg.Hyperparameters.from_env({**TINY_ENV, **env})


@pytest.mark.parametrize("shape", [(3, 64, 64), (2, 96, 32), (4, 32, 128)])
def test_newton_schulz_singular_values_near_one(shape):
    torch.manual_seed(0)
    n, rows, cols = shape
    k = min(rows, cols)
    U = torch.linalg.qr(torch.randn(n, rows, k)).Q
    V = torch.linalg.qr(torch.randn(n, cols, k)).Q
    G = 7.0 * U @ torch.diag_embed(torch.logspace(-1, 0, k).expand(n, k)) @ V.mT  # singular values spread 10x
    sv = torch.linalg.svdvals(tg.orthogonalize(G, 5).float())
    assert sv.min() > 0.6 and sv.max() < 1.25
    assert abs(sv.mean().item() - 0.9) < 0.15
    pe = torch.linalg.svdvals(tg.orthogonalize(G, 5, "polar_express").float())
    assert pe.min() > 0.8 and pe.max() < 1.2  # per-step coefficients: a tighter band in as many steps


def test_polar_express_is_tighter_than_newton_schulz_on_wide_spectra():
    """Singular values spread over 300x: after 5 steps Polar Express leaves them within [0.85, 1.15]; the
    fixed quintic leaves the smallest near 0.55."""
    torch.manual_seed(1)
    U, V = torch.linalg.qr(torch.randn(64, 64)).Q, torch.linalg.qr(torch.randn(64, 64)).Q
    G = (U @ torch.diag(torch.logspace(-2.5, 0, 64)) @ V.T)[None]
    ns, pe = (torch.linalg.svdvals(tg.orthogonalize(G, 5, m).float()) for m in ("newton_schulz", "polar_express"))
    assert pe.min() > 0.84 and pe.max() < 1.16
    assert ns.min() < 0.6


def test_xsa_output_is_orthogonal_to_own_value():
    torch.manual_seed(0)
    y, v = torch.randn(2, 5, 8, 16), torch.randn(2, 5, 4, 16)
    out = tg.remove_self_value(y, v)
    vn = torch.nn.functional.normalize(v, dim=-1).repeat_interleave(2, dim=2)  # GQA: head h reads kv h // 2
    assert (out * vn).sum(-1).abs().max() < 1e-5
    assert not torch.allclose(out, y)
    # the removed part is along v only: what remains of y orthogonal to v is unchanged
    assert torch.allclose(out, y - (y * vn).sum(-1, keepdim=True) * vn, atol=1e-6)


def test_attention_with_one_qkv_product_matches_three_separate_projections():
    torch.manual_seed(0)
    hp = tiny_hp()
    attn = tg.CausalSelfAttention(hp, xsa=True, attn_impl="sdpa")
    for m in (attn.c_q, attn.c_k, attn.c_v, attn.proj):
        torch.nn.init.normal_(m.weight, std=0.1)
    x = torch.randn(2, 7, hp.model_dim)
    B, T, C, H, KV, D = 2, 7, hp.model_dim, attn.heads, attn.kv_heads, attn.head_dim
    # reference: each projection on its own, then the same norm / gain / rotary / attention / XSA steps
    q = tg.rms_norm((x @ attn.c_q.weight.T).view(B, T, H, D)) * attn.q_gain[:, None]
    k = tg.rms_norm((x @ attn.c_k.weight.T).view(B, T, KV, D))
    v = (x @ attn.c_v.weight.T).view(B, T, KV, D)
    freqs = torch.outer(torch.arange(T, dtype=torch.float32), attn.inv_freq)
    q, k = (tg.apply_partial_rope(t, freqs.cos(), freqs.sin()) for t in (q, k))
    want = (tg.remove_self_value(tg.attention(q, k, v, "sdpa"), v).reshape(B, T, C)) @ attn.proj.weight.T
    got = attn(x, None)
    assert torch.allclose(got, want, atol=1e-5)
    weights = [attn.c_q.weight, attn.c_k.weight, attn.c_v.weight]
    g_want = torch.autograd.grad(want.square().sum(), weights)
    g_got = torch.autograd.grad(got.square().sum(), weights)
    for a, b in zip(g_got, g_want):
        assert a.abs().max() > 0 and torch.allclose(a, b, atol=1e-5)


def test_layer_indexed_features_follow_num_layers():
    for layers in (1, 2, 3, 11):
        hp = tiny_hp(num_layers=layers, parallel_resid_start=0)
        m = tg.GPT(hp, dtype=torch.float32)
        xsa = [b.attn.xsa for b in m.blocks]
        assert xsa == [i >= layers - 4 for i in range(layers)]
        assert m.ve_first == max(0, layers - 2)
        ids = torch.randint(0, 320, (2, 16))
        assert torch.isfinite(m(ids, ids))


def test_grouping_of_parameters_for_optimizers():
    m = tg.GPT(tiny_hp(), dtype=torch.float32)
    opt = tg.Optimizers(m, tiny_hp(), 0, 1, compile_ns=False)
    muon_ids = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    assert id(m.blocks[0].attn.c_q.weight) in muon_ids and id(m.tok_emb.weight) not in muon_ids
    assert id(m.blocks[0].resid_mix) not in muon_ids and id(m.skip_weights) not in muon_ids
    tables, scalars = opt.adam.param_groups
    assert {id(m.tok_emb.weight), id(m.bigram.embed.weight), id(m.ve.embed.weight)} == {id(p) for p in tables["params"]}
    total = len(muon_ids) + len(tables["params"]) + len(scalars["params"])
    assert total == len(list(m.parameters()))


def test_backward_accumulates_into_the_gradient_buffers():
    """Every .grad is a view of a Muon bank or of the AdamW buffer: backward fills the buffers, zeroing them
    zeroes every gradient, and the views survive a step."""
    torch.manual_seed(0)
    hp = tiny_hp()
    m = tg.GPT(hp, dtype=torch.float32)
    opt = tg.Optimizers(m, hp, 0, 1, compile_ns=False)
    ids = torch.randint(0, hp.vocab_size, (2, 16))
    m(ids, ids).backward()
    buffers = [bank for _, _, bank, _ in opt.muon.banks] + [opt.adam_grads]
    total = sum(b.square().sum() for b in buffers)
    assert total > 0 and torch.allclose(total, sum(p.grad.square().sum() for p in m.parameters()))
    before = [p.detach().clone() for p in m.parameters()]
    opt.step(1.0, 0.9)
    assert all(b.abs().sum() == 0 for b in buffers) and all(p.grad.abs().sum() == 0 for p in m.parameters())
    assert all(not torch.equal(a, p) for a, p in zip(before, m.parameters()) if p.dim() == 2)
    m(ids, ids).backward()
    assert sum(b.square().sum() for b in buffers) > 0


def perturbed_model(hp) -> tg.GPT:
    torch.manual_seed(0)
    m = tg.GPT(hp, dtype=torch.float32)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # weights off the int6 grid, so fake quantisation shows
    return m


def test_qat_fake_quantises_as_the_export_stores():
    """One quantiser: each layer late QAT fake-quantises holds, in its forward, the weight the artifact stores."""
    hp = tiny_hp()
    m, quant = perturbed_model(hp), tg.Quantizer.from_hp(hp)
    layers = dict(m.named_modules())
    names = [n for n, layer in layers.items() if layer in tg.quantized_linears(m, quant)]
    assert len(names) == 6 * hp.num_layers  # q, k, v, out, fc, proj in every block
    _, exported = tg.unpack_state(tg.pack_state(m.state_dict(), hp, quant))
    for name in names:
        w = layers[name].weight
        assert torch.equal(quant.fake_quantize(w), exported[name + ".weight"]) and not torch.equal(w, exported[name + ".weight"])


def test_qat_check_passes_a_working_switch_and_stops_a_folded_one():
    """The start-up check compares the forward with QAT off and on: it passes the real switch and stops a run
    whose switch does not reach the forward (what torch.compile folding a flag into the graph leaves)."""
    hp = tiny_hp()
    m, quant = perturbed_model(hp), tg.Quantizer.from_hp(hp)
    layers = tg.quantized_linears(m, quant)
    ids = torch.randint(0, hp.vocab_size, (2, 32))
    def check(ls):
        return tg.check_switch(m, (ids, ids), lambda q: tg.set_qat(ls, q), None, quant, "late QAT", "")

    off, on = check(layers)
    assert off != on and all(layer.qat is None for layer in layers)  # and it is off again afterwards
    assert off == m(ids, ids).item()
    with pytest.raises(tg.TrainingError, match="late QAT does not change the compiled forward"):
        check([tg.CastedLinear(64, 64)])


def test_schedule_reaches_every_optimizer_after_a_state_restore():
    """The warm-up restores the optimizer state; the LR scale set afterwards must still reach Muon and AdamW
    (load_state_dict replaces the param-group dicts): at scale 0 no weight moves."""
    torch.manual_seed(0)
    hp = tiny_hp()
    m = tg.GPT(hp, dtype=torch.float32)
    opt = tg.Optimizers(m, hp, 0, 1, compile_ns=False)
    saved = opt.state_dict()
    ids = torch.randint(0, hp.vocab_size, (2, 16))
    m(ids, ids).backward()
    opt.step(1.0, 0.9)
    opt.load_state_dict(saved)
    before = [p.detach().clone() for p in m.parameters()]
    m(ids, ids).backward()
    opt.step(0.0, 0.9)
    assert all(torch.equal(a, p) for a, p in zip(before, m.parameters()))


def test_adam_lr_decay_off_keeps_adamw_at_its_full_lr():
    """ADAM_LR_DECAY=0: at LR scale 0 the Muon matrices stay put, while AdamW's tables and scalars still take
    full-LR steps (proxy5's setting); with the default every weight stays put."""
    for decay in (True, False):
        torch.manual_seed(0)
        hp = tiny_hp(adam_lr_decay=decay)
        m = tg.GPT(hp, dtype=torch.float32)
        opt = tg.Optimizers(m, hp, 0, 1, compile_ns=False)
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        ids = torch.randint(0, hp.vocab_size, (2, 16))
        m(ids, ids).backward()
        opt.step(0.0, 0.9)
        muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
        moved = {n for n, p in m.named_parameters() if not torch.equal(before[n], p)}
        assert not moved & {n for n, p in m.named_parameters() if id(p) in muon}
        assert (("tok_emb.weight" in moved) and ("blocks.0.attn_scale" in moved)) == (not decay)
        assert [g["lr"] for g in opt.adam.param_groups] == ([0.0, 0.0] if decay else [hp.tied_embed_lr, hp.scalar_lr])


def matrices_model(weights: list[torch.Tensor]) -> torch.nn.Module:
    """CastedLinear layers with the given matrices, plus one vector parameter (the last weight) for AdamW."""
    m = torch.nn.Module()
    m.layers = torch.nn.ModuleList(tg.CastedLinear(w.size(1), w.size(0)) for w in weights[:-1])
    m.gain = torch.nn.Parameter(weights[-1].clone())
    with torch.no_grad():
        for layer, w in zip(m.layers, weights):
            layer.weight.copy_(w)
    return m


OPT_HP = dict(adam_wd=0, muon_wd=0.1, grad_clip_norm=0.5, matrix_lr=0.1)


def optimizer_step(weights, grads, rank=0, world=1) -> list[torch.Tensor]:
    model = matrices_model(weights)
    opt = tg.Optimizers(model, tiny_hp(**OPT_HP), rank, world, compile_ns=False)
    params = [layer.weight for layer in model.layers] + [model.gain]
    for p, g in zip(params, grads):
        p.grad.copy_(g)
    opt.step(1.0, 0.9)
    return [p.detach().clone() for p in params]


def random_weights_and_grads(seed: int, ranks: int):
    torch.manual_seed(seed)  # 5 wide and 2 tall matrices: an odd bank count pads the shards
    weights = [torch.randn(16, 8) for _ in range(5)] + [torch.randn(8, 16) for _ in range(2)] + [torch.randn(8)]
    return weights, [[torch.randn_like(w) for w in weights] for _ in range(ranks)]


def test_banked_muon_equals_per_matrix_muon():
    """The banked step against plain per-matrix Muon: global-norm clip, Nesterov momentum, orthogonalise (rows
    normalised first: MUON_ROW_NORM's default), scale by sqrt(max(1, rows/cols)), decoupled weight decay."""
    weights, (grads,) = random_weights_and_grads(0, 1)
    got = optimizer_step(weights, grads)
    norm = torch.sqrt(sum(g.square().sum() for g in grads))
    clip = min(1.0, OPT_HP["grad_clip_norm"] / (norm.item() + 1e-6))
    lr, wd = OPT_HP["matrix_lr"], OPT_HP["muon_wd"]
    for w, g, p in zip(weights[:-1], grads, got):
        u = g * clip * (1 + 0.9)  # first step: the momentum buffer is the gradient itself
        o = tg.orthogonalize(u[None], 5, row_norm=True)[0].float() * max(1.0, w.size(0) / w.size(1)) ** 0.5
        assert torch.allclose(p, w * (1 - lr * wd) - lr * o, atol=1e-6)


def sharded_step(weights, grads, world, rank):
    return optimizer_step(weights, grads[rank], rank, world)


def test_sharded_step_on_two_processes_equals_one(tmp_path):
    """Two ranks with different local gradients (reduce-scatter, sharded orthogonalisation, all-gather) end
    with the weights one process gets from the mean gradient."""
    weights, grads = random_weights_and_grads(1, 2)
    one = optimizer_step(weights, [(a + b) / 2 for a, b in zip(*grads)])
    two = on_ranks(functools.partial(sharded_step, weights, grads), 2, tmp_path)
    for a, b in zip(one, two):
        assert torch.allclose(a, b, atol=1e-6)


FUSED_MLP_CHECK = """
import sys, torch
import train_gpt as tg
from test_model import tiny_hp
torch.manual_seed(0)
for slope in (0.0, 0.5, -0.014):  # odd sizes: every tile of the kernel is partly masked
    ref, fused = tg.MLP(48, 144, slope, "torch").double(), tg.MLP(48, 144, slope, "triton")
    torch.nn.init.normal_(ref.proj.weight, std=0.1)
    fused.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    x, g = torch.randn(2, 35, 48, dtype=torch.float64), torch.randn(2, 35, 48, dtype=torch.float64)
    want, got = (tg.mlp_output_and_grads(m, x, g) for m in (ref, fused))
    errs = [tg.relative_error(a, r) for a, r in zip(got, want)]
    print("slope", slope, "errors", errs)
    assert max(errs) < 1e-5, errs
log = []
assert tg.select_mlp_kernel(tiny_hp(mlp_kernel="triton"), torch.device("cpu"), log.append) == "triton", log
launch = tg.launch_squared_act_grad  # a kernel broken for one slope only: the check must try every layer's slope
tg.launch_squared_act_grad = lambda d_out, w_proj, saved, slope, tiles: (
    torch.zeros_like(saved) if slope == 0.3 else launch(d_out, w_proj, saved, slope, tiles))
assert tg.select_mlp_kernel(tiny_hp(mlp_kernel="auto"), torch.device("cpu"), log.append) == "torch"  # CPU: torch path
try:
    tg.select_mlp_kernel(tiny_hp(mlp_kernel="triton", leaky_relu_slopes="0.0,0.3"), torch.device("cpu"), log.append)
    sys.exit("a kernel broken at a layer's slope passed the start-up check")
except tg.ConfigError as e:
    assert "failed its check (off by" in str(e), e
tg.launch_squared_act_grad = lambda d_out, w_proj, saved, slope, tiles: torch.zeros_like(saved)  # a broken kernel
try:
    tg.select_mlp_kernel(tiny_hp(mlp_kernel="triton"), torch.device("cpu"), log.append)
    sys.exit("a broken kernel passed the start-up check")
except tg.ConfigError as e:
    assert "failed its check (off by" in str(e), e
print("ok")
"""


def test_fused_mlp_backward_matches_float64_in_the_triton_interpreter():
    """The Triton backward (d act -> d pre in the matrix product's epilogue) against the torch MLP in float64,
    relu^2 and leaky relu^2, run by Triton's CPU interpreter in fp32; the start-up check passes it and
    rejects a kernel that returns zeros."""
    import os
    import subprocess
    import sys
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-c", FUSED_MLP_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), failure_tail(r)


def test_mlp_kernel_choice_on_cpu_and_bad_requests(monkeypatch):
    log = []
    assert tg.select_mlp_kernel(tiny_hp(), torch.device("cpu"), log.append) == "torch" and log == ["mlp: torch"]
    with pytest.raises(tg.ConfigError, match="MLP_KERNEL='cuda'"):
        tg.select_mlp_kernel(tiny_hp(mlp_kernel="cuda"), torch.device("cpu"), log.append)
    monkeypatch.setattr(tg, "triton", None)
    with pytest.raises(tg.ConfigError, match="triton is not importable"):
        tg.select_mlp_kernel(tiny_hp(mlp_kernel="triton"), torch.device("cpu"), log.append)


TODAY_PARAMS = [  # the tiny model before the later records' switches: name, shape, in registration order
    ("ve_layer_scales", (2,)), ("skip_weights", (1, 64)), ("tok_emb.weight", (320, 64)), ("bigram.scale", ()),
    ("bigram.embed.weight", (64, 16)), ("bigram.proj.weight", (64, 16)), ("smear.gate", (64,)), ("ve.scale", ()),
    ("ve.embed.weight", (320, 16)), ("ve.proj.weight", (32, 16))] + [
    (f"blocks.{i}.{name}", shape) for i in range(2) for name, shape in (
        ("attn_scale", (64,)), ("mlp_scale", (64,)), ("resid_mix", (2, 64)), ("attn.q_gain", (4,)),
        ("attn.c_q.weight", (64, 64)), ("attn.c_k.weight", (32, 64)), ("attn.c_v.weight", (32, 64)),
        ("attn.proj.weight", (64, 64)), ("mlp.fc.weight", (192, 64)), ("mlp.proj.weight", (64, 192)))]
TODAY_LOSSES = [5.767948627471924, 6.04958963394165, 6.134584903717041, 6.107173442840576]


def test_switches_off_give_todays_model():
    """With every later record's switch off (LEAKY_RELU_SLOPE=0, PARALLEL_RESID_START=0, QUANT_CLIP_FLOOR=1,
    MUON_ROW_NORM=0 and MLP_MULT=3 too: their defaults changed), the tiny model has the parameters it had before those switches existed and, over four optimizer steps on fixed batches (the last
    two with late QAT), the same losses (golden values from that code; 1e-5 leaves room for another CPU's
    rounding)."""
    hp = tiny_hp(leaky_relu_slope=0.0, parallel_resid_start=0, quant_clip_floor=1.0, muon_row_norm=0, mlp_mult=3.0)
    torch.manual_seed(0)
    m = tg.GPT(hp, dtype=torch.float32)
    assert [(n, tuple(p.shape)) for n, p in m.named_parameters()] == TODAY_PARAMS
    opt, quant = tg.Optimizers(m, hp, 0, 1, compile_ns=False), tg.Quantizer.from_hp(hp)
    gen, losses = torch.Generator().manual_seed(1), []
    for step in range(4):
        tg.set_qat(tg.quantized_linears(m, quant), quant if step >= 2 else None)
        ids = torch.randint(0, hp.vocab_size, (4, 64), generator=gen)
        loss = m(ids[:, :-1], ids[:, 1:])
        loss.backward()
        opt.step(1.0, 0.95)
        losses.append(loss.item())
    assert losses == pytest.approx(TODAY_LOSSES, rel=1e-5)
