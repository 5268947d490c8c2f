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

dry_run=0
if [ "${1:-}" = "--dry-run" ]; then
    dry_run=1
    shift
fi

# Sets the array `cmd` to the opensd command, or fails with what to do.
find_opensd() {
    if [ -n "${OPENSD:-}" ]; then
        read -r -a cmd <<< "$OPENSD"
        return 0
    fi
    if [ -x "$repo/.venv/bin/opensd" ]; then
        cmd=("$repo/.venv/bin/opensd")
        return 0
    fi
    if command -v opensd >/dev/null 2>&1; then
        cmd=(opensd)
        return 0
    fi
    local py
    for py in python3 python; do
        if command -v "$py" >/dev/null 2>&1 && "$py" -c "import opensd.cli.main" >/dev/null 2>&1; then
            cmd=("$py" -m opensd.cli.main)
            return 0
        fi
    done
    echo "error: cannot find opensd: no $repo/.venv/bin/opensd, no opensd on PATH, and neither python3 nor" \
         "python imports opensd. Run \`make install-runtime\` in $repo (it creates .venv), activate the" \
         "environment opensd is installed in, or set OPENSD to the command (e.g. OPENSD=/path/to/opensd)" >&2
    return 1
}

find_opensd || exit 2
for stage in vae clip unet; do
    var="$(echo "$stage" | tr a-z A-Z)_ARGS"
    # shellcheck disable=SC2206
    extra=(${!var:-})
    if [ "$dry_run" = 1 ]; then
        echo "${cmd[*]} train $stage --config $here/$stage.toml $* ${extra[*]}"
        continue
    fi
    start=$(date +%s)
    "${cmd[@]}" train "$stage" --config "$here/$stage.toml" "$@" "${extra[@]}"
    echo "train $stage: $(( $(date +%s) - start )) s wall" >&2
done
