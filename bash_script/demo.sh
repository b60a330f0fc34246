#!/usr/bin/env bash
# Embedded demo: build a tiny random-weight SD model and a procedural concept, train all three
# AttnDreamBooth stages on them, and render a prompt file. No downloads; about a minute on 2 CPU
# cores.
#   bash bash_script/demo.sh [OUT]      (default OUT: demo_out)
set -euo pipefail
OUT=${1:-demo_out}
PY=${PYTHON:-python}
cd "$(dirname "$0")/.."

cat <<MSG
== AttnDreamBooth demo: about 1 minute on 2 CPU cores, nothing downloaded.
   It builds a tiny Stable-Diffusion-shaped model with RANDOM weights and a drawn concept,
   trains the three stages on them, and renders three prompts with attention heatmaps.
   Expect noise, not pictures: a random-weight model has learned nothing to draw with. The
   demo shows that every part runs end to end; the README trains on real photos.
MSG

"$PY" -m attn_utils.tiny --out "$OUT"            # OUT/base_model, OUT/concept

# The paper's recipe with its fast stage 3 (--fast: 200 steps at batch 4), at the tiny
# model's 128 px. Drop --fast for the full 500-step stage 3. Relaunching after an
# interruption continues from the newest checkpoint.
"$PY" train_attndreambooth.py \
  --pretrained_model_name_or_path "$OUT/base_model" \
  --instance_data_dir "$OUT/concept" \
  --category sloth \
  --output_dir "$OUT/run" \
  --resolution 128 \
  --fast \
  --validation_prompt "a photo of a {} sloth" \
  --num_validation_images 4 --validation_inference_steps 10 \
  --checkpointing_steps 50

"$PY" inference.py \
  --run_dir "$OUT/run" \
  --prompt_file dataset/prompts/demo.txt \
  --save_dir "$OUT/images" \
  --num_images_per_prompt 4 --infer_batch_size 4 \
  --num_inference_steps 10 --seed 0 --save_attention_maps

# One picture: the concept's photos above one rendered image with its [V] and category maps.
"$PY" - "$OUT" <<'PY'
import sys
from pathlib import Path

from PIL import Image

out = Path(sys.argv[1])
photos = [Image.open(p).convert("RGB").resize((128, 128)) for p in sorted((out / "concept").iterdir())]
prompt_dir = sorted((out / "images").glob("a_photo_of_*"))[0]
panel = Image.open(prompt_dir / "attention" / "0.png").convert("RGB")
sheet = Image.new("RGB", (max(128 * len(photos), panel.width), 128 + panel.height), "white")
for i, p in enumerate(photos):
    sheet.paste(p, (i * 128, 0))
sheet.paste(panel, (0, 128))
sheet.save(out / "overview.png")
PY

cat <<MSG
== demo finished
   model $OUT/base_model, concept $OUT/concept, run $OUT/run, images $OUT/images
   $OUT/overview.png: the concept's photos, then one image of "a photo of [V] sloth" with
   where [V] and "sloth" attended. The images are noise because the weights are random; with
   a real base model the same commands learn the concept (README: training on your photos).
MSG
