#!/usr/bin/env bash
# One call of proxy ablations on a lent device machine (the tool library's `run`): the wheels in .whl/ (WHEELS) installed
# into /tmp/site, eval/ablate.sh on PLAN (RUNS, JOBS and every train_gpt.py setting pass through), stopped after
# DEADLINE seconds (default 560, under the call's 600) so that whatever finished comes back: $OUT/logs.tgz holds
# the runs' logs (and nothing else), whatever happened. Every named run runs (FRESH=1): a warm machine keeps logs/ from
# the call before, whose logs came back already, and a 150 s run must not be skipped for a fixed-steps log of its name.
#
# KEEP_ARTIFACTS="run_a run_b" also brings those runs' artifacts back in $OUT (the tool returns 8 files of at most 16 MiB:
# up to 7 artifacts beside logs.tgz), to study their bytes here (tools/recompress.py) or score them again (EVAL_ARTIFACT).
#   RUNS="xsa11_s1337 xsa11_s42 qk4_s1337 qk4_s42" JOBS=4 PROXY_SECONDS=0 ITERATIONS=1700 \
#     bash eval/device_ablate.sh eval/plans/issue13.txt .proxy           (carry .proxy and .whl)
set -uo pipefail
cd "$(dirname "$0")/.."
fail() { echo "error: $*" >&2; exit 2; }
[ $# -ge 1 ] && [ $# -le 2 ] || fail "usage: bash eval/device_ablate.sh PLAN [DATA_DIR]"
[ -n "${OUT:-}" ] && [ -d "$OUT" ] || fail "OUT is not a folder (the device tool sets it)"
deadline=${DEADLINE:-560}
[[ $deadline =~ ^[1-9][0-9]*$ ]] || fail "DEADLINE=$deadline is not a whole number of seconds"
wheels=${WHEELS:-.whl}
if compgen -G "$wheels/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl ||
    fail "the wheels in $wheels/ do not install"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 ATTN_BACKEND=${ATTN_BACKEND:-cudnn}  # timing kernels on a shared GPU would be noise
mkdir -p logs
echo "$(date +%H:%M:%S) device_ablate: deadline ${deadline}s"
FRESH=1 timeout --kill-after=10 "$deadline" bash eval/ablate.sh "$@"
rc=$?
[ $rc -eq 124 ] && echo "$(date +%H:%M:%S) device_ablate: the deadline stopped the plan; finished runs are in the logs"
tar czf "$OUT/logs.tgz" logs/*.txt logs/*.out 2>/dev/null || tar czf "$OUT/logs.tgz" --files-from /dev/null
read -ra keep <<< "${KEEP_ARTIFACTS:-}"
[ ${#keep[@]} -le 7 ] || echo "device_ablate: only the first 7 of KEEP_ARTIFACTS come back (the tool returns 8 files)"
for run in "${keep[@]:0:7}"; do
  if [ -f "logs/$run.int6.ptz" ]; then cp "logs/$run.int6.ptz" "$OUT/"; else echo "device_ablate: $run left no artifact"; fi
done
exit $rc
