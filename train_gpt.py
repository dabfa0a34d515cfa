"""Parameter Golf: the 11-layer record stack in one file (train, export, score).

    SEED=1337 torchrun --standalone --nproc_per_node=8 train_gpt.py

Every setting is an env var named after a Hyperparameters field (upper case). Sections in data-flow order:
config, data, model, optimizer, schedule, training, quantization/export, evaluation, main.
"""
from __future__ import annotations

import collections, concurrent.futures, contextlib, dataclasses, difflib, faulthandler, glob, hashlib, importlib.util
import itertools, json, math, os, re, sys, time, warnings, zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the MLP runs the torch path
    triton = None

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
    # evaluation
    eval_seq_len: int = 2048
    eval_stride: int = 64
    val_batch_size: int = 524_288  # tokens per evaluation batch, all ranks together
    eval_artifact: str = ""  # score this artifact and exit (no training data is read)
    # test-time training, evaluation only and score first: a chunk of val trains the weights after it is scored
    ttt_mode: str = "lora"  # off | chunk (SGD on each scored chunk; the last never trained on) | lora (per document)
    ttt_chunk_tokens: int = 32_768  # predictions per chunk
    ttt_lr: float = 0.01  # cosine-decayed over the chunks
    ttt_epochs: int = 3  # SGD steps on each chunk, each on the whole chunk
    ttt_momentum: float = 0.9
    ttt_grad_clip: float = 1.0  # 0 = no clip
    ttt_freeze_blocks: int = 0  # the first blocks that stay fixed (the embedding tables always do)
    ttt_ema: float = 0.0  # 0: the adapted weights score; d: their EMA with decay d per chunk scores
    ttt_budget_seconds: float = 480.0  # past this the rest of val is scored without adapting; 0 = no limit
    ttt_lora_rank: int = 8  # TTT_MODE=lora: each document's own low-rank deltas, (x @ A) @ B
    ttt_lora_targets: str = "q,v,head"  # the matrices they add to: q, k, v, o (attention), up, down (MLP), head
    ttt_lora_lr: float = 0.005  # Adam, one step after each scored chunk of a document (proxy: 0.01 and 0.0025 worse)
    ttt_lora_chunk: int = 256  # predictions of each document scored before a step (the sp1024 LoRA record: 256)
    ttt_lora_docs: int = 32  # documents side by side, one batch row each
    ttt_lora_reset: str = "fresh"  # each batch's deltas: fresh (A drawn anew) | warm_a (A kept from the batch before); B = 0
    ttt_lora_phases: str = ""  # documents' fractions (stream order, e.g. 0.1,0.2) after which the base weights take chunk
                               # TTT's SGD steps on the documents scored since (phased TTT); "" = none
    # model
    num_layers: int = 11
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 3.5
    leaky_relu_slope: float = 0.5  # leaky_relu(x, slope)^2; 0 = relu^2 (proxy, 1,700 steps: 0.5 is -0.0020 / -0.0024 bpb)
    leaky_relu_slopes: str = ""  # one slope per layer, comma-separated (overrides LEAKY_RELU_SLOPE)
    mlp_kernel: str = "auto"  # auto (triton on CUDA when its start-up check passes) | triton | torch
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
    bigram_hash: str = "mul"  # mul: (92821 * prev + cur) mod (buckets - 1) | xor: the 1.1233 script's xor of two products
    aux_proj_init_scale: bool = False  # BigramHash and value-embedding projections x 1/sqrt(2 * layers), as the 1.1233 script
    engram_buckets: int = 0  # EngramLite hashed n-gram embeddings (buckets per head and order); 0 = off
    engram_heads: int = 2
    engram_orders: int = 2  # 1: bigrams; 2: bigrams and trigrams
    engram_dim: int = 32  # per head and order
    skip_gates: bool = False  # U-Net skips through a learned sigmoid gate: lerp(weight * skip, x, sigmoid(gate))
    parallel_resid_start: int = 7  # first layer of two residual lanes (attention and MLP read one each); 0 = off
    recur_layers: str = ""  # depth recurrence: these consecutive layers (e.g. 4,5) run again after their pass; "" = off
    recur_loops: int = 1  # extra passes of RECUR_LAYERS
    recur_start_frac: str = "0.5"  # the run fraction at which the extra passes switch on (one, or one per pass)
    recur_untie_mlp: bool = False  # the extra passes have MLPs of their own (attention stays shared)
    logit_softcap: float = 30.0
    tied_embed_init_std: float = 0.005
    attn_backend: str = "auto"  # auto: FA3 if it imports, else the fastest SDPA kernel | fa3 | cudnn | flash | efficient | math
    torch_compile: bool = True
    clock_sync_every: int = 10  # multi-GPU wallclock runs read rank 0's clock every this many steps
    # optimizer
    matrix_lr: float = 0.025
    tied_embed_lr: float = 0.035
    scalar_lr: float = 0.025
    muon_momentum: float = 0.95  # issue 13: 0.97 and 0.95 beat the records' 0.99 on the proxy (README)
    muon_momentum_warmup_start: float = 0.92
    muon_momentum_warmup_frac: float = 0.21
    muon_backend_steps: int = 5
    muon_backend: str = "newton_schulz"  # newton_schulz | polar_express (per-step coefficients)
    muon_row_norm: bool = True  # MuonEq-R: rows of the update normalised before the orthogonalisation (issue 13: −0.013)
    ns_margin: float = 1.01  # Newton-Schulz starts from G / (margin * |G|_F); the 1.1233 script has 1.0
    muon_wd: float = 0.04
    adam_wd: float = 0.04
    adam_lr_decay: bool = True  # AdamW's LRs follow the schedule; 0: they stay constant (proxy5's 10.5 MB model, issue 14)
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip_norm: float = 0.3
    # weight averaging and late QAT
    ema_frac: float = 0.047  # EMA time constant as a fraction of the run (0.997 at ~7,100 steps); 0 = off
    late_qat_threshold: float = 0.15  # fake-quantise block matrices once the LR scale is below this; 0 = off
    lr_floor: float = 0.0  # the warmdown ends at this LR scale instead of 0
    # export
    quantizer: str = "gptq_lite"  # how each matrix becomes integers: gptq_lite (rounding) | gptq (Hessian error feedback)
    quant_bits: str = "6"  # block matrices' bits, or mixed: each one MIXED_BITS by GPTQ's error per byte (QUANTIZER=gptq)
    mixed_bits: str = "5,6,7"  # QUANT_BITS=mixed: the widths, lowest first (every matrix starts there; late QAT uses it)
    size_target: int = 15_900_000  # QAT_SIZE_FIT raises the floor, or QUANT_BITS=mixed promotes, until code + artifact fit this
    qat_size_fit: bool = True  # at late QAT's start raise the clip floor until the estimate fits (with SIZE_FIT; not mixed)
    clip_mode: str = "search"  # row scales: search (the least-error of CLIP_PERCENTILES) | sdclip (SDCLIP_K * std of the row)
    sdclip_k: float = 12.85  # block matrices' clip in row standard deviations (CLIP_MODE=sdclip)
    sdclip_k_embed: float = 14.0  # embedding tables' clip in row standard deviations
    gptq_calib_batches: int = 16  # training batches whose activations give GPTQ its Hessians
    gptq_reserve_seconds: float = 8.0  # with a wallclock cap, training stops this much earlier for the calibration
    gptq_damp: float = 0.01  # added to the Hessian diagonal, as a fraction of its mean
    gptq_block: int = 128  # columns per lazy error-feedback block
    quant_min_numel: int = 65_536  # tensors with at most this many elements pass through as fp16/fp32
    quant_clip_floor: float = 0.5  # row clips never go below this (the record's 1.0: scale >= 1/31): bounds the size
    size_fit: bool = True  # if the artifact is over SIZE_LIMIT, raise the clip floor by 10% until it fits
    embed_quant_bits: int = 8
    clip_percentiles: str = "0.999,0.9995,0.9999,0.99999,1.0"
    compressor: str = "brotli"  # brotli (quality 11) | zstd (level 22): brotli is ~7% smaller on the proxy
    byte_shuffle: int = 0  # 0 = off; N: the payload's bytes regrouped by position mod N before the compressor
    artifact_path: str = ""  # "" -> logs/<RUN_ID>.int6.ptz
    size_limit: int = 16_000_000
    allow_oversize: bool = False
    @classmethod
    def from_env(cls, env=os.environ) -> "Hyperparameters":
        fields = {f.name.upper(): f for f in dataclasses.fields(cls)}
        for name in sorted(set(env) - set(fields)) if env.get("RANK", "0") == "0" else ():  # a typo is ignored:
            for near in difflib.get_close_matches(name, fields, 1, 0.85):  # say so, or a run trains the wrong model
                print(f"warning: {name} is not a setting of train_gpt.py (did you mean {near}?); it is ignored", file=sys.stderr)
        hp = cls(**{f.name: parse_env_value(n, env[n], type(f.default)) for n, f in fields.items() if n in env})
        hp.run_id = hp.run_id or time.strftime("run_%Y%m%d_%H%M%S") + f"_{os.getpid()}"
        hp.validate()
        return hp
    @property
    def train_seconds(self) -> float:
        """The training loop's wallclock cap (0 = none): with GPTQ the calibration's reserve comes off it, so that
        training and calibration together stay within MAX_WALLCLOCK_SECONDS."""
        reserve = self.gptq_reserve_seconds if self.max_wallclock_seconds > 0 and self.quantizer == "gptq" else 0.0
        return self.max_wallclock_seconds - reserve
    widths = property(lambda self: csv_numbers(self.mixed_bits, int))
    percentiles = property(lambda self: csv_numbers(self.clip_percentiles))
    recur = property(lambda self: csv_numbers(self.recur_layers, int))
    lora_phases = property(lambda self: csv_numbers(self.ttt_lora_phases))
    # the block matrices' bits for late QAT and a fixed-width export (with mixed: the lowest width)
    block_bits = property(lambda self: self.widths[0] if self.quant_bits == "mixed" else int(self.quant_bits))
    fits_at_qat = property(lambda self: self.qat_size_fit and self.size_fit and self.quant_bits != "mixed")
    @property
    def recur_starts(self) -> tuple[float, ...]:
        """The run fraction at which each extra pass switches on."""
        starts = csv_numbers(self.recur_start_frac)
        return starts * self.recur_loops if len(starts) == 1 else starts
    @property
    def layer_slopes(self) -> tuple[float, ...]:
        """The MLP's leaky ReLU slope in each layer."""
        return csv_numbers(self.leaky_relu_slopes) or (self.leaky_relu_slope,) * self.num_layers
    def validate(self):
        """Every value a run can get wrong, checked before anything is read or built."""
        def need(ok: bool, name: str, rule: str):
            if not ok:
                raise ConfigError(f"{name.upper()}={getattr(self, name)!r} {rule}")
        for name in ("iterations", "train_batch_tokens", "train_seq_len", "eval_seq_len", "eval_stride", "val_batch_size",
                     "train_log_every", "num_layers", "model_dim", "num_heads", "num_kv_heads", "vocab_size", "bigram_dim",
                     "ve_dim", "engram_heads", "engram_dim", "muon_backend_steps", "recur_loops", "clock_sync_every", "size_limit",
                     "gptq_calib_batches", "gptq_block", "ttt_chunk_tokens", "ttt_lora_rank", "ttt_lora_chunk", "ttt_lora_docs"):
            need(getattr(self, name) >= 1, name, "must be at least 1")
        for name in ("seed", "max_wallclock_seconds", "warmup_steps", "grad_accum_steps", "xsa_last_n",
                     "ve_last_n", "bigram_vocab_size", "engram_buckets", "rope_dims", "leaky_relu_slope", "matrix_lr", "tied_embed_lr",
                     "scalar_lr", "muon_wd", "adam_wd", "grad_clip_norm", "ema_frac", "late_qat_threshold",
                     "quant_min_numel", "quant_clip_floor", "gptq_reserve_seconds", "ttt_lr", "ttt_epochs", "ttt_grad_clip",
                     "ttt_freeze_blocks", "ttt_budget_seconds", "ttt_lora_lr"):
            need(getattr(self, name) >= 0, name, "must not be negative")
        for name in ("warmdown_frac", "muon_momentum", "muon_momentum_warmup_start", "muon_momentum_warmup_frac",
                     "beta1", "beta2", "lr_floor", "ttt_momentum"):
            need(0 <= getattr(self, name) <= 1, name, "must be between 0 and 1")
        for name in ("mlp_mult", "rope_base", "logit_softcap", "tied_embed_init_std", "adam_eps", "ns_margin",
                     "sdclip_k", "sdclip_k_embed", "gptq_damp"):
            need(getattr(self, name) > 0, name, "must be positive")
        for name, allowed in (("compressor", CODECS), ("quantizer", QUANTIZERS), ("muon_backend", QUINTIC_COEFFS),
                              ("bigram_hash", BIGRAM_HASHES), ("clip_mode", CLIP_MODES), ("ttt_lora_reset", ("fresh", "warm_a")),
                              ("attn_backend", ATTN_BACKENDS), ("mlp_kernel", MLP_KERNELS), ("ttt_mode", TTT_MODES)):
            need(getattr(self, name) in allowed, name, f"is not one of {', '.join(allowed)}")
        need(2 <= self.embed_quant_bits <= 8, "embed_quant_bits", "must be between 2 and 8 (stored as int8)")
        need(self.quant_bits == "mixed" or self.quant_bits.isdigit() and 2 <= int(self.quant_bits) <= 8, "quant_bits",
             "must be mixed or between 2 and 8 (stored as int8)")
        need(self.quant_bits != "mixed" or self.quantizer == "gptq", "quant_bits",
             "needs QUANTIZER=gptq (matrices are ranked by their Hessian-weighted error)")
        need(parses(lambda: list(self.widths) == sorted(set(self.widths)) and 2 <= self.widths[0] <= self.widths[-1] <= 8),
             "mixed_bits", "must be increasing comma-separated bit widths between 2 and 8")
        need(self.size_target <= self.size_limit or self.quant_bits != "mixed", "size_target",
             f"must be at most SIZE_LIMIT={self.size_limit}")
        need(self.quant_clip_floor > 0 or not self.size_fit, "quant_clip_floor", "must be positive for the size fits")
        need(self.vocab_size <= 1 << 16, "vocab_size", "must fit the shards' uint16 token ids (at most 65536)")
        need(self.bigram_vocab_size != 1, "bigram_vocab_size", "must be 0 (off) or at least 2")
        need(self.gptq_reserve_seconds < self.max_wallclock_seconds or self.max_wallclock_seconds == 0
             or self.quantizer != "gptq", "gptq_reserve_seconds", f"must be below MAX_WALLCLOCK_SECONDS={self.max_wallclock_seconds}")
        need(0 <= self.byte_shuffle <= 15, "byte_shuffle", "must be between 0 (off) and 15")
        need(0 <= self.ttt_ema < 1, "ttt_ema", "must be in [0, 1): 0 = off, else the EMA's decay per chunk")
        need(set(self.ttt_lora_targets.split(",")) <= set(LORA_TARGETS), "ttt_lora_targets",
             f"must be a comma-separated list of {', '.join(LORA_TARGETS)}")
        need(parses(lambda: all(a < b for a, b in zip((0, *self.lora_phases), (*self.lora_phases, 1)))),
             "ttt_lora_phases", "must be increasing comma-separated fractions in (0, 1)")
        need(self.parallel_resid_start == 0 or self.num_layers // 2 <= self.parallel_resid_start < self.num_layers,
             "parallel_resid_start", f"must be 0 (off) or a decoder layer ({self.num_layers // 2} to {self.num_layers - 1})")
        need(parses(lambda: list(self.recur) == list(range(self.recur[0], self.recur[-1] + 1)) and self.recur[-1] < self.num_layers
                    and len({i >= self.parallel_resid_start > 0 for i in self.recur}) == 1) if self.recur else True,
             "recur_layers", f"must be consecutive layers below NUM_LAYERS={self.num_layers}, all before or all from "
             f"PARALLEL_RESID_START")
        need(parses(lambda: len(self.recur_starts) == self.recur_loops and all(0 <= f < 1 for f in self.recur_starts)
                    and list(self.recur_starts) == sorted(self.recur_starts)), "recur_start_frac",
             f"must be one fraction in [0, 1) or RECUR_LOOPS={self.recur_loops} increasing ones")
        need(self.engram_orders in (1, 2), "engram_orders", "must be 1 (bigrams) or 2 (bigrams and trigrams)")
        need(self.eval_stride <= self.eval_seq_len, "eval_stride", f"must be at most EVAL_SEQ_LEN={self.eval_seq_len}")
        need(self.ttt_lora_chunk <= self.eval_seq_len, "ttt_lora_chunk",
             f"must be at most EVAL_SEQ_LEN={self.eval_seq_len}: one window scores a chunk")
        need(self.model_dim % self.num_heads == 0, "model_dim", f"must be a multiple of NUM_HEADS={self.num_heads}")
        need(self.num_heads % self.num_kv_heads == 0, "num_heads", f"must be a multiple of NUM_KV_HEADS={self.num_kv_heads}")
        need(self.rope_dims % 2 == 0 and self.rope_dims <= self.model_dim // self.num_heads, "rope_dims",
             f"must be even and at most the head dim ({self.model_dim // self.num_heads})")
        need(re.fullmatch(r"[\w.-]+", self.run_id) is not None, "run_id", "may hold only letters, digits, '_', '.', '-'")
        need(parses(lambda: self.percentiles and all(0 < p <= 1 for p in self.percentiles)), "clip_percentiles",
             "must be a comma-separated list of numbers in (0, 1]")
        need(parses(lambda: len(self.layer_slopes) == self.num_layers and all(-1 <= s <= 1 for s in self.layer_slopes)),
             "leaky_relu_slopes", f"must be {self.num_layers} comma-separated numbers in [-1, 1], one per layer")

TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")

def csv_numbers(text: str, kind: type = float) -> tuple:
    """A comma-separated setting's numbers ("" = none)."""
    return tuple(kind(v) for v in text.split(",")) if text else ()

def parses(check) -> bool:
    """check(), or False where a list setting does not parse (or is empty where it needs an item)."""
    try:
        return bool(check())
    except (ValueError, IndexError):
        return False

def parse_env_value(name: str, raw: str, kind: type):
    if kind is bool:
        word = raw.strip().lower()
        if word not in TRUE_WORDS + FALSE_WORDS:
            raise ConfigError(f"{name}={raw!r} is not a boolean (use one of {', '.join(TRUE_WORDS + FALSE_WORDS)})")
        return word in TRUE_WORDS
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a valid {kind.__name__}") from None

class ConfigError(ValueError): pass  # a setting that cannot work
class DataError(RuntimeError): pass  # shards or tokenizer missing or wrong
class ArtifactError(RuntimeError): pass  # an artifact that cannot be read or does not fit
class TrainingError(RuntimeError): pass  # a run that cannot go on (a non-finite loss, a switch lost in compile)

USER_ERRORS = (ConfigError, DataError, ArtifactError, TrainingError, OSError)  # one `error:` line, exit code 2

# ------------------------------------------------------------------------------------------------------------- data
SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
HEADER_BYTES = 4 * HEADER_INTS
DOWNLOAD_HINT = "download them with: python3 data/cached_challenge_fineweb.py --variant sp1024 --train-shards 80"

def read_shard(path: str, vocab_size: int = 1 << 16) -> np.ndarray:
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
    tokens = np.fromfile(path, dtype="<u2", count=count, offset=HEADER_BYTES)
    if count and int(tokens.max()) >= vocab_size:
        raise DataError(f"{path}: token id {int(tokens.max())} is outside VOCAB_SIZE={vocab_size}: "
                        "the shards were made with another tokenizer")
    return tokens

def list_shards(data_path: str, split: str) -> list[str]:
    pattern = os.path.join(data_path, f"fineweb_{split}_*.bin")
    files = sorted(glob.glob(pattern))
    if not files:
        raise DataError(f"no {split} shards match {pattern}; set DATA_PATH or {DOWNLOAD_HINT}")
    return files

class TokenStream:
    """Tokens of the shards in order, cycling forever."""
    def __init__(self, files: list[str], vocab_size: int = 1 << 16):
        self.files, self.vocab_size, self.file_idx, self.pos = files, vocab_size, 0, 0
        self.tokens = read_shard(files[0], vocab_size)
    def take(self, n: int) -> np.ndarray:
        parts = []
        while n > 0:
            if self.pos >= len(self.tokens):
                self.file_idx = (self.file_idx + 1) % len(self.files)
                self.tokens, self.pos = read_shard(self.files[self.file_idx], self.vocab_size), 0
            k = min(n, len(self.tokens) - self.pos)
            parts.append(self.tokens[self.pos:self.pos + k])
            self.pos, n = self.pos + k, n - k
        return np.concatenate(parts)

class TrainLoader:
    """Each step reads one global batch; rank r, micro-step m gets slice m * world + r (disjoint, covering).
    A worker thread reads and pins the next step's tokens while the GPU runs this one."""
    def __init__(self, files, rank, world, accum, batch_tokens, seq_len, device, vocab_size=1 << 16):
        self.files, self.rank, self.world, self.accum = files, rank, world, accum
        self.seq_len, self.device, self.vocab_size = seq_len, device, vocab_size
        self.local_tokens = batch_tokens // (world * accum)
        self.worker = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self.reset()
    def reset(self):
        """Back to the first token of the first shard."""
        if hasattr(self, "pending"):
            self.pending.result()
        self.stream = TokenStream(self.files, self.vocab_size)
        self.pending = self.worker.submit(self._read_step)
    def _read_step(self) -> list[Tensor]:
        span = self.local_tokens + 1
        chunk = self.stream.take(span * self.world * self.accum)
        out = []
        for m in range(self.accum):
            i = m * self.world + self.rank
            buf = torch.from_numpy(chunk[i * span:(i + 1) * span].astype(np.int64))
            out.append(buf.pin_memory() if self.device.type == "cuda" else buf)
        return out
    def next_step(self) -> list[tuple[Tensor, Tensor]]:
        host, self.pending = self.pending.result(), self.worker.submit(self._read_step)
        out = []
        for buf in host:
            buf = buf.to(self.device, non_blocking=True)
            out.append((buf[:-1].view(-1, self.seq_len), buf[1:].view(-1, self.seq_len)))
        return out

def load_val_tokens(data_path: str, min_len: int, vocab_size: int = 1 << 16) -> np.ndarray:
    tokens = np.concatenate([read_shard(f, vocab_size) for f in list_shards(data_path, "val")])
    if len(tokens) < min_len + 1:
        raise DataError(f"validation split has {len(tokens)} tokens, fewer than one sequence ({min_len} + 1)")
    return tokens

def load_tokenizer(path: str, vocab_size: int):
    import sentencepiece as spm
    if not os.path.isfile(path):
        raise DataError(f"tokenizer {path} not found; set TOKENIZER_PATH or {DOWNLOAD_HINT}")
    try:
        sp = spm.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as e:
        raise DataError(f"tokenizer {path} is not a SentencePiece model ({str(e).strip()[:120]})") from None
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
class CastedLinear(nn.Linear):
    """fp32 master weight used in the activation dtype; `qat` (a Quantizer) turns on straight-through fake
    quantisation with the export's quantiser. It is an instance attribute, so torch.compile guards on it."""
    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        self.zero_init = zero_init
        self.qat: Quantizer | None = None
        self.lora: tuple[Tensor, Tensor] | None = None  # TTT_MODE=lora's per-document deltas (DocLoRA)
    def cast_weight(self, dtype: torch.dtype) -> Tensor:
        w = self.weight if self.qat is None else self.qat.qat_weight(self.weight)
        return w.to(dtype)
    def forward(self, x: Tensor) -> Tensor:
        return add_lora(self, x, F.linear(x, self.cast_weight(x.dtype)))

def add_lora(m: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """y = m(x), plus the low-rank delta (x @ A[d]) @ B[d] of batch row d where DocLoRA set m.lora = (A, B)."""
    return y if m.lora is None else y + (x @ m.lora[0].to(x.dtype)) @ m.lora[1].to(x.dtype)

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
    """Causal attention on (B, T, H, D) tensors with GQA (impl fa3 or sdpa); returns (B, T, H, D)."""
    if impl == "fa3":
        from flash_attn_interface import flash_attn_func
        out = flash_attn_func(q, k, v, causal=True)
        return out[0] if isinstance(out, tuple) else out
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.size(1) != k.size(1))
    return y.transpose(1, 2)

SDPA_KERNELS = ("cudnn", "flash", "efficient", "math")
ATTN_BACKENDS = ("auto", "fa3", *SDPA_KERNELS)

def sdpa_backend(kernel: str):
    from torch.nn.attention import SDPBackend
    return {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[kernel]

def relative_error(a: Tensor, ref: Tensor) -> float:
    """|a - ref| / |ref| in float64 (Frobenius norms)."""
    return ((a.double() - ref).norm() / ref.norm()).item()

def select_attention(hp: Hyperparameters, device: torch.device, batch_seqs: int, log) -> str:
    """ATTN_BACKEND resolved to an `attention` impl. auto: the first of FA3 and the SDPA kernels cuDNN, flash,
    efficient (fastest first on H100 and H200: tools/gpu_bench.py attention) that runs at the training shapes
    (batch_seqs sequences per micro-step) and matches a float64 reference. A named backend must pass the same check."""
    if device.type != "cuda":
        log("attention: torch SDPA on CPU")
        return "sdpa"
    from torch.nn.attention import sdpa_kernel
    hd, T = hp.model_dim // hp.num_heads, hp.train_seq_len
    q = torch.randn(batch_seqs, T, hp.num_heads, hd, device=device, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(batch_seqs, T, hp.num_kv_heads, hd, device=device, dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    with sdpa_kernel(sdpa_backend("math")):
        ref = attention(*(t[:1].detach().double() for t in (q, k, v)), "sdpa")
    notes = []
    for name in ["fa3", "cudnn", "flash", "efficient"] if hp.attn_backend == "auto" else [hp.attn_backend]:
        impl = "fa3" if name == "fa3" else "sdpa"
        try:
            with sdpa_kernel(sdpa_backend(name)) if impl == "sdpa" else contextlib.nullcontext(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # SDPA kernels that cannot take these inputs warn, then raise
                out = attention(q, k, v, impl)
                out.sum().backward()
                err = relative_error(out[:1], ref)
        except Exception as e:  # a kernel that cannot take these shapes or dtypes says so in various ways
            notes.append(f"{name} failed ({type(e).__name__}: {str(e)[:120]})")
            continue
        if err > 1e-2:
            notes.append(f"{name} rejected (relative error {err:.1e})")
            continue
        for kernel, setter in zip(SDPA_KERNELS, (torch.backends.cuda.enable_cudnn_sdp, torch.backends.cuda.enable_flash_sdp,
                                                 torch.backends.cuda.enable_mem_efficient_sdp, torch.backends.cuda.enable_math_sdp)):
            setter(name == "fa3" or kernel == name)
        log(f"attention: {name} (relative error {err:.1e} at B={batch_seqs}" + "".join(f"; {n}" for n in notes) + ")")
        return impl
    raise ConfigError(f"ATTN_BACKEND={hp.attn_backend}: no attention implementation runs correctly here ({'; '.join(notes)})")

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
        projs = (self.c_q, self.c_k, self.c_v)  # three Muon matrices, one matrix product per call
        qkv = F.linear(x, torch.cat([m.cast_weight(x.dtype) for m in projs]))
        q, k, v = (add_lora(m, x, t).view(B, T, -1, self.head_dim)
                   for m, t in zip(projs, qkv.split([m.out_features for m in projs], dim=-1)))
        v = v if ve is None else v + ve.view(B, T, self.kv_heads, self.head_dim)
        q = rms_norm(q) * self.q_gain.to(q.dtype)[:, None]
        k = rms_norm(k)
        freqs = torch.outer(torch.arange(T, device=x.device, dtype=torch.float32), self.inv_freq)
        q, k = apply_partial_rope(q, freqs.cos(), freqs.sin()), apply_partial_rope(k, freqs.cos(), freqs.sin())
        y = attention(q, k, v, self.attn_impl)
        y = remove_self_value(y, v) if self.xsa else y
        return self.proj(y.reshape(B, T, C))

def squared_act(pre: Tensor, slope: float) -> Tensor:
    return (F.leaky_relu(pre, slope) if slope else F.relu(pre)).square()

MLP_KERNELS = ("auto", "triton", "torch")
MLP_GRAD_TILES = (128, 128, 64, 4, 3)  # BM, BN, BK, warps, stages: the fastest in tools/gpu_bench.py mlp on H100

if triton is not None:
    @triton.jit
    def squared_act_grad_kernel(a_ptr, b_ptr, out_ptr, saved_ptr, M, N, K: tl.constexpr, s_am, s_ak, s_bn, s_bk,
                                SLOPE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """d pre = (A @ B.T) * d leaky(pre)^2 / d pre for A = d out (M, K) and B = W_proj.T (N, K), strided; out
        and saved (the forward's pre) are contiguous (M, N)."""
        n_blocks = tl.cdiv(N, BN)
        pid = tl.program_id(0)  # consecutive programs share a row block of A: it is read once from HBM
        rm = ((pid // n_blocks) * BM + tl.arange(0, BM)).to(tl.int64)
        rn = (pid % n_blocks) * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            k = k0 + rk
            a = tl.load(a_ptr + rm[:, None] * s_am + k[None, :] * s_ak, mask=(rm[:, None] < M) & (k[None, :] < K), other=0.0)
            b = tl.load(b_ptr + rn[None, :] * s_bn + k[:, None] * s_bk, mask=(rn[None, :] < N) & (k[:, None] < K), other=0.0)
            acc = tl.dot(a, b, acc)
        offs, mask = rm[:, None] * N + rn[None, :], (rm[:, None] < M) & (rn[None, :] < N)
        saved = tl.load(saved_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc = acc * 2.0 * tl.where(saved > 0, saved, saved * SLOPE * SLOPE)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)

def launch_squared_act_grad(d_out: Tensor, w_proj: Tensor, saved: Tensor, slope: float, tiles) -> Tensor:
    (M, K), N, out = d_out.shape, w_proj.size(1), torch.empty_like(saved)
    bm, bn, bk, warps, stages = tiles
    squared_act_grad_kernel[(triton.cdiv(M, bm) * triton.cdiv(N, bn),)](
        d_out, w_proj, out, saved, M, N, K, d_out.stride(0), d_out.stride(1), w_proj.stride(1), w_proj.stride(0),
        SLOPE=slope, BM=bm, BN=bn, BK=bk, num_warps=warps, num_stages=stages)
    return out

@torch.library.custom_op("pgolf::squared_act_grad", mutates_args=())
def squared_act_grad(d_out: Tensor, w_proj: Tensor, saved: Tensor, slope: float) -> Tensor:
    """The MLP's d pre from d out (M, dim), W_proj (dim, hidden) and the forward's pre."""
    return launch_squared_act_grad(d_out, w_proj, saved.contiguous(), slope, MLP_GRAD_TILES)

@squared_act_grad.register_fake
def _(d_out, w_proj, saved, slope):
    return torch.empty_like(saved)

class SquaredActMLP(torch.autograd.Function):
    """leaky(x @ W_fc.T)^2 @ W_proj.T for 2-D x: the forward is plain torch (inductor fuses it with its
    neighbours); the backward multiplies d act = d out @ W_proj by the activation's derivative inside the
    matrix product's epilogue, so d act is never written to memory."""
    @staticmethod
    def forward(ctx, x: Tensor, w_fc: Tensor, w_proj: Tensor, slope: float) -> Tensor:
        pre = x @ w_fc.t()
        act = squared_act(pre, slope)
        ctx.slope = slope
        ctx.save_for_backward(x, w_fc, w_proj, act, pre)
        return act @ w_proj.t()
    @staticmethod
    def backward(ctx, d_out: Tensor):
        x, w_fc, w_proj, act, pre = ctx.saved_tensors
        d_pre = squared_act_grad(d_out, w_proj, pre, ctx.slope)
        return d_pre @ w_fc, d_pre.t() @ x, d_out.t() @ act, None

class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, slope: float, kernel: str = "torch"):
        super().__init__()
        self.fc, self.proj = CastedLinear(dim, hidden), CastedLinear(hidden, dim, zero_init=True)
        self.slope, self.fused = slope, kernel == "triton"
    def forward(self, x: Tensor) -> Tensor:
        if self.fused and self.fc.lora is None and self.proj.lora is None:
            w_fc, w_proj = self.fc.cast_weight(x.dtype), self.proj.cast_weight(x.dtype)
            return SquaredActMLP.apply(x.reshape(-1, x.size(-1)), w_fc, w_proj, self.slope).view(*x.shape[:-1], -1)
        return self.proj(squared_act(self.fc(x), self.slope))

def mlp_output_and_grads(mlp: MLP, x: Tensor, d_out: Tensor) -> list[Tensor]:
    """[out, d x, d W_fc, d W_proj] of `mlp` at x for the upstream gradient d_out, both cast to its weights' dtype."""
    dtype = mlp.fc.weight.dtype
    x = x.detach().to(dtype).requires_grad_()
    out = mlp(x)
    return [out, *torch.autograd.grad(out, (x, mlp.fc.weight, mlp.proj.weight), d_out.to(dtype))]

def select_mlp_kernel(hp: Hyperparameters, device: torch.device, log) -> str:
    """MLP_KERNEL resolved: the fused Triton kernel where it runs and matches the torch path in float64 (output
    and all three gradients, at every layer's slope), else the torch path; an explicit request that cannot be met
    is an error."""
    want = hp.mlp_kernel
    if want == "torch" or (want == "auto" and (device.type != "cuda" or triton is None)):
        log("mlp: torch")
        return "torch"
    if triton is None:
        raise ConfigError("MLP_KERNEL=triton but triton is not importable")
    dim, hidden = hp.model_dim, int(hp.mlp_mult * hp.model_dim)
    gen = torch.Generator(device=device).manual_seed(0)
    x, w_fc, w_proj = (torch.randn(*s, device=device, generator=gen) / s[-1] ** 0.5 for s in ((4096, dim), (hidden, dim), (dim, hidden)))
    d_out = torch.randn(4096, dim, device=device, generator=gen)
    try:
        err = 0.0
        for slope in sorted(set(hp.layer_slopes)):
            errs = []
            for impl, dtype in (("triton", torch.bfloat16 if device.type == "cuda" else torch.float32), ("torch", torch.float64)):
                mlp = MLP(dim, hidden, slope, impl).to(device, dtype)
                mlp.load_state_dict({"fc.weight": w_fc, "proj.weight": w_proj})
                errs.append(mlp_output_and_grads(mlp, x, d_out))
            err = max(err, *(relative_error(a, r) for a, r in zip(*errs)))
        problem = "" if err <= 1e-2 else f"off by {err:.1e} against float64"
    except Exception as e:  # a GPU or triton build that cannot compile the kernel
        problem = f"{type(e).__name__}: {str(e)[:200]}"
    if not problem:
        log(f"mlp: triton (largest relative error of output and gradients vs float64: {err:.1e})")
        return "triton"
    if want == "triton":
        raise ConfigError(f"MLP_KERNEL=triton: the fused kernel failed its check ({problem})")
    log(f"mlp: torch (the fused kernel failed its check: {problem})")
    return "torch"

class Block(nn.Module):
    def __init__(self, hp: Hyperparameters, layer: int, attn_impl: str):
        super().__init__()
        dim = hp.model_dim
        self.attn = CausalSelfAttention(hp, xsa=layer >= hp.num_layers - hp.xsa_last_n, attn_impl=attn_impl)
        self.mlp = MLP(dim, int(hp.mlp_mult * dim), hp.layer_slopes[layer], hp.mlp_kernel)
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))
        self.ln_scale = 1.0 / math.sqrt(layer + 1) if hp.ln_scale else 1.0
        # two lanes: lanes[i, j] weighs output j (attention, MLP) into lane i (the one attention reads, MLP's); all
        # ones at init, so the lanes stay equal and the block is x + attn(x) + mlp(x), GPT-J's parallel block
        self.lanes = nn.Parameter(torch.ones(2, 2)) if 0 < hp.parallel_resid_start <= layer else None
    def forward(self, x: Tensor, x0: Tensor, ve: Tensor | None, mlp: MLP | None = None) -> Tensor:
        """x is (B, T, C), or with two lanes (2, B, T, C); `mlp` replaces the block's own (an untied recurrence pass)."""
        mlp = self.mlp if mlp is None else mlp
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        if self.lanes is not None:
            a, m, w = self.attn_scale.to(x.dtype) * self.attn(rms_norm(x[0]) * self.ln_scale, ve), \
                self.mlp_scale.to(x.dtype) * mlp(rms_norm(x[1]) * self.ln_scale), self.lanes.to(x.dtype)
            # pointwise: as an einsum, the 2x2 weight's gradient was a GEMM over B*T*C (+25% ms/step at 4 layers)
            return x + torch.stack((w[0, 0] * a + w[0, 1] * m, w[1, 0] * a + w[1, 1] * m))
        x = x + self.attn_scale.to(x.dtype) * self.attn(rms_norm(x) * self.ln_scale, ve)
        return x + self.mlp_scale.to(x.dtype) * mlp(rms_norm(x) * self.ln_scale)

class SmearGate(nn.Module):
    """x_t <- (1 - g) * x_t + g * x_{t-1}, with a learned per-dimension gate g = sigmoid(w)."""
    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim))
    def forward(self, x: Tensor) -> Tensor:
        g = torch.sigmoid(self.gate).to(x.dtype)
        return x + g * (F.pad(x[:, :-1], (0, 0, 1, 0)) - x)

BIGRAM_HASHES = ("mul", "xor")

class BigramHash(nn.Module):
    """Embedding of a hash of (previous, current) token, projected to the model dim; zero-initialised table."""
    def __init__(self, buckets: int, dim: int, model_dim: int, hash_kind: str = "mul"):
        super().__init__()
        self.buckets, self.hash_kind = buckets, hash_kind
        self.embed = nn.Embedding(buckets, dim)
        nn.init.zeros_(self.embed.weight)
        self.proj = CastedLinear(dim, model_dim)
        self.scale = nn.Parameter(torch.tensor(0.05))
    def forward(self, ids: Tensor, dtype: torch.dtype) -> Tensor:
        prev, cur = ids[:, :-1], ids[:, 1:]
        h = (prev * 92821 + cur if self.hash_kind == "mul" else (cur * 36313) ^ (prev * 27191)) % (self.buckets - 1)
        h = F.pad(h, (1, 0), value=self.buckets - 1)  # the first position has no previous token
        return self.proj(self.embed(h).to(dtype)) * self.scale.to(dtype)

class EngramLite(nn.Module):
    """Hashed n-gram embeddings: for each order (bigram; trigram) and head, a hash of the token and its
    predecessors picks a row of one shared table; the rows are concatenated, projected to the model dim (from zero)
    and scaled by a learned per-dimension sigmoid gate. Heads hash independently, so two n-grams that collide in
    one head rarely collide in all. A position reads only its own token and earlier ones."""
    def __init__(self, buckets: int, heads: int, orders: int, dim: int, model_dim: int):
        super().__init__()
        self.buckets, self.heads, self.orders = buckets, heads, orders
        self.embed = nn.Embedding(orders * heads * buckets, dim)
        nn.init.normal_(self.embed.weight, std=0.01)
        self.proj = CastedLinear(orders * heads * dim, model_dim, zero_init=True)
        nn.init.zeros_(self.proj.weight)  # GPT's init pass has run before this module is built
        self.gate = nn.Parameter(torch.zeros(model_dim))
        # an odd multiplier per (order, head, offset): Fibonacci hashing's 0x9E3779B1 times a running index
        mult = [(0x9E3779B1 * (i + 1)) % (1 << 31) | 1 for i in range(orders * heads * (orders + 1))]
        self.register_buffer("mult", torch.tensor(mult).view(orders, heads, orders + 1), persistent=False)
    def forward(self, ids: Tensor, dtype: torch.dtype) -> Tensor:
        back = [ids] + [F.pad(ids[:, :-k], (k, 0)) for k in range(1, self.orders + 1)]  # back[k] = token t - k (0 before the start)
        rows = []
        for o in range(self.orders):  # order o hashes tokens t - o - 1 ... t
            for h in range(self.heads):
                mixed = back[0] * self.mult[o, h, 0]
                for k in range(1, o + 2):
                    mixed = mixed ^ (back[k] * self.mult[o, h, k])
                rows.append(mixed % self.buckets + (o * self.heads + h) * self.buckets)
        e = self.embed(torch.stack(rows, dim=-1)).flatten(-2).to(dtype)
        return self.proj(e) * torch.sigmoid(self.gate).to(dtype)

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
        self.dtype, self.softcap = dtype, hp.logit_softcap
        self.tok_emb = nn.Embedding(hp.vocab_size, dim)
        nn.init.normal_(self.tok_emb.weight, std=hp.tied_embed_init_std)
        self.bigram = BigramHash(hp.bigram_vocab_size, hp.bigram_dim, dim, hp.bigram_hash) if hp.bigram_vocab_size else None
        self.smear = SmearGate(dim) if hp.smear_gate else None
        n_ve = min(hp.ve_last_n, L)
        self.ve_first = L - n_ve
        self.ve = ValueEmbedding(hp.vocab_size, hp.ve_dim, hp.num_kv_heads * dim // hp.num_heads) if n_ve else None
        self.ve_layer_scales = nn.Parameter(torch.ones(n_ve)) if n_ve else None
        self.blocks = nn.ModuleList(Block(hp, i, attn_impl) for i in range(L))
        self.n_enc, self.parallel_start = L // 2, hp.parallel_resid_start
        self.skip_weights = nn.Parameter(torch.ones(min(self.n_enc, L - self.n_enc), dim))
        for m in self.modules():
            if isinstance(m, CastedLinear):
                nn.init.zeros_(m.weight) if m.zero_init else nn.init.orthogonal_(m.weight)
        for m in [m for m in (self.bigram, self.ve) if m is not None and hp.aux_proj_init_scale]:
            m.proj.weight.data.mul_(1 / math.sqrt(2 * L))
        # built last, so that switching one on leaves the other modules' initial weights as they were
        self.skip_gates = nn.Parameter(torch.zeros_like(self.skip_weights)) if hp.skip_gates else None
        self.engram = EngramLite(hp.engram_buckets, hp.engram_heads, hp.engram_orders, hp.engram_dim, dim) if hp.engram_buckets else None
        self.recur, self.loops_on = hp.recur, hp.recur_loops if hp.recur else 0  # the training loop sets loops_on
        self.lora: tuple[Tensor, Tensor] | None = None  # the output head's DocLoRA deltas (add_lora)
        self.recur_mlps = nn.ModuleList(MLP(dim, int(hp.mlp_mult * dim), hp.layer_slopes[i], hp.mlp_kernel)
                                        for _ in range(hp.recur_loops) for i in hp.recur) if hp.recur_untie_mlp else None
        for mlp in self.recur_mlps or []:  # as the blocks' MLPs start: the extra pass adds nothing at first
            nn.init.orthogonal_(mlp.fc.weight)
            nn.init.zeros_(mlp.proj.weight)
    def layer_ve(self, ve: Tensor | None, i: int, dtype: torch.dtype) -> Tensor | None:
        return ve * self.ve_layer_scales[i - self.ve_first].to(dtype) if ve is not None and i >= self.ve_first else None
    def hidden(self, ids: Tensor) -> Tensor:
        x = self.tok_emb(ids).to(self.dtype)
        x = x if self.bigram is None else x + self.bigram(ids, self.dtype)
        x = x if self.engram is None else x + self.engram(ids, self.dtype)
        x = rms_norm(x)
        x = x if self.smear is None else self.smear(x)
        x0, skips = x, []
        ve = self.ve(ids, self.dtype) if self.ve is not None else None
        for i, block in enumerate(self.blocks):
            if i == self.parallel_start > 0:  # from here on two lanes (the encoder, whose outputs skip, has one)
                x = torch.stack((x, x))
            j = i - self.n_enc
            if 0 <= j < len(self.skip_weights):
                skip = self.skip_weights[j].to(x.dtype) * skips.pop()
                x = x + skip if self.skip_gates is None else torch.lerp(skip, x, torch.sigmoid(self.skip_gates[j]).to(x.dtype))
            x = block(x, x0, self.layer_ve(ve, i, x.dtype))
            if i < self.n_enc:
                skips.append(x)
            if self.recur and i == self.recur[-1]:  # depth recurrence: the layers again (the U-Net skips: first pass only)
                for n in range(self.loops_on):
                    for k, r in enumerate(self.recur):
                        mlp = self.recur_mlps[n * len(self.recur) + k] if self.recur_mlps is not None else None
                        x = self.blocks[r](x, x0, self.layer_ve(ve, r, x.dtype), mlp)
        return rms_norm(x.mean(0) if self.parallel_start else x)
    def forward(self, ids: Tensor, targets: Tensor, per_token: bool = False) -> Tensor:
        h = self.hidden(ids)
        logits = add_lora(self, h, F.linear(h, self.tok_emb.weight.to(self.dtype))).float()
        logits = self.softcap * torch.tanh(logits / self.softcap)
        losses = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction="none" if per_token else "mean")
        return losses.view(targets.shape) if per_token else losses

def build_model(hp: Hyperparameters, device: torch.device, attn_impl: str) -> GPT:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return GPT(hp, attn_impl, dtype).to(device)

def maybe_compile(model: nn.Module, hp: Hyperparameters):
    if hp.torch_compile:  # one graph per recurrence depth and QAT state (and the evaluation's): room for all
        torch._dynamo.config.recompile_limit = 16
    return torch.compile(model, dynamic=False, fullgraph=True) if hp.torch_compile else model

def quantized_linears(model: GPT, quant: Quantizer) -> list[CastedLinear]:
    """The layers whose weights the export stores at the block bits: the layers that late QAT fake-quantises."""
    return [m for n, m in model.named_modules() if isinstance(m, CastedLinear) and quant.kind(n + ".weight", m.weight) == "int"]

# -------------------------------------------------------------------------------------------------------- optimizer
QUINTIC_COEFFS = {  # odd quintic a*x + b*x^3 + c*x^5 per step; the last triple repeats beyond its list
    "newton_schulz": ((3.4445, -4.7750, 2.0315),),
    # Polar Express (Amsel et al. 2025): each step minimax-optimal on the interval the previous one leaves
    "polar_express": ((8.156554524902461, -22.48329292557795, 15.878769915207462),
                      (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                      (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                      (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                      (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)),
}
REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # renamed in torch 2.13
ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

def orthogonalize(G: Tensor, steps: int, method: str = "newton_schulz", row_norm: bool = False, margin: float = 1.01) -> Tensor:
    """Approximate the orthogonal polar factor of each matrix in a (N, m, n) batch, in bf16. row_norm (MuonEq-R)
    first scales every row to unit norm."""
    coeffs = QUINTIC_COEFFS[method]
    X = G.bfloat16()
    X = X / (X.float().norm(dim=-1, keepdim=True) + 1e-7).to(X.dtype) if row_norm else X
    tall = X.size(-2) > X.size(-1)
    X = X.mT if tall else X
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * margin + 1e-7)  # singular values <= 1, with a bf16 margin
    for i in range(steps):
        a, b, c = coeffs[min(i, len(coeffs) - 1)]
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X

def attach_grad_buffer(params: list[Tensor], shape: tuple) -> Tensor:
    """A zeroed fp32 buffer whose slices are the params' .grad: backward accumulates straight into it, so a
    group is reduced, clipped and zeroed as one tensor. `shape` is (slots, *param shape) for a bank of
    same-shape matrices (spare slots stay zero) or (total numel,) for a flat buffer."""
    buf = torch.zeros(shape, device=params[0].device, dtype=torch.float32)
    offset = 0
    for i, p in enumerate(params):
        p.grad = buf[i] if buf.dim() > 1 else buf[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    return buf

class Muon(torch.optim.Optimizer):
    """Muon on parameter banks: the matrices of one shape share a gradient bank (N, m, n), N padded to a
    multiple of the world size. Each rank reduce-scatters a bank, applies Nesterov momentum to its slice and
    orthogonalises it with batched matmuls; the updates are all-gathered. Decoupled weight decay.
    Use: reduce_grads(), then step(grad_scale), then finish()."""
    def __init__(self, params, lr, momentum, ns_steps, wd, method="newton_schulz", world=1, compile_ns=False, row_norm=False,
                 margin=1.01):
        super().__init__(params, dict(lr=lr, momentum=momentum, wd=wd))
        self.ns_steps, self.method, self.world, self.row_norm, self.margin = ns_steps, method, world, row_norm, margin
        self.orthogonalize = torch.compile(orthogonalize, dynamic=False) if compile_ns else orthogonalize
        self.banks, self.pending = [], []  # banks: (group index, params, grad bank, this rank's summed slice)
        for gi, group in enumerate(self.param_groups):
            by_shape: dict[tuple, list[Tensor]] = {}
            for p in group["params"]:
                by_shape.setdefault(tuple(p.shape), []).append(p)
            for shape, ps in by_shape.items():
                per_rank = -(-len(ps) // world)
                bank = attach_grad_buffer(ps, (per_rank * world, *shape))
                self.banks.append((gi, ps, bank, bank.new_zeros((per_rank, *shape)) if world > 1 else bank))
    def reduce_grads(self) -> list:
        """Start summing the banks over ranks into each rank's slice (async handles)."""
        return [REDUCE_SCATTER(mine, bank, async_op=True) for _, _, bank, mine in self.banks] if self.world > 1 else []
    def local_sq_norm(self) -> Tensor:
        return sum(mine.square().sum() for *_, mine in self.banks)
    @torch.no_grad()
    def step(self, grad_scale: Tensor):
        """Momentum and orthogonalisation of this rank's slices; starts the all-gathers."""
        for gi, ps, bank, mine in self.banks:
            group, state = self.param_groups[gi], self.state[ps[0]]
            if "momentum" not in state:
                state["momentum"] = torch.zeros_like(mine)
            buf, g = state["momentum"], mine.mul_(grad_scale)  # the slice is scratch until the next backward
            buf.mul_(group["momentum"]).add_(g)
            O = self.orthogonalize(g.add_(buf, alpha=group["momentum"]), self.ns_steps, self.method, self.row_norm, self.margin)
            if self.world > 1:  # O stays referenced until the gather is done: gloo does not keep its input alive
                full = O.new_empty(bank.shape)
                self.pending.append((full, ALL_GATHER(full, O, async_op=True), O))
            else:
                self.pending.append((O, None, O))
    @torch.no_grad()
    def finish(self):
        """Wait for the gathered updates, then apply them."""
        for _, handle, _ in self.pending:
            if handle is not None:
                handle.wait()
        for (gi, ps, _, _), (O, _, _) in zip(self.banks, self.pending):
            group, (m, n) = self.param_groups[gi], ps[0].shape
            lr = group["lr"]
            if group["wd"]:
                torch._foreach_mul_(ps, 1.0 - lr * group["wd"])
            torch._foreach_add_(ps, list(O[:len(ps)].float().unbind(0)), alpha=-lr * max(1.0, m / n) ** 0.5)
        self.pending = []

class Optimizers:
    """Muon for the block matrices, AdamW for embedding tables (embed LR) and scalars/gates/vectors (scalar
    LR). Every gradient lives in a preallocated buffer: one step sums them over ranks (Muon banks
    reduce-scattered, the AdamW buffer all-reduced), clips by the global norm, and updates. No host sync."""
    def __init__(self, model: GPT, hp: Hyperparameters, rank: int, world: int, compile_ns: bool):
        matrices = [m.weight for m in model.modules() if isinstance(m, CastedLinear)]
        tables = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
        taken = {id(p) for p in matrices + tables}
        scalars = [p for p in model.parameters() if id(p) not in taken]
        self.clip_norm, self.rank, self.world, self.adam_lr_decay = hp.grad_clip_norm, rank, world, hp.adam_lr_decay
        self.muon = Muon(matrices, hp.matrix_lr, hp.muon_momentum, hp.muon_backend_steps, hp.muon_wd,
                         hp.muon_backend, world, compile_ns, hp.muon_row_norm, hp.ns_margin)
        self.adam_grads = attach_grad_buffer(tables + scalars, (sum(p.numel() for p in tables + scalars),))
        self.adam = torch.optim.AdamW([{"params": tables, "lr": hp.tied_embed_lr}, {"params": scalars, "lr": hp.scalar_lr}],
                                      betas=(hp.beta1, hp.beta2), eps=hp.adam_eps, weight_decay=hp.adam_wd,
                                      fused=self.adam_grads.is_cuda)
        self.grad_buffers = [bank for _, _, bank, _ in self.muon.banks] + [self.adam_grads]
        for g in self.muon.param_groups + self.adam.param_groups:
            g["base_lr"] = g["lr"]
    def step(self, lr_scale: float, momentum: float):
        for g in self.muon.param_groups:  # load_state_dict replaces the group dicts: set every step
            g["lr"], g["momentum"] = g["base_lr"] * lr_scale, momentum
        for g in self.adam.param_groups:
            g["lr"] = g["base_lr"] * (lr_scale if self.adam_lr_decay else 1.0)
        handles = self.muon.reduce_grads()
        if self.world > 1:
            handles.append(dist.all_reduce(self.adam_grads, async_op=True))
        for h in handles:
            h.wait()
        # the buffers hold sums over ranks; the AdamW buffer is the same on every rank, so rank 0 counts it
        sq = self.muon.local_sq_norm() + (self.adam_grads.square().sum() if self.rank == 0 else 0.0)
        if self.world > 1:
            dist.all_reduce(sq)
        grad_scale = torch.full_like(sq, 1.0 / self.world)
        if self.clip_norm > 0:
            grad_scale *= (self.clip_norm / (sq.sqrt() / self.world + 1e-6)).clamp(max=1.0)
        self.adam_grads.mul_(grad_scale)
        self.muon.step(grad_scale)
        self.adam.step()
        self.muon.finish()
        torch._foreach_zero_(self.grad_buffers)
    def state_dict(self) -> list[dict]:
        return [self.muon.state_dict(), self.adam.state_dict()]
    def load_state_dict(self, states: list[dict]):
        self.muon.load_state_dict(states[0])
        self.adam.load_state_dict(states[1])

# --------------------------------------------------------------------------------------------------------- schedule
@dataclasses.dataclass(frozen=True)
class Schedule:
    """Every time-dependent setting as a pure function of the run's progress p: the larger of step / ITERATIONS
    and training time / MAX_WALLCLOCK_SECONDS, so a 150 s run has the 600 s run's shape. p >= 1 ends the run."""
    iterations: int
    cap_ms: float  # 0 = no time cap
    warmdown_frac: float
    momentum_start: float
    momentum_end: float
    momentum_warmup_frac: float
    ema_frac: float  # 0 = no EMA
    late_qat_threshold: float  # 0 = no QAT
    lr_floor: float = 0.0
    recur_starts: tuple[float, ...] = ()  # where each depth-recurrence pass switches on
    @classmethod
    def from_hp(cls, hp: Hyperparameters) -> "Schedule":
        return cls(hp.iterations, 1000.0 * hp.train_seconds, hp.warmdown_frac, hp.muon_momentum_warmup_start,
                   hp.muon_momentum, hp.muon_momentum_warmup_frac, hp.ema_frac, hp.late_qat_threshold, hp.lr_floor,
                   hp.recur_starts if hp.recur else ())
    def progress(self, step: int, elapsed_ms: float) -> float:
        return max(step / self.iterations, elapsed_ms / self.cap_ms if self.cap_ms > 0 else 0.0)
    def warmdown(self, p: float) -> float:
        """1 until the warmdown (the last WARMDOWN_FRAC of the run), then linear to 0 at its end: the LR scale
        without its floor, which also times late QAT."""
        return max(0.0, min(1.0, (1.0 - p) / self.warmdown_frac)) if self.warmdown_frac > 0 else 1.0
    def lr_scale(self, p: float) -> float:
        return max(self.warmdown(p), self.lr_floor)
    def momentum(self, p: float) -> float:
        """Muon momentum: linear from its start to its end value over the first MUON_MOMENTUM_WARMUP_FRAC."""
        t = min(1.0, p / self.momentum_warmup_frac) if self.momentum_warmup_frac > 0 else 1.0
        return self.momentum_start + t * (self.momentum_end - self.momentum_start)
    def ema_decay(self, dp: float) -> float:
        """EMA decay for a step of dp progress: the time constant is EMA_FRAC of the run (0.997 per step at ~7,100)."""
        return math.exp(-dp / self.ema_frac) if self.ema_frac > 0 else 0.0
    def recur_loops(self, p: float) -> int:
        """Depth recurrence: the extra passes that run at progress p (each from its RECUR_START_FRAC)."""
        return sum(p >= f for f in self.recur_starts)
    def recur_counts(self, p: float) -> list[int]:  # the extra-pass counts the run meets from progress p on: a graph each
        return sorted({self.recur_loops(f) for f in (p, *self.recur_starts) if f >= p})
    def qat(self, p: float) -> bool:
        """Late QAT: on once the warmdown is below LATE_QAT_THRESHOLD (and then to the end: it only falls)."""
        return self.late_qat_threshold > 0 and self.warmdown(p) < self.late_qat_threshold
    def qat_start(self) -> float:
        return 1.0 - self.late_qat_threshold * self.warmdown_frac  # where the warmdown crosses LATE_QAT_THRESHOLD

class RunClock:
    """Training milliseconds since start(). Under a time cap with several ranks every rank follows rank 0's clock, so
    all take the same LR, EMA decay and stop step: it is broadcast at every step up to `sync_every`, then every
    `sync_every` steps, and extrapolated at the mean step time in between (step 0's clock reads ~0)."""
    def __init__(self, device: torch.device, world: int, sync_every: int, capped: bool):
        self.device, self.sync_every, self.shared = device, sync_every, capped and world > 1
        self.synced, self.t0 = (0, 0.0), time.perf_counter()
    def start(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()
    def elapsed_ms(self, step: int) -> float:
        ms = 1000 * (time.perf_counter() - self.t0)
        if not self.shared:
            return ms
        if step <= self.sync_every or step % self.sync_every == 0:
            clock = torch.tensor(ms, device=self.device, dtype=torch.float64)
            dist.broadcast(clock, 0)
            self.synced = (step, clock.item())
        at, ms = self.synced
        return ms + (step - at) * ms / max(at, 1)

# --------------------------------------------------------------------------------------------------------- training
TrainingParts = collections.namedtuple("TrainingParts", "loader model compiled opt")  # TrainLoader, GPT, its compiled form, Optimizers

def grad_accum_steps(hp: Hyperparameters, world: int) -> int:
    return hp.grad_accum_steps or max(1, 8 // world)

def setup_training(hp: Hyperparameters, rank: int, world: int, device: torch.device, attn_impl: str, log) -> TrainingParts:
    accum = grad_accum_steps(hp, world)
    if hp.train_batch_tokens % (world * accum * hp.train_seq_len):
        raise ConfigError(f"TRAIN_BATCH_TOKENS={hp.train_batch_tokens} must divide into {world} ranks x {accum} "
                          f"micro-steps x TRAIN_SEQ_LEN={hp.train_seq_len}")
    loader = TrainLoader(list_shards(hp.data_path, "train"), rank, world, accum, hp.train_batch_tokens,
                         hp.train_seq_len, device, hp.vocab_size)
    model = build_model(hp, device, attn_impl)
    log(f"model_params:{sum(p.numel() for p in model.parameters())} world_size:{world} grad_accum_steps:{accum}")
    if world > 1:  # every rank starts from rank 0's weights (the gradients are summed by the optimizer)
        for t in model.state_dict().values():
            dist.broadcast(t, 0)
    return TrainingParts(loader, model, maybe_compile(model, hp), Optimizers(model, hp, rank, world, hp.torch_compile))

def train_step(parts: TrainingParts, lr_scale: float, momentum: float, mark=lambda phase: None) -> Tensor:
    """One optimizer step on the next global batch; returns the mean loss (on device). `mark(phase)` is called
    as each phase is queued (tools/step_timing.py times them)."""
    batches = parts.loader.next_step()
    mark("data")
    loss_sum = torch.zeros((), device=batches[0][0].device)
    for x, y in batches:
        loss = parts.compiled(x, y)
        mark("forward")
        (loss / len(batches)).backward()
        mark("backward")
        loss_sum += loss.detach()
    parts.opt.step(lr_scale, momentum)
    mark("optimizer")
    return loss_sum / len(batches)

def set_qat(layers: list[CastedLinear], quant: Quantizer | None):
    for m in layers:
        m.qat = quant

def fit_qat_floor(model: GPT, weights: list[Tensor], quant: Quantizer, budget: float, world: int, log):
    """QAT_SIZE_FIT: raise `quant`'s clip floor (a device scalar) by 10% steps until `estimated_bytes` of `weights`
    fits `budget`, then bisect the last step 4 times (within 0.7%): late QAT trains on the grid the export writes."""
    state = dict(zip((n for n, _ in model.named_parameters()), weights))
    estimate = lambda f: estimated_bytes(state, dataclasses.replace(quant, clip_floor=f))
    t0, low, floor = time.perf_counter(), 0.0, quant.clip_floor.item()
    while (est := estimate(floor)) > budget and floor < 100:
        low, floor = floor, floor * 1.1
    for _ in range(4 if low else 0):
        mid = (low + floor) / 2
        low, floor, est = (low, mid, mid_est) if (mid_est := estimate(mid)) <= budget else (mid, floor, est)
    quant.clip_floor.fill_(floor)
    if world > 1:
        dist.broadcast(quant.clip_floor, 0)
    log(f"qat_size_fit: clip_floor {floor:.4f}, estimated {est:,.0f} bytes for {budget:,.0f} in {time.perf_counter() - t0:.1f}s")

def check_switch(model: nn.Module, batch: tuple[Tensor, Tensor], switch, off, on, what: str, fix: str):
    """A switch read in the compiled forward must reach it: at the same weights and batch the loss with it on must
    differ from the loss with it off (a switch that torch.compile folded into the graph would not). Returns both."""
    losses = []
    for state in (off, on):
        switch(state)
        losses.append(model(*batch).item())
    switch(off)
    if losses[0] == losses[1]:
        raise TrainingError(f"{what} does not change the compiled forward (loss {losses[0]:.6f} with and without): "
                            f"the switch was folded into the graph; {fix}")
    return losses

def compile_warmup(parts: TrainingParts, hp: Hyperparameters, sched: Schedule, qat_layers, quant: Quantizer, log):
    """WARMUP_STEPS steps so that torch.compile builds every graph the run needs (in turn: each number of depth
    recurrence passes, then late QAT with each number it will meet), checks that the QAT and recurrence switches reach the
    compiled forward, then the initial model, optimizer state and data position are restored."""
    if hp.warmup_steps <= 0:
        return
    initial, opt_states = {k: v.detach().clone() for k, v in parts.model.state_dict().items()}, parts.opt.state_dict()
    loops, model = len(sched.recur_starts), parts.model
    states = [(n, None) for n in sched.recur_counts(0.0)] + \
        [(n, quant) for n in sched.recur_counts(sched.qat_start()) if hp.late_qat_threshold > 0 and qat_layers]
    t0 = time.perf_counter()
    for i in range(hp.warmup_steps):
        model.loops_on, qat = states[i * len(states) // hp.warmup_steps]
        set_qat(qat_layers, qat)
        train_step(parts, sched.lr_scale(0.0), sched.momentum(0.0))
    log(f"warmup:{hp.warmup_steps} steps in {time.perf_counter() - t0:.1f}s (compile included) graphs (extra passes, QAT):"
        + "".join(f" {n}{'+qat' if q else ''}" for n, q in states))
    batch = parts.loader.next_step()[0]
    if hp.late_qat_threshold > 0 and qat_layers:
        off, on = check_switch(parts.compiled, batch, lambda q: set_qat(qat_layers, q), None, quant, "late QAT",
                               "LATE_QAT_THRESHOLD=0 trains without it")
        log(f"qat_check: compiled loss {off:.6f} with fake quantisation off, {on:.6f} on")
    if loops:
        off, on = check_switch(parts.compiled, batch, lambda n: setattr(model, "loops_on", n), 0, loops,
                               "depth recurrence", "RECUR_LAYERS unset trains without it")
        log(f"recur_check: compiled loss {off:.6f} with no extra pass, {on:.6f} with {loops}")
    set_qat(qat_layers, None)
    model.loops_on = sched.recur_loops(0.0)
    model.load_state_dict(initial)
    parts.opt.load_state_dict(opt_states)
    parts.loader.reset()

def collect_hessians(model: GPT, loader: TrainLoader, batches: int, quant: Quantizer, world: int) -> dict[str, Tensor]:
    """GPTQ's calibration: X^T X of the inputs of every matrix the export quantises, summed over the training
    loader's next `batches` batches and over ranks. The block matrices' inputs, and for the tied embedding the
    final hidden state, the input of the output head (its other use, the token lookup, has no input to weigh)."""
    sums: dict[str, Tensor] = {}
    def add(names: list[str], x: Tensor):
        x = x.detach().reshape(-1, x.size(-1)).double()  # float64: no TF32 in the Hessian
        gram = x.T @ x  # once for q, k and v, which share their input
        for n in names:
            sums[n] = sums[n] + gram if n in sums else gram.clone()
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, CausalSelfAttention):  # q, k and v read the block's input in one matrix product
            names = [f"{name}.{c}.weight" for c in ("c_q", "c_k", "c_v")]
        elif isinstance(m, CastedLinear):
            names = [f"{name}.weight"]
        else:
            continue
        hooks.append(m.register_forward_pre_hook(lambda _, args, names=names: add(names, args[0])))
    fused = [m for m in model.modules() if isinstance(m, MLP) and m.fused]
    try:
        for m in fused:  # the fused MLP reads its weights directly; the plain path calls fc and proj
            m.fused = False
        with torch.no_grad():
            for _ in range(batches):
                for x, _ in loader.next_step():
                    add(["tok_emb.weight"], model.hidden(x))
    finally:
        for h in hooks:
            h.remove()
        for m in fused:
            m.fused = True
    hessians = {n: h for n, h in sorted(sums.items()) if quant.kind(n, model.get_parameter(n)).startswith("int")}
    if world > 1:
        for h in hessians.values():
            dist.all_reduce(h)
    return hessians

def calibrate(parts: TrainingParts, hp: Hyperparameters, quant: Quantizer, world: int, train_s: float, log) -> dict:
    """The Hessians for GPTQ, timed against the training budget they belong to."""
    t0 = time.perf_counter()
    hessians = collect_hessians(parts.model, parts.loader, hp.gptq_calib_batches, quant, world)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    took, cap = time.perf_counter() - t0, hp.max_wallclock_seconds
    msg = f"gptq_calibration: {hp.gptq_calib_batches} training batches, {len(hessians)} Hessians in {took:.1f}s"
    if cap > 0:
        msg += f"; training {train_s:.1f}s + calibration {took:.1f}s = {train_s + took:.1f}s of MAX_WALLCLOCK_SECONDS={cap:g}"
    if 0 < cap < train_s + took:
        msg += f": OVERRAN the budget by {train_s + took - cap:.1f}s (raise GPTQ_RESERVE_SECONDS)"
    log(msg)
    return hessians

def train(hp: Hyperparameters, rank: int, world: int, device: torch.device, attn_impl: str, log,
          code_bytes: int) -> tuple[GPT, dict[str, Tensor], float]:
    """The training loop; returns the final (averaged) model, GPTQ's Hessians and the clip floor QAT trained on."""
    parts = setup_training(hp, rank, world, device, attn_impl, log)
    sched, quant = Schedule.from_hp(hp), QUANTIZERS[hp.quantizer].from_hp(hp)
    if hp.fits_at_qat:  # a device scalar: the fit moves the compiled QAT graph's floor without a recompile
        quant = dataclasses.replace(quant, clip_floor=torch.full((), hp.quant_clip_floor, device=device))
    qat_layers = quantized_linears(parts.model, quant)
    compile_warmup(parts, hp, sched, qat_layers, quant, log)
    params = list(parts.model.parameters())
    weights = [p.detach() for p in params]  # views that follow the in-place optimizer updates
    ema = [w.clone() for w in weights] if hp.ema_frac > 0 else None  # the EMA is what the run exports
    clock = RunClock(device, world, hp.clock_sync_every, capped=sched.cap_ms > 0)
    qat_on, nonfinite, last_loss = False, torch.zeros((), device=device, dtype=torch.bool), torch.zeros((), device=device)
    step, progress, phases = 0, 0.0, [(0, 0.0)]  # phases: (step, ms) where each recurrence phase began
    clock.start()
    while True:
        elapsed_ms = clock.elapsed_ms(step)
        new_progress = sched.progress(step, elapsed_ms)
        stop = new_progress >= 1.0
        if step > 0 and ema is not None:
            torch._foreach_lerp_(ema, weights, 1.0 - sched.ema_decay(new_progress - progress))
        progress = min(new_progress, 1.0)
        scale = sched.lr_scale(progress)
        if step > 0 and (step % hp.train_log_every == 0 or step <= 10 or stop):
            stats = torch.stack((last_loss.float(), nonfinite.float()))
            if world > 1:
                dist.all_reduce(stats)
            if stats[1] > 0:
                raise TrainingError(f"non-finite train loss by step {step}: stopping (lower the LRs or check the data)")
            avg = elapsed_ms / step
            log(f"step:{step}/{hp.iterations} train_loss:{stats[0].item() / world:.4f} train_time:{elapsed_ms / 1000:.1f}s "
                f"step_avg:{avg:.2f}ms tok/s:{hp.train_batch_tokens / avg * 1000:,.0f} lr_scale:{scale:.3f} "
                f"eta:{elapsed_ms * (1 - progress) / progress / 1000:.0f}s")
        if stop:
            break
        if not qat_on and sched.qat(progress):
            if hp.fits_at_qat:  # the EMA is what the export writes
                fit_qat_floor(parts.model, ema or weights, quant, min(hp.size_target, hp.size_limit) - code_bytes, world, log)
            set_qat(qat_layers, quant)
            qat_on = True
            log(f"late_qat:on step:{step} lr_scale:{scale:.3f}")
        if (loops := sched.recur_loops(progress)) != parts.model.loops_on:  # a graph the warm-up compiled
            phases.append((step, elapsed_ms))
            parts.model.loops_on = loops
            log(f"recur:{parts.model.loops_on} extra passes of layers {hp.recur_layers} from step:{step} "
                f"({(elapsed_ms - phases[-2][1]) / max(step - phases[-2][0], 1):.2f} ms/step before)")
        last_loss = train_step(parts, scale, sched.momentum(progress))
        nonfinite |= ~torch.isfinite(last_loss)
        step += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
        log(f"peak_memory:{torch.cuda.max_memory_allocated() // 2**20}MiB")
    log(f"training done: {step} steps in {elapsed_ms / 1000:.1f}s ({elapsed_ms / max(step, 1):.2f} ms/step)")
    if len(phases) > 1:
        log(f"recur: {(elapsed_ms - phases[-1][1]) / max(step - phases[-1][0], 1):.2f} ms/step after the last switch")
    with torch.no_grad():
        if ema is not None:
            torch._foreach_copy_(weights, ema)
        if world > 1:  # a digest of the final weights: every rank must hold the same model
            digest = torch.stack([torch.stack([p.double().sum(), p.double().square().sum()]) for p in params]).sum(0)
            lo, hi = digest.clone(), digest.clone()
            dist.all_reduce(lo, op=dist.ReduceOp.MIN)
            dist.all_reduce(hi, op=dist.ReduceOp.MAX)
            log(f"ranks_in_sync:{int(torch.equal(lo, hi))}")
    set_qat(qat_layers, None)
    hessians = calibrate(parts, hp, quant, world, elapsed_ms / 1000, log) if isinstance(quant, GPTQ) else {}
    return parts.model, hessians, float(quant.clip_floor)

# ---------------------------------------------------------------------------------------------- quantization/export
def round_rows(w: Tensor, scale: Tensor, qmax: int) -> Tensor:
    return torch.clamp(torch.round(w.float() / scale.float()[:, None]), -qmax, qmax)

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
        q = round_rows(w, scale, qmax)
        err = (q * scale[:, None] - w).square().sum(1)
        if best_err is None:
            best_q, best_scale, best_err = q, scale, err
        else:
            better = err < best_err
            best_q = torch.where(better[:, None], q, best_q)
            best_scale, best_err = torch.where(better, scale, best_scale), torch.minimum(err, best_err)
    return best_q.to(torch.int8), best_scale.half()

def sdclip_scales(w: Tensor, bits: int, k: float, clip_floor: float) -> Tensor:
    """SDClip: each row's clip is k standard deviations of the row (never below `clip_floor`), as an fp16 scale."""
    clip = (k * w.float().std(dim=1)).clamp_min(clip_floor)
    return (clip / (2 ** (bits - 1) - 1)).clamp_min(2 ** -24).half()

def dequantize_rows(q: Tensor, scale: Tensor) -> Tensor:
    return q.float() * scale.float()[:, None]

def gptq_rows(w: Tensor, hessian: Tensor, scale: Tensor, bits: int, damp: float, block: int) -> Tensor:
    """GPTQ (Frantar et al. 2022) on fixed row scales: columns are rounded one at a time, largest Hessian
    diagonal first, and each column's rounding error is spread over the columns not yet rounded so that the
    error in the layer's output, (W - Q) X with H = X^T X, is what is minimised rather than |W - Q|. The update
    uses the upper Cholesky factor U of H^-1: after column i, W[:, j] -= (w_i - q_i) / U[i, i] * U[i, j] for j > i,
    applied lazily a block of columns at a time."""
    qmax = 2 ** (bits - 1) - 1
    W, H = w.double().clone(), hessian.double().clone()  # float64: no TF32 in the error feedback on a GPU
    dead = (H.diagonal() == 0).nonzero().squeeze(1)  # inputs that were always zero: their weights do not matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    order = torch.argsort(H.diagonal(), descending=True)
    W, H = W[:, order], H[order][:, order]
    mean_diag = H.diagonal().mean()
    for attempt in range(5):  # a Hessian that is not positive definite gets more damping
        L, info = torch.linalg.cholesky_ex(H + (damp * 10 ** attempt) * mean_diag * torch.eye(len(H), device=H.device))
        if info == 0:
            break
    else:
        raise ArtifactError("GPTQ: the Hessian is not positive definite even with 10,000x damping")
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    s, Q, n = scale.double(), torch.empty_like(W), W.size(1)
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        Wb, Ub, errs = W[:, b0:b1], U[b0:b1, b0:b1], torch.empty_like(W[:, b0:b1])
        for j in range(b1 - b0):
            q = torch.clamp(torch.round(Wb[:, j] / s), -qmax, qmax)
            Q[:, b0 + j] = q
            errs[:, j] = (Wb[:, j] - q * s) / Ub[j, j]
            Wb[:, j + 1:] -= errs[:, j:j + 1] * Ub[j:j + 1, j + 1:]
        W[:, b1:] -= errs @ U[b0:b1, b1:]
    return Q[:, torch.argsort(order)].to(torch.int8)

CLIP_MODES = ("search", "sdclip")

@dataclasses.dataclass(frozen=True)
class Quantizer:
    """What the export does to each tensor, shared by late QAT, the export and the size fit. Block matrices
    (attention, MLP) become `bits`-bit integers per row, embedding tables `embed_bits`; control tensors stay fp32
    and the other small tensors fp16. Row scales come from CLIP_MODE; this quantiser (gptq_lite) then rounds each
    value to the nearest step. A Hessian-based one (GPTQ below) overrides `quantize`, which gets the tensor's name
    to find its Hessian. QAT rounds to the nearest step on the same scales: it sees no Hessians while training."""
    bits: int
    embed_bits: int
    percentiles: tuple[float, ...]
    clip_floor: float
    min_numel: int  # tensors with at most this many elements are not quantised
    clip_mode: str = "search"
    sdclip_k: float = 12.85
    sdclip_k_embed: float = 14.0
    bits_by_name: dict = dataclasses.field(default_factory=dict, compare=False)  # mixed precision: name -> bits
    @classmethod
    def from_hp(cls, hp: Hyperparameters) -> "Quantizer":
        return cls(hp.block_bits, hp.embed_quant_bits, hp.percentiles, hp.quant_clip_floor, hp.quant_min_numel,
                   clip_mode=hp.clip_mode, sdclip_k=hp.sdclip_k, sdclip_k_embed=hp.sdclip_k_embed)
    def kind(self, name: str, t: Tensor) -> str:
        """int: large matrices; int_embed: large embedding tables; fp32: control tensors (scales, gates, mixes,
        q gains, skip weights); fp16: the other small tensors."""
        if t.ndim == 2 and t.numel() > self.min_numel:
            return "int_embed" if name.endswith(("emb.weight", "embed.weight")) else "int"
        return "fp32" if t.ndim < 2 or name.endswith(("resid_mix", "skip_weights", "skip_gates", "lanes")) else "fp16"
    def bits_of(self, name: str, kind: str) -> int:
        return self.bits_by_name.get(name, self.bits if kind == "int" else self.embed_bits)
    def round_to_rows(self, w: Tensor, bits: int, embed: bool = False) -> tuple[Tensor, Tensor]:
        """(int8 values, fp16 row scales) of a 2-D tensor: CLIP_MODE's scales, values rounded to the nearest step."""
        if self.clip_mode == "search":
            return quantize_rows(w, bits, self.percentiles, self.clip_floor)
        scale = sdclip_scales(w, bits, self.sdclip_k_embed if embed else self.sdclip_k, self.clip_floor)
        return round_rows(w, scale, 2 ** (bits - 1) - 1).to(torch.int8), scale
    def quantize(self, name: str, w: Tensor, bits: int) -> tuple[Tensor, Tensor]:
        """(int8 values, fp16 row scales) of a 2-D tensor."""
        return self.round_to_rows(w, bits, embed=self.kind(name, w) == "int_embed")
    def fake_quantize(self, w: Tensor) -> Tensor:
        """A block matrix as the export's row quantiser stores it."""
        return dequantize_rows(*self.round_to_rows(w, self.bits)).to(w.dtype)
    def qat_weight(self, w: Tensor) -> Tensor:
        """A block matrix in late QAT's forward: the exported value with a straight-through gradient."""
        return w + (self.fake_quantize(w) - w).detach()

@dataclasses.dataclass(frozen=True)
class GPTQ(Quantizer):
    """QUANTIZER=gptq: the same row scales, rounded by `gptq_rows` with the Hessian of each matrix's inputs
    (`collect_hessians`, from training batches at the end of training); a tensor without one is rounded to the
    nearest step."""
    hessians: dict = dataclasses.field(default_factory=dict, compare=False)
    damp: float = 0.01
    block: int = 128
    memo: dict = dataclasses.field(default_factory=dict, compare=False)  # (name, bits, clip) -> result, for mixed bits
    @classmethod
    def from_hp(cls, hp: Hyperparameters) -> "GPTQ":
        return dataclasses.replace(super().from_hp(hp), damp=hp.gptq_damp, block=hp.gptq_block)
    def quantize(self, name: str, w: Tensor, bits: int) -> tuple[Tensor, Tensor]:
        if name not in self.hessians:
            return super().quantize(name, w, bits)
        key = (name, bits, self.clip_mode, self.clip_floor)
        if key not in self.memo:
            scale = self.round_to_rows(w, bits, embed=self.kind(name, w) == "int_embed")[1]
            self.memo[key] = gptq_rows(w, self.hessians[name], scale, bits, self.damp, self.block), scale
        return self.memo[key]

def entropy_bytes(q: Tensor) -> float:
    """The order-0 entropy of a tensor's integers, in bytes: about what the compressor needs for them."""
    counts = torch.bincount(q.flatten().long() + 128, minlength=256).double()
    p = counts[counts > 0] / q.numel()
    return float(-(p * p.log2()).sum()) * q.numel() / 8

def stored_bytes(q: Tensor, scale: Tensor) -> float:
    """About what the compressor needs for a quantised tensor: its values' entropy plus the fp16 row scales."""
    return entropy_bytes(q) + 2 * scale.numel()

def estimated_bytes(state: dict[str, Tensor], quant: Quantizer) -> float:
    """The artifact's size without compressing: `stored_bytes` of every quantised tensor, rounded to the nearest
    step (GPTQ's values cost about the same), and the rest at their stored width."""
    total = 0.0
    for name, t in state.items():
        kind = quant.kind(name, t)
        if kind.startswith("int"):
            total += stored_bytes(*quant.round_to_rows(t, quant.bits_of(name, kind), embed=kind == "int_embed"))
        else:
            total += t.numel() * (4 if kind == "fp32" else 2)
    return total

def output_error(w: Tensor, q: Tensor, scale: Tensor, hessian: Tensor | None) -> float:
    """tr((W - Q) H (W - Q)^T): the squared error quantisation adds to the layer's outputs over the calibration
    tokens (|W - Q|^2 without a Hessian)."""
    d = w.double() - dequantize_rows(q, scale).double()
    return float(((d @ hessian.double()) * d).sum()) if hessian is not None else float(d.square().sum())

def allocate_bits(state: dict[str, Tensor], quant: Quantizer, widths: tuple[int, ...], budget: float) -> dict[str, int]:
    """QUANT_BITS=mixed: every block matrix at widths[0]; then, while the added bytes (estimated by the entropy
    of the values plus fp16 scales) stay within `budget`, promote to its next width the matrix whose output error
    falls most per added byte."""
    names = [n for n, t in state.items() if quant.kind(n, t) == "int"]
    cost, err = {}, {}
    for n, b in itertools.product(names, widths):
        q, scale = quant.quantize(n, state[n], b)
        cost[n, b] = stored_bytes(q, scale)
        err[n, b] = output_error(state[n], q, scale, getattr(quant, "hessians", {}).get(n))
    bits, spent = {n: widths[0] for n in names}, 0.0
    while True:
        steps = [((err[n, bits[n]] - err[n, b]) / max(cost[n, b] - cost[n, bits[n]], 1.0), n, b)
                 for n in names for b in widths[widths.index(bits[n]) + 1:][:1]
                 if spent + cost[n, b] - cost[n, bits[n]] <= budget]
        if not steps:
            return bits
        _, n, b = max(steps)
        spent, bits[n] = spent + cost[n, b] - cost[n, bits[n]], b

QUANTIZERS = {"gptq_lite": Quantizer, "gptq": GPTQ}
ARTIFACT_MAGIC = b"PGA2"  # PGA1: one compressed stream, before CODEC_CHUNK
CODECS = {"zstd": 1, "brotli": 2}
MODEL_KEYS = ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "leaky_relu_slope",
              "rope_dims", "rope_base", "qk_gain_init", "ln_scale", "xsa_last_n", "ve_dim", "ve_last_n", "smear_gate",
              "bigram_vocab_size", "bigram_dim", "logit_softcap", "tied_embed_init_std", "leaky_relu_slopes",
              "engram_buckets", "engram_heads", "engram_orders", "engram_dim", "skip_gates", "bigram_hash",
              "parallel_resid_start", "recur_layers", "recur_loops", "recur_untie_mlp")

def codec_module(codec: str):
    try:
        return importlib.import_module({"zstd": "zstandard", "brotli": "brotli"}[codec])
    except ImportError as e:
        raise ConfigError(f"COMPRESSOR={codec} needs the {e.name} package (pip install -r requirements.txt)") from None

CODEC_CHUNK = 1 << 22  # brotli's window: chunks this long cost ~nothing against one stream (zstd: ~50 bytes each)

def compress(raw: bytes, codec: str) -> bytes:
    """zstd at level 22 or brotli at quality 11, in CODEC_CHUNK pieces compressed on all cores at once (both codecs
    release the GIL; a 27 MB payload takes brotli ~50 s on one), each stored after its u32 length."""
    m = codec_module(codec)
    one = (lambda c: m.ZstdCompressor(level=22).compress(c)) if codec == "zstd" else (lambda c: m.compress(c, quality=11))
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        parts = pool.map(one, [raw[i:i + CODEC_CHUNK] for i in range(0, max(len(raw), 1), CODEC_CHUNK)])
        return b"".join(len(p).to_bytes(4, "little") + p for p in parts)

def decompress(blob: bytes, codec: str) -> bytes:
    m = codec_module(codec)
    one, parts, i = m.ZstdDecompressor().decompress if codec == "zstd" else m.decompress, [], 0
    while i < len(blob) or not parts:  # an empty blob is not an empty payload: compress writes one chunk at least
        n = int.from_bytes(blob[i:i + 4], "little")
        parts.append(one(blob[i + 4:i + 4 + n]))
        i += 4 + n
    return b"".join(parts)

def shuffle_bytes(raw: bytes, stride: int, inverse: bool = False) -> bytes:
    """Byte 0 of every `stride`-byte group first, then byte 1, ...: neighbouring values' high and low bytes (or,
    for int8 values, alternate columns) end up in separate runs, which the compressor models better. The last
    len % stride bytes stay at the end. `inverse` undoes it."""
    if stride <= 1:
        return raw
    a = np.frombuffer(raw, dtype=np.uint8)
    n = len(a) - len(a) % stride
    return a[:n].reshape((stride, -1) if inverse else (-1, stride)).T.tobytes() + a[n:].tobytes()

def pack_state(state: dict[str, Tensor], hp: Hyperparameters, quant: Quantizer) -> bytes:
    """Quantise a state dict and lay it out as: u32 header length, JSON header, raw tensor bytes."""
    entries, chunks, offset = [], [], 0
    def add(name: str, kind: str, t: Tensor):
        nonlocal offset
        data = t.detach().cpu().contiguous().numpy().tobytes()
        entries.append([name, kind, str(t.dtype).removeprefix("torch."), list(t.shape), offset, len(data)])
        chunks.append(data)
        offset += len(data)
    for name, t in state.items():
        kind = quant.kind(name, t)
        if kind.startswith("int"):
            bits = quant.bits_of(name, kind)
            q, scale = quant.quantize(name, t, bits)
            add(name, f"int{bits}", q)
            add(name + ".scale", "scale", scale)
        else:
            add(name, kind, t.to(torch.float16 if kind == "fp16" else torch.float32))
    payload = b"".join(chunks)
    config = {k: v for k, v in dataclasses.asdict(hp).items() if k in MODEL_KEYS}
    header = json.dumps({"config": config, "tensors": entries, "crc32": zlib.crc32(payload)}, sort_keys=True).encode()
    return len(header).to_bytes(4, "little") + header + payload

def stored_tensors(raw: bytes) -> tuple[dict, dict[str, tuple[str, np.ndarray]]]:
    """pack_state's layout read back and checked, nothing dequantised: (header, name -> (kind, stored array))."""
    try:
        hlen = int.from_bytes(raw[:4], "little")
        header = json.loads(raw[4:4 + hlen])
        entries, crc, _ = header["tensors"], header["crc32"], header["config"]
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"artifact header unreadable: {e}") from None
    payload = memoryview(raw)[4 + hlen:]
    if zlib.crc32(payload) != crc:
        raise ArtifactError("artifact payload checksum mismatch: corrupt artifact")
    try:
        return header, {name: (kind, np.frombuffer(payload[off:off + n], dtype=getattr(np, dtype)).reshape(shape))
                        for name, kind, dtype, shape, off, n in entries}
    except (ValueError, TypeError, AttributeError) as e:  # a table that does not fit its payload
        raise ArtifactError(f"artifact tensor table does not match its payload ({type(e).__name__}: {e})") from None

def unpack_state(raw: bytes) -> tuple[dict, dict[str, Tensor]]:
    """Inverse of pack_state, dequantising on the way: returns (model config, fp32 state dict)."""
    header, stored = stored_tensors(raw)
    t = lambda name: torch.from_numpy(stored[name][1].copy())
    try:
        state = {name: dequantize_rows(t(name), t(name + ".scale")) if kind.startswith("int") else t(name).float()
                 for name, (kind, _) in stored.items() if kind != "scale"}
    except (KeyError, RuntimeError) as e:  # integers without their scales, or scales of another shape
        raise ArtifactError(f"artifact tensor table does not match its payload ({type(e).__name__}: {e})") from None
    return header["config"], state

def write_artifact(path: str, state: dict[str, Tensor], hp: Hyperparameters, quant: Quantizer, log=None) -> int:
    """MAGIC, one byte (codec | byte-shuffle stride << 4), the compressed (shuffled) pack_state payload."""
    t0 = time.perf_counter()
    raw = shuffle_bytes(pack_state(state, hp, quant), hp.byte_shuffle)
    blob = ARTIFACT_MAGIC + bytes([CODECS[hp.compressor] | hp.byte_shuffle << 4]) + compress(raw, hp.compressor)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        f.write(blob)
    os.replace(path + ".tmp", path)  # never leave a half-written artifact
    if log:
        log(f"artifact:{path} {len(blob)} bytes ({hp.compressor}) clip_floor:{quant.clip_floor:.4f} "
            f"export_time:{time.perf_counter() - t0:.1f}s")
    return len(blob)

def fit_mixed_bits(path: str, state: dict[str, Tensor], hp: Hyperparameters, quant: Quantizer, code_bytes: int,
                   log) -> tuple[Quantizer, int]:
    """QUANT_BITS=mixed: write the artifact with every block matrix at the lowest width, spend the bytes left to
    SIZE_TARGET on `allocate_bits`'s promotions, and write that. Returns the quantiser and the artifact's bytes."""
    base = write_artifact(path, state, hp, quant, log)
    bits = allocate_bits(state, quant, hp.widths, hp.size_target - code_bytes - base)
    quant = dataclasses.replace(quant, bits_by_name=bits)
    nbytes = write_artifact(path, state, hp, quant, log)
    counts = collections.Counter(bits.values())
    log(f"mixed_bits: {', '.join(f'int{b} x{counts[b]}' for b in sorted(counts))}: {nbytes - base:+,} bytes over "
        f"all int{hp.widths[0]}, code + artifact {code_bytes + nbytes:,} (SIZE_TARGET {hp.size_target:,})")
    log("mixed_bits_by_matrix: " + " ".join(f"{n}:{b}" for n, b in bits.items()))
    return quant, nbytes

def export_artifact(path: str, state: dict[str, Tensor], hp: Hyperparameters, code_bytes: int, log,
                    hessians: dict[str, Tensor] | None = None) -> int:
    """Write the artifact (QUANT_BITS=mixed: `fit_mixed_bits`); with SIZE_FIT, raise the clip floor by 10% until
    code + artifact fit SIZE_LIMIT."""
    quant = QUANTIZERS[hp.quantizer].from_hp(hp)
    quant = dataclasses.replace(quant, hessians=hessians) if hessians else quant
    if hp.quant_bits == "mixed":
        quant, nbytes = fit_mixed_bits(path, state, hp, quant, code_bytes, log)
    else:
        nbytes = write_artifact(path, state, hp, quant, log)
    while hp.size_fit and nbytes + code_bytes > hp.size_limit:
        quant = dataclasses.replace(quant, clip_floor=quant.clip_floor * 1.1)
        log(f"size_fit: {nbytes + code_bytes} bytes is over {hp.size_limit}; retrying with clip_floor "
            f"{quant.clip_floor:.4f} (training used {hp.quant_clip_floor:.4f})")
        nbytes = write_artifact(path, state, hp, quant, log)
    return nbytes

def read_payload(path: str) -> bytes:
    """An artifact's pack_state bytes (decompressed, unshuffled)."""
    if not os.path.isfile(path):
        raise ArtifactError(f"artifact {path} not found")
    blob = Path(path).read_bytes()
    codecs = {v: k for k, v in CODECS.items()}
    if blob[:4] == b"PGA1":
        raise ArtifactError(f"{path}: written by a train_gpt.py before chunked compression: score it with that script")
    if len(blob) < 5 or blob[:4] != ARTIFACT_MAGIC or blob[4] & 15 not in codecs:
        raise ArtifactError(f"{path}: not a train_gpt.py artifact (bad magic)")
    codec, stride = codecs[blob[4] & 15], blob[4] >> 4
    try:
        raw = decompress(blob[5:], codec)
    except Exception as e:  # each codec raises its own error type for truncated input
        raise ArtifactError(f"{path}: cannot decompress ({codec}): truncated or corrupt artifact ({e})") from None
    return shuffle_bytes(raw, stride, inverse=True)

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

def balanced_share(items: list, cost, rank: int, world: int) -> list:
    """This rank's items, each given in turn to the least-loaded rank (costliest first: the ranks end together)."""
    load, owners = [0] * world, []
    for item in items:
        owners.append(r := load.index(min(load)))
        load[r] += cost(item)
    return [item for item, r in zip(items, owners) if r == rank]

def eval_spans(num_preds: int, seq_len: int, stride: int, span_preds: int, rank: int, world: int):
    """In stream order: ((start, end) of a span of predictions, this rank's chunks of it). Spans hold whole chunks
    and at most span_preds predictions (0: the whole stream is one span); every rank sees every span."""
    chunks = scored_chunks(num_preds, seq_len, stride)
    if span_preds <= 0:
        yield (0, num_preds), rank_slice(chunks, rank, world)
        return
    i = 0
    while i < len(chunks):
        j = i + 1
        while j < len(chunks) and chunks[j][1] - chunks[i][0] <= span_preds:
            j += 1
        yield (chunks[i][0], chunks[j - 1][1]), rank_slice(chunks[i:j], rank, world)
        i = j

def window_batch(tokens: Tensor, chunks: list[tuple[int, int]], seq_len: int, batch_seqs: int):
    """(inputs, targets, scored mask) of a fixed-shape batch (the compiled model sees one shape): chunk (s, e)
    is scored by the window [max(0, e - seq_len), e), a chunk (s, e, floor) by [max(floor, e - seq_len), e) (a
    document's own tokens); padding rows repeat the last window and are masked out."""
    device, n_real = tokens.device, len(chunks)
    chunks = chunks + [chunks[-1]] * (batch_seqs - n_real)
    scored_from, ends = (torch.tensor([c[i] for c in chunks], device=device) for i in (0, 1))
    floors = torch.tensor([c[2] if len(c) > 2 else 0 for c in chunks], device=device)
    idx = torch.maximum(ends - seq_len, floors)[:, None] + torch.arange(seq_len, device=device)
    mask = (idx >= scored_from[:, None]) & (idx < ends[:, None])
    mask[n_real:] = False
    idx = idx.clamp_max(tokens.numel() - 2)
    return tokens[idx], tokens[idx + 1], mask

class Adapter:
    """The score-then-adapt hook of `evaluate`. The stream is cut into spans of at most `span_preds` predictions
    (0: one span); all ranks score a span (`scored` sees each batch with its per-token losses), then every rank
    calls `adapt(start, end)`: the weights may learn from predictions [start, end), all scored already, and
    nothing is scored twice. `spans` may plan the scoring otherwise (DocLoRA). This one learns nothing."""
    span_preds, batch_seqs, grad = 0, 0, False  # rows per scored batch (0: the evaluation's); grad: scores keep their graph
    def spans(self, num_preds: int, seq_len: int, stride: int, rank: int, world: int):
        return eval_spans(num_preds, seq_len, stride, self.span_preds, rank, world)
    def scored(self, x: Tensor, y: Tensor, mask: Tensor, losses: Tensor): pass
    def adapt(self, start: int, end: int): pass

def evaluate(model, tokens: Tensor, tables, seq_len: int, stride: int, batch_seqs: int, rank: int, world: int,
             adapter: Adapter | None = None) -> tuple[float, float]:
    """Exact val loss (nats/token) and bpb; every prediction is scored exactly once across all ranks."""
    adapter = adapter or Adapter()
    batch_seqs = adapter.batch_seqs or batch_seqs
    sums = torch.zeros(3, device=tokens.device, dtype=torch.float64)  # loss, tokens, bytes
    for (start, end), chunks in adapter.spans(tokens.numel() - 1, seq_len, stride, rank, world):
        with torch.set_grad_enabled(adapter.grad):
            for i in range(0, len(chunks), batch_seqs):
                x, y, mask = window_batch(tokens, chunks[i:i + batch_seqs], seq_len, batch_seqs)
                losses = model(x, y, per_token=True).double()
                sums[0] += (losses.detach() * mask).sum()
                sums[1] += mask.sum()
                sums[2] += (count_bytes(x, y, tables) * mask).sum()
                adapter.scored(x, y, mask, losses)
        adapter.adapt(start, end)
    if world > 1:
        dist.all_reduce(sums)
    loss, ntok, nbytes = sums.tolist()
    return loss / ntok, loss / (math.log(2) * nbytes)

TTT_MODES = ("off", "chunk", "lora")
LORA_TARGETS = ("q", "k", "v", "o", "up", "down", "head")
FULL_VAL_TOKENS = 62_021_632  # the challenge's val split, for the eval-time projection

class TTT(Adapter):
    """Both TTT modes: after a span is scored, `adapt` has the weights `learn` from it (where it `learns`) until
    TTT_BUDGET_SECONDS have passed, then says so and scores the rest as they are; `finish` reports."""
    synced = True  # the budget by rank 0's clock, so that every rank stops at the same span
    def start_clock(self, steps: int, unit: str, t0: float = 0.0):  # t0: a budget's start (else now)
        self.steps, self.unit, self.adapted, self.stopped, self.adapt_s, self.t0 = steps, unit, 0, False, 0.0, t0 or time.perf_counter()
    def learns(self, start: int, end: int) -> bool:  # not from the stream's last span: nothing is scored after it
        return end < self.tokens.numel() - 1
    def warm_up(self, rows: int) -> float:
        """Compile the training graph before the clock starts (token-0 rows, no step taken): its seconds."""
        t0, zeros = time.perf_counter(), torch.zeros(rows, self.hp.eval_seq_len, dtype=self.tokens.dtype, device=self.tokens.device)
        self.model(zeros, zeros.clone(), per_token=True).sum().backward()  # two tensors: one twice compiles for aliased inputs
        return time.perf_counter() - t0
    def adapt(self, start: int, end: int):
        if self.stopped or not self.learns(start, end):
            return
        flag = torch.tensor(float(0 < self.hp.ttt_budget_seconds < time.perf_counter() - self.t0), device=self.tokens.device)
        if self.synced and self.world > 1:
            dist.broadcast(flag, 0)
        if flag.item():
            self.stopped = True
            self.log(f"ttt: TTT_BUDGET_SECONDS={self.hp.ttt_budget_seconds:g} reached after {self.adapted} of "
                     f"{self.steps} {self.unit}: the rest is scored without adapting")
            return
        t0 = time.perf_counter()
        self.learn(start, end)
        self.adapted, self.adapt_s = self.adapted + 1, self.adapt_s + time.perf_counter() - t0
    def finish(self):
        eval_s = time.perf_counter() - self.t0  # since the clock started: the TTT score's seconds
        full_s = eval_s * FULL_VAL_TOKENS / self.tokens.numel() * self.world / 8
        self.log(f"ttt: {self.adapted} of {self.steps} {self.unit} adapted in {self.adapt_s:.1f}s of {eval_s:.1f}s; the "
                 f"full val ({FULL_VAL_TOKENS:,} tokens) on 8 GPUs: ~{full_s:.0f}s")

class ChunkTTT(TTT):
    """TTT_MODE=chunk: after each span of TTT_CHUNK_TOKENS predictions, TTT_EPOCHS SGD steps (momentum, clipped, LR
    cosine over the spans) on it; the next span is scored by the new weights or their EMA (TTT_EMA). Embedding tables
    and the first TTT_FREEZE_BLOCKS blocks stay fixed. Ranks split a span's rows and sum their gradients."""
    def __init__(self, model: nn.Module, base: GPT, tokens: Tensor, hp: Hyperparameters, world: int, rank: int, log):
        self.model, self.tokens, self.hp, self.world, self.rank, self.log = model, tokens, hp, world, rank, log
        self.span_preds, seq = hp.ttt_chunk_tokens, hp.eval_seq_len
        frozen = tuple(f"blocks.{i}." for i in range(hp.ttt_freeze_blocks))
        self.params = [p for n, p in base.named_parameters()  # the frozen ones' gradients are computed and ignored:
                       if not n.startswith(frozen) and not n.endswith(("emb.weight", "embed.weight"))]  # no recompile
        self.grads = attach_grad_buffer(self.params, (sum(p.numel() for p in self.params),))
        self.opt = torch.optim.SGD(self.params, lr=hp.ttt_lr, momentum=hp.ttt_momentum)
        self.weights = [p.detach() for p in self.params]  # views: the foreach updates below change the model
        self.fast = [w.clone() for w in self.weights] if hp.ttt_ema > 0 else None
        spans = sum(1 for _ in eval_spans(tokens.numel() - 1, seq, hp.eval_stride, self.span_preds, 0, 1))
        self.rows = -(-max(self.span_preds, seq) // seq // world) * world  # padded to a multiple of the ranks
        log(f"ttt: SGD on chunks of {self.span_preds} predictions ({spans} in the stream), {len(self.params)} tensors "
            f"adapted; training graph warmed up in {self.warm_up(self.rows // world):.1f}s")
        self.grads.zero_()
        self.start_clock(spans - 1, "chunks")
    def span_rows(self, start: int, end: int) -> tuple[Tensor, Tensor, Tensor]:
        """This rank's rows of predictions [start, end): (inputs, targets, mask), padding masked out."""
        seq = self.hp.eval_seq_len
        idx = start + torch.arange(self.rows * seq, device=self.tokens.device).view(self.rows, seq)
        idx = rank_slice(idx, self.rank, self.world)
        mask, idx = idx < end, idx.clamp_max(end - 1)
        return self.tokens[idx], self.tokens[idx + 1], mask
    def learn(self, start: int, end: int):
        for g in self.opt.param_groups:
            g["lr"] = self.hp.ttt_lr * 0.5 * (1 + math.cos(math.pi * self.adapted / max(self.steps, 1)))
        if self.fast is not None:  # train the fast weights; the model holds their EMA for scoring
            ema = [w.clone() for w in self.weights]
            torch._foreach_copy_(self.weights, self.fast)
        x, y, mask = self.span_rows(start, end)
        for _ in range(self.hp.ttt_epochs):
            ((self.model(x, y, per_token=True) * mask).sum() / (end - start)).backward()
            if self.world > 1:
                dist.all_reduce(self.grads)
            if self.hp.ttt_grad_clip > 0:
                self.grads.mul_((self.hp.ttt_grad_clip / (self.grads.norm() + 1e-6)).clamp(max=1.0))
            self.opt.step()
            self.grads.zero_()
        if self.fast is not None:
            torch._foreach_copy_(self.fast, self.weights)
            torch._foreach_lerp_(ema, self.weights, 1.0 - self.hp.ttt_ema)
            torch._foreach_copy_(self.weights, ema)

def document_spans(tokens: Tensor, bos: int) -> list[tuple[int, int]]:
    """Predictions [start, end) of each document: from its BOS (or the stream's first token) to the prediction of
    the next document's BOS, so that every prediction of the stream belongs to exactly one document."""
    starts = sorted({0, *torch.nonzero(tokens[:-1] == bos).flatten().tolist()})
    return list(zip(starts, starts[1:] + [tokens.numel() - 1]))

class DocLoRA(TTT):
    """TTT_MODE=lora: each document is scored on its own (no window reaches into the one before) in chunks of
    TTT_LORA_CHUNK predictions, TTT_LORA_DOCS documents side by side, a batch row each with its own rank-r deltas
    (x @ A) @ B on the TTT_LORA_TARGETS matrices (A random, B zero: no change at first); after each chunk is scored,
    one Adam step on its mean loss (but the batch's last, whose step nothing would use). Deltas and Adam's state start
    afresh with each batch (longest documents first), so a document learns from its own scored tokens only
    (TTT_LORA_RESET=warm_a keeps A, and steps on the last chunk too). With TTT_LORA_PHASES the documents are cut in
    stream order, and after each part but the last the base weights learn from it (`phase`); else the artifact's
    weights never change. Ranks take whole batches, balanced by their chunks."""
    synced, grad = False, True  # a chunk's scoring pass is its training forward too
    def __init__(self, model: nn.Module, base: GPT, tokens: Tensor, hp: Hyperparameters, world: int, rank: int, log,
                 bos: int):
        self.model, self.tokens, self.hp, self.world, self.log = model, tokens, hp, world, log
        self.span_preds, self.batch_seqs, D = hp.ttt_lora_chunk, hp.ttt_lora_docs, hp.ttt_lora_docs
        self.skip_last = int(hp.ttt_lora_reset == "fresh")  # the batch's deltas go after its last chunk: no step on it
        docs, self.parts, n = document_spans(tokens, bos), [], 0
        cuts = sorted({0, *(round(f * len(docs)) for f in hp.lora_phases), len(docs)})
        for a, b in zip(cuts, cuts[1:]):  # (first prediction, end, this rank's numbered batches) of each part
            part = sorted(docs[a:b], key=lambda d: d[0] - d[1])
            batches = list(enumerate((part[i:i + D] for i in range(0, len(part), D)), n))
            self.parts.append((docs[a][0], docs[b - 1][1], balanced_share(batches, self.batch_chunks, rank, world)))
            n += len(batches)
        self.sgd = ChunkTTT(model, base, tokens, hp, world, rank, log) if len(self.parts) > 1 else None
        role = {"attn.c_q": "q", "attn.c_k": "k", "attn.c_v": "v", "attn.proj": "o", "mlp.fc": "up", "mlp.proj": "down"}
        targets = hp.ttt_lora_targets.split(",")
        self.mods = [m for n, m in base.named_modules() if n.startswith("blocks.") and role.get(n.split(".", 2)[-1]) in targets]
        self.mods += [base] * ("head" in targets)
        shapes = [(hp.model_dim, hp.vocab_size) if m is base else (m.in_features, m.out_features) for m in self.mods]
        self.loras = [tuple(torch.zeros(D, *shape, device=tokens.device, requires_grad=True)
                            for shape in ((i, hp.ttt_lora_rank), (hp.ttt_lora_rank, o))) for i, o in shapes]
        self.opt = torch.optim.Adam([t for lora in self.loras for t in lora], lr=hp.ttt_lora_lr)
        self.frozen = [p for p in base.parameters() if p.requires_grad]
        self.deltas_on(True)
        log(f"ttt: lora rank {hp.ttt_lora_rank} on {hp.ttt_lora_targets} ({len(self.mods)} matrices), {len(docs)} documents "
            f"in {len(self.parts)} part(s), batches of {D}, chunks of {self.span_preds} predictions; graphs warmed up in "
            f"{self.warm_up(D):.1f}s")  # B = 0: the warm-up changes nothing
        self.opt.zero_grad()
        self.start_clock(sum(self.batch_chunks(b) - self.skip_last for *_, bs in self.parts for b in bs), "steps")
    def batch_chunks(self, batch: tuple[int, list]) -> int:
        return -(-(batch[1][0][1] - batch[1][0][0]) // self.span_preds)  # its longest (first) document's chunks
    def deltas_on(self, on: bool):
        """The deltas in the forward and the base weights frozen, or neither."""
        for m, lora in zip(self.mods, self.loras):
            m.lora = lora if on else None
        for p in self.frozen:
            p.requires_grad_(not on)
    def spans(self, num_preds: int, seq_len: int, stride: int, rank: int, world: int):
        """Per batch of documents: fresh deltas (drawn by the batch's number, the same on any rank), then its chunks
        in lockstep, a row (s, e, document start) each, as the span (chunk start, length) of its longest document;
        after each part but the last, its `phase`."""
        for p, (start, end, batches) in enumerate(self.parts):
            for b, docs in batches:
                gen = torch.Generator().manual_seed(b)
                with torch.no_grad():
                    for a, z in self.loras:
                        if self.hp.ttt_lora_reset == "fresh" or not self.adapted:
                            a.copy_(torch.randn(a.shape, generator=gen) / a.size(1) ** 0.5)
                        z.zero_()
                self.opt.state.clear()
                for c in range(0, n := docs[0][1] - docs[0][0], self.span_preds):
                    rows = [(min(s + c, e), min(s + c + self.span_preds, e), s) for s, e in docs]
                    yield (c, n), rows + [(0, 0, 0)] * (self.batch_seqs - len(rows))
            if p < len(self.parts) - 1:
                self.phase(start, end)
    def phase(self, start: int, end: int):
        """Phased TTT: with the deltas off, the base weights take chunk TTT's SGD steps (its settings, the LR's cosine
        over this part) on predictions [start, end), which every rank has scored, TTT_CHUNK_TOKENS at a time."""
        t0, C = time.perf_counter(), self.hp.ttt_chunk_tokens
        self.deltas_on(False)
        self.sgd.start_clock(-(-(end - start) // C), "chunks", t0=self.t0)  # one budget for both
        for a in range(start, end, C):
            self.sgd.adapt(a, min(a + C, end))
        self.deltas_on(True)
        self.log(f"ttt: phase on predictions [{start}, {end}): {self.sgd.adapted} SGD chunks in {time.perf_counter() - t0:.1f}s")
    def learns(self, start: int, end: int) -> bool:  # (start, end): the chunk's start and the batch's length
        return not (self.skip_last and start + self.span_preds >= end)
    def scored(self, x: Tensor, y: Tensor, mask: Tensor, losses: Tensor):
        self.rows = (losses, mask)
    def learn(self, start: int, end: int):
        losses, mask = self.rows
        ((losses * mask).sum(1) / mask.sum(1).clamp_min(1)).sum().backward()
        self.opt.step()
        self.opt.zero_grad()
    def finish(self):
        self.deltas_on(False)
        super().finish()

class EvalContext:
    """Validation tokens, byte tables and one compiled evaluation model whose weights are swapped in."""
    def __init__(self, hp, rank, world, device, attn_impl, log):
        self.hp, self.rank, self.world, self.log = hp, rank, world, log
        sp = load_tokenizer(hp.tokenizer_path, hp.vocab_size)
        self.tables, self.bos = tuple(t.to(device) for t in build_byte_tables(sp)), sp.bos_id()
        val = load_val_tokens(hp.data_path, hp.eval_seq_len, hp.vocab_size)
        self.tokens = torch.from_numpy(val.astype(np.int64)).to(device)
        self.model = build_model(hp, device, attn_impl).eval()
        self.compiled = maybe_compile(self.model, hp)
        self.batch_seqs = max(1, hp.val_batch_size // (world * hp.eval_seq_len))
        log(f"val_tokens:{self.tokens.numel()} eval_seq_len:{hp.eval_seq_len} stride:{hp.eval_stride}")
    def score(self, state: dict[str, Tensor], label: str, stride: int | None = None,
              adapter: Adapter | None = None) -> tuple[float, float]:
        self.model.load_state_dict(state, strict=True)
        t0 = time.perf_counter()
        loss, bpb = evaluate(self.compiled, self.tokens, self.tables, self.hp.eval_seq_len,
                             stride or self.hp.eval_seq_len, self.batch_seqs, self.rank, self.world, adapter)
        self.log(f"{label} val_loss:{loss:.8f} val_bpb:{bpb:.8f} eval_time:{time.perf_counter() - t0:.1f}s")
        return loss, bpb

def score_artifact(path: str, code_bytes: int, ev: EvalContext):
    t0 = time.perf_counter()
    _, state = unpack_state(read_payload(path))
    ev.log(f"artifact:{path} loaded and dequantised in {time.perf_counter() - t0:.1f}s")
    ev.score(state, "final_int6_roundtrip_exact")
    ev.score(state, "final_int6_sliding_window_exact", stride=ev.hp.eval_stride)
    if ev.hp.ttt_mode != "off":  # the model holds the artifact's weights already (the scores above loaded them)
        ttt = ChunkTTT(ev.compiled, ev.model, ev.tokens, ev.hp, ev.world, ev.rank, ev.log) if ev.hp.ttt_mode == "chunk" \
            else DocLoRA(ev.compiled, ev.model, ev.tokens, ev.hp, ev.world, ev.rank, ev.log, ev.bos)
        ev.score(state, "final_int6_ttt_exact", stride=ev.hp.eval_stride, adapter=ttt)
        ttt.finish()
    artifact_bytes = os.path.getsize(path)
    ev.log(f"Total submission size int6+{ev.hp.compressor}: {artifact_bytes + code_bytes} bytes "
           f"(model {artifact_bytes} + code {code_bytes})")

def with_artifact_config(hp: Hyperparameters, path: str, payload: bytes | None = None) -> Hyperparameters:
    """The model shape comes from the artifact's header (in `payload`, its read_payload, if given), whatever the env says."""
    config = stored_tensors(payload or read_payload(path))[0]["config"]  # the header alone: score_artifact dequantises
    missing = [k for k in MODEL_KEYS if k not in config]
    try:
        if missing:
            raise ConfigError(f"it lacks {', '.join(missing)}")
        hp = dataclasses.replace(hp, **{k: config[k] for k in MODEL_KEYS})
        hp.validate()
    except (ConfigError, TypeError) as e:
        raise ArtifactError(f"{path}: the model config in its header is not usable ({e})") from None
    return hp

# ------------------------------------------------------------------------------------------------------------- main
class Logger:
    """Rank 0 prints each line and appends it to logs/<RUN_ID>.txt; the other ranks stay quiet."""
    def __init__(self, path: str | None):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", encoding="utf-8") if path else None
    def __call__(self, msg: str, echo: bool = True):
        if self.file is None:
            return
        if echo:
            print(msg, flush=True)
        self.file.write(msg + "\n")
        self.file.flush()

def setup_distributed() -> tuple[int, int, torch.device]:
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        cuda = device.type == "cuda"  # device_id binds the NCCL group to this GPU (barriers use it)
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return rank, world, device

def counted_code(source: bytes) -> bytes:
    """The bytes a record counts for this script: its packed form by tools/pack.py (what make_record ships). A
    script without tools/ beside it (a record folder's, packed already) counts its own bytes."""
    packer = Path(__file__).resolve().parent / "tools" / "pack.py"
    if not packer.is_file():
        return source
    spec = importlib.util.spec_from_file_location("pack", packer)
    pack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pack)
    return pack.counted(source)

def select_kernels(hp: Hyperparameters, device: torch.device, world: int, log) -> tuple[Hyperparameters, str]:
    """The start-up kernel choices at the training shapes: (hp with MLP_KERNEL resolved, the attention impl)."""
    micro_batch = max(1, hp.train_batch_tokens // (world * grad_accum_steps(hp, world) * hp.train_seq_len))
    attn_impl = select_attention(hp, device, micro_batch, log)
    return dataclasses.replace(hp, mlp_kernel=select_mlp_kernel(hp, device, log)), attn_impl

def run(hp: Hyperparameters, rank: int, world: int, device: torch.device, log):
    """Train, export and score (or, with EVAL_ARTIFACT, only score)."""
    log(f"command: {' '.join(sys.argv)}")
    log("hyperparameters: " + json.dumps(dataclasses.asdict(hp), sort_keys=True))
    log(f"torch:{torch.__version__} device:{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    source = Path(__file__).read_bytes()
    code = counted_code(source)
    log(f"code: {Path(__file__).name} {len(code)} bytes sha256:{hashlib.sha256(code).hexdigest()} (packed; "
        f"{'as run' if code == source else f'readable {len(source)} bytes sha256:{hashlib.sha256(source).hexdigest()}'})")
    torch.manual_seed(hp.seed)
    np.random.seed(hp.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    artifact = hp.eval_artifact or hp.artifact_path or f"logs/{hp.run_id}.int6.ptz"
    if hp.eval_artifact:
        hp = with_artifact_config(hp, artifact)  # fails fast on a bad file
    else:
        compress(b"", hp.compressor)  # a missing codec or an unwritable artifact folder fails now, not after training
        Path(artifact).parent.mkdir(parents=True, exist_ok=True)
        if not os.access(Path(artifact).parent, os.W_OK):
            raise ConfigError(f"cannot write the artifact {artifact}: its folder is not writable (set ARTIFACT_PATH)")
    hp, attn_impl = select_kernels(hp, device, world, log)
    ev = EvalContext(hp, rank, world, device, attn_impl, log)
    if not hp.eval_artifact:
        model, hessians, floor = train(hp, rank, world, device, attn_impl, log, len(code))
        hp = dataclasses.replace(hp, quant_clip_floor=floor)  # the export starts from the floor QAT trained on
        ev.score(model.state_dict(), "pre_quant_ema")
        if rank == 0:
            export_artifact(artifact, {k: v.detach() for k, v in model.state_dict().items()}, hp, len(code), log,
                            hessians)  # quantised where the weights are (the GPU); pack_state moves the results
        if world > 1:
            dist.barrier()
        total = os.path.getsize(artifact) + len(code)
        if total > hp.size_limit and not hp.allow_oversize:
            raise ArtifactError(f"submission is {total} bytes, {total - hp.size_limit} over the {hp.size_limit}-byte "
                                f"limit (artifact kept at {artifact}; ALLOW_OVERSIZE=1 scores it anyway)")
    score_artifact(artifact, len(code), ev)

def main():
    hp = Hyperparameters.from_env()
    rank, world, device = setup_distributed()
    if world > 1:  # a default RUN_ID is a timestamp: every rank takes rank 0's, so they share logs and artifact
        shared = [hp.run_id]
        dist.broadcast_object_list(shared, src=0)
        hp.run_id = shared[0]
    log = Logger(f"logs/{hp.run_id}.txt" if rank == 0 else None)
    try:
        run(hp, rank, world, device, log)
    except USER_ERRORS as e:
        log(f"error: {e}", echo=False)  # the log says why it ends; stderr gets the line below
        raise
    if world > 1:
        dist.barrier()  # every rank is done before the group goes
        dist.destroy_process_group()

if __name__ == "__main__":
    faulthandler.enable()  # a crash inside a native library still prints where each Python thread was
    code = 0
    try:
        main()
    except USER_ERRORS as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        else:  # every rank meets the same input; rank 0 says it, before a launcher stops the others
            time.sleep(2)
        code = 2
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # exit without the interpreter's teardown, during which gloo's worker
        sys.stdout.flush()  # threads may still free the last tensors under the GIL and abort the process (~2% of runs)
        os._exit(code)
    sys.exit(code)
