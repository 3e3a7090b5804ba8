#!/usr/bin/env bash
# Trains the tiny full LLaVA-OV model shipped in src/visor/demo/checkpoint, from scratch, in three stages.
# Usage: scripts/train_demo_checkpoint.sh OUTPUT_DIR [THREADS]     (see src/visor/demo/checkpoint/TRAINING.md)
# Stage 1 learns the coarse tasks and counting; stage 2 is a curriculum on 2x2 grids, where digit reading gets
# off the loss plateau it sits on at 3x3; stage 3 returns to the full demo mix, weighted towards the weak tasks.
set -euo pipefail
OUT=${1:?usage: $0 OUTPUT_DIR [THREADS]}
THREADS=${2:-1}
VISOR=${VISOR:-visor}
COMMON=(--recipe full --set batch_size=64 --set num_threads="$THREADS" --set attn_implementation=eager)

"$VISOR" train "${COMMON[@]}" --model tiny --output "$OUT/1-base" --max-steps 2500 \
  --data 'synthetic@demo:read_cell*2,bar_value*2,count_marks*2,dominant_color,easy_vqa' \
  --set eval_every=250 --set samples_per_task=50 --set save_every=250
"$VISOR" train "${COMMON[@]}" --init "$OUT/1-base/model" --output "$OUT/2-curriculum" --max-steps 400 \
  --data 'synthetic@curriculum:read_cell' \
  --set eval_every=100 --set samples_per_task=100 --set save_every=100
"$VISOR" train "${COMMON[@]}" --init "$OUT/2-curriculum/model" --output "$OUT/3-demo-mix" --max-steps 1000 \
  --data 'synthetic@demo:read_cell*3,bar_value,count_marks,dominant_color,easy_vqa*3' \
  --set eval_every=200 --set samples_per_task=100 --set save_every=200
echo "trained model: $OUT/3-demo-mix/model"
