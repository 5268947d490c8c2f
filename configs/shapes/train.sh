#!/usr/bin/env bash
# Train the default model (models/opensd-shapes) from scratch: the three `opensd train` stages
# with the configs beside this script. Extra arguments go to every stage, for example
#   configs/shapes/train.sh --set data.workers=14      # render the data in 14 processes
#   configs/shapes/train.sh --device cpu
# Stage-specific extras: VAE_ARGS, CLIP_ARGS, UNET_ARGS. OPENSD names the command (default: opensd).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
OPENSD=${OPENSD:-opensd}
for stage in vae clip unet; do
    var="$(echo "$stage" | tr a-z A-Z)_ARGS"
    start=$(date +%s)
    # shellcheck disable=SC2086
    $OPENSD train "$stage" --config "$here/$stage.toml" "$@" ${!var:-}
    echo "train $stage: $(( $(date +%s) - start )) s wall" >&2
done
