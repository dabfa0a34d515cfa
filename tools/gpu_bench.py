"""GPU checks and timings for the fast paths of train_gpt.py, at the record's shapes (one call, one table).

    python3 tools/gpu_bench.py [attention] [mlp] [orthogonalize] [ceilings]

attention: every implementation this machine can run (FA3, SDPA cuDNN/flash/efficient, native GQA or
K/V expanded) at B=48, T=2048, 8 heads / 4 KV heads, head dim 64: forward and backward medians, and the
relative error of the output and of dq, dk, dv against float64 math on two sequences.
mlp: the MLP with its backward d act -> d pre fused into a Triton matrix product (MLP_KERNEL=triton) against the
compiled torch MLP at M=98,304 tokens, 512 -> 1536 -> 512: relative error of the output and the three gradients
against float64 on the first 4,096 rows, forward / forward+backward medians, and the fused kernel alone at
every tile shape against cuBLAS + inductor.
orthogonalize: Newton-Schulz and Polar Express at 4 and 5 steps on the record's Muon banks (compiled, bf16):
time per optimizer step and the spread of the singular values they leave.
ceilings: device-to-device copy bandwidth and a large bf16 matrix product, to read the others against.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import sys

import torch

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")]
import train_gpt as tg  # noqa: E402
from cli import UsageError, run  # noqa: E402


def median_cuda_ms(fn, reps: int = 10, warmup: int = 3) -> float:
    """Median milliseconds of fn() over `reps` CUDA-event-timed calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def bench_attention(B=48, T=2048, H=8, KV=4, D=64):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    dev = torch.device("cuda")
    q = torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(B, T, KV, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    dout = torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16)
    ref_in = [t[:2].detach().double().requires_grad_() for t in (q, k, v)]
    with sdpa_kernel(SDPBackend.MATH):
        ref_out = tg.attention(*ref_in, "sdpa")
    ref_grads = torch.autograd.grad(ref_out, ref_in, dout[:2].double())
    flops = 4 * B * H * T * T * D / 2  # causal forward: QK^T and PV over half the square
    print(f"attention B={B} T={T} H={H} KV={KV} D={D}: forward {flops / 1e9:.0f} GFLOP, backward 2.5x")
    print(f"{'impl':24s} {'fwd ms':>8s} {'bwd ms':>8s} {'fwd+bwd':>8s} {'TFLOP/s':>8s} {'err out':>8s} {'err dq':>8s} {'err dk':>8s} {'err dv':>8s}")
    for label, fn, backend in attention_variants():
        try:
            with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                out = fn(q, k, v)
                grads = torch.autograd.grad(out, (q, k, v), dout)
                errs = [tg.relative_error(t[:2], r) for t, r in zip((out, *grads), (ref_out, *ref_grads))]
                fwd = median_cuda_ms(lambda: fn(q, k, v), reps=20)
                both = median_cuda_ms(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), dout), reps=20)
        except Exception as e:  # report and go on: one broken kernel must not hide the others
            print(f"{label:24s} failed: {type(e).__name__}: {str(e)[:150]}")
            continue
        print(f"{label:24s} {fwd:8.3f} {both - fwd:8.3f} {both:8.3f} {3.5 * flops / both / 1e9:8.0f} "
              + " ".join(f"{e:8.1e}" for e in errs))


def expanded_kv_attention(q, k, v):
    """SDPA with K/V repeated to the query heads (no native GQA): the variant train_gpt.py measured slower."""
    groups = q.size(2) // k.size(2)
    return tg.attention(q, k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2), "sdpa")


def attention_variants():
    """(label, attention function, SDPA backend or None) for FA3 and each SDPA kernel, native GQA or K/V expanded."""
    out = [("fa3", lambda q, k, v: tg.attention(q, k, v, "fa3"), None)]
    for kernel in ("cudnn", "flash", "efficient"):
        out.append((f"{kernel}/gqa", lambda q, k, v: tg.attention(q, k, v, "sdpa"), tg.sdpa_backend(kernel)))
        out.append((f"{kernel}/expanded", expanded_kv_attention, tg.sdpa_backend(kernel)))
    return out


def bench_mlp(M=48 * 2048, D=512, H=1536):
    dev, slope = torch.device("cuda"), 0.0  # relu^2, the default
    torch.manual_seed(0)
    x = torch.randn(M, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn(M, D, device=dev, dtype=torch.bfloat16)
    ref = tg.MLP(D, H, slope, "torch").to(dev)
    torch.nn.init.normal_(ref.proj.weight, std=H ** -0.5)
    ref64 = tg.MLP(D, H, slope, "torch").to(dev, torch.float64)
    ref64.load_state_dict(ref.state_dict())
    want = tg.mlp_output_and_grads(ref64, x[:4096], dout[:4096])
    print(f"mlp M={M} {D}->{H}->{D} slope={slope}: errors vs float64 on 4,096 rows (out, dx, dW_fc, dW_proj)")
    print(f"{'impl':8s} {'fwd ms':>8s} {'fwd+bwd':>8s} {'err out':>8s} {'err dx':>8s} {'err dWfc':>8s} {'err dWpr':>8s}")
    for impl in ("torch", "triton"):
        mlp = tg.MLP(D, H, slope, impl).to(dev)
        mlp.load_state_dict(ref.state_dict())
        fn = torch.compile(mlp, dynamic=False, fullgraph=True)
        step = lambda n=M: torch.autograd.grad(fn(x[:n]), (x, mlp.fc.weight, mlp.proj.weight), dout[:n])
        out, dx, dfc, dpr = fn(x[:4096]), *step(4096)
        errs = [tg.relative_error(t, r) for t, r in zip((out, dx[:4096], dfc, dpr), want)]
        fwd = median_cuda_ms(lambda: fn(x), reps=20)
        both = median_cuda_ms(step, reps=20)
        print(f"{impl:8s} {fwd:8.3f} {both:8.3f} " + " ".join(f"{e:8.1e}" for e in errs))
    w_proj = ref.proj.weight.bfloat16().detach()
    saved = x.detach() @ ref.fc.weight.bfloat16().t()  # pre, what the backward reads
    down = torch.compile(lambda d, w, pre: (d @ w) * 2 * torch.where(pre > 0, pre, pre * slope * slope))
    print(f"d pre alone, ms: cuBLAS + inductor {median_cuda_ms(lambda: down(dout, w_proj, saved), reps=20):.3f}")
    print(f"{'BM BN BK warps stages':22s} {'ms':>7s}")
    for tiles in itertools.product((64, 128, 256), (64, 128, 256), (32, 64, 128), (4, 8), (2, 3, 4)):
        bm, bn, bk, warps, stages = tiles
        smem = stages * (bm + bn) * bk * 2
        warps_ok = (4,) if bm * bn < 128 * 128 else (8,) if bm * bn > 128 * 128 else (4, 8)  # by accumulator size
        if smem > 200_000 or not 64 * 128 <= bm * bn <= 128 * 256 or warps not in warps_ok:
            continue
        try:
            ms = median_cuda_ms(lambda: tg.launch_squared_act_grad(dout, w_proj, saved, slope, tiles), reps=10)
        except Exception as e:  # out of shared memory or registers: say so and go on
            print(f"{str(tiles):22s} failed: {type(e).__name__}")
            continue
        print(f"{str(tiles):22s} {ms:7.3f}")


def bench_orthogonalize(L=11):
    dev = torch.device("cuda")
    banks = [(2 * L, 512, 512), (2 * L, 256, 512), (L, 1536, 512), (L, 512, 1536)]
    torch.manual_seed(0)
    grads = [torch.randn(s, device=dev) for s in banks]
    print(f"orthogonalize, banks {banks} (compiled, bf16)")
    print(f"{'method':16s} {'steps':>5s} {'ms/step':>8s} {'sv min':>7s} {'sv max':>7s}")
    for method, steps in (("newton_schulz", 5), ("polar_express", 4), ("polar_express", 5)):
        torch._dynamo.reset()  # 3 configs x 4 shapes would pass dynamo's recompile limit and fall back to eager
        fn = torch.compile(tg.orthogonalize, dynamic=False)
        ms = median_cuda_ms(lambda: [fn(g, steps, method) for g in grads], reps=20)
        sv = torch.linalg.svdvals(fn(grads[0], steps, method).float())
        print(f"{method:16s} {steps:5d} {ms:8.3f} {sv.min().item():7.3f} {sv.max().item():7.3f}")


def bench_ceilings():
    dev = torch.device("cuda")
    x = torch.randn(1 << 28, device=dev)
    y = torch.empty_like(x)
    ms = median_cuda_ms(lambda: y.copy_(x), reps=20)
    print(f"device copy: {2 * x.numel() * 4 / ms / 1e9:.0f} GB/s (read + write)")
    a, b = (torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16) for _ in range(2))
    ms = median_cuda_ms(lambda: a @ b, reps=20)
    print(f"bf16 matmul 8192^3: {2 * 8192 ** 3 / ms / 1e9:.0f} TFLOP/s")


BENCHES = {"attention": bench_attention, "mlp": bench_mlp, "orthogonalize": bench_orthogonalize, "ceilings": bench_ceilings}


def main(argv=None) -> int:
    todo = (sys.argv[1:] if argv is None else argv) or ["ceilings", "attention", "mlp", "orthogonalize"]
    unknown = [t for t in todo if t not in BENCHES]
    if unknown:
        raise UsageError(f"unknown bench {', '.join(unknown)} (choose from {', '.join(BENCHES)})")
    if not torch.cuda.is_available():
        raise UsageError("gpu_bench needs a CUDA GPU")
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}")
    for name in todo:
        BENCHES[name]()
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
