"""Parameter Golf: the 11-layer record stack in one file (train, export, score).

    SEED=1337 torchrun --standalone --nproc_per_node=8 train_gpt.py

Every setting is an env var named after a Hyperparameters field (upper case). Sections in data-flow order:
config, data, model, optimizer, quantization/export, evaluation, main.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# ----------------------------------------------------------------------------------------------------------- config


@dataclasses.dataclass
class Hyperparameters:
    # data and run
    data_path: str = "./data/datasets/fineweb10B_sp1024"
    tokenizer_path: str = "./data/tokenizers/fineweb_1024_bpe.model"
    run_id: str = ""  # "" -> run_<timestamp>_<pid of rank 0>
    seed: int = 1337
    vocab_size: int = 1024
    # schedule; every phase is a fraction of the run (wallclock or ITERATIONS, whichever ends first)
    iterations: int = 20000
    max_wallclock_seconds: float = 600.0  # 0 = no time cap
    warmup_steps: int = 20  # compile warm-up steps; model and optimizer state are restored after them
    warmdown_frac: float = 0.49  # the record's 3,500 of ~7,100 steps
    train_batch_tokens: int = 786_432
    train_seq_len: int = 2048
    grad_accum_steps: int = 0  # 0 -> 8 // world_size
    train_log_every: int = 100
    val_loss_every: int = 0  # 0 = only the final evaluation
    # evaluation
    eval_seq_len: int = 2048
    eval_stride: int = 64
    val_batch_size: int = 524_288  # tokens per evaluation batch, all ranks together
    eval_artifact: str = ""  # score this artifact and exit (no training data is read)
    # model
    num_layers: int = 11
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 3.0
    leaky_relu_slope: float = 0.0  # 0 = relu^2
    rope_dims: int = 16
    rope_base: float = 10000.0
    qk_gain_init: float = 1.5
    ln_scale: bool = True
    xsa_last_n: int = 4
    ve_dim: int = 128
    ve_last_n: int = 2  # 0 disables the value embedding
    smear_gate: bool = True
    bigram_vocab_size: int = 2048  # 0 disables BigramHash
    bigram_dim: int = 128
    logit_softcap: float = 30.0
    tied_embed_init_std: float = 0.005
    attn_backend: str = "auto"  # auto | fa3 | flash | cudnn | efficient | math
    torch_compile: bool = True
    # optimizer
    matrix_lr: float = 0.025
    tied_embed_lr: float = 0.035
    scalar_lr: float = 0.025
    muon_momentum: float = 0.99
    muon_momentum_warmup_start: float = 0.92
    muon_momentum_warmup_frac: float = 0.21
    muon_backend_steps: int = 5
    muon_wd: float = 0.04
    adam_wd: float = 0.04
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip_norm: float = 0.3
    # weight averaging and late QAT
    ema_frac: float = 0.047  # EMA time constant as a fraction of the run (0.997 at ~7,100 steps); 0 = off
    swa_enabled: bool = False
    swa_start_scale: float = 0.2  # SWA snapshots once the LR scale is below this
    swa_every_frac: float = 0.007  # one snapshot per this fraction of the run (50 of ~7,100 steps)
    late_qat_threshold: float = 0.15  # fake-quantise block matrices once the LR scale is below this; 0 = off
    # export
    quant_bits: int = 6
    quant_min_numel: int = 65_536  # tensors with at most this many elements pass through as fp16/fp32
    quant_clip_floor: float = 1.0  # row clips never go below this (the record's scale >= 1/31): bounds the size
    size_fit: bool = True  # if the artifact is over SIZE_LIMIT, raise the clip floor by 10% until it fits
    embed_quant_bits: int = 8
    clip_percentiles: str = "0.999,0.9995,0.9999,0.99999,1.0"
    compressor: str = "brotli"  # brotli (quality 11) | zstd (level 22): brotli is ~7% smaller on the proxy
    artifact_path: str = ""  # "" -> logs/<RUN_ID>.int6.ptz
    size_limit: int = 16_000_000
    allow_oversize: bool = False

    @classmethod
    def from_env(cls, env=os.environ) -> "Hyperparameters":
        kw = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f.name.upper())
            if raw is None:
                continue
            kind = type(f.default)
            try:
                kw[f.name] = (raw.strip().lower() in ("1", "true", "yes", "on")) if kind is bool else kind(raw)
            except ValueError:
                raise ConfigError(f"{f.name.upper()}={raw!r} is not a valid {kind.__name__}") from None
        hp = cls(**kw)
        if not hp.run_id:
            hp.run_id = time.strftime("run_%Y%m%d_%H%M%S") + f"_{os.getpid()}"
        return hp

    @property
    def percentiles(self) -> tuple[float, ...]:
        return tuple(float(p) for p in self.clip_percentiles.split(","))


class ConfigError(ValueError):
    pass


class DataError(RuntimeError):
    pass


class ArtifactError(RuntimeError):
    pass


class TrainingError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------------------- data
SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
HEADER_BYTES = 4 * HEADER_INTS
DOWNLOAD_HINT = "download them with: python3 data/cached_challenge_fineweb.py --variant sp1024 --train-shards 80"


def read_shard(path: str) -> np.ndarray:
    """Read one challenge shard: 256 little-endian int32 header (magic, version, count), then uint16 tokens."""
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise DataError(f"{path}: {size} bytes, shorter than the {HEADER_BYTES}-byte shard header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise DataError(f"{path}: bad magic {header[0]} (expected {SHARD_MAGIC}): not a challenge shard")
    if header[1] != SHARD_VERSION:
        raise DataError(f"{path}: unsupported shard version {header[1]} (expected {SHARD_VERSION})")
    count = int(header[2])
    if size != HEADER_BYTES + 2 * count:
        raise DataError(f"{path}: {size} bytes, but the header says {count} tokens "
                        f"({HEADER_BYTES + 2 * count} bytes): truncated or corrupt")
    return np.fromfile(path, dtype="<u2", count=count, offset=HEADER_BYTES)


def list_shards(data_path: str, split: str) -> list[str]:
    pattern = os.path.join(data_path, f"fineweb_{split}_*.bin")
    files = sorted(glob.glob(pattern))
    if not files:
        raise DataError(f"no {split} shards match {pattern}; set DATA_PATH or {DOWNLOAD_HINT}")
    return files


class TokenStream:
    """Tokens of the shards in order, cycling forever."""

    def __init__(self, files: list[str]):
        self.files, self.file_idx, self.pos = files, 0, 0
        self.tokens = read_shard(files[0])

    def take(self, n: int) -> np.ndarray:
        parts = []
        while n > 0:
            if self.pos >= len(self.tokens):
                self.file_idx = (self.file_idx + 1) % len(self.files)
                self.tokens, self.pos = read_shard(self.files[self.file_idx]), 0
            k = min(n, len(self.tokens) - self.pos)
            parts.append(self.tokens[self.pos:self.pos + k])
            self.pos, n = self.pos + k, n - k
        return np.concatenate(parts)


class TrainLoader:
    """Each step reads one global batch; rank r, micro-step m gets slice m * world + r (disjoint, covering)."""

    def __init__(self, files, rank, world, accum, batch_tokens, seq_len, device):
        self.stream, self.rank, self.world, self.accum = TokenStream(files), rank, world, accum
        self.seq_len, self.device = seq_len, device
        self.local_tokens = batch_tokens // (world * accum)

    def next_step(self) -> list[tuple[Tensor, Tensor]]:
        span = self.local_tokens + 1
        chunk = self.stream.take(span * self.world * self.accum)
        out = []
        for m in range(self.accum):
            i = m * self.world + self.rank
            buf = torch.from_numpy(chunk[i * span:(i + 1) * span].astype(np.int64))
            if self.device.type == "cuda":
                buf = buf.pin_memory().to(self.device, non_blocking=True)
            out.append((buf[:-1].view(-1, self.seq_len), buf[1:].view(-1, self.seq_len)))
        return out


def load_val_tokens(data_path: str, min_len: int) -> np.ndarray:
    tokens = np.concatenate([read_shard(f) for f in list_shards(data_path, "val")])
    if len(tokens) < min_len + 1:
        raise DataError(f"validation split has {len(tokens)} tokens, fewer than one sequence ({min_len} + 1)")
    return tokens


def load_tokenizer(path: str, vocab_size: int):
    import sentencepiece as spm
    if not os.path.isfile(path):
        raise DataError(f"tokenizer {path} not found; set TOKENIZER_PATH or {DOWNLOAD_HINT}")
    sp = spm.SentencePieceProcessor(model_file=path)
    if sp.vocab_size() != vocab_size:
        raise DataError(f"tokenizer {path} has vocab {sp.vocab_size()}, but VOCAB_SIZE={vocab_size}")
    return sp


def build_byte_tables(sp) -> tuple[Tensor, Tensor, Tensor]:
    """Per token: UTF-8 bytes of its piece without the leading-space marker, whether it has that marker,
    and whether it is a boundary (control/unknown/unused: no bytes, and no space after it is counted)."""
    n = sp.vocab_size()
    base, space, boundary = torch.zeros(n, dtype=torch.int32), torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)
    for t in range(n):
        if sp.is_control(t) or sp.is_unknown(t) or sp.is_unused(t):
            continue
        boundary[t] = False
        if sp.is_byte(t):
            base[t] = 1
            continue
        piece = sp.id_to_piece(t)
        if piece.startswith("\u2581"):
            space[t], piece = True, piece[1:]
        base[t] = len(piece.encode("utf-8"))
    return base, space, boundary


def count_bytes(prev: Tensor, target: Tensor, tables) -> Tensor:
    base, space, boundary = tables
    return base[target] + (space[target] & ~boundary[prev]).int()


# ------------------------------------------------------------------------------------------------------------ model
def fake_quantize(w: Tensor, bits: int, percentiles: tuple[float, ...], clip_floor: float) -> Tensor:
    q, scale = quantize_rows(w, bits, percentiles, clip_floor)
    return dequantize_rows(q, scale).to(w.dtype)


class CastedLinear(nn.Linear):
    """fp32 master weight used in the activation dtype; `qat` = (bits, percentiles, floor) turns on straight-through
    fake quantisation with the export quantiser. It is an instance attribute, so torch.compile guards on it."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        self.zero_init = zero_init
        self.qat: tuple | None = None

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if self.qat is not None:
            w = w + (fake_quantize(w, *self.qat) - w).detach()
        return F.linear(x, w.to(x.dtype))


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def apply_partial_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first 2 * cos.size(-1) dims of each head; x is (B, T, H, D), cos/sin are (T, R/2)."""
    r = cos.size(-1)
    x1, x2, rest = x[..., :r], x[..., r:2 * r], x[..., 2 * r:]
    cos, sin = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest), dim=-1)


def remove_self_value(y: Tensor, v: Tensor) -> Tensor:
    """XSA: remove from each head's output its component along the token's own normalised value vector.
    y is (B, T, H, D), v is (B, T, Hkv, D); query head h reads kv head h // (H // Hkv), as in GQA."""
    B, T, H, D = y.shape
    yg = y.view(B, T, v.size(2), H // v.size(2), D)
    vn = F.normalize(v, dim=-1).unsqueeze(3)
    return (yg - (yg * vn).sum(-1, keepdim=True) * vn).view(B, T, H, D)


def attention(q: Tensor, k: Tensor, v: Tensor, impl: str) -> Tensor:
    """Causal attention on (B, T, H, D) tensors with GQA; returns (B, T, H, D)."""
    if impl == "fa3":
        from flash_attn_interface import flash_attn_func
        out = flash_attn_func(q, k, v, causal=True)
        return out[0] if isinstance(out, tuple) else out
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    groups = q.size(1) // k.size(1)
    if impl == "sdpa_expand" and groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=groups > 1 and impl != "sdpa_expand")
    return y.transpose(1, 2)


class CausalSelfAttention(nn.Module):
    def __init__(self, hp: Hyperparameters, xsa: bool, attn_impl: str):
        super().__init__()
        dim, self.heads, self.kv_heads = hp.model_dim, hp.num_heads, hp.num_kv_heads
        self.head_dim = dim // hp.num_heads
        self.c_q = CastedLinear(dim, dim)
        self.c_k = CastedLinear(dim, self.kv_heads * self.head_dim)
        self.c_v = CastedLinear(dim, self.kv_heads * self.head_dim)
        self.proj = CastedLinear(dim, dim, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((self.heads,), hp.qk_gain_init))
        inv_freq = 1.0 / hp.rope_base ** (torch.arange(0, hp.rope_dims, 2, dtype=torch.float32) / hp.rope_dims)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.xsa, self.attn_impl = xsa, attn_impl

    def forward(self, x: Tensor, ve: Tensor | None) -> Tensor:
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.heads, self.head_dim)
        k = self.c_k(x).view(B, T, self.kv_heads, self.head_dim)
        v = self.c_v(x).view(B, T, self.kv_heads, self.head_dim)
        if ve is not None:
            v = v + ve.view(B, T, self.kv_heads, self.head_dim)
        q = rms_norm(q) * self.q_gain.to(q.dtype)[:, None]
        k = rms_norm(k)
        freqs = torch.outer(torch.arange(T, device=x.device, dtype=torch.float32), self.inv_freq)
        q, k = apply_partial_rope(q, freqs.cos(), freqs.sin()), apply_partial_rope(k, freqs.cos(), freqs.sin())
        y = attention(q, k, v, self.attn_impl)
        if self.xsa:
            y = remove_self_value(y, v)
        return self.proj(y.reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, slope: float):
        super().__init__()
        self.fc, self.proj, self.slope = CastedLinear(dim, hidden), CastedLinear(hidden, dim, zero_init=True), slope

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        h = F.leaky_relu(h, self.slope) if self.slope else F.relu(h)
        return self.proj(h.square())


class Block(nn.Module):
    def __init__(self, hp: Hyperparameters, layer: int, attn_impl: str):
        super().__init__()
        dim = hp.model_dim
        self.attn = CausalSelfAttention(hp, xsa=layer >= hp.num_layers - hp.xsa_last_n, attn_impl=attn_impl)
        self.mlp = MLP(dim, int(hp.mlp_mult * dim), hp.leaky_relu_slope)
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))
        self.ln_scale = 1.0 / math.sqrt(layer + 1) if hp.ln_scale else 1.0

    def forward(self, x: Tensor, x0: Tensor, ve: Tensor | None) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(rms_norm(x) * self.ln_scale, ve)
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x) * self.ln_scale)


class SmearGate(nn.Module):
    """x_t <- (1 - g) * x_t + g * x_{t-1}, with a learned per-dimension gate g = sigmoid(w)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        g = torch.sigmoid(self.gate).to(x.dtype)
        return x + g * (F.pad(x[:, :-1], (0, 0, 1, 0)) - x)


class BigramHash(nn.Module):
    """Embedding of a hash of (previous, current) token, projected to the model dim; zero-initialised table."""

    def __init__(self, buckets: int, dim: int, model_dim: int):
        super().__init__()
        self.buckets = buckets
        self.embed = nn.Embedding(buckets, dim)
        nn.init.zeros_(self.embed.weight)
        self.proj = CastedLinear(dim, model_dim)
        self.scale = nn.Parameter(torch.tensor(0.05))

    def forward(self, ids: Tensor, dtype: torch.dtype) -> Tensor:
        h = (ids[:, :-1] * 92821 + ids[:, 1:]) % (self.buckets - 1)
        h = F.pad(h, (1, 0), value=self.buckets - 1)  # the first position has no previous token
        return self.proj(self.embed(h).to(dtype)) * self.scale.to(dtype)


class ValueEmbedding(nn.Module):
    """A token embedding shared by the last layers, projected to the KV width and added to V."""

    def __init__(self, vocab: int, dim: int, kv_dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        nn.init.normal_(self.embed.weight, std=0.01)
        self.proj = CastedLinear(dim, kv_dim)
        self.scale = nn.Parameter(torch.tensor(0.1))

    def forward(self, ids: Tensor, dtype: torch.dtype) -> Tensor:
        return self.proj(self.embed(ids).to(dtype)) * self.scale.to(dtype)


class GPT(nn.Module):
    def __init__(self, hp: Hyperparameters, attn_impl: str = "sdpa", dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        L, dim = hp.num_layers, hp.model_dim
        if dim % hp.num_heads or hp.num_heads % hp.num_kv_heads or hp.rope_dims > dim // hp.num_heads:
            raise ConfigError("need MODEL_DIM % NUM_HEADS == 0, NUM_HEADS % NUM_KV_HEADS == 0, ROPE_DIMS <= head dim")
        self.dtype, self.softcap = dtype, hp.logit_softcap
        self.tok_emb = nn.Embedding(hp.vocab_size, dim)
        nn.init.normal_(self.tok_emb.weight, std=hp.tied_embed_init_std)
        self.bigram = BigramHash(hp.bigram_vocab_size, hp.bigram_dim, dim) if hp.bigram_vocab_size else None
        self.smear = SmearGate(dim) if hp.smear_gate else None
        n_ve = min(hp.ve_last_n, L)
        self.ve_first = L - n_ve
        self.ve = ValueEmbedding(hp.vocab_size, hp.ve_dim, hp.num_kv_heads * dim // hp.num_heads) if n_ve else None
        self.ve_layer_scales = nn.Parameter(torch.ones(n_ve)) if n_ve else None
        self.blocks = nn.ModuleList(Block(hp, i, attn_impl) for i in range(L))
        self.n_enc = L // 2
        self.skip_weights = nn.Parameter(torch.ones(min(self.n_enc, L - self.n_enc), dim))
        for m in self.modules():
            if isinstance(m, CastedLinear):
                nn.init.zeros_(m.weight) if m.zero_init else nn.init.orthogonal_(m.weight)

    def hidden(self, ids: Tensor) -> Tensor:
        x = self.tok_emb(ids).to(self.dtype)
        if self.bigram is not None:
            x = x + self.bigram(ids, self.dtype)
        x = rms_norm(x)
        if self.smear is not None:
            x = self.smear(x)
        x0, skips = x, []
        ve = self.ve(ids, self.dtype) if self.ve is not None else None
        for i, block in enumerate(self.blocks):
            j = i - self.n_enc
            if 0 <= j < len(self.skip_weights):
                x = x + self.skip_weights[j].to(x.dtype) * skips.pop()
            ve_i = ve * self.ve_layer_scales[i - self.ve_first].to(x.dtype) if ve is not None and i >= self.ve_first else None
            x = block(x, x0, ve_i)
            if i < self.n_enc:
                skips.append(x)
        return rms_norm(x)

    def forward(self, ids: Tensor, targets: Tensor, per_token: bool = False) -> Tensor:
        logits = F.linear(self.hidden(ids), self.tok_emb.weight.to(self.dtype)).float()
        logits = self.softcap * torch.tanh(logits / self.softcap)
        losses = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction="none" if per_token else "mean")
        return losses.view(targets.shape) if per_token else losses


def quantized_linears(model: GPT, min_numel: int) -> list[CastedLinear]:
    """The block matrices that the export stores as int6: the layers that late QAT fake-quantises."""
    return [m for n, m in model.named_modules() if isinstance(m, CastedLinear)
            and export_kind(n + ".weight", m.weight, min_numel) == "int"]


# -------------------------------------------------------------------------------------------------------- optimizer
def newton_schulz(G: Tensor, steps: int) -> Tensor:
    """Approximate the orthogonal polar factor of each matrix in a (N, m, n) batch (quintic Newton-Schulz)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16()
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, then each update orthogonalised by Newton-Schulz; same-shape matrices are batched and
    split across ranks, which all-gather the results. Decoupled weight decay. Gradients arrive averaged."""

    def __init__(self, params, lr, momentum, ns_steps, wd, rank=0, world=1, compile_ns=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, wd=wd))
        self.ns_steps, self.rank, self.world = ns_steps, rank, world
        self.orthogonalize = torch.compile(newton_schulz, dynamic=False) if compile_ns else newton_schulz

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, mom, wd = group["lr"], group["momentum"], group["wd"]
            by_shape: dict[tuple, list[Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(tuple(p.shape), []).append(p)
            for shape, params in by_shape.items():
                grads = [p.grad for p in params]
                for p in params:
                    if "momentum_buffer" not in self.state[p]:
                        self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                bufs = [self.state[p]["momentum_buffer"] for p in params]
                torch._foreach_mul_(bufs, mom)
                torch._foreach_add_(bufs, grads)
                updates = torch._foreach_add(grads, bufs, alpha=mom)
                per_rank = -(-len(params) // self.world)
                mine = updates[self.rank * per_rank:(self.rank + 1) * per_rank]
                G = torch.zeros((per_rank, *shape), device=params[0].device, dtype=torch.float32)
                if mine:
                    G[:len(mine)] = torch.stack(mine)
                O = self.orthogonalize(G, self.ns_steps).float() * max(1.0, shape[0] / shape[1]) ** 0.5
                if self.world > 1:
                    gathered = torch.empty((self.world * per_rank, *shape), device=O.device, dtype=O.dtype)
                    dist.all_gather_into_tensor(gathered, O.contiguous())
                    O = gathered
                if wd:
                    torch._foreach_mul_(params, 1.0 - lr * wd)
                torch._foreach_add_(params, list(O[:len(params)].unbind(0)), alpha=-lr)


def build_optimizers(model: GPT, hp: Hyperparameters, rank: int, world: int, compile_ns: bool):
    """Muon for 2-D matrices, AdamW for embedding tables (embed LR) and for scalars/gates/vectors (scalar LR)."""
    matrices = [m.weight for m in model.modules() if isinstance(m, CastedLinear)]
    tables = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    taken = {id(p) for p in matrices + tables}
    scalars = [p for p in model.parameters() if id(p) not in taken]
    adam = dict(betas=(hp.beta1, hp.beta2), eps=hp.adam_eps, weight_decay=hp.adam_wd)
    if next(model.parameters()).is_cuda:
        adam["fused"] = True
    opts = [
        Muon(matrices, hp.matrix_lr, hp.muon_momentum, hp.muon_backend_steps, hp.muon_wd, rank, world, compile_ns),
        torch.optim.AdamW([{"params": tables, "lr": hp.tied_embed_lr}, {"params": scalars, "lr": hp.scalar_lr}], **adam),
    ]
    for opt in opts:
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
    return opts


def lr_scale(progress: float, warmdown_frac: float) -> float:
    """1 until the warmdown, then linear to 0 at the end of the run."""
    if warmdown_frac <= 0:
        return 1.0
    return max(0.0, min(1.0, (1.0 - progress) / warmdown_frac))


def muon_momentum(progress: float, hp: Hyperparameters) -> float:
    t = min(1.0, progress / hp.muon_momentum_warmup_frac) if hp.muon_momentum_warmup_frac > 0 else 1.0
    return hp.muon_momentum_warmup_start + t * (hp.muon_momentum - hp.muon_momentum_warmup_start)


def ema_decay(progress_step: float, ema_frac: float) -> float:
    """Per-step decay for an EMA whose time constant is `ema_frac` of the run (0.997 for the record's run)."""
    return math.exp(-progress_step / ema_frac)


# ---------------------------------------------------------------------------------------------- quantization/export
def export_kind(name: str, t: Tensor, min_numel: int) -> str:
    """int: large matrices (attention, MLP); int_embed: large embedding tables; fp32: control tensors (scales,
    gates, mixes, q gains, skip weights); fp16: the other small tensors."""
    if t.ndim == 2 and t.numel() > min_numel:
        return "int_embed" if name.endswith("emb.weight") or name.endswith("embed.weight") else "int"
    return "fp32" if t.ndim < 2 or name.endswith(("resid_mix", "skip_weights")) else "fp16"


def quantize_rows(w: Tensor, bits: int, percentiles: tuple[float, ...], clip_floor: float) -> tuple[Tensor, Tensor]:
    """Symmetric per-row quantisation to [-(2^(b-1)-1), 2^(b-1)-1] with an fp16 scale. For each row the clip is
    the percentile of |w| (linear interpolation) among `percentiles` that gives the least squared error, but never
    below `clip_floor`: rows smaller than the floor share one absolute step, which is what bounds the size."""
    qmax = 2 ** (bits - 1) - 1
    w = w.float()
    n = w.size(1)
    first = math.floor(min(percentiles) * (n - 1))  # every candidate lies in the top n - first values
    top = w.abs().topk(n - first, dim=1).values.flip(1)
    best_q = best_scale = best_err = None
    for p in percentiles:
        pos = p * (n - 1) - first
        lo = min(int(pos), top.size(1) - 1)
        hi = min(lo + 1, top.size(1) - 1)
        clip = (top[:, lo] + (pos - lo) * (top[:, hi] - top[:, lo])).clamp_min(clip_floor)
        scale = (clip / qmax).clamp_min(2 ** -24).half().float()
        q = torch.clamp(torch.round(w / scale[:, None]), -qmax, qmax)
        err = (q * scale[:, None] - w).square().sum(1)
        if best_err is None:
            best_q, best_scale, best_err = q, scale, err
        else:
            better = err < best_err
            best_q = torch.where(better[:, None], q, best_q)
            best_scale, best_err = torch.where(better, scale, best_scale), torch.minimum(err, best_err)
    return best_q.to(torch.int8), best_scale.half()


def dequantize_rows(q: Tensor, scale: Tensor) -> Tensor:
    return q.float() * scale.float()[:, None]


ARTIFACT_MAGIC = b"PGA1"
CODECS = {"zstd": 1, "brotli": 2}


def compress(raw: bytes, codec: str) -> bytes:
    if codec == "zstd":
        import zstandard
        return zstandard.ZstdCompressor(level=22).compress(raw)
    if codec == "brotli":
        import brotli
        return brotli.compress(raw, quality=11)
    raise ConfigError(f"COMPRESSOR={codec!r}: use zstd or brotli")


def decompress(blob: bytes, codec: str) -> bytes:
    if codec == "zstd":
        import zstandard
        return zstandard.ZstdDecompressor().decompress(blob)
    import brotli
    return brotli.decompress(blob)


def pack_state(state: dict[str, Tensor], hp: Hyperparameters, clip_floor: float) -> bytes:
    """Quantise a state dict and lay it out as: u32 header length, JSON header, raw tensor bytes."""
    entries, chunks, offset = [], [], 0

    def add(name: str, kind: str, t: Tensor):
        nonlocal offset
        data = t.detach().cpu().contiguous().numpy().tobytes()
        entries.append([name, kind, str(t.dtype).removeprefix("torch."), list(t.shape), offset, len(data)])
        chunks.append(data)
        offset += len(data)

    for name, t in state.items():
        kind = export_kind(name, t, hp.quant_min_numel)
        if kind.startswith("int"):
            bits = hp.quant_bits if kind == "int" else hp.embed_quant_bits
            q, scale = quantize_rows(t, bits, hp.percentiles, clip_floor)
            add(name, f"int{bits}", q)
            add(name + ".scale", "scale", scale)
        else:
            add(name, kind, t.to(torch.float16 if kind == "fp16" else torch.float32))
    payload = b"".join(chunks)
    config = {k: v for k, v in dataclasses.asdict(hp).items() if k in MODEL_KEYS}
    header = json.dumps({"config": config, "tensors": entries, "crc32": zlib.crc32(payload)}, sort_keys=True).encode()
    return len(header).to_bytes(4, "little") + header + payload


def unpack_state(raw: bytes) -> tuple[dict, dict[str, Tensor]]:
    """Inverse of pack_state, dequantising on the way: returns (model config, fp32 state dict)."""
    try:
        hlen = int.from_bytes(raw[:4], "little")
        header = json.loads(raw[4:4 + hlen])
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"artifact header unreadable: {e}") from None
    payload = raw[4 + hlen:]
    if zlib.crc32(payload) != header["crc32"]:
        raise ArtifactError("artifact payload checksum mismatch: corrupt artifact")
    raw_tensors = {}
    for name, kind, dtype, shape, off, nbytes in header["tensors"]:
        arr = np.frombuffer(payload, dtype=np.dtype(getattr(np, dtype)), count=nbytes // np.dtype(getattr(np, dtype)).itemsize, offset=off)
        raw_tensors[name] = (kind, torch.from_numpy(arr.copy()).view(shape))
    state = {}
    for name, (kind, t) in raw_tensors.items():
        if kind == "scale":
            continue
        state[name] = dequantize_rows(t, raw_tensors[name + ".scale"][1]) if kind.startswith("int") else t.float()
    return header["config"], state


def write_artifact(path: str, state: dict[str, Tensor], hp: Hyperparameters, clip_floor: float) -> int:
    blob = ARTIFACT_MAGIC + bytes([CODECS[hp.compressor]]) + compress(pack_state(state, hp, clip_floor), hp.compressor)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(blob)
    os.replace(tmp, path)  # never leave a half-written artifact
    return len(blob)


def export_artifact(path: str, state: dict[str, Tensor], hp: Hyperparameters, code_bytes: int, log) -> int:
    floor = hp.quant_clip_floor
    while True:
        t0 = time.perf_counter()
        nbytes = write_artifact(path, state, hp, floor)
        log(f"artifact:{path} {nbytes} bytes ({hp.compressor}) clip_floor:{floor:.4f} "
            f"export_time:{time.perf_counter() - t0:.1f}s")
        if nbytes + code_bytes <= hp.size_limit or not hp.size_fit:
            return nbytes
        floor *= 1.1
        log(f"size_fit: {nbytes + code_bytes} bytes is over {hp.size_limit}; retrying with clip_floor {floor:.4f} "
            f"(training used {hp.quant_clip_floor:.4f})")


def read_artifact(path: str) -> tuple[dict, dict[str, Tensor]]:
    if not os.path.isfile(path):
        raise ArtifactError(f"artifact {path} not found")
    blob = Path(path).read_bytes()
    codecs = {v: k for k, v in CODECS.items()}
    if len(blob) < 5 or blob[:4] != ARTIFACT_MAGIC or blob[4] not in codecs:
        raise ArtifactError(f"{path}: not a train_gpt.py artifact (bad magic)")
    try:
        raw = decompress(blob[5:], codecs[blob[4]])
    except Exception as e:  # each codec raises its own error type for truncated input
        raise ArtifactError(f"{path}: cannot decompress ({codecs[blob[4]]}): truncated or corrupt artifact ({e})") from None
    return unpack_state(raw)


MODEL_KEYS = ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "leaky_relu_slope",
              "rope_dims", "rope_base", "qk_gain_init", "ln_scale", "xsa_last_n", "ve_dim", "ve_last_n", "smear_gate",
              "bigram_vocab_size", "bigram_dim", "logit_softcap", "tied_embed_init_std")


# ------------------------------------------------------------------------------------------------------- evaluation
def scored_chunks(num_preds: int, seq_len: int, stride: int) -> list[tuple[int, int]]:
    """Split predictions [0, num_preds) into chunks each scored once: the first seq_len, then `stride` each.
    Chunk (s, e) is scored by the window of inputs [max(0, e - seq_len), e), so each sees up to seq_len context."""
    chunks, s = [], 0
    while s < num_preds:
        e = min(num_preds, seq_len if s == 0 else s + stride)
        chunks.append((s, e))
        s = e
    return chunks


def rank_slice(items: list, rank: int, world: int) -> list:
    return items[rank * len(items) // world:(rank + 1) * len(items) // world]


@torch.inference_mode()
def evaluate(model, tokens: Tensor, tables, seq_len: int, stride: int, batch_seqs: int, rank: int, world: int):
    """Exact val loss (nats/token) and bpb; every prediction is scored exactly once across all ranks."""
    device = tokens.device
    chunks = rank_slice(scored_chunks(tokens.numel() - 1, seq_len, stride), rank, world)
    sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss, tokens, bytes
    pos = torch.arange(seq_len, device=device)
    for i in range(0, len(chunks), batch_seqs):
        batch = chunks[i:i + batch_seqs]
        n_real = len(batch)
        batch = batch + [batch[-1]] * (batch_seqs - n_real)  # fixed shape for the compiled model
        ends = torch.tensor([e for _, e in batch], device=device)
        scored_from = torch.tensor([s for s, _ in batch], device=device)
        starts = (ends - seq_len).clamp_min(0)
        idx = starts[:, None] + pos
        mask = (idx >= scored_from[:, None]) & (idx < ends[:, None])
        mask[n_real:] = False
        idx = idx.clamp_max(tokens.numel() - 2)
        x, y = tokens[idx], tokens[idx + 1]
        losses = model(x, y, per_token=True).double()
        sums[0] += (losses * mask).sum()
        sums[1] += mask.sum()
        sums[2] += (count_bytes(x, y, tables) * mask).sum()
    if world > 1:
        dist.all_reduce(sums)
    loss, ntok, nbytes = sums.tolist()
    return loss / ntok, loss / (math.log(2) * nbytes)


# ------------------------------------------------------------------------------------------------------------- main
class Logger:
    def __init__(self, path: str | None):
        self.file = None
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a", encoding="utf-8")

    def __call__(self, msg: str):
        if self.file is None:
            return
        print(msg, flush=True)
        self.file.write(msg + "\n")
        self.file.flush()


def select_attention(requested: str, device: torch.device, hp: Hyperparameters, batch_seqs: int, log) -> str:
    """Pick the attention implementation: FA3 if importable, else the SDPA kernel with the least median
    forward+backward time at the training shapes (batch_seqs sequences per micro-step)."""
    if device.type != "cuda":
        log("attention: torch SDPA on CPU")
        return "sdpa"
    if requested in ("auto", "fa3"):
        try:
            import flash_attn_interface  # noqa: F401
            log("attention: flash_attn_interface (FA3)")
            return "fa3"
        except ImportError:
            if requested == "fa3":
                raise ConfigError("ATTN_BACKEND=fa3 but flash_attn_interface is not importable") from None
    from torch.nn.attention import SDPBackend, sdpa_kernel
    kernels = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    names = list(kernels)[:3] if requested == "auto" else [requested]
    hd, T, B = hp.model_dim // hp.num_heads, hp.train_seq_len, batch_seqs
    q = torch.randn(B, T, hp.num_heads, hd, device=device, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(B, T, hp.num_kv_heads, hd, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    timings, failure = {}, "none ran"
    for name in names:
        for impl in ("sdpa", "sdpa_expand"):
            try:
                with sdpa_kernel(kernels[name]), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # kernels that cannot take these inputs warn, then raise
                    times = []
                    for _ in range(13):  # 3 warm-up calls, then the median of 10
                        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        start.record()
                        attention(q, k, v, impl).sum().backward()
                        end.record()
                        end.synchronize()
                        times.append(start.elapsed_time(end))
                timings[(name, impl)] = float(np.median(times[3:]))
            except Exception as e:  # a kernel that cannot take these shapes or dtypes says so in various ways
                failure = f"{name}/{impl}: {type(e).__name__}: {str(e)[:200]}"
    if not timings:
        raise ConfigError(f"no SDPA kernel among {names} runs on this GPU (last failure {failure})")
    log(f"attention timings (fwd+bwd median ms, B={B}): " + ", ".join(f"{n}/{i}:{t:.2f}" for (n, i), t in timings.items()))
    name, impl = min(timings, key=timings.get)
    for other, setter in (("cudnn", torch.backends.cuda.enable_cudnn_sdp), ("flash", torch.backends.cuda.enable_flash_sdp),
                          ("efficient", torch.backends.cuda.enable_mem_efficient_sdp), ("math", torch.backends.cuda.enable_math_sdp)):
        setter(other == name)
    log(f"attention: torch SDPA {name} kernel, {'K/V expanded' if impl == 'sdpa_expand' else 'native GQA'}")
    return impl


def setup_distributed() -> tuple[int, int, torch.device]:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def build_model(hp: Hyperparameters, device: torch.device, attn_impl: str) -> GPT:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return GPT(hp, attn_impl, dtype).to(device)


def maybe_compile(model: nn.Module, hp: Hyperparameters):
    return torch.compile(model, dynamic=False, fullgraph=True) if hp.torch_compile else model


class EvalContext:
    """Validation tokens, byte tables and one compiled evaluation model whose weights are swapped in."""

    def __init__(self, hp, rank, world, device, attn_impl, log):
        self.hp, self.rank, self.world, self.log = hp, rank, world, log
        sp = load_tokenizer(hp.tokenizer_path, hp.vocab_size)
        self.tables = tuple(t.to(device) for t in build_byte_tables(sp))
        self.tokens = torch.from_numpy(load_val_tokens(hp.data_path, hp.eval_seq_len).astype(np.int64)).to(device)
        self.model = build_model(hp, device, attn_impl).eval()
        self.compiled = maybe_compile(self.model, hp)
        self.batch_seqs = max(1, hp.val_batch_size // (world * hp.eval_seq_len))
        log(f"val_tokens:{self.tokens.numel()} eval_seq_len:{hp.eval_seq_len} stride:{hp.eval_stride}")

    def score(self, state: dict[str, Tensor], label: str, stride: int | None = None) -> tuple[float, float]:
        self.model.load_state_dict(state, strict=True)
        t0 = time.perf_counter()
        loss, bpb = evaluate(self.compiled, self.tokens, self.tables, self.hp.eval_seq_len,
                             stride or self.hp.eval_seq_len, self.batch_seqs, self.rank, self.world)
        self.log(f"{label} val_loss:{loss:.8f} val_bpb:{bpb:.8f} eval_time:{time.perf_counter() - t0:.1f}s")
        return loss, bpb


def score_artifact(path: str, code_bytes: int, ev: EvalContext):
    t0 = time.perf_counter()
    _, state = read_artifact(path)
    ev.log(f"artifact:{path} loaded and dequantised in {time.perf_counter() - t0:.1f}s")
    ev.score(state, "final_int6_roundtrip_exact")
    ev.score(state, "final_int6_sliding_window_exact", stride=ev.hp.eval_stride)
    artifact_bytes = os.path.getsize(path)
    ev.log(f"Total submission size int6+{ev.hp.compressor}: {artifact_bytes + code_bytes} bytes "
           f"(model {artifact_bytes} + code {code_bytes})")


def grad_accum_steps(hp: Hyperparameters, world: int) -> int:
    return hp.grad_accum_steps or max(1, 8 // world)


def train(hp: Hyperparameters, rank: int, world: int, device: torch.device, attn_impl: str, log, ev: EvalContext):
    accum = grad_accum_steps(hp, world)
    if hp.train_batch_tokens % (world * accum * hp.train_seq_len):
        raise ConfigError(f"TRAIN_BATCH_TOKENS={hp.train_batch_tokens} must divide into {world} ranks x {accum} "
                          f"micro-steps x TRAIN_SEQ_LEN={hp.train_seq_len}")
    loader = TrainLoader(list_shards(hp.data_path, "train"), rank, world, accum, hp.train_batch_tokens, hp.train_seq_len, device)
    model = build_model(hp, device, attn_impl)
    log(f"model_params:{sum(p.numel() for p in model.parameters())} world_size:{world} grad_accum_steps:{accum}")
    compiled = maybe_compile(model, hp)
    ddp = torch.nn.parallel.DistributedDataParallel(compiled, device_ids=[device.index] if device.type == "cuda" else None,
                                                    broadcast_buffers=False) if world > 1 else compiled
    opts = build_optimizers(model, hp, rank, world, compile_ns=hp.torch_compile)
    params = list(model.parameters())
    qat_layers = quantized_linears(model, hp.quant_min_numel)
    cap_ms = 1000 * hp.max_wallclock_seconds

    def forward_backward(batches) -> Tensor:
        loss_sum = torch.zeros((), device=device)
        for m, (x, y) in enumerate(batches):
            if world > 1:
                ddp.require_backward_grad_sync = m == len(batches) - 1
            loss = ddp(x, y)
            (loss / len(batches)).backward()
            loss_sum += loss.detach()
        return loss_sum / len(batches)

    def optimizer_step(scale: float, momentum: float):
        for opt in opts:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * scale
                if "momentum" in g:
                    g["momentum"] = momentum
        torch.nn.utils.clip_grad_norm_(params, hp.grad_clip_norm)
        for opt in opts:
            opt.step()
        model.zero_grad(set_to_none=True)

    def sync_time() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def set_qat(on: bool):
        for m in qat_layers:
            m.qat = (hp.quant_bits, hp.percentiles, hp.quant_clip_floor) if on else None

    # compile warm-up (QAT graphs included), then restore the initial state
    if hp.warmup_steps > 0:
        initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
        opt_states = [opt.state_dict() for opt in opts]
        t0, phase_ms = time.perf_counter(), np.zeros(3)  # data, forward+backward, optimizer
        timed = min(5, hp.warmup_steps // 4)  # the last steps run compiled graphs only: time their phases
        for i in range(hp.warmup_steps):
            set_qat(hp.late_qat_threshold > 0 and hp.warmup_steps // 3 <= i < 2 * hp.warmup_steps // 3)
            t = [sync_time()]
            batches = loader.next_step()
            t.append(sync_time())
            forward_backward(batches)
            t.append(sync_time())
            optimizer_step(1.0, hp.muon_momentum_warmup_start)
            t.append(sync_time())
            if i >= hp.warmup_steps - timed:
                phase_ms += 1000 * np.diff(t) / timed
        log(f"warmup:{hp.warmup_steps} steps in {time.perf_counter() - t0:.1f}s (compile included)")
        if timed:
            log(f"step_phases_ms data:{phase_ms[0]:.2f} forward_backward:{phase_ms[1]:.2f} optimizer:{phase_ms[2]:.2f} "
                f"(last {timed} warm-up steps, synchronised)")
        set_qat(False)
        model.load_state_dict(initial)
        for opt, st in zip(opts, opt_states):
            opt.load_state_dict(st)
        loader = TrainLoader(loader.stream.files, rank, world, accum, hp.train_batch_tokens, hp.train_seq_len, device)

    weights = [p.detach() for p in params]  # views that follow the in-place optimiser updates
    ema = [w.clone() for w in weights] if hp.ema_frac > 0 else None
    swa, swa_count, swa_slot = None, 0, -1
    qat_on, nonfinite = False, torch.zeros((), device=device, dtype=torch.bool)
    last_loss = torch.zeros((), device=device)
    step, train_ms, progress = 0, 0.0, 0.0
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_start = time.perf_counter()
    while True:
        elapsed_ms = train_ms + 1000 * (time.perf_counter() - t_start)
        if world > 1 and cap_ms > 0:  # every rank follows rank 0's clock: same LR, EMA decay and stop step
            clock = torch.tensor(elapsed_ms, device=device, dtype=torch.float64)
            dist.broadcast(clock, 0)
            elapsed_ms = clock.item()
        new_progress = max(step / hp.iterations, elapsed_ms / cap_ms if cap_ms > 0 else 0.0)
        stop = new_progress >= 1.0
        if ema is not None and step > 0:
            torch._foreach_lerp_(ema, weights, 1.0 - ema_decay(new_progress - progress, hp.ema_frac))
        progress = min(new_progress, 1.0)
        scale = lr_scale(progress, hp.warmdown_frac)
        if hp.swa_enabled and scale < hp.swa_start_scale and int(progress / hp.swa_every_frac) != swa_slot:
            swa_slot = int(progress / hp.swa_every_frac)
            if swa is None:
                swa = [w.clone() for w in weights]
            else:
                torch._foreach_add_(swa, weights)
            swa_count += 1
        is_log = step % hp.train_log_every == 0 or step <= 10 or stop
        if is_log and step > 0:
            stats = torch.stack((last_loss.float(), nonfinite.float()))
            if world > 1:
                dist.all_reduce(stats)
            if stats[1] > 0:
                raise TrainingError(f"non-finite train loss by step {step}: stopping (lower the LRs or check the data)")
            avg = elapsed_ms / step
            eta = (cap_ms - elapsed_ms) / 1000 if cap_ms > 0 else (hp.iterations - step) * avg / 1000
            log(f"step:{step}/{hp.iterations} train_loss:{stats[0].item() / world:.4f} train_time:{elapsed_ms / 1000:.1f}s "
                f"step_avg:{avg:.2f}ms tok/s:{hp.train_batch_tokens / avg * 1000:,.0f} lr_scale:{scale:.3f} eta:{max(eta, 0):.0f}s")
        if hp.val_loss_every > 0 and step > 0 and (step % hp.val_loss_every == 0 or stop):
            if device.type == "cuda":
                torch.cuda.synchronize()
            train_ms += 1000 * (time.perf_counter() - t_start)
            ev.score(model.state_dict(), f"step:{step} val")
            t_start = time.perf_counter()
        if stop:
            break
        if not qat_on and hp.late_qat_threshold > 0 and scale < hp.late_qat_threshold:
            set_qat(True)
            qat_on = True
            log(f"late_qat:on step:{step} lr_scale:{scale:.3f}")
        last_loss = forward_backward(loader.next_step())
        optimizer_step(scale, muon_momentum(progress, hp))
        nonfinite |= ~torch.isfinite(last_loss)
        step += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
        log(f"peak_memory:{torch.cuda.max_memory_allocated() // 2**20}MiB")
    log(f"training done: {step} steps in {elapsed_ms / 1000:.1f}s ({elapsed_ms / max(step, 1):.2f} ms/step)")
    final = ema if ema is not None else weights
    if swa_count:
        final = [s / swa_count for s in swa]
        log(f"swa: averaged {swa_count} snapshots")
    with torch.no_grad():
        for p, f in zip(params, final):
            p.copy_(f)
        if world > 1:  # a digest of the final weights: every rank must hold the same model
            digest = torch.stack([torch.stack([p.double().sum(), p.double().square().sum()]) for p in params]).sum(0)
            lo, hi = digest.clone(), digest.clone()
            dist.all_reduce(lo, op=dist.ReduceOp.MIN)
            dist.all_reduce(hi, op=dist.ReduceOp.MAX)
            log(f"ranks_in_sync:{int(torch.equal(lo, hi))}")
    set_qat(False)
    return model


def main():
    hp = Hyperparameters.from_env()
    rank, world, device = setup_distributed()
    if world > 1:  # a default RUN_ID is a timestamp: every rank takes rank 0's, so they share logs and artifact
        shared = [hp.run_id]
        dist.broadcast_object_list(shared, src=0)
        hp.run_id = shared[0]
    log = Logger(f"logs/{hp.run_id}.txt" if rank == 0 else None)
    log(f"command: {' '.join(sys.argv)}")
    log("hyperparameters: " + json.dumps(dataclasses.asdict(hp), sort_keys=True))
    log(f"torch:{torch.__version__} device:{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    torch.manual_seed(hp.seed)
    np.random.seed(hp.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    code_bytes = len(Path(__file__).read_bytes())
    artifact = hp.eval_artifact or hp.artifact_path or f"logs/{hp.run_id}.int6.ptz"
    if hp.eval_artifact:
        config, _ = read_artifact(artifact)  # fail fast on a bad file; the model shape comes from the artifact
        hp = dataclasses.replace(hp, **config)
    micro_batch = max(1, hp.train_batch_tokens // (world * grad_accum_steps(hp, world) * hp.train_seq_len))
    attn_impl = select_attention(hp.attn_backend, device, hp, micro_batch, log)
    ev = EvalContext(hp, rank, world, device, attn_impl, log)
    if not hp.eval_artifact:
        model = train(hp, rank, world, device, attn_impl, log, ev)
        ev.score(model.state_dict(), "pre_quant_ema")
        if rank == 0:
            export_artifact(artifact, {k: v.detach().cpu() for k, v in model.state_dict().items()}, hp, code_bytes, log)
        if world > 1:
            dist.barrier()
        total = os.path.getsize(artifact) + code_bytes
        if total > hp.size_limit and not hp.allow_oversize:
            raise ArtifactError(f"submission is {total} bytes, {total - hp.size_limit} over the {hp.size_limit}-byte "
                                f"limit (artifact kept at {artifact}; ALLOW_OVERSIZE=1 scores it anyway)")
    score_artifact(artifact, code_bytes, ev)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError, ArtifactError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
