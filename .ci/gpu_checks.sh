#!/usr/bin/env bash
# The GPU checks, as one prepared script for a lent GPU machine (no network, no segfactory install, Python 3.12
# with torch). Prepare here first (`bash .ci/gpu_prepare.sh`: wheels in .whl/, real data in .gpu/), then run on
# the GPU machine from the repository root with .whl and .gpu carried:
#   bash .ci/gpu_checks.sh 1    # SSL pretraining (SimCLR, DenseCL) beside pytest -m gpu; then bench augment, train
#   bash .ci/gpu_checks.sh 2    # probe both encoders on real labels (3 sets) beside a label-efficiency sweep on CHO
#   bash .ci/gpu_checks.sh all  # a shorter version of both in one call of under 10 minutes (for a 15-minute lease)
# Part 2 reads part 1's encoders from $WORK (default /tmp/gpuwork), so both run on the same machine.
# Every step has its own time limit and log; a failing step never stops the others. Logs and JSON land in
# $WORK/results-partN, packed into $OUT/gpu_partN.tgz (default ./gpu-out). GPU_CHECKS_TINY=1 runs the same steps at toy size on the CPU (checks the script itself).
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:-1}
OUT=${OUT:-$PWD/gpu-out}      # gets one archive per part (the device tool brings back at most 8 files)
WORK=${WORK:-/tmp/gpuwork}
RES=$WORK/results-part$PART   # every log and JSON; packed into $OUT/gpu_part$PART.tgz after each step
PY=${PY:-python3}
TINY=${GPU_CHECKS_TINY:-0}
mkdir -p "$OUT" "$WORK" "$RES"
export PYTHONUNBUFFERED=1 XDG_CACHE_HOME=$WORK/cache MPLBACKEND=Agg
if [ -d .whl ] && [ ! -f "$WORK/site/.done" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl \
    && touch "$WORK/site/.done"
fi
export PYTHONPATH=$WORK/site:$PWD
SF="$PY -m segfactory.cli"
NCPU=$(nproc)
W=$(( NCPU > 16 ? 15 : NCPU - 1 )); [ "$W" -ge 1 ] || W=1

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log to $RES/NAME.log, note rc and seconds
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  if [ -n "${DEADLINE:-}" ]; then  # a phase's deadline (in $SECONDS) caps every step started inside it
    if [ $((DEADLINE - SECONDS)) -lt 10 ]; then echo "$name skipped: phase deadline" | tee -a "$RES/steps.txt"; return; fi
    [ "$limit" -le $((DEADLINE - SECONDS)) ] || limit=$((DEADLINE - SECONDS))
  fi
  echo "=== $name (limit ${limit}s): $*"
  timeout -k 10 "$limit" "$@" >"$RES/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - t0))" | tee -a "$RES/steps.txt"
  tail -n 4 "$RES/$name.log"
  pack
}
pack() {  # the results so far, replaced atomically (steps in the background pack too)
  tar czf "$OUT/gpu_part$PART.tgz.$BASHPID" -C "$RES" . && mv "$OUT/gpu_part$PART.tgz.$BASHPID" "$OUT/gpu_part$PART.tgz"
}

if [ "$TINY" = 1 ]; then
  DEV=cpu; BB=test_resnet; CROP=64; BS=16; STEPS=6; PSTEPS=5; PIMG=64; SEEDS=2; FTSTEPS=4; FTCROP=64
  TRAIN_ARGS=(--size 64 --batch-sizes 2 --steps 2 --warmup 1 --encoder test_resnet --workers 1 --device cpu)
  AUG_ARGS=(--device cpu --images 8 --batch-size 4 --crop-size 32 --backbone test_resnet --workers 1)
  FT_MODEL=(finetune.model.encoder=test_resnet finetune.model.decoder_channels=8)
  FT_TEST=.gpu/data/hela-eval; FT_FRACTIONS='[0.1]'   # the script's plumbing only (CPU evaluation is slow)
else
  DEV=cuda; BB=resnet18; CROP=224; BS=64; STEPS=800; PSTEPS=300; PIMG=256; SEEDS=5; FTSTEPS=300; FTCROP=256
  TRAIN_ARGS=(--size 512 --batch-sizes 8 16 32 --steps 10 --warmup 2 --encoder resnet18 --workers "$W" --device cuda)
  AUG_ARGS=(--device cuda --method simclr --batch-size 256 --crop-size 224 --images 4096 --backbone resnet18)
  FT_MODEL=(finetune.model.encoder=resnet18 'finetune.model.decoder_channels=null')
  FT_TEST=.gpu/data/cho-eval; FT_FRACTIONS='[0.02,0.1,1.0]'
fi

ssl_args() {  # the SSL arguments shared by both methods
  common=(--images .gpu/ingest --backbone "$BB" --steps "$STEPS" --batch-size "$BS" "augment.crop_size=$CROP"
          augment.vflip=true augment.rot90=true "train.device=$DEV" "data.num_workers=$((W / ${1:-2}))"
          train.checkpoint_every=100000 train.log_every=20)
}
ssl_one() {  # ssl_one simclr|densecl [WORKER_DIVISOR]
  local common; ssl_args "${2:-2}"
  if [ "$1" = simclr ]; then
    step pretrain_simclr 150 $SF pretrain configs/pretrain.yaml --out "$WORK/simclr" --method simclr "${common[@]}"
  else
    step pretrain_densecl 150 $SF pretrain configs/pretrain_densecl.yaml --out "$WORK/densecl" "${common[@]}" \
      method.densecl.memory_bank_size=16 method.densecl.dense_start_step=$((STEPS / 4)) optim.warmup_steps=$((STEPS / 10))
  fi
  [ -f "$WORK/$1/summary.json" ] && cp "$WORK/$1/summary.json" "$RES/pretrain_${1}_summary.json"
  [ -f "$WORK/$1/loss.png" ] && cp "$WORK/$1/loss.png" "$RES/pretrain_${1}_loss.png"
  true
}
ssl() {  # SSL on the 84 real unlabeled microscopy frames (gray), one method after the other.
  # Batch 64 < 84 images: no image twice in a batch.
  ssl_one simclr; ssl_one densecl
}
ssl_both() {  # both methods at once on the one GPU (each with a quarter of the CPU cores for loading)
  ssl_one simclr 4 & local pid=$!
  ssl_one densecl 4; wait "$pid"
}
env_info() {
  { nvidia-smi -L; df -h /dev/shm; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv; nproc; free -g
    $PY -c "import torch, numpy, timm, kornia, lightly, segmentation_models_pytorch as smp, pydantic
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(), 'numpy', numpy.__version__,
      'timm', timm.__version__, 'kornia', kornia.__version__, 'lightly', lightly.__version__, 'smp', smp.__version__)"
  } >"$RES/env.txt" 2>&1
  cat "$RES/env.txt"
}
sweep() {  # sweep LIMIT_S: random init vs SimCLR fine-tuned on fractions of CHO's labeled frames
  step sweep_cho "$1" $SF sweep configs/finetune_sweep.yaml --out "$WORK/sweep" --real .gpu/data/cho-labeled \
    --test "$FT_TEST" --encoder "$WORK/simclr/encoder" --steps "$FTSTEPS" 'finetune.data.synthetic=[]' \
    "sweep.real_fractions=$FT_FRACTIONS" 'sweep.synthetic_fractions=[0.0]' 'sweep.encoder_inits=[random,ssl]' \
    "${FT_MODEL[@]}" "finetune.augment.crop_size=$FTCROP" finetune.train.batch_size=16 finetune.train.lr=0.001 \
    "finetune.data.num_workers=$((W / 2))" "finetune.train.device=$DEV" finetune.predict.tile=512 \
    "finetune.train.val_every=$FTSTEPS" "finetune.train.checkpoint_every=$FTSTEPS"
  for f in results.csv label_efficiency.png; do [ -f "$WORK/sweep/$f" ] && cp "$WORK/sweep/$f" "$RES/sweep_$f"; done
  true
}

probes() {
  for m in simclr densecl; do
    [ -f "$WORK/$m/encoder/encoder.json" ] || { echo "no $m encoder in $WORK (run part 1 first)"; continue; }
    for d in cho hela trpl; do
      step "probe_${m}_$d" 90 sh -c "$SF probe --encoder $WORK/$m/encoder --data .gpu/data/$d-eval --steps $PSTEPS \
        --seeds $SEEDS image_size=$PIMG device=$DEV > $RES/probe_${m}_$d.json"
    done
  done
}

if [ "$PART" = 1 ]; then
  env_info
  # Pretraining (wall time reported as measured beside the GPU tests) overlaps pytest; the benches run alone after.
  ssl &
  [ "$TINY" = 1 ] || step pytest_gpu 180 $PY -m pytest -q -p no:cacheprovider -m gpu -rs tests
  wait
  step bench_augment 100 sh -c "$SF bench augment ${AUG_ARGS[*]} > $RES/bench_augment.json"
  step bench_train 270 sh -c "$SF bench train ${TRAIN_ARGS[*]} > $RES/bench_train.json"
fi

if [ "$PART" = 2 ]; then
  # Probes (frozen encoder, 5 seeds, 3 real labeled sets) beside the label-efficiency sweep: the same fine-tune
  # (matched steps) from random init and from the SimCLR encoder on 2 %, 10 % and 100 % of CHO's labeled
  # training frames (t = 0..11, 80 % of them: 1, 5 and 47 slices), scored on CHO's held-out eval frames (t = 14..19).
  [ -f "$WORK/simclr/encoder/encoder.json" ] || ssl   # a fresh machine: part 1's encoders are gone
  probes &
  sweep 300 &
  wait
fi
if [ "$PART" = all ]; then
  # Everything in one call of under 10 minutes (a lent machine gives a session 15 minutes, its start included):
  # phase A (under 4.7 minutes): pytest -m gpu (77 s alone on an H200, 150+ s beside the rest) beside SimCLR and DenseCL at once, then the probes beside a shorter
  # label-efficiency sweep (2 % and 10 % of CHO's labeled frames, random init vs SimCLR);
  # phase B (alone on the machine, about 4.5 minutes): bench augment, bench train (batch 8 and 32).
  env_info
  DEADLINE=$((SECONDS + ${PHASE_A_S:-280}))
  [ "$TINY" = 1 ] || SEEDS=3   # 5-seed probes did not fit (H200, 2026-12-04: 3 seeds took 40-50 s per set)
  { [ "$TINY" = 1 ] || step pytest_gpu 200 $PY -m pytest -q -p no:cacheprovider -m gpu -rs tests; } &
  ssl_both
  { probes; } &
  [ "$TINY" = 1 ] || FT_FRACTIONS='[0.02,0.1]'
  sweep 150
  wait
  unset DEADLINE
  step bench_augment 70 sh -c "$SF bench augment ${AUG_ARGS[*]} > $RES/bench_augment.json"
  [ "$TINY" = 1 ] || TRAIN_ARGS=(--size 512 --batch-sizes 8 32 --steps 10 --warmup 2 --encoder resnet18 --workers "$W" --device cuda)
  step bench_train 200 sh -c "$SF bench train ${TRAIN_ARGS[*]} > $RES/bench_train.json"
fi
echo "=== done part $PART"; cat "$RES/steps.txt"; pack
