"""Which export setting spends the bytes best, measured on the CPU from an artifact's weights, no GPU needed:

    python3 tools/quant_error.py ARTIFACT DATA_DIR TOKENIZER [--calib-seqs 8] [--val-seqs 8] SETTING ...

SETTING is comma-separated train_gpt.py settings for the export, e.g. `QUANT_CLIP_FLOOR=1.0` or
`QUANTIZER=gptq,CLIP_MODE=sdclip,QUANT_CLIP_FLOOR=0.01`. For each: QAT_SIZE_FIT's `estimated_bytes`, the output
error tr((W - Q) H (W - Q)^T) summed over the quantised matrices (H from --calib-seqs training sequences of DATA_DIR,
as GPTQ's calibration takes them; never val), and the loss and bpb of the model so quantised on the first --val-seqs
val sequences (seq 2048, no overlap; the artifact itself on the first line). The artifact's dequantised weights
stand for the trained model: they sit on its own grid, so the setting it was written with measures as (nearly: a
few rows may pick another scale) zero error, and every other setting quantises them a second time."""
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
import torch  # noqa: E402

import train_gpt as tg  # noqa: E402
from cli import ArgParser, UsageError, run  # noqa: E402
from recompress import layout_min_numel  # noqa: E402


def parse_setting(text: str) -> dict[str, str]:
    pairs = [kv.split("=", 1) for kv in text.split(",")]
    if not all(len(p) == 2 and p[0] for p in pairs):
        raise UsageError(f"setting {text!r} is not NAME=VALUE[,NAME=VALUE...]")
    return dict(pairs)


def main(argv=None) -> int:
    ap = ArgParser(description=__doc__)
    ap.add_argument("artifact")
    ap.add_argument("data_dir")
    ap.add_argument("tokenizer")
    ap.add_argument("settings", nargs="+")
    ap.add_argument("--calib-seqs", type=int, default=8)
    ap.add_argument("--val-seqs", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    args = ap.parse_args(argv)
    if min(args.calib_seqs, args.val_seqs, args.seq_len) < 1:
        raise UsageError("--calib-seqs, --val-seqs and --seq-len must be at least 1")
    settings = [parse_setting(s) for s in args.settings]
    raw0 = tg.read_payload(args.artifact)
    base_env = {"RUN_ID": "quant_error", "DATA_PATH": args.data_dir, "TOKENIZER_PATH": args.tokenizer,
                "TORCH_COMPILE": "0", "TTT_MODE": "off", "TTT_LORA_CHUNK": str(args.seq_len),
                "EVAL_SEQ_LEN": str(args.seq_len), "EVAL_STRIDE": str(args.seq_len),
                "QUANT_MIN_NUMEL": str(layout_min_numel(tg.stored_tensors(raw0)[1]))}  # unless a setting says
    hps = [tg.with_artifact_config(tg.Hyperparameters.from_env({**base_env, **env}), args.artifact, raw0)
           for env in [{}] + settings]  # every setting checked before anything slow runs
    _, state = tg.unpack_state(raw0)
    model = tg.GPT(hps[0], "sdpa", torch.float32)
    model.load_state_dict(state, strict=True)
    model.eval()

    t0 = time.perf_counter()
    loader = tg.TrainLoader(tg.list_shards(args.data_dir, "train"), 0, 1, 1, args.seq_len, args.seq_len,
                            torch.device("cpu"), hps[0].vocab_size)
    quant0 = tg.Quantizer.from_hp(hps[0])
    hessians = tg.collect_hessians(model, loader, args.calib_seqs, quant0, 1)
    print(f"calibration: {args.calib_seqs} training sequences of {args.seq_len}, {len(hessians)} Hessians in "
          f"{time.perf_counter() - t0:.0f}s")
    sp = tg.load_tokenizer(args.tokenizer, hps[0].vocab_size)
    tables = tg.build_byte_tables(sp)
    val = tg.load_val_tokens(args.data_dir, args.seq_len, hps[0].vocab_size)[:args.val_seqs * args.seq_len + 1]
    tokens = torch.from_numpy(val.astype("int64"))

    def score(label: str, quantised: dict):
        model.load_state_dict(quantised, strict=True)
        with torch.no_grad():
            loss, bpb = tg.evaluate(model, tokens, tables, args.seq_len, args.seq_len, 4, 0, 1)
        return f"{label}: val_loss {loss:.5f} val_bpb {bpb:.5f} ({tokens.numel() - 1} predictions)"

    print(score("artifact as stored", state))
    for text, hp in zip(args.settings, hps[1:]):
        quant = tg.QUANTIZERS[hp.quantizer].from_hp(hp)
        quant = tg.dataclasses.replace(quant, hessians=hessians) if hp.quantizer == "gptq" else quant
        t0 = time.perf_counter()
        raw = tg.pack_state(state, hp, quant)
        _, stored = tg.stored_tensors(raw)
        error = sum(tg.output_error(state[n], torch.tensor(stored[n][1]), torch.tensor(stored[n + ".scale"][1]), h)
                    for n, h in hessians.items())
        line = f"{text}: estimated {tg.estimated_bytes(state, quant):,.0f} bytes, output error {error:.4g}"
        print(score(f"{line} ({time.perf_counter() - t0:.0f}s)", tg.unpack_state(raw)[1]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run(main, errors=(tg.ArtifactError, tg.ConfigError, tg.DataError)))
