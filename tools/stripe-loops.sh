#!/usr/bin/env bash
# Several throttled storage devices on a machine with one disk, to measure the KV striped over N devices
# (issue 23, docs/striping.md): loop devices on files of the real disk, each limited below the disk's
# bandwidth by the block cgroup (v1 blkio.throttle.*_bps_device, or v2 io.max), so N of them give N times
# one's bandwidth while the disk itself is not the bottleneck. Needs root.
#   tools/stripe-loops.sh up N MB_PER_S [DIR] [SIZE]  attach N loop devices (files of SIZE, default 2G, in DIR,
#                                                     default /var/tmp), throttle each to MB_PER_S read and
#                                                     write in the cgroup dualblade-stripes; prints them A,B,...
#   tools/stripe-loops.sh run CMD...                  CMD inside that cgroup (its I/O throttled)
#   tools/stripe-loops.sh down                        detach them, remove the files and the cgroup
set -euo pipefail
NAME=dualblade-stripes
STATE=/run/$NAME.devices
if [ -d /sys/fs/cgroup/blkio ]; then CG=/sys/fs/cgroup/blkio/$NAME; V=1; else CG=/sys/fs/cgroup/$NAME; V=2; fi

up() {
    local n=$1 mbps=$2 dir=${3:-/var/tmp} size=${4:-2G} devs=() bps=$(($2 * 1000 * 1000))
    [ ! -e "$STATE" ] || { echo "already up: $(cat "$STATE") (tools/stripe-loops.sh down first)" >&2; exit 1; }
    mkdir -p "$CG"
    if [ $V = 2 ]; then
        grep -qw io /sys/fs/cgroup/cgroup.subtree_control || echo +io >/sys/fs/cgroup/cgroup.subtree_control
    fi
    for i in $(seq 0 $((n - 1))); do
        local f="$dir/$NAME-$i.img"
        fallocate -l "$size" "$f"
        # written once: reads of a file's unwritten extents would cost the disk nothing
        dd if=/dev/zero of="$f" bs=4M count=$(( $(stat -c %s "$f") / 4194304 )) oflag=direct conv=notrunc status=none
        local d; d=$(losetup -f --show --direct-io=on "$f")
        local mm; mm=$(lsblk -dno MAJ:MIN "$d" | tr -d ' ')
        if [ $V = 1 ]; then
            echo "$mm $bps" >"$CG/blkio.throttle.read_bps_device"
            echo "$mm $bps" >"$CG/blkio.throttle.write_bps_device"
        else
            echo "$mm rbps=$bps wbps=$bps" >"$CG/io.max"
        fi
        devs+=("$d")
    done
    (IFS=,; echo "${devs[*]}") | tee "$STATE"
}

run() {
    echo $$ >"$CG/cgroup.procs"
    exec "$@"
}

down() {
    if [ -e "$STATE" ]; then
        for d in $(tr , ' ' <"$STATE"); do
            local f; f=$(losetup -nO BACK-FILE "$d" 2>/dev/null || true)
            losetup -d "$d" 2>/dev/null || true
            [ -z "$f" ] || rm -f "$f"
        done
        rm -f "$STATE"
    fi
    [ ! -d "$CG" ] || rmdir "$CG" 2>/dev/null || true
}

cmd=${1:-}; shift || true
case $cmd in
    up) up "$@" ;;
    run) run "$@" ;;
    down) down ;;
    *) sed -n '2,12p' "$0"; exit 2 ;;
esac
