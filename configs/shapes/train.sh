#!/usr/bin/env bash
# Train the default model (models/opensd-shapes) from scratch: the three `opensd train` stages
# with the configs beside this script. Extra arguments go to every stage, for example
#   configs/shapes/train.sh --set data.workers=14      # render the data in 14 processes
#   configs/shapes/train.sh --device cpu
#   configs/shapes/train.sh --dry-run                   # print the three commands, run nothing
# Stage-specific extras: VAE_ARGS, CLIP_ARGS, UNET_ARGS.
# The command: $OPENSD if set, else the repository's .venv/bin/opensd (made by `make install-runtime`),
# else `opensd` on PATH, else `python3 -m opensd.cli.main` (or `python`) where that python has opensd.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

# shellcheck source=opensd_cmd.sh
. "$here/opensd_cmd.sh"  # --dry-run, cmd, run
for stage in vae clip unet; do
    var="$(echo "$stage" | tr a-z A-Z)_ARGS"
    # shellcheck disable=SC2206
    extra=(${!var:-})
    run train "$stage" --config "$here/$stage.toml" "$@" "${extra[@]}"
done
