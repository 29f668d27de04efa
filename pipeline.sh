#!/usr/bin/env bash
# The whole default pipeline on a CPU, offline: synthetic benchmark -> tiny base VLM (offline perception
# stage) -> streaming SFT with CE, focal and CB-Stream at the same budget and seed -> GRPO from CB-Stream
# -> StreamPro-F1 of every model on the synthetic test split (free-running streaming decoding), plus the
# calibration control (CE with its threshold tuned on val) and the model-free baselines -> results table.
#
#   bash pipeline.sh            # one seed (0): about 30 minutes on 2 cores
#   bash pipeline.sh 0 1 2      # three seeds, two at a time (one core each), then mean ± std
#
# Every stage skips what is done (checkpoints and prediction files resume), so rerunning after an
# interruption finishes the job. Outputs: out/seed<N>/{base,sft-ce,sft-focal,sft-cb,grpo}, out/results.md.
set -euo pipefail
cd "$(dirname "$0")"
seeds=("${@:-0}")
log() { echo "[$(date +%H:%M:%S)] $*"; }

run_seed() {
  local s=$1 o=out/seed$1
  log "seed $s: offline perception stage"; python sft.py --stage offline --seed "$s" --out "$o/base" --resume
  for loss in ce focal cb; do
    log "seed $s: streaming SFT, $loss"; python sft.py --loss "$loss" --seed "$s" --model "$o/base" --out "$o/sft-$loss" --resume
  done
  log "seed $s: GRPO"; python grpo.py --seed "$s" --model "$o/sft-cb" --out "$o/grpo" --resume
  for m in sft-ce sft-focal sft-cb grpo; do
    log "seed $s: benchmark $m"; python bench.py --model "$o/$m" > "$o/$m.bench.txt"
  done
  log "seed $s: CE with a threshold tuned on val"
  python bench.py --model "$o/sft-ce" --calibrate data/synthetic/val.jsonl > "$o/sft-ce.calibrated.bench.txt"
}

start=$(date +%s)
python data.py --show 0 > /dev/null  # generates data/synthetic and the tiny model on first use
for b in oracle silent every-turn random; do python bench.py --baseline "$b" > /dev/null; done
mkdir -p out
for ((i = 0; i < ${#seeds[@]}; i += 2)); do  # two seeds side by side, one core each; a seed alone gets both
  pair=("${seeds[@]:i:2}")
  if [ ${#pair[@]} -eq 1 ]; then run_seed "${pair[0]}" 2>&1 | tee "out/seed${pair[0]}.log"; continue; fi
  pids=()
  for s in "${pair[@]}"; do (export OMP_NUM_THREADS=1; run_seed "$s") > "out/seed$s.log" 2>&1 & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p"; done
done
dirs=(); for s in "${seeds[@]}"; do dirs+=("out/seed$s"); done
python bench.py --table "${dirs[@]}" | tee out/results.md
log "done in $(( ($(date +%s) - start) / 60 )) min; seeds ${seeds[*]}; table in out/results.md"
