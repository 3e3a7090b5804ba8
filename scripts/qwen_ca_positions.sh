#!/usr/bin/env bash
# How should VISOR's CA blocks position the visual keys on a Qwen-VL model? A tiny Qwen2.5-VL full model trained
# from scratch, converted three ways (M-RoPE on the visual keys and text queries + CPE, the default; no rotary in
# the CA blocks + CPE; M-RoPE without CPE), each trained by stage 1 and universal training on the same data and
# seed; then the full model and every configuration of each variant answer 200 test prompts per task
# (OUT/test_accuracy.json; the committed run: docs/qwen-ca-positions/). About 7 min on 2 CPU cores (fp32).
#
# Usage: scripts/qwen_ca_positions.sh OUT   (FULL_STEPS, S1, U override the step counts: 1500, 200, 400)
set -euo pipefail
OUT=${1:?usage: scripts/qwen_ca_positions.sh OUT}
REPO=$(cd "$(dirname "$0")/.." && pwd)
V=$REPO/.venv/bin
mkdir -p "$OUT" && cd "$OUT"
DATA="synthetic@demo-train:read_cell*3,bar_value,count_marks*2,dominant_color,easy_vqa_balanced*4"
COMMON="--set mixed_precision=no --set num_threads=2 --set eval_every=0 --set samples_per_task=40 --no-progress"
FULL_STEPS=${FULL_STEPS:-1500}
S1=${S1:-200}
U=${U:-400}
if [ ! -f full/model/config.json ]; then
  "$V/visor" train --recipe full --data "$DATA" --model tiny-qwen2.5-vl --output full --max-steps "$FULL_STEPS" \
    --set batch_size=32 --set learning_rate=1e-3 $COMMON > full.log 2>&1
fi
for variant in rope norope nocpe; do
  case $variant in
    rope) options="{}" ;;
    norope) options="{'cross_attention_rope': False}" ;;
    nocpe) options="{'position_encoding': False}" ;;
  esac
  # Converted as stage 1 converts (CA blocks copy their host's attention, no gate), with the variant's options.
  "$V/python" - <<PY
import torch
from transformers import AutoTokenizer

from visor.backbones.qwen2_5_vl import VisorQwen2_5_VLForConditionalGeneration
from visor.training.recipes import load_checkpoint

torch.manual_seed(0)
model = VisorQwen2_5_VLForConditionalGeneration.from_stock(
    load_checkpoint("full/model"), cross_attention_init="host", cross_attention_gate=False, **$options)
model.save_pretrained("init-$variant")
AutoTokenizer.from_pretrained("full/model").save_pretrained("init-$variant")
PY
  "$V/visor" train --recipe visor-stage1 --data "$DATA" --init "init-$variant" --output "s1-$variant" \
    --max-steps "$S1" --set batch_size=32 $COMMON > "s1-$variant.log" 2>&1
  "$V/visor" train --recipe visor-universal --data "$DATA" --init "s1-$variant/model" --output "u-$variant" \
    --max-steps "$U" --set batch_size=32 $COMMON > "u-$variant.log" 2>&1
done
# Test accuracy (200 prompts per task) of the full model and of every configuration of each variant, with the
# configuration's SA layers (docs/qwen-vl.md's table is rendered from this file: scripts/docs_figures.py).
"$V/python" - <<'PY'
import json

import torch

from visor.evaluation.scoring import evaluate
from visor.training.data import resolve_data
from visor.training.recipes import load_checkpoint

torch.set_num_threads(2)
DATA = "synthetic@demo-train:read_cell*3,bar_value,count_marks*2,dominant_color,easy_vqa_balanced*4"
VARIANTS = {"rope": "M-RoPE + CPE (default)", "norope": "no rotary in CA + CPE", "nocpe": "M-RoPE, no CPE"}
full = load_checkpoint("full/model", attn_implementation="eager")
data = resolve_data(DATA, full.config, seed=0)
results = {"full": evaluate(full, data, split="test", per_task=200, batch_size=64), "variants": []}
for variant, label in VARIANTS.items():
    model = load_checkpoint(f"u-{variant}/model", attn_implementation="eager")
    results["variants"].append({"name": variant, "label": label, "configurations": [
        {"self_attention_layers": layers,
         "accuracy": evaluate(model, data, split="test", per_task=200, batch_size=64, configuration=index)}
        for index, layers in enumerate(model.config.configurations)]})
with open("test_accuracy.json", "w") as file:
    json.dump(results, file, indent=1)
print("wrote", "test_accuracy.json")
PY
