"""Quantisation, the artifact format and its errors."""
import json
import re

import brotli
import pytest
import torch
import torch._dynamo.testing
import zstandard

import train_gpt as tg
from conftest import failure_tail, run_train
from test_model import tiny_hp

PCTS = (0.999, 0.9995, 0.9999, 0.99999, 1.0)


@pytest.mark.parametrize("bits", [4, 5, 6, 8])
def test_quantise_error_bounds(bits):
    torch.manual_seed(bits)
    w = torch.randn(48, 300) * torch.rand(48, 1)
    q, scale = tg.quantize_rows(w, bits, (1.0,), clip_floor=0.0)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and scale.dtype == torch.float16 and int(q.abs().max()) <= qmax
    err = (tg.dequantize_rows(q, scale) - w).abs()
    assert torch.all(err <= scale.float()[:, None] / 2 + 1e-6)  # row max clip: nothing is clipped, error <= step/2
    assert torch.all(scale.float() >= w.abs().amax(1) / qmax * (1 - 1e-3))


def test_clip_search_returns_the_min_mse_candidate_per_row():
    torch.manual_seed(0)
    w = torch.randn(64, 512)
    w[::7, :3] *= 12  # outliers make clipping worth it on some rows
    q, scale = tg.quantize_rows(w, 6, PCTS, clip_floor=0.0)
    got = (tg.dequantize_rows(q, scale) - w).square().sum(1)
    for p in PCTS:
        clip = torch.quantile(w.abs(), p, dim=1)  # reference: torch's linear-interpolated percentile
        s = (clip / 31).half().float()
        cand = (torch.clamp(torch.round(w / s[:, None]), -31, 31) * s[:, None] - w).square().sum(1)
        assert torch.all(got <= cand * (1 + 1e-5) + 1e-9)
    single = [tg.quantize_rows(w, 6, (p,), 0.0) for p in PCTS]
    errs = torch.stack([(tg.dequantize_rows(*qs) - w).square().sum(1) for qs in single])
    assert torch.allclose(got, errs.min(0).values)


def test_clip_floor_gives_rows_one_absolute_step():
    w = torch.randn(8, 128) * 0.05
    _, scale = tg.quantize_rows(w, 6, PCTS, clip_floor=1.0)
    assert torch.all(scale.float() == torch.tensor(1 / 31).half().float())
    _, free = tg.quantize_rows(w, 6, PCTS, clip_floor=0.0)
    assert torch.all(free.float() < scale.float())


def trained_like_state(hp):
    torch.manual_seed(0)
    m = tg.GPT(hp, dtype=torch.float32)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return m, {k: v.detach().clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("codec", ["zstd", "brotli"])
def test_artifact_round_trip_gives_identical_logits(tmp_path, codec):
    hp = tiny_hp(compressor=codec)
    m, state = trained_like_state(hp)
    path = str(tmp_path / "a.ptz")
    tg.write_artifact(path, state, hp, tg.Quantizer.from_hp(hp))
    config, loaded = tg.unpack_state(tg.read_payload(path))
    assert config["num_layers"] == 2 and set(loaded) == set(state)
    # the reference: block matrices int6, embedding tables int8 (per-row search), control tensors fp32, rest fp16
    ref = {}
    for name, t in state.items():
        if t.numel() > hp.quant_min_numel and t.ndim == 2:
            ref[name] = tg.dequantize_rows(*tg.quantize_rows(t, 8 if "emb" in name else 6, hp.percentiles,
                                                               hp.quant_clip_floor))
        else:
            control = t.ndim < 2 or name.endswith(("resid_mix", "skip_weights", "lanes"))
            ref[name] = t.to(torch.float32 if control else torch.float16).float()
    ids = torch.randint(0, 320, (2, 32))
    a, b = tg.GPT(hp, dtype=torch.float32), tg.GPT(tg.Hyperparameters(**{**hp.__dict__, **config}), dtype=torch.float32)
    a.load_state_dict(ref)
    b.load_state_dict(loaded)
    assert torch.equal(a(ids, ids, per_token=True), b(ids, ids, per_token=True))
    assert not torch.equal(m(ids, ids, per_token=True), b(ids, ids, per_token=True))  # quantisation did happen
    assert loaded["blocks.0.attn_scale"].dtype == torch.float32 and torch.equal(loaded["blocks.0.attn_scale"], state["blocks.0.attn_scale"])


@pytest.mark.parametrize("codec", ["zstd", "brotli"])
def test_compression_runs_in_chunks_each_a_plain_stream(monkeypatch, codec):
    raw = bytes(torch.randint(0, 8, (10_000,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).tolist())
    monkeypatch.setattr(tg, "CODEC_CHUNK", 4096)
    blob, i, parts = tg.compress(raw, codec), 0, []
    while i < len(blob):  # the layout: u32 length, then a stream the codec's own library decodes alone
        n = int.from_bytes(blob[i:i + 4], "little")
        parts.append(zstandard.ZstdDecompressor().decompress(blob[i + 4:i + 4 + n]) if codec == "zstd"
                     else brotli.decompress(blob[i + 4:i + 4 + n]))
        i += 4 + n
    assert [len(p) for p in parts] == [4096, 4096, 1808] and b"".join(parts) == raw
    assert tg.decompress(blob, codec) == raw
    with pytest.raises(Exception):
        tg.decompress(blob[:-3], codec)


@pytest.mark.parametrize("stride", [2, 3, 4])
def test_byte_shuffle_groups_bytes_by_position_and_round_trips(tmp_path, stride):
    raw = bytes(range(10)) * 3 + b"xy"
    shuffled = tg.shuffle_bytes(raw, stride)
    n = len(raw) - len(raw) % stride
    assert shuffled[:n // stride] == raw[:n:stride] and shuffled[n:] == raw[n:]  # first every stride-th byte
    assert tg.shuffle_bytes(shuffled, stride, inverse=True) == raw and tg.shuffle_bytes(raw, 0) == raw
    hp = tiny_hp(compressor="zstd", byte_shuffle=stride)
    _, state = trained_like_state(hp)
    quant = tg.Quantizer.from_hp(hp)
    tg.write_artifact(str(tmp_path / "s"), state, hp, quant)
    tg.write_artifact(str(tmp_path / "p"), state, tiny_hp(compressor="zstd"), quant)
    assert (tmp_path / "s").read_bytes()[4] == 1 | stride << 4
    assert tg.read_payload(str(tmp_path / "s")) == tg.read_payload(str(tmp_path / "p"))
    assert (tmp_path / "s").read_bytes() != (tmp_path / "p").read_bytes()


def test_recompress_reports_each_codec_and_shuffle(tmp_path):
    import subprocess
    import sys
    hp = tiny_hp(compressor="zstd")
    tg.write_artifact(str(tmp_path / "a"), trained_like_state(hp)[1], hp, tg.Quantizer.from_hp(hp))

    def recompress(*args) -> str:
        r = subprocess.run([sys.executable, str(tg.Path(tg.__file__).parent / "tools" / "recompress.py"),
                            str(tmp_path / "a"), *args], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return r.stdout
    lines = recompress("zstd", "--shuffle", "0,2").splitlines()
    assert lines[0].startswith("raw payload:") and [x.split(":")[0] for x in lines[1:]] == ["zstd byte_shuffle 0", "zstd byte_shuffle 2"]
    assert int(lines[1].split()[3]) == (tmp_path / "a").stat().st_size
    out = recompress("zstd", "--tensors", "3", "--entropy")
    tensors, entropy = out.split("each compressed alone (with its scales), ")[1].split("integer values, bits per value")
    listed = tensors.splitlines()[1:]
    costs = [int(line.split(": ")[1].split()[0]) for line in listed]
    assert len(listed) == 3 and costs == sorted(costs, reverse=True) and "tok_emb.weight int8 320x64:" in out
    assert all("zeros" in line for line in listed if " int" in line) and not any(".scale " in x for x in listed)
    stored = tg.stored_tensors(tg.read_payload(str(tmp_path / "a")))[1]
    alone = lambda name: len(tg.compress(stored[name][1].tobytes(), "zstd"))
    emb = next(line for line in listed if "tok_emb.weight int8" in line)
    assert int(emb.split(": ")[1].split()[0]) == alone("tok_emb.weight") + alone("tok_emb.weight.scale")
    assert {line.split(":")[0].strip() for line in entropy.splitlines()[1:]} == {"int6", "int8"}
    rows = re.findall(r"clip_floor ([\d.]+): estimated ([\d,]+) \(.*\), zstd ([\d,]+)", recompress("zstd", "--estimate", "0.5,2"))
    (f1, est1, zstd1), (f2, est2, zstd2) = [(float(f), int(e.replace(",", "")), int(z.replace(",", ""))) for f, e, z in rows]
    assert (f1, f2) == (0.5, 2.0) and est2 < est1 and zstd2 < zstd1  # a higher floor: fewer bytes, estimated and written
    assert zstd1 == pytest.approx((tmp_path / "a").stat().st_size, rel=0.01)  # quantised again at its own floor
    bad = subprocess.run([sys.executable, str(tg.Path(tg.__file__).parent / "tools" / "recompress.py"), str(tmp_path / "a"),
                          "--estimate", "half"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--estimate takes comma-separated numbers" in bad.stderr


def test_order0_bits_counts_each_value_by_its_frequency():
    import recompress  # tools/ is on the path (conftest)
    assert abs(recompress.order0_bits(tg.np.array([0, 0, 0, 1], dtype=tg.np.int8)) - 3.2451) < 1e-4  # 4·H(3/4)
    assert recompress.order0_bits(tg.np.arange(8, dtype=tg.np.int8)) == 24.0 and recompress.order0_bits(tg.np.zeros(5)) == 0


def test_same_weights_give_the_same_bytes(tmp_path):
    hp = tiny_hp()
    _, state = trained_like_state(hp)
    quant = tg.Quantizer.from_hp(hp)
    tg.write_artifact(str(tmp_path / "a"), state, hp, quant)
    tg.write_artifact(str(tmp_path / "b"), {k: v.clone() for k, v in state.items()}, hp, quant)
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:len(b) // 2], "truncated or corrupt"),
    (lambda b: b"XXXX" + b[4:], "bad magic"),
    (lambda b: b[:5], "truncated or corrupt"),
    (lambda b: b"PGA1" + b[4:], "before chunked compression"),
])
def test_corrupt_artifacts_fail_clearly(tmp_path, damage, message):
    hp = tiny_hp(compressor="zstd")
    _, state = trained_like_state(hp)
    path = tmp_path / "a.ptz"
    tg.write_artifact(str(path), state, hp, tg.Quantizer.from_hp(hp))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(tg.ArtifactError, match=message):
        tg.unpack_state(tg.read_payload(str(path)))


def test_flipped_payload_byte_fails_the_checksum(tmp_path):
    hp = tiny_hp(compressor="zstd")
    _, state = trained_like_state(hp)
    raw = bytearray(tg.pack_state(state, hp, tg.Quantizer.from_hp(hp)))
    raw[-100] ^= 0xFF
    with pytest.raises(tg.ArtifactError, match="checksum"):
        tg.unpack_state(bytes(raw))


def test_size_fit_raises_the_floor_until_it_fits(tmp_path):
    hp = tiny_hp()
    _, state = trained_like_state(hp)
    path = str(tmp_path / "a.ptz")
    first = tg.write_artifact(path, state, hp, tg.Quantizer.from_hp(hp))
    lines = []
    limited = tg.Hyperparameters(**{**hp.__dict__, "size_limit": first - 2000})
    n = tg.export_artifact(path, state, limited, 0, lines.append)
    assert n <= first - 2000 and any("size_fit" in line for line in lines)
    floors = [float(line.split("clip_floor:")[1].split()[0]) for line in lines if line.startswith("artifact:")]
    assert floors[0] == hp.quant_clip_floor and all(b == pytest.approx(a * 1.1, rel=1e-3) for a, b in zip(floors, floors[1:]))


def test_estimated_bytes_track_the_compressed_artifact(tmp_path):
    """QAT_SIZE_FIT's estimate (entropy of the values, fp16 scales, the rest at its width) against brotli's bytes:
    within 5% at floors from none to one that coarsens most rows, and falling as the floor rises."""
    hp = tiny_hp()
    _, state = trained_like_state(hp)
    estimates = []
    for floor in (0.0, 0.5, 1.0, 2.0):
        quant = tg.dataclasses.replace(tg.Quantizer.from_hp(hp), clip_floor=floor)
        estimates.append(tg.estimated_bytes(state, quant))
        assert tg.write_artifact(str(tmp_path / "a.ptz"), state, hp, quant) == pytest.approx(estimates[-1], rel=0.05)
    assert estimates == sorted(estimates, reverse=True) and estimates[-1] < 0.8 * estimates[0]


def test_qat_size_fit_lands_on_the_lowest_floor_that_fits():
    """From floor 0.5 the 10% steps pass 0.732 (over a budget that floor 0.76 meets) and reach 0.805; the bisection
    of that step must come down to within 0.7% of 0.76, and the floor it keeps must fit."""
    hp = tiny_hp()
    m, state = trained_like_state(hp)
    quant = tg.dataclasses.replace(tg.Quantizer.from_hp(hp), clip_floor=torch.full((), 0.5))
    estimate = lambda f: tg.estimated_bytes(state, tg.dataclasses.replace(quant, clip_floor=f))
    budget, lines = estimate(0.76), []
    assert estimate(0.5 * 1.1 ** 3) > budget
    tg.fit_qat_floor(m, [p.detach() for p in m.parameters()], quant, budget, 1, lines.append)
    floor = quant.clip_floor.item()
    assert 0.5 * 1.1 ** 3 < floor <= 0.76 * 1.007 and estimate(floor) <= budget
    assert lines[0].startswith(f"qat_size_fit: clip_floor {floor:.4f}, estimated ")


def test_a_device_floor_moves_the_compiled_qat_forward_without_a_recompile():
    """QAT_SIZE_FIT fills the clip floor in place after the warm-up compiled the QAT graph: the graph must read
    it (not bake in its value), or training would go on with the old grid, or stop to recompile."""
    torch.manual_seed(0)
    layer = tg.CastedLinear(96, 96)
    floor = torch.full((), 0.01)
    layer.qat = tg.dataclasses.replace(tg.Quantizer.from_hp(tiny_hp()), clip_floor=floor)
    torch._dynamo.reset()
    counts = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(layer, backend=counts, fullgraph=True)
    x = torch.randn(4, 96)
    before = compiled(x)
    floor.fill_(1.0)  # most rows now below the floor: a coarser grid
    after = compiled(x)
    assert counts.frame_count == 1 and not torch.allclose(before, after)
    assert torch.equal(after, layer(x))  # the eager forward at the new floor


def test_qat_size_fit_trains_on_the_floor_the_export_writes(tmp_path, dataset, tokenizer):
    """The defaults with a SIZE_LIMIT under the tiny model's size at floor 0.5 (SIZE_TARGET's default is above it, so
    the limit is the budget): at late QAT's start the floor rises until the estimate fits, QAT trains on it and the
    export starts from it."""
    r = run_train(tmp_path, dataset, tokenizer, ITERATIONS=30, LATE_QAT_THRESHOLD=0.5, SIZE_LIMIT=80_000)
    assert r.returncode == 0, failure_tail(r)
    fit = re.search(r"qat_size_fit: clip_floor ([\d.]+), estimated ([\d,]+) bytes for ([\d,]+) in", r.stdout)
    floor, estimate, budget = float(fit[1]), int(fit[2].replace(",", "")), int(fit[3].replace(",", ""))
    assert floor > 0.5 and estimate <= budget < 80_000  # the budget is SIZE_LIMIT less the code
    assert r.stdout.index("qat_size_fit:") < r.stdout.index("late_qat:on")
    exported = re.search(r"artifact:\S+ \d+ bytes \(brotli\) clip_floor:([\d.]+)", r.stdout)
    assert float(exported[1]) == pytest.approx(floor, abs=1e-4)
    assert int(re.search(r"Total submission size int6\+brotli: (\d+)", r.stdout)[1]) <= 80_000


@pytest.mark.parametrize("settings", [dict(SIZE_FIT=0, ALLOW_OVERSIZE=1),
                                      dict(QUANTIZER="gptq", QUANT_BITS="mixed", SIZE_TARGET=75_000)])
def test_qat_size_fit_stays_out_without_the_size_fit_and_with_mixed_bits(tmp_path, dataset, tokenizer, settings):
    """SIZE_FIT=0 asks for no fitting at all, and mixed bits spend on promotions the bytes a raised floor would save:
    late QAT starts on QUANT_CLIP_FLOOR as it is, under the same SIZE_LIMIT as above."""
    r = run_train(tmp_path, dataset, tokenizer, ITERATIONS=30, LATE_QAT_THRESHOLD=0.5, SIZE_LIMIT=80_000, **settings)
    assert r.returncode == 0, failure_tail(r)
    assert "late_qat:on" in r.stdout and "qat_size_fit:" not in r.stdout


def rewrite_header(raw: bytes, edit) -> bytes:
    hlen = int.from_bytes(raw[:4], "little")
    header = json.loads(raw[4:4 + hlen])
    edit(header)
    new = json.dumps(header).encode()
    return len(new).to_bytes(4, "little") + new + raw[4 + hlen:]


@pytest.mark.parametrize("edit, message", [
    (lambda h: h.pop("tensors"), "header unreadable"),
    (lambda h: h["tensors"][0].__setitem__(3, [999, 999]), "does not match its payload"),
    (lambda h: h["tensors"][0].__setitem__(2, "float1024"), "does not match its payload"),
])
def test_a_header_that_lies_fails_clearly(edit, message):
    hp = tiny_hp()
    _, state = trained_like_state(hp)
    raw = rewrite_header(tg.pack_state(state, hp, tg.Quantizer.from_hp(hp)), edit)
    with pytest.raises(tg.ArtifactError, match=message):
        tg.unpack_state(raw)


@pytest.mark.parametrize("edit, message", [(lambda h: h["config"].pop("num_layers"), "lacks num_layers"),
                                           (lambda h: h["config"].update(num_heads=3), "MODEL_DIM=64 must be a multiple")])
def test_scoring_needs_a_usable_model_config_in_the_artifact(tmp_path, edit, message):
    hp = tiny_hp(compressor="zstd")
    _, state = trained_like_state(hp)
    raw = rewrite_header(tg.pack_state(state, hp, tg.Quantizer.from_hp(hp)), edit)
    path = tmp_path / "a.ptz"
    path.write_bytes(tg.ARTIFACT_MAGIC + bytes([tg.CODECS["zstd"]]) + tg.compress(raw, "zstd"))
    with pytest.raises(tg.ArtifactError, match=message):
        tg.with_artifact_config(hp, str(path))
