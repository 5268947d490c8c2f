#!/usr/bin/env bash
# The rich-world comparison of text encoders (docs/shapes.md): train the autoencoder and the shapes
# CLIP on the rich world, then two U-Nets that differ only in what conditions them (the shapes
# CLIP, unet.toml; the pretrained all-MiniLM-L6-v2, unet_minilm.toml), and score both on the rich
# benchmark and the rich held-out suite. Every stage stops at its time limit (train.time_limit;
# the configs' own: VAE 90 s, CLIP 70 s, each U-Net 250 s on a GPU), so the whole run fits the
# default model's budget of about fifteen GPU minutes; on a CPU pass longer limits through the
# stage variables below.
#   configs/shapes/train_rich.sh                         # everything under runs/shapes-rich/
#   OUT=/tmp/rich configs/shapes/train_rich.sh --device cpu --set data.workers=2
#   VAE_ARGS="--set train.time_limit=5" ... configs/shapes/train_rich.sh     # a smoke run
#   configs/shapes/train_rich.sh --dry-run               # print the commands, run nothing
# Extra arguments go to every training stage; VAE_ARGS, CLIP_ARGS, UNET_ARGS (both U-Nets) and
# EVAL_ARGS (both evaluations, e.g. "--per-category 4 --images-per-prompt 1") go to one kind.
# The command is found as configs/shapes/train.sh finds it (opensd_cmd.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${OUT:-runs/shapes-rich}

# shellcheck source=opensd_cmd.sh
. "$here/opensd_cmd.sh"  # --dry-run, cmd, run

# shellcheck disable=SC2206
vae_extra=(${VAE_ARGS:-}); clip_extra=(${CLIP_ARGS:-}); unet_extra=(${UNET_ARGS:-}); eval_extra=(${EVAL_ARGS:-})
rich=(--set data.world=rich)
run train vae --config "$here/vae.toml" "${rich[@]}" --set "train.out_dir=$out/vae" "$@" "${vae_extra[@]}"
run train clip --config "$here/clip.toml" "${rich[@]}" --set "train.out_dir=$out/clip" "$@" "${clip_extra[@]}"
run train unet --config "$here/unet.toml" "${rich[@]}" --set "vae_dir=$out/vae" --set "clip_dir=$out/clip" \
    --set "train.out_dir=$out/unet_clip" "$@" "${unet_extra[@]}"
run train unet --config "$here/unet_minilm.toml" "${rich[@]}" --set "vae_dir=$out/vae" \
    --set "train.out_dir=$out/unet_minilm" "$@" "${unet_extra[@]}"
for name in unet_clip unet_minilm; do
    for suite in benchmark holdout; do
        run eval --model "$out/$name/model" --suite "$suite" --world rich --out "$out/eval/$name-$suite" "${eval_extra[@]}"
    done
done
