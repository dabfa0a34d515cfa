"""QUANTIZER=gptq: the error-feedback rounding against an independent float64 formulation, its gain over
rounding to the nearest step, SDClip's scales, and the calibration (training data only, summed over ranks)."""
import functools

import pytest
import torch

import train_gpt as tg
from conftest import on_ranks
from test_model import tiny_hp


def correlated_problem(rows=24, cols=40, tokens=400, seed=0):
    """A weight matrix and a Hessian X^T X of strongly correlated inputs (a few shared factors plus noise)."""
    g = torch.Generator().manual_seed(seed)
    factors = torch.randn(tokens, 4, generator=g, dtype=torch.float64)
    x = factors @ torch.randn(4, cols, generator=g, dtype=torch.float64) + 0.1 * torch.randn(tokens, cols, generator=g, dtype=torch.float64)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64) * 0.3
    return w, x, x.T @ x


def gptq_by_inverse_downdates(w, h, scale, qmax, damp):
    """The GPTQ recurrence as the paper first states it, in float64: quantise columns in order of decreasing
    Hessian diagonal; after column i, move its error onto the remaining columns with the current inverse Hessian,
    W[:, j] -= e * Hinv[i, j] / Hinv[i, i], then remove i from the inverse (Hinv -= Hinv[:, i] Hinv[i, :] / Hinv[i, i])."""
    h = h.clone()
    h += damp * h.diagonal().mean() * torch.eye(len(h), dtype=h.dtype)
    order = torch.argsort(h.diagonal(), descending=True)
    w, hinv = w[:, order].clone(), torch.linalg.inv(h[order][:, order])
    q = torch.zeros_like(w)
    for i in range(w.size(1)):
        q[:, i] = torch.clamp(torch.round(w[:, i] / scale), -qmax, qmax)
        e = w[:, i] - q[:, i] * scale
        w[:, i + 1:] -= e[:, None] * hinv[i, i + 1:][None, :] / hinv[i, i]
        hinv = hinv - hinv[:, i:i + 1] @ hinv[i:i + 1, :] / hinv[i, i]
    return q[:, torch.argsort(order)]


@pytest.mark.parametrize("block", [1, 7, 128])
def test_gptq_equals_the_inverse_downdate_formulation(block):
    w, _, h = correlated_problem()
    scale = (w.abs().amax(1) / 31).half()
    got = tg.gptq_rows(w, h, scale, 6, damp=0.01, block=block)
    ref = gptq_by_inverse_downdates(w, h, scale.double(), 31, 0.01)
    assert got.dtype == torch.int8
    assert (got.double() != ref).float().mean() < 0.01  # float32 vs float64 may flip a rare tie
    assert int(got.abs().max()) <= 31


def test_gptq_lowers_the_output_error_on_correlated_inputs():
    """Weighted by the inputs (|(W - Q) X^T|), GPTQ's error is well below rounding each value to the nearest
    step on the same scales; with uncorrelated inputs (diagonal H) it is exactly that rounding."""
    w, x, h = correlated_problem(seed=1)
    quant = tg.Quantizer(6, 8, (0.999, 1.0), 0.0, 0)
    scale = quant.round_to_rows(w, 6)[1]
    nearest = tg.round_rows(w, scale, 31)
    gptq = tg.gptq_rows(w, h, scale, 6, 0.01, 128).double()

    def output_error(q):
        return ((w - q * scale.double()[:, None]) @ x.T).square().sum()
    assert output_error(gptq) < 0.5 * output_error(nearest)
    diagonal = torch.diag(torch.rand(w.size(1), dtype=torch.float64) + 0.5)
    assert torch.equal(tg.gptq_rows(w, diagonal, scale, 6, 0.01, 16).double(), nearest.double())


def test_gptq_quantizer_uses_hessians_by_name_and_rounds_the_rest():
    w, _, h = correlated_problem(rows=8, cols=40)
    hp = tiny_hp(quantizer="gptq", quant_clip_floor=0, size_fit=0)
    quant = tg.QUANTIZERS["gptq"].from_hp(hp)
    quant = tg.dataclasses.replace(quant, hessians={"a.weight": h})
    q_a, s_a = quant.quantize("a.weight", w, 6)
    q_b, s_b = quant.quantize("b.weight", w, 6)
    assert torch.equal(s_a, s_b) and torch.equal(q_b.float(), tg.round_rows(w, s_b, 31))
    assert torch.equal(q_a, tg.gptq_rows(w, h, s_a, 6, hp.gptq_damp, hp.gptq_block)) and not torch.equal(q_a, q_b)


def test_sdclip_scales_are_k_standard_deviations_with_the_floor():
    torch.manual_seed(0)
    w = torch.randn(6, 256) * torch.tensor([0.01, 0.02, 0.05, 0.1, 0.2, 0.5])[:, None]
    got = tg.sdclip_scales(w, 6, 12.85, clip_floor=0.0).float()
    assert torch.allclose(got, 12.85 * w.std(dim=1) / 31, rtol=1e-3)
    floored = tg.sdclip_scales(w, 6, 12.85, clip_floor=1.0).float()
    assert torch.allclose(floored, torch.maximum(got, torch.tensor(1 / 31)), rtol=1e-3)
    quant = tg.Quantizer.from_hp(tiny_hp(clip_mode="sdclip", sdclip_k=3.0, sdclip_k_embed=5.0, quant_clip_floor=0, size_fit=0))
    assert torch.allclose(quant.quantize("blocks.0.mlp.fc.weight", w, 6)[1].float(), 3 * w.std(dim=1) / 31, rtol=1e-3)
    assert torch.allclose(quant.quantize("tok_emb.weight", w, 8)[1].float(), 5 * w.std(dim=1) / 127, rtol=1e-3)


def calibration_setup(dataset, world=1, rank=0):
    hp = tiny_hp(data_path=str(dataset), quantizer="gptq", mlp_kernel="torch", train_batch_tokens=512)
    torch.manual_seed(0)
    model = tg.GPT(hp, dtype=torch.float32)
    loader = tg.TrainLoader(tg.list_shards(hp.data_path, "train"), rank, world, 2 // world, hp.train_batch_tokens,
                            hp.train_seq_len, torch.device("cpu"), hp.vocab_size)
    return hp, model, loader


def test_hessians_cover_every_quantised_matrix_from_training_shards_only(dataset, monkeypatch):
    """One Hessian per matrix the export stores as integers that has an input (the block matrices and the tied
    head), each X^T X of that input (checked for the first MLP against its input captured by hand); only train
    shards are opened."""
    opened = []
    read_shard = tg.read_shard
    monkeypatch.setattr(tg, "read_shard", lambda path, *a: opened.append(path) or read_shard(path, *a))
    hp, model, loader = calibration_setup(dataset)
    quant = tg.QUANTIZERS["gptq"].from_hp(hp)
    hessians = tg.collect_hessians(model, loader, 3, quant, world=1)
    ints = {n for n, t in model.state_dict().items() if quant.kind(n, t) == "int"}
    assert ints <= set(hessians) and "tok_emb.weight" in hessians
    assert opened and all("_train_" in p for p in opened)

    _, model2, loader2 = calibration_setup(dataset)
    seen = []
    hook = model2.blocks[0].mlp.fc.register_forward_pre_hook(lambda _, args: seen.append(args[0].reshape(-1, args[0].size(-1))))
    with torch.no_grad():
        for _ in range(3):
            for x, _ in loader2.next_step():
                model2.hidden(x)
    hook.remove()
    x = torch.cat(seen)
    assert torch.allclose(hessians["blocks.0.mlp.fc.weight"], (x.T @ x).double(), rtol=1e-4, atol=1e-4)
    assert torch.equal(hessians["blocks.0.attn.c_q.weight"], hessians["blocks.0.attn.c_v.weight"])


def rank_hessians(dataset, world, rank):
    hp, model, loader = calibration_setup(dataset, world, rank)
    return tg.collect_hessians(model, loader, 2, tg.QUANTIZERS["gptq"].from_hp(hp), world)


def test_hessians_of_two_processes_sum_to_one_process(tmp_path, dataset):
    """Each rank reads its share of every global batch (one process: the same shares as two micro-batches); the
    summed Hessians equal one process's."""
    hp, model, loader = calibration_setup(dataset)
    one = tg.collect_hessians(model, loader, 2, tg.QUANTIZERS["gptq"].from_hp(hp), world=1)
    two = on_ranks(functools.partial(rank_hessians, dataset), 2, tmp_path)
    assert set(one) == set(two)
    for name in one:
        assert torch.allclose(one[name], two[name], rtol=1e-4, atol=1e-3), name


def test_gptq_run_stops_early_for_its_calibration_and_says_when_it_overran(tmp_path, dataset, tokenizer):
    """Training stops GPTQ_RESERVE_SECONDS before MAX_WALLCLOCK_SECONDS and the log adds the calibration's
    seconds to the training time; with no reserve the total overruns and the log says so."""
    from conftest import failure_tail, run_train
    from logs import parse_log
    common = dict(QUANTIZER="gptq", ITERATIONS=100000, MAX_WALLCLOCK_SECONDS=4, COMPRESSOR="zstd")
    r = run_train(tmp_path, dataset, tokenizer, GPTQ_RESERVE_SECONDS=2, **common)  # calibration takes ~0.8 s
    assert r.returncode == 0, failure_tail(r)
    log = parse_log(str(tmp_path / "logs" / "t.txt"))
    assert 2.0 <= log["train_s"] < 2.5
    line = next(x for x in r.stdout.splitlines() if x.startswith("gptq_calibration:"))
    assert "16 training batches" in line and "of MAX_WALLCLOCK_SECONDS=4" in line and "OVERRAN" not in line
    r = run_train(tmp_path, dataset, tokenizer, GPTQ_RESERVE_SECONDS=0, RUN_ID="u", **common)
    assert r.returncode == 0, failure_tail(r)
    assert "OVERRAN the budget" in next(x for x in r.stdout.splitlines() if x.startswith("gptq_calibration:"))


def test_entropy_bytes_is_the_order0_entropy():
    q = torch.tensor([-2, -1, 0, 1] * 250, dtype=torch.int8)
    assert tg.entropy_bytes(q) == pytest.approx(1000 * 2 / 8)
    assert tg.entropy_bytes(torch.zeros(100, dtype=torch.int8)) == 0


def test_allocation_promotes_the_largest_error_drop_per_byte_first():
    """Three matrices, one of them on inputs 100x larger: with room for one promotion that one gets it; with no
    room all stay at the lowest width, with unlimited room all reach the highest."""
    g = torch.Generator().manual_seed(0)
    state = {f"m{i}.weight": torch.randn(32, 48, generator=g) * 0.05 for i in range(3)}
    x = torch.randn(200, 48, generator=g)
    hessians = {n: x.T @ x * (100.0 if n == "m1.weight" else 1.0) for n in state}
    quant = tg.GPTQ(6, 8, (1.0,), 0.0, 0, hessians=hessians)

    def cost(n, b):  # entropy of the values (numpy's count) + fp16 scales
        import numpy as np
        q, s = quant.quantize(n, state[n], b)
        _, counts = np.unique(q.numpy(), return_counts=True)
        p = counts / counts.sum()
        return float(-(p * np.log2(p)).sum()) * q.numel() / 8 + 2 * s.numel()
    assert set(tg.allocate_bits(state, quant, (5, 6, 7), 0.0).values()) == {5}
    one = cost("m1.weight", 6) - cost("m1.weight", 5) + 0.5
    assert tg.allocate_bits(state, quant, (5, 6, 7), one) == {"m0.weight": 5, "m1.weight": 6, "m2.weight": 5}
    assert set(tg.allocate_bits(state, quant, (5, 6, 7), 1e12).values()) == {7}


def test_mixed_export_reaches_the_target_with_the_widths_it_logs(tmp_path):
    """fit_mixed_bits on the tiny model: with a target between the all-int5 and all-int7 sizes it writes an
    artifact of mixed widths near the target (the entropy estimate is within 2% of zstd's bytes), whose stored
    kinds are the widths it logged."""
    from test_export import trained_like_state
    hp = tiny_hp(quantizer="gptq", quant_bits="mixed", compressor="zstd", quant_clip_floor=0, size_fit=0)
    _, state = trained_like_state(hp)
    g, base = torch.Generator().manual_seed(1), tg.QUANTIZERS["gptq"].from_hp(hp)
    inputs = {n: torch.randn(300, t.size(1), generator=g) for n, t in state.items() if base.kind(n, t) == "int"}
    quant = tg.dataclasses.replace(base, hessians={n: x.T @ x for n, x in inputs.items()})
    sizes = {b: tg.write_artifact(str(tmp_path / f"all{b}"), state, hp, tg.dataclasses.replace(quant, bits=b)) for b in (5, 7)}
    target = (sizes[5] + sizes[7]) // 2
    lines = []
    q, nbytes = tg.fit_mixed_bits(str(tmp_path / "m"), state, tg.dataclasses.replace(hp, size_target=target), quant, 0,
                                  lines.append)
    assert sizes[5] < nbytes == (tmp_path / "m").stat().st_size <= target * 1.02
    assert len(set(q.bits_by_name.values())) > 1
    logged = dict(x.split(":") for x in lines[-1].removeprefix("mixed_bits_by_matrix: ").split())
    raw = tg.read_payload(str(tmp_path / "m"))
    header = tg.json.loads(raw[4:4 + int.from_bytes(raw[:4], "little")])
    stored = {name: kind for name, kind, *_ in header["tensors"] if name in logged}
    assert stored == {n: f"int{b}" for n, b in logged.items()} and set(logged) == set(quant.hessians)
