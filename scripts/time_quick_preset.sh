#!/usr/bin/env bash
# Wall time of each `--preset quick` stage, then one image from the model: the numbers behind
# opensd.training.presets.QUICK_SECONDS and docs/training.md ("A quick first run").
#   scripts/time_quick_preset.sh [RUN_DIR]       (default: runs/quick-timing; OPENSD: the command)
set -euo pipefail
out=${1:-runs/quick-timing}
read -r -a opensd <<< "${OPENSD:-opensd}"
rm -rf "$out"
for stage in vae clip unet; do
    extra=()
    [ "$stage" = unet ] && extra=(--vae "$out/vae" --clip "$out/clip")
    start=$(date +%s)
    "${opensd[@]}" train "$stage" --preset quick --out "$out/$stage" -q "${extra[@]}"
    echo "quick $stage: $(( $(date +%s) - start )) s wall"
done
"${opensd[@]}" generate "a red circle above a blue square" -m "$out/unet/model" --seed 1 --out "$out/demo.png" -q
