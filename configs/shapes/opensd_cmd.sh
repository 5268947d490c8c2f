# Shared by the scripts beside it, sourced without arguments after they set `repo`: takes a leading
# --dry-run off the script's arguments (dry_run=1), sets the array `cmd` to the opensd command or
# exits 2 with what to do, and defines `run`: one opensd command with its wall time (printed only
# under --dry-run).

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

dry_run=0
if [ "${1:-}" = "--dry-run" ]; then
    dry_run=1
    shift
fi
find_opensd || exit 2
