#!/usr/bin/env bash
# CLIP or MiniLM on a CPU budget (docs/shapes.md, "CLIP or MiniLM under one U-Net body"): retrain
# the shapes CLIP on the rich world's captions (clip.toml, 266 steps: the default model's count),
# then train the default model's U-Net body twice on the rich world, once under that CLIP
# (unet_body_clip.toml) and once under the pretrained MiniLM (unet_body_minilm.toml), the same
# 3,000 steps each, and score both on the rich benchmark and held-out suites (one image per
# prompt, CFG 5). Everything goes under runs/rich-cpu/ (OUT); results in OUT/eval/*/results.json.
#   configs/shapes/compare_body.sh                     # CLIP, both U-Nets, four evaluations
#   JOBS=2 configs/shapes/compare_body.sh              # the two U-Nets (and then the evaluations) side by side
#   configs/shapes/compare_body.sh --dry-run           # print the commands, run nothing
# Each opensd command runs with OMP_NUM_THREADS=${THREADS:-1} (with JOBS=2, one thread per job on a
# 2-core machine). CLIP_ARGS, UNET_ARGS (both U-Nets) and EVAL_ARGS (the evaluations) go to one kind;
# extra arguments go to every training stage. The command is found as train.sh finds it (opensd_cmd.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${OUT:-runs/rich-cpu}
jobs=${JOBS:-1}
export OMP_NUM_THREADS=${THREADS:-1}

# shellcheck source=opensd_cmd.sh
. "$here/opensd_cmd.sh"  # --dry-run, cmd, run

pair() {  # run two commands (each a quoted string of arguments), side by side when JOBS=2
    # shellcheck disable=SC2086
    if [ "$jobs" = 2 ] && [ "$dry_run" = 0 ]; then
        run $1 & local first=$!
        run $2 & local second=$!
        wait "$first" && wait "$second"
    else
        run $1
        run $2
    fi
}

# shellcheck disable=SC2206
clip_extra=(${CLIP_ARGS:-}); unet_extra="${UNET_ARGS:-}"; eval_extra="${EVAL_ARGS:-}"
run train clip --config "$here/clip.toml" --set data.world=rich --steps 266 --set train.time_limit=0 \
    --set "train.out_dir=$out/clip" "$@" "${clip_extra[@]}"
extra="$*"
pair "train unet --config $here/unet_body_clip.toml --set clip_dir=$out/clip --set train.out_dir=$out/unet_clip $extra $unet_extra" \
     "train unet --config $here/unet_body_minilm.toml --set train.out_dir=$out/unet_minilm $extra $unet_extra"
for suite in benchmark holdout; do
    pair "eval --model $out/unet_clip/model --suite $suite --world rich --images-per-prompt 1 --cfg-scale 5 --threads $OMP_NUM_THREADS --out $out/eval/unet_clip-$suite $eval_extra" \
         "eval --model $out/unet_minilm/model --suite $suite --world rich --images-per-prompt 1 --cfg-scale 5 --threads $OMP_NUM_THREADS --out $out/eval/unet_minilm-$suite $eval_extra"
done
