# Sourced by the GPU run scripts (storage-runs.sh, exact-runs.sh): each step runs only if that many
# seconds are left of DEADLINE (counted from the script's start), and at most what is left, so that the device
# call comes back with what it has. STEP_FILTER: an extended regex that keeps the lines a step prints (all: empty).
DEADLINE=${DEADLINE:-560}
left() { echo $((DEADLINE - SECONDS)); }
step() { # step SECONDS NAME CMD...
    local need=$1 name=$2; shift 2
    if [ "$(left)" -lt "$need" ]; then echo "== $name: skipped ($(left) s left)"; return; fi
    echo "== $name ($(left) s left)"
    if [ -n "${STEP_FILTER:-}" ]; then
        timeout "$(left)" "$@" 2>&1 | grep -E "$STEP_FILTER"
    else
        timeout "$(left)" "$@"
    fi
    echo "== $name: rc=${PIPESTATUS[0]} at ${SECONDS}s"
}
