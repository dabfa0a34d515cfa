#!/usr/bin/env bash
# Proxy ablations on every visible GPU at once: each line of PLAN is one proxy run (eval/proxy.sh on one GPU),
# started as soon as a GPU is free; last, one summary line per run (tools/logs.py), in plan order.
#
#   bash eval/ablate.sh PLAN [SHARED_DATA_DIR]      (JOBS=N runs at once; default: the GPU count, or 1)
#   RUNS="a_s1337 a_s42" bash eval/ablate.sh PLAN   (only these runs of the plan)
#
# JOBS above the GPU count puts JOBS/count runs on each GPU (neighbours in the plan share one: list an arm's
# seeds together and the second finds the first's compiled graphs in the cache), each started once the run before
# it there has compiled (compiles at once starve each other of CPU): a compile and an export (CPU) overlap
# another run's steps, so more runs finish per hour, but their ms/step are not speed figures; use it with fixed
# steps (PROXY_SECONDS=0 ITERATIONS=N), never with a wallclock budget.
#
# PLAN holds one run per line, `NAME [ENV=VALUE ...]`, e.g. `leaky05_s42 SEED=42 LEAKY_RELU_SLOPE=0.5`; blank lines
# and lines starting with # are skipped. A run's output goes to logs/NAME.out and its log to logs/NAME.txt; a run
# whose log is complete already is not run again (FRESH=1: run it anyway). Exit code 1 if a run failed, 2 for a bad plan.
set -euo pipefail
fail() { echo "error: $*" >&2; exit 2; }
[ $# -ge 1 ] && [ $# -le 2 ] || fail "usage: bash eval/ablate.sh PLAN [SHARED_DATA_DIR]"
[ -f "$1" ] || fail "plan $1 not found"
plan=$(realpath "$1")
src=$(realpath "${2:-$(dirname "$0")/../../shared/data}" 2>/dev/null) || fail "shared data folder ${2:-} not found"
cd "$(dirname "$0")/.."
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
jobs=${JOBS:-$(( gpus > 0 ? gpus : 1 ))}
[[ $jobs =~ ^[1-9][0-9]*$ ]] || fail "JOBS=$jobs is not a whole number >= 1"

# the settings a plan may name: train_gpt.py's Hyperparameters fields, upper-cased, and eval/proxy.sh's own
known=" PROXY_SECONDS NPROC $(sed -n '/^class Hyperparameters/,/^    def /p' "$(dirname "$0")/../train_gpt.py" |
  grep -oE '^    [a-z][a-z0-9_]*: ' | tr -d ' :' | tr 'a-z' 'A-Z' | tr '\n' ' ')"
names=() settings=()
while read -r name rest; do
  [[ -z $name || $name == \#* ]] && continue
  [[ $name =~ ^[A-Za-z0-9_.-]+$ ]] || fail "$plan: run name '$name' may hold only letters, digits, '_', '.', '-'"
  for kv in $rest; do
    [[ $kv =~ ^[A-Z][A-Z0-9_]*=[^=]*$ ]] || fail "$plan: '$kv' in run $name is not ENV=VALUE"
    [[ $known == *" ${kv%%=*} "* ]] || fail "$plan: run $name sets ${kv%%=*}, which train_gpt.py does not read (a typo, or a removed switch?)"
  done
  for seen in "${names[@]}"; do [ "$seen" != "$name" ] || fail "$plan: run name $name appears twice"; done
  names+=("$name") settings+=("$rest")
done < "$plan"
[ ${#names[@]} -gt 0 ] || fail "$plan holds no runs"
if [ -n "${RUNS:-}" ]; then  # keep the named runs, in plan order
  for want in $RUNS; do
    [[ " ${names[*]} " == *" $want "* ]] || fail "RUNS names $want, which is not a run of $plan"
  done
  all_names=("${names[@]}") all_settings=("${settings[@]}")
  names=() settings=()
  for i in "${!all_names[@]}"; do
    if [[ " $RUNS " == *" ${all_names[$i]} "* ]]; then names+=("${all_names[$i]}") settings+=("${all_settings[$i]}"); fi
  done
fi
if [ "$gpus" -gt 0 ] && [ "$jobs" -gt "$gpus" ]; then
  for i in "${!names[@]}"; do  # a run's own PROXY_SECONDS overrides the caller's
    seconds=${PROXY_SECONDS:-150}
    for kv in ${settings[$i]}; do [[ $kv == PROXY_SECONDS=* ]] && seconds=${kv#PROXY_SECONDS=}; done
    [ "$seconds" = 0 ] || fail "JOBS=$jobs shares $gpus GPU(s) between runs, but ${names[$i]} has a wallclock budget: use fixed steps (PROXY_SECONDS=0 ITERATIONS=N)"
  done
  echo "JOBS=$jobs on $gpus GPU(s): runs share GPUs, so their ms/step are not speed figures"
fi
data=$(bash eval/proxy_data.sh "$src" ${PROXY_DATA_DIR:+"$PROXY_DATA_DIR"})
mkdir -p logs

declare -A slot_of=()
free=($(seq 0 $((jobs - 1))))
finish_one() {  # wait for any run to end and give its slot back (the summary below says how each went)
  local pid
  wait -n -p pid || true
  free+=("${slot_of[$pid]}")
  unset "slot_of[$pid]"
}
declare -A last_on=()  # GPU -> "pid name" of the run started there last
wait_for_compile() {  # until run $2 (process $1) has logged its warm-up, or ended; no arguments: no wait
  [ $# -eq 2 ] || return 0
  while kill -0 "$1" 2>/dev/null && ! grep -qs '^warmup:' "logs/$2.txt"; do sleep 5; done
}
for i in "${!names[@]}"; do
  name=${names[$i]}
  if [ "${FRESH:-0}" != 1 ] && grep -qs "^final_int6_sliding_window_exact" "logs/$name.txt"; then
    echo "$(date +%H:%M:%S) $name: done already (logs/$name.txt)"
    continue
  fi
  [ ${#free[@]} -gt 0 ] || finish_one
  slot=${free[0]}
  free=("${free[@]:1}")
  gpu=$(( gpus == 0 ? 0 : jobs > gpus ? slot * gpus / jobs : slot ))
  rm -f "logs/$name.txt"  # an unfinished log from an earlier try would be appended to
  # shellcheck disable=SC2086
  ( [ "$gpus" -gt 0 ] && export CUDA_VISIBLE_DEVICES=$gpu
    wait_for_compile ${last_on[$gpu]:-}
    echo "$(date +%H:%M:%S) start $name ${settings[$i]} (slot $slot of $jobs)"
    env ${settings[$i]} RUN_ID="$name" PROXY_DATA_DIR="$data" bash eval/proxy.sh "$src" > "logs/$name.out" 2>&1 ) &
  slot_of[$!]=$slot last_on[$gpu]="$! $name"
done
while [ ${#slot_of[@]} -gt 0 ]; do finish_one; done

failed=0
for name in "${names[@]}"; do
  if grep -qs "^final_int6_sliding_window_exact" "logs/$name.txt"; then
    python3 tools/logs.py summary "logs/$name.txt"
  else
    echo "$name: failed ($(grep -h '^error:' "logs/$name.out" 2>/dev/null | head -1 || true); see logs/$name.out)"
    failed=1
  fi
done
exit $failed
