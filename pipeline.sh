#!/usr/bin/env bash
# The whole default pipeline on a CPU, offline: synthetic benchmark -> tiny base VLM (offline perception
# stage, then the narrate stage, where it learns to watch a frame stream) -> streaming SFT with CE, focal
# and CB-Stream at the same budget and seed -> GRPO from CB-Stream and its control -> StreamPro-F1 of every model on the
# synthetic test split (free-running streaming decoding), plus two controls (CE with its threshold tuned
# on val; CB-Stream SFT continued on GRPO's videos and labels) and the model-free baselines -> results table.
#
# The paper's task split (StreamPro 4.3, B.2): SFT on levels 0-1 and level 2's OU, EU, TP, TG (sft.py's
# defaults), GRPO on level 2's EU, OU, AA, TP, TG, GP (RL below, grpo.py's defaults), RF in neither.
#
#   bash pipeline.sh            # one seed (0): 18 minutes on 2 cores; run it alone (STUDY.md: wall time)
#   bash pipeline.sh 0 1 2      # three seeds, then mean ± std: 69 minutes beside other work
#
# Every stage skips what is done (checkpoints and prediction files resume), so rerunning after an
# interruption finishes the job. Outputs: out/seed<N>/{base,narrator,sft-ce,sft-focal,sft-cb,grpo}, one log
# per stage beside them (out/seed<N>/<stage>.log: tail -f it to watch), out/results.md.
set -euo pipefail
cd "$(dirname "$0")"
seeds=("${@:-0}")
RL="--levels 2 --tasks EU,OU,AA,TP,TG,GP"  # GRPO's videos, and its control's (test_core.py holds them equal)
CONTROL_OPT="--lr 1e-4 --warmup 5 --eval_every 50 --save_every 50"  # (chosen on val: STUDY.md)
log() { echo "[$(date +%H:%M:%S)] $*"; }

# One stage: its output goes to its own log; the console gets one line when it starts.
stage() {
  local o=$1 name=$2; shift 2; log "seed ${o#out/seed}: $name"
  "$@" > "$o/$name.log" 2>&1 || { log "seed ${o#out/seed}: $name FAILED; the end of $o/$name.log:"; tail -n 15 "$o/$name.log"; return 1; }
}

# Two chains side by side, one core each: the tiny model's small matrices barely use a second thread,
# so two 1-thread jobs finish in about 60% of the time of the same jobs run one after the other.
side_by_side() {
  (export OMP_NUM_THREADS=1; eval "$1") & local a=$!
  (export OMP_NUM_THREADS=1; eval "$2") & local b=$!
  local ra=0 rb=0; wait $a || ra=$?; wait $b || rb=$?  # both finish (and keep their checkpoints) before a failure stops us
  return $(( ra || rb ))
}

# A seed's base and narrator: one lane, the head of every later stage of that seed.
prep() {
  local s=$1 o=out/seed$1
  mkdir -p "$o"
  stage "$o" base python sft.py --stage offline --seed "$s" --out "$o/base" --resume
  stage "$o" narrator python sft.py --stage narrate --seed "$s" --model "$o/base" --out "$o/narrator" --resume
}

# The rest of a seed, in two lanes of about equal length: GRPO, its control and their benchmarks | focal SFT, the
# other benchmarks and calibrated CE.
run_seed() {
  local s=$1 o=out/seed$1
  sft() { stage "$o" "sft-$1" python sft.py --loss "$1" --seed "$s" --model "$o/narrator" --out "$o/sft-$1" --resume; }
  bench() { stage "$o" "$1.bench" python bench.py --model "$o/$1" "${@:2}"; }
  # the control: CB-Stream SFT continued on GRPO's videos (the same split, seed and batch: the same videos in the
  # same order), with their labels instead of rewards, for as many steps
  control() { stage "$o" control python sft.py $RL --loss cb --seed "$s" --model "$o/sft-cb" --out "$o/control" --resume \
      --batch 4 --micro_batch 4 --max_steps 50 $CONTROL_OPT; }
  side_by_side "sft cb" "sft ce"
  side_by_side "stage $o grpo python grpo.py $RL --seed $s --model $o/sft-cb --out $o/grpo --resume; bench grpo; control; bench control" \
               "sft focal; bench sft-focal; bench sft-ce; bench sft-cb; stage $o sft-ce.calibrated.bench python bench.py --model $o/sft-ce --calibrate data/synthetic/val.jsonl"
  for m in sft-ce sft-ce.calibrated sft-focal sft-cb grpo control; do  # the headline of each model's table
    echo "  $m: $(grep -h 'Overall Avg' "$o/$m.bench.log")"
  done
}

start=$(date +%s)
python model.py --show 0 > /dev/null  # generates data/synthetic and the tiny model on first use
for b in oracle silent every-turn random; do python bench.py --baseline "$b" > /dev/null; done
# With more seeds, the next seed's base and narrator run on a third lane (one thread) beside this seed's
# two: three one-thread jobs share the two cores without the stalls of a two-thread job beside others.
prep "${seeds[0]}"  # alone, so with two threads
for i in "${!seeds[@]}"; do
  s=${seeds[$i]} next=${seeds[$((i + 1))]:-} t=$(date +%s) p=""
  if [ -n "$next" ]; then (export OMP_NUM_THREADS=1; prep "$next") & p=$!; fi
  trap '[ -z "$p" ] || wait "$p"' EXIT  # if this seed fails, the next one's lane still finishes its stage
  run_seed "$s"; log "seed $s done, $(( ($(date +%s) - t) / 60 )) min after its narrator"
  if [ -n "$p" ]; then q=$p p=""; wait "$q"; fi
done
dirs=(); for s in "${seeds[@]}"; do dirs+=("out/seed$s"); done
python bench.py --table "${dirs[@]}" | tee out/results.md
log "done in $(( ($(date +%s) - start) / 60 )) min; seeds ${seeds[*]}; table in out/results.md"
