#!/usr/bin/env bash
# The whole nanoMoR pipeline, in order:  bash run.sh [smoke|cpu|gpu] [--force]
# Default preset: gpu when CUDA is available, else cpu. Outputs go to out/PRESET/ (or $OUT_DIR).
# A stage whose output already exists is skipped, so an interrupted run continues where it stopped;
# --force redoes everything. The first failing stage stops the run with its name.
set -uo pipefail
cd "$(dirname "$0")"

preset=""
force=0
for a in "$@"; do
  case "$a" in
    --force) force=1 ;;
    smoke|cpu|gpu) preset="$a" ;;
    *) echo "error: unknown argument '$a' (usage: bash run.sh [smoke|cpu|gpu] [--force])" >&2; exit 2 ;;
  esac
done
if [ -z "$preset" ]; then
  preset=$(python3 -c "import torch; print('gpu' if torch.cuda.is_available() else 'cpu')") || exit 1
fi
out="${OUT_DIR:-out/$preset}"  # OUT_DIR=... puts the run elsewhere (the tests do)
mkdir -p "$out" || { echo "error: cannot create $out" >&2; exit 2; }
domains="add bool pick ok hop"
total_start=$(date +%s)
declare -a times

stage() {  # stage NAME OUTPUT_FILE command...
  local name=$1 output=$2
  shift 2
  if [ $force -eq 0 ] && [ -e "$output" ]; then
    echo "== $name: $output exists, skipped"
    return
  fi
  echo "== $name"
  local t0=$(date +%s)
  if ! "$@"; then
    echo "error: stage '$name' failed" >&2
    exit 1
  fi
  times+=("$name $(( $(date +%s) - t0 ))s")
}

py="python3"
stage pretrain "$out/base.pt" $py pretrain.py --preset "$preset" --out_dir "$out"
for d in $domains; do
  stage "expert:$d" "$out/experts/$d.pt" $py train_expert.py --preset "$preset" --out_dir "$out" --domain "$d"
  stage "sft:$d" "$out/experts/${d}_sft.pt" $py train_expert.py --preset "$preset" --out_dir "$out" --domain "$d" --method sft
done
for f in distill.py train_router.py eval.py; do
  [ -f "$f" ] || { echo "== $f does not exist yet: the pipeline stops here"; break; }
  case "$f" in
    distill.py) stage distill "$out/distill/hop.jsonl" $py distill.py --preset "$preset" --out_dir "$out" ;;
    train_router.py)
      stage mor_hard "$out/mor/mor_hard.pt" $py train_router.py --preset "$preset" --out_dir "$out" --name mor_hard
      stage mor_soft "$out/mor/mor_soft.pt" $py train_router.py --preset "$preset" --out_dir "$out" --name mor_soft \
        --routing soft --top_k 2
      stage moe_soft "$out/mor/moe_soft.pt" $py train_router.py --preset "$preset" --out_dir "$out" --name moe_soft \
        --routing soft --top_k 2 --per_layer --train_experts ;;
    eval.py) stage eval "$out/eval.json" $py eval.py --preset "$preset" --out_dir "$out" ;;
  esac
done

{
  echo "== wall time per stage ($preset, $(date -u +%Y-%m-%dT%H:%MZ), stages skipped as done are not listed)"
  for t in "${times[@]}"; do echo "  $t"; done
  echo "  total $(( $(date +%s) - total_start ))s"
} | tee "$out/times.txt"
