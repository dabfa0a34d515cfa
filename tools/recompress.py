"""Size of an artifact's model under other codecs and byte shuffles (BYTE_SHUFFLE), and where its bytes go:
python3 tools/recompress.py ARTIFACT [CODEC ...] [--shuffle 0,2,4] [--tensors N] [--entropy] [--estimate 0.5,1.0]

--tensors N lists the N tensors that cost most, each compressed alone with the first codec: stored kind, shape,
compressed bytes, for integer tensors the share of zeros and the mean |value| in steps, and the row scales' mean
(which is what a smaller weight, under the clip floor, changes).
--entropy: per integer kind (int6, int8, ...), the first codec's bits per value (each tensor alone) against the
tensors' order-0 entropy, what any coder that codes each tensor's values independently needs at least.
--estimate FLOORS: the model (dequantised) quantised again at each clip floor: QAT_SIZE_FIT's `estimated_bytes`
against the bytes the first codec writes."""
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
import train_gpt as tg  # noqa: E402
from cli import ArgParser, UsageError, run  # noqa: E402


def main(argv=None) -> int:
    ap = ArgParser(description=__doc__)
    ap.add_argument("artifact")
    ap.add_argument("codecs", nargs="*", metavar="CODEC")
    ap.add_argument("--shuffle", type=numbers(int, "--shuffle", "0,2,4"), default=[0])
    ap.add_argument("--tensors", type=count, default=0, help="how many tensors to list")
    ap.add_argument("--entropy", action="store_true")
    ap.add_argument("--estimate", type=numbers(float, "--estimate", "0.5,1.0"), default=[])
    args = ap.parse_intermixed_args(argv)
    strides, floors = args.shuffle, args.estimate
    if not all(0 <= s <= 15 for s in strides):
        raise UsageError("--shuffle strides must be between 0 and 15")
    if not all(f >= 0 for f in floors):
        raise UsageError("--estimate floors must not be negative")
    codecs = args.codecs or list(tg.CODECS)
    unknown = [c for c in codecs if c not in tg.CODECS]
    if unknown:
        raise UsageError(f"unknown codec {', '.join(unknown)} (use {', '.join(tg.CODECS)})")
    raw = tg.read_payload(args.artifact)  # a readable artifact, or one clear error
    _, stored = tg.stored_tensors(raw)  # a table that fits its payload, or one clear error
    print(f"raw payload: {len(raw)} bytes")
    for codec in codecs:
        for stride in strides:
            t0 = time.perf_counter()
            n = len(tg.compress(tg.shuffle_bytes(raw, stride), codec)) + 5
            print(f"{codec} byte_shuffle {stride}: {n} bytes ({time.perf_counter() - t0:.1f}s)")
    if args.tensors or args.entropy:  # each tensor compressed alone, once for both reports
        alone = {name: len(tg.compress(values.tobytes(), codecs[0])) for name, (_, values) in stored.items()}
        if args.tensors:
            print_tensor_costs(stored, alone, codecs[0], args.tensors)
        if args.entropy:
            print_entropy(stored, alone, codecs[0])
    if floors:
        print_estimates(args.artifact, raw, stored, codecs[0], floors)
    return 0


def count(text: str) -> int:
    """--tensors' argparse type: a whole number of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise UsageError("--tensors takes how many tensors to list, e.g. --tensors 20")
    return int(text)


def numbers(kind: type, flag: str, example: str):
    """An argparse type: comma-separated numbers of `kind`, or a UsageError that shows the flag's form."""
    def parse(text: str) -> list:
        try:
            return [kind(v) for v in text.split(",")]
        except ValueError:
            raise UsageError(f"{flag} takes comma-separated numbers, e.g. {flag} {example}") from None
    return parse


def print_estimates(path: str, raw: bytes, stored: dict, codec: str, floors: list):
    """Each tensor stored as an integer is quantised again at its stored width (the artifact's layout, mixed widths
    too), the rest as stored, by gptq_lite's rounding."""
    hp = tg.with_artifact_config(tg.Hyperparameters(compressor=codec, run_id="recompress"), path, raw)
    _, state = tg.unpack_state(raw)
    ints = {name: int(kind[3:]) for name, (kind, _) in stored.items() if kind.startswith("int")}
    layout = tg.dataclasses.replace(tg.Quantizer.from_hp(hp), bits_by_name=ints, min_numel=layout_min_numel(stored))
    print(f"estimated_bytes (QAT_SIZE_FIT) against {codec}, the dequantised model quantised again at each floor:")
    for floor in floors:
        quant = tg.dataclasses.replace(layout, clip_floor=floor)
        t0 = time.perf_counter()
        estimate, seconds = tg.estimated_bytes(state, quant), time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            written = tg.write_artifact(f"{tmp}/estimate.ptz", state, hp, quant)
        print(f"  clip_floor {floor}: estimated {estimate:,.0f} ({seconds:.1f}s), {codec} {written:,} ({written / estimate - 1:+.2%})")


def order0_bits(values) -> float:
    """Bits to code integer `values` with their own frequencies, each value independently (train_gpt's
    `entropy_bytes`, the estimate QAT_SIZE_FIT and mixed bits use)."""
    return 8 * tg.entropy_bytes(tg.torch.tensor(tg.np.asarray(values)))


def layout_min_numel(stored: dict) -> int:
    """The QUANT_MIN_NUMEL that quantises exactly the tensors an artifact stored as integers (`stored`:
    train_gpt.stored_tensors' arrays by name)."""
    return min((a.size for kind, a in stored.values() if kind.startswith("int")), default=2 ** 62) - 1


def print_entropy(stored: dict, alone: dict, codec: str):
    """`alone`: each tensor's bytes compressed by itself with `codec`, by name."""
    by_kind = {}
    for name, (kind, values) in stored.items():
        if kind.startswith("int"):
            n, bits, bound = by_kind.get(kind, (0, 0, 0.0))
            by_kind[kind] = (n + values.size, bits + 8 * alone[name], bound + order0_bits(values))
    print(f"integer values, bits per value: {codec} (each tensor alone, without its scales) against order-0 entropy:")
    for kind, (n, bits, bound) in sorted(by_kind.items()):
        print(f"  {kind}: {n} values: {codec} {bits / n:.4f}, order-0 {bound / n:.4f} ({bits / bound - 1:+.1%})")


def print_tensor_costs(stored: dict, alone: dict, codec: str, top: int):
    """`stored`: train_gpt.stored_tensors' arrays by name; `alone`: their bytes compressed alone, by name."""
    rows = []
    for name, (kind, values) in stored.items():
        if kind == "scale":
            continue
        cost = alone[name]
        detail = ""
        if kind.startswith("int"):
            scale = stored[name + ".scale"][1].astype("float64")
            cost += alone[name + ".scale"]  # the fp16 row scales as stored
            detail = (f" zeros {(values == 0).mean():.1%} mean|q| {tg.np.abs(values.astype('int32')).mean():.2f}"
                      f" mean scale {scale.mean():.3e}")
        rows.append((cost, f"{name} {kind} {'x'.join(map(str, values.shape))}: {cost} bytes{detail}"))
    rows.sort(key=lambda r: -r[0])
    print(f"tensors by {codec} bytes, each compressed alone (with its scales), {len(rows)} in all:")
    for _, line in rows[:top]:
        print("  " + line)


if __name__ == "__main__":
    sys.exit(run(main, errors=(tg.ArtifactError, tg.ConfigError)))
