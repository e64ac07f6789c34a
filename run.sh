#!/usr/bin/env bash
# The whole nanoMoR pipeline:  bash run.sh [smoke|cpu|gpu] [--force] [--seed S] [--seeds N]
# Default preset: gpu when CUDA is available, else cpu. Outputs go to out/PRESET/ (or $OUT_DIR), each
# stage's log to out/PRESET/logs/STAGE.log. --seed S seeds every training stage (pretraining data and
# init, rollouts, distillation, stage 2; each derives its own streams from it; default 0); eval's test
# prompts stay the same for every seed. --seeds N runs the whole pipeline for seeds S..S+N-1 into
# out/PRESET/seed_K/, side by side (the cores shared among them), then summary.py writes
# out/PRESET/summary.json and summary.md: every figure as per-seed values, mean and std. A stage whose output already exists is skipped, so an
# interrupted run continues where it stopped; --force redoes everything. The first failing stage stops
# the run with its name.
#
# Stages that do not depend on each other run side by side ($JOBS at a time), each with its share of the
# cores (at least one thread). On CPU one more stage than there are cores: the models are small, so two
# one-thread processes get more done than one process with two threads, and three one-thread processes
# on two cores get as much done as two (measured) while keeping both cores busy where two would leave
# one idle: the three routers train at once, and the shorter stages fill the gaps. Experts and traces
# are the same bit for bit at any thread count; stage 2's routers are not (their sums split over
# threads differently). On a GPU three at a time: one stage alone leaves it mostly idle, waiting on
# Python (decoding steps, building batches), and three fit in an H100's memory.
# Portable bash (3.2, macOS): no associative arrays, no `wait -n`.
set -uo pipefail
cd "$(dirname "$0")"

usage="usage: bash run.sh [smoke|cpu|gpu] [--force] [--seed S] [--seeds N]"
preset=""
force=0
seed=0
seeds=""
while [ $# -gt 0 ]; do
  case "$1" in
    --force) force=1 ;;
    smoke|cpu|gpu) preset="$1" ;;
    --seed|--seeds)
      [ $# -ge 2 ] || { echo "error: $1 needs a value ($usage)" >&2; exit 2; }
      case "$2" in ''|*[!0-9]*) echo "error: $1 must be a non-negative integer (got '$2')" >&2; exit 2 ;; esac
      if [ "$1" = --seed ]; then seed=$2; else seeds=$2; fi
      shift ;;
    *) echo "error: unknown argument '$1' ($usage)" >&2; exit 2 ;;
  esac
  shift
done
[ "$seeds" != 0 ] || { echo "error: --seeds must be at least 1" >&2; exit 2; }
for var in CORES JOBS; do  # the environment's knobs: unset, or a count
  eval "val=\${$var-unset}"
  case "$val" in unset) ;; ''|*[!0-9]*|0) echo "error: $var must be a positive integer (got '$val')" >&2; exit 2 ;; esac
done
py="${PYTHON:-python3}"  # PYTHON=... picks the interpreter (the tests pass their own)
if [ -z "$preset" ]; then
  preset=$($py -c "import torch; print('gpu' if torch.cuda.is_available() else 'cpu')") || exit 1
fi
out="${OUT_DIR:-out/$preset}"  # OUT_DIR=... puts the run elsewhere (the tests do)
mkdir -p "$out/logs" || { echo "error: cannot create $out/logs" >&2; exit 2; }
cores=${CORES:-$($py -c "import os; print(os.cpu_count() or 1)")}  # CORES: this run's share (--seeds sets it)

if [ -n "$seeds" ]; then  # one pipeline per seed, side by side, each with its share of the cores
  share=$(( cores / seeds > 0 ? cores / seeds : 1 ))
  seed_jobs=$(( seeds >= cores ? 1 : share ))  # together about as many stages at a time as one run has
  [ "$preset" = gpu ] && seed_jobs=$(( 3 / seeds > 0 ? 3 / seeds : 1 ))
  flags=(); [ $force -eq 1 ] && flags=(--force)
  pids=(); dirs=()
  for ((k = seed; k < seed + seeds; k++)); do
    dir="$out/seed_$k"
    mkdir -p "$dir" || { echo "error: cannot create $dir" >&2; exit 2; }
    echo "== seed $k started, $seed_jobs stage(s) at a time, log: $dir/run.log"
    OUT_DIR="$dir" CORES=$share JOBS=${JOBS:-$seed_jobs} bash "$0" "$preset" --seed "$k" "${flags[@]}" > "$dir/run.log" 2>&1 &
    pids+=($!); dirs+=("$dir")
  done
  trap 'kill "${pids[@]}" 2>/dev/null; wait; exit 130' INT TERM
  failed=0
  for i in "${!pids[@]}"; do
    if wait "${pids[i]}"; then echo "== ${dirs[i]} done: $(tail -n 1 "${dirs[i]}/run.log")"
    else echo "error: the pipeline in ${dirs[i]} failed; the end of ${dirs[i]}/run.log:" >&2
         tail -n 5 "${dirs[i]}/run.log" | sed 's/^/  /' >&2; failed=1; fi
  done
  [ $failed -eq 0 ] || exit 1
  exec $py summary.py --preset "$preset" --out_dir "$out" --seeds "$(seq -s, "$seed" $((seed + seeds - 1)))"
fi
if [ "$preset" = gpu ]; then default_jobs=3; else default_jobs=$(( cores < 2 ? 1 : cores + 1 )); fi
jobs=${JOBS:-$default_jobs}

# ---------------------------------------------------------------------------------------------
# The stages: name, the file that marks it done, the stages it needs, its command.
names=(); outputs=(); needs=(); cmds=()
add() {  # add NAME OUTPUT "NEEDED STAGES" command...
  names+=("$1"); outputs+=("$2"); needs+=("$3"); shift 3
  cmds+=("$(printf '%q ' "$@")")
}
common=(--preset "$preset" --out_dir "$out" --seed "$seed")

add pretrain "$out/base.pt" "" $py pretrain.py "${common[@]}"
rl=""
rl_order="ok pick bool hop add"  # the slowest first (measured): the critical path is RLVF -> distill -> routers
for d in $rl_order; do
  add "expert:$d" "$out/experts/$d.pt" "pretrain" $py train_expert.py "${common[@]}" --domain "$d"
  rl="$rl expert:$d"
done
traces=""
for d in $rl_order; do  # each domain's traces as soon as its expert is done
  add "distill:$d" "$out/distill/$d.jsonl" "expert:$d" $py distill.py "${common[@]}" --domains "$d"
  traces="$traces distill:$d"
done
# stage 2: the method, its controls and the baselines, all on the same traces, steps and rates, the
# slowest first (measured) so that the last ones to end are short: mor_gumbel (a Gumbel-softmax sample
# in training), mor_hard (the method), router_only (no attention LoRA), mor_paper (the paper's exact
# recipe: no routing loss), mor_soft / moe_soft (soft top-2 over frozen experts / per layer, experts
# trainable), lorahub (the searched merge), attn_fast (the attention LoRA alone at a rate that lets it
# learn what it can; the method's is kept slow), attn_only (the same at the method's rate)
add mor_gumbel "$out/mor/mor_gumbel.pt" "$traces" $py train_router.py "${common[@]}" --name mor_gumbel --routing gumbel
add mor_hard "$out/mor/mor_hard.pt" "$traces" $py train_router.py "${common[@]}" --name mor_hard
add router_only "$out/mor/router_only.pt" "$traces" $py train_router.py "${common[@]}" --name router_only --attn_lora_r 0
add mor_paper "$out/mor/mor_paper.pt" "$traces" $py train_router.py "${common[@]}" --name mor_paper --route_loss 0
add mor_soft "$out/mor/mor_soft.pt" "$traces" $py train_router.py "${common[@]}" --name mor_soft \
  --routing soft --top_k 2
add lorahub "$out/mor/lorahub.pt" "$traces" $py lorahub.py "${common[@]}"
add attn_fast "$out/mor/attn_fast.pt" "$traces" $py train_router.py "${common[@]}" --name attn_fast --attn_only --attn_lr 1e-2
add moe_soft "$out/mor/moe_soft.pt" "$traces" $py train_router.py "${common[@]}" --name moe_soft \
  --routing soft --top_k 2 --per_layer --train_experts
add attn_only "$out/mor/attn_only.pt" "$traces" $py train_router.py "${common[@]}" --name attn_only --attn_only
routers="mor_hard mor_paper router_only attn_only attn_fast mor_gumbel lorahub mor_soft moe_soft"
sft=""
for d in add bool pick ok hop; do  # only eval needs them: they fill the gaps
  add "sft:$d" "$out/experts/${d}_sft.pt" "pretrain" $py train_expert.py "${common[@]}" --domain "$d" --method sft
  sft="$sft sft:$d"
done
add eval "$out/eval.json" "$rl $sft $routers" $py eval.py --preset "$preset" --out_dir "$out"  # the same test prompts for every seed

# ---------------------------------------------------------------------------------------------
# The scheduler: start every stage whose needs are done, in the order above, while fewer than $jobs
# run; poll once a second for the ones that ended.
n=${#names[@]}
state=()  # per stage: pending, running or done
pids=(); starts=(); took=()
for ((i = 0; i < n; i++)); do
  state[i]=pending
  if [ $force -eq 0 ] && [ -e "${outputs[i]}" ]; then
    echo "== ${names[i]}: ${outputs[i]} exists, skipped"
    state[i]=done
  fi
done
log_of() { echo "$out/logs/${names[$1]//:/_}.log"; }
is_done() {  # is_done STAGE_NAME
  local j
  for ((j = 0; j < n; j++)); do [ "${names[j]}" = "$1" ] && [ "${state[j]}" = done ] && return 0; done
  return 1
}
ready() {  # ready I: pending, and everything it needs is done
  local s
  [ "${state[$1]}" = pending ] || return 1
  for s in ${needs[$1]}; do is_done "$s" || return 1; done
}
count() {  # count STATE
  local j c=0
  for ((j = 0; j < n; j++)); do [ "${state[j]}" = "$1" ] && c=$((c + 1)); done
  echo $c
}
stop_all() {  # a stage failed: stop the others (their checkpoints stay; outputs are written atomically)
  local j
  for ((j = 0; j < n; j++)); do [ "${state[j]}" = running ] && kill "${pids[j]}" 2>/dev/null; done
  wait
}
trap 'stop_all; exit 130' INT TERM

total_start=$(date +%s)
while [ "$(count pending)" -gt 0 ] || [ "$(count running)" -gt 0 ]; do
  for ((i = 0; i < n; i++)); do
    running=$(count running)
    [ "$running" -lt "$jobs" ] || break
    ready $i || continue
    # threads: the cores shared among the stages that can run now (an alone stage gets them all)
    now=$running
    for ((j = 0; j < n; j++)); do ready $j && now=$((now + 1)); done
    [ $now -gt "$jobs" ] && now=$jobs
    threads=${OMP_NUM_THREADS:-$(( cores / now > 0 ? cores / now : 1 ))}
    # one at a time on the whole machine: the library's own default; with CORES given (--seeds does), that share
    [ "$jobs" -eq 1 ] && [ -z "${CORES:-}" ] && threads=${OMP_NUM_THREADS:-}
    echo "== ${names[i]} started${threads:+ ($threads thread(s))}, log: $(log_of $i)"
    ( [ -n "$threads" ] && export OMP_NUM_THREADS=$threads; eval "exec ${cmds[i]}" ) > "$(log_of $i)" 2>&1 &
    pids[i]=$!; starts[i]=$(date +%s); state[i]=running
  done
  [ "$(count running)" -gt 0 ] || { echo "error: no stage can start (a needed stage is missing)" >&2; exit 1; }
  sleep 1
  for ((i = 0; i < n; i++)); do
    [ "${state[i]}" = running ] && ! kill -0 "${pids[i]}" 2>/dev/null || continue
    wait "${pids[i]}"
    rc=$?
    if [ $rc -ne 0 ]; then
      state[i]=failed
      stop_all
      { echo "error: stage '${names[i]}' failed (exit $rc); the end of its log, $(log_of $i):"
        tail -n 5 "$(log_of $i)" | sed 's/^/  /'; } >&2
      exit 1
    fi
    state[i]=done
    took[i]=$(( $(date +%s) - starts[i] ))
    echo "== ${names[i]} done in ${took[i]}s: $(tail -n 1 "$(log_of $i)")"
    [ "${names[i]}" = eval ] && cat "$(log_of $i)"  # the results table
  done
done

{
  echo "== wall time per stage ($preset, $(date -u +%Y-%m-%dT%H:%MZ), $jobs at a time, stages skipped as done are not listed)"
  for ((i = 0; i < n; i++)); do [ -n "${took[i]:-}" ] && echo "  ${names[i]} ${took[i]}s"; done
  echo "  total $(( $(date +%s) - total_start ))s"
} | tee "$out/times.txt"
