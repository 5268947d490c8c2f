# Shared by the scripts beside it (sourced, after they set `repo` and `dry_run`): find the opensd
# command, and run one opensd command with its wall time (or print it under --dry-run).

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

run() {  # run (or print) one opensd command, with its wall time
    if [ "$dry_run" = 1 ]; then
        echo "${cmd[*]} $*"
        return 0
    fi
    local start
    start=$(date +%s)
    "${cmd[@]}" "$@"
    echo "$1 $2: $(( $(date +%s) - start )) s wall" >&2
}
