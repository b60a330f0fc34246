#!/usr/bin/env bash
# Embedded demo: build a tiny random-weight SD model and a procedural concept, train all three
# AttnDreamBooth stages on them, and render a prompt file. No downloads; a few minutes on a CPU.
#   bash bash_script/demo.sh [OUT]      (default OUT: demo_out)
set -euo pipefail
OUT=${1:-demo_out}
PY=${PYTHON:-python}
cd "$(dirname "$0")/.."

"$PY" -m attn_utils.tiny --out "$OUT"            # OUT/base_model, OUT/concept

# The paper's recipe (SPEC.md) with its fast stage 3 (--fast: 200 steps at batch 4), at the
# tiny model's 128 px. Drop --fast for the full 500-step stage 3.
"$PY" train_attndreambooth.py \
  --pretrained_model_name_or_path "$OUT/base_model" \
  --instance_data_dir "$OUT/concept" \
  --category sloth \
  --output_dir "$OUT/run" \
  --resolution 128 \
  --fast \
  --validation_prompt "a photo of a {} sloth" \
  --num_validation_images 4 --validation_inference_steps 10 \
  --checkpointing_steps 50 \
  --resume_from_checkpoint latest

"$PY" inference.py \
  --run_dir "$OUT/run" \
  --prompt_file dataset/prompts/demo.txt \
  --save_dir "$OUT/images" \
  --num_images_per_prompt 4 --infer_batch_size 4 \
  --num_inference_steps 10 --seed 0 --save_attention_maps

echo "demo finished: model $OUT/base_model, concept $OUT/concept, run $OUT/run, images $OUT/images"
