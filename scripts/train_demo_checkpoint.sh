#!/usr/bin/env bash
# Trains the tiny full LLaVA-OV model shipped in src/visor/demo/checkpoint, from scratch (see TRAINING.md there).
# Usage: scripts/train_demo_checkpoint.sh OUTPUT_DIR [THREADS]   (the shipped model: THREADS=2, about 2 h 20 min)
# easy-VQA is trained on balanced questions (`easy_vqa_balanced`: its question forms, yes and no equally likely),
# never on the package's lopsided ones, so that yes/no is answered from the image, not from the words.
# Stages 1-3 learn the demo's tasks: the coarse tasks and counting, a 2x2 read_cell curriculum that gets digit
# reading off its plateau, the demo mix. Stages 4-6 teach easy-VQA: more of it in the mix; its colour, shape and
# positive yes/no forms alone (shapes); its yes/no forms alone, positive and then negated too (the comparison a
# yes/no question asks is only learned when it is most of a batch). Stage 7 returns to the demo mix; stage 8
# asks only the yes/no questions that name a colour (the comparison had collapsed to one colour feature); stage 9
# interleaves everything. Runs that continue a stage restart its learning-rate schedule; they are how the recipe
# was found and are kept so that it reproduces.
set -euo pipefail
OUT=${1:?usage: $0 OUTPUT_DIR [THREADS]}
THREADS=${2:-2}
VISOR=${VISOR:-visor}
COMMON=(--recipe full --set batch_size=64 --set num_threads="$THREADS" --set attn_implementation=eager)

run() {  # run NAME INIT STEPS DATA [settings...]
  local name=$1 init=$2 steps=$3 data=$4
  shift 4
  "$VISOR" train "${COMMON[@]}" --init "$init" --output "$OUT/$name" --max-steps "$steps" --data "$data" "$@"
}

"$VISOR" train "${COMMON[@]}" --model tiny --output "$OUT/1-base" --max-steps 2500 \
  --data 'synthetic@demo-train:read_cell*2,bar_value*2,count_marks*2,dominant_color,easy_vqa_balanced' \
  --set eval_every=250 --set samples_per_task=50 --set save_every=250
run 2-curriculum "$OUT/1-base/model" 400 'synthetic@curriculum:read_cell' \
  --set eval_every=100 --set samples_per_task=100 --set save_every=100
run 3-demo-mix "$OUT/2-curriculum/model" 1000 \
  'synthetic@demo-train:read_cell*3,bar_value,count_marks,dominant_color,easy_vqa_balanced*3' \
  --set eval_every=200 --set samples_per_task=100 --set save_every=200
# stage 4 was stopped after 1,000 of its planned 1,500 steps; its step-1,000 checkpoint is what continued
run 4-more-easy-vqa "$OUT/3-demo-mix/model" 1500 \
  'synthetic@demo-train:read_cell*2,bar_value,count_marks,dominant_color,easy_vqa_balanced*8' \
  --set eval_every=250 --set samples_per_task=100 --set save_every=500 --set keep_checkpoints=2
run 5a-shapes "$OUT/4-more-easy-vqa/checkpoints/step-001000/model" 600 'synthetic@curriculum:easy_vqa_balanced' \
  --set eval_every=100 --set samples_per_task=200 --set save_every=200
run 5b-shapes "$OUT/5a-shapes/model" 800 'synthetic@curriculum:easy_vqa_balanced' \
  --set eval_every=200 --set samples_per_task=200 --set save_every=200
run 6a-yes-no "$OUT/5b-shapes/model" 400 'synthetic@yes-no:easy_vqa_balanced' \
  --set eval_every=100 --set samples_per_task=200 --set save_every=200
run 6b-yes-no "$OUT/6a-yes-no/model" 500 'synthetic@yes-no:easy_vqa_balanced' \
  --set eval_every=100 --set samples_per_task=200 --set save_every=500
run 6c-negated "$OUT/6b-yes-no/model" 600 'synthetic@yes-no-negated:easy_vqa_balanced' \
  --set eval_every=100 --set samples_per_task=200 --set save_every=600
run 6d-negated "$OUT/6c-negated/model" 800 'synthetic@yes-no-negated:easy_vqa_balanced' \
  --set eval_every=100 --set samples_per_task=200 --set save_every=800
run 6e-negated "$OUT/6d-negated/model" 800 'synthetic@yes-no-negated:easy_vqa_balanced' \
  --set eval_every=100 --set samples_per_task=200 --set save_every=800
run 7a-demo-mix "$OUT/6e-negated/model" 800 \
  'synthetic@demo-train:read_cell*3,bar_value,count_marks,dominant_color,easy_vqa_balanced*6' \
  --set eval_every=200 --set samples_per_task=100 --set save_every=800
run 7b-interleaved "$OUT/7a-demo-mix/model" 800 \
  'synthetic@demo-train:read_cell*3,bar_value,count_marks*2,dominant_color,easy_vqa_balanced*2,easy_vqa_yes_no*4' \
  --set eval_every=200 --set samples_per_task=100 --set save_every=800
run 8-color-yes-no "$OUT/7b-interleaved/model" 600 'synthetic@demo-train:easy_vqa_color_yes_no' \
  --set eval_every=100 --set samples_per_task=200 --set save_every=600
run 9a-interleaved "$OUT/8-color-yes-no/model" 800 \
  'synthetic@demo-train:read_cell*3,bar_value,count_marks*2,dominant_color,easy_vqa_balanced*2,easy_vqa_yes_no*2,easy_vqa_color_yes_no*2' \
  --set eval_every=200 --set samples_per_task=100 --set save_every=800
run 9b-interleaved "$OUT/9a-interleaved/model" 800 \
  'synthetic@demo-train:read_cell*3,bar_value,count_marks*2,dominant_color,easy_vqa_balanced*4,easy_vqa_yes_no*2,easy_vqa_color_yes_no*2' \
  --set eval_every=200 --set samples_per_task=100 --set save_every=800
echo "trained model: $OUT/9b-interleaved/model"
