#!/usr/bin/env bash
# What the bench's memory-limited cells hold, sampled: every PERIOD seconds (default 0.25), for each cgroup
# dualblade.bench.cgroup made (dualblade-*), one line: seconds since the start, the group, memory.current and
# the keys of memory.stat that say which of it the kernel can reclaim (file LRU) and which it cannot. Runs until
# killed; run it in the background beside a bench:  tools/gpu/cgstat.sh >$OUT/cgstat.log & ... ; kill $!
# (auto's room is the limit less what cannot be reclaimed: this shows what that was in a cell, in MiB.)
period=${PERIOD:-0.25} root=${CGROOT:-/sys/fs/cgroup} t0=$EPOCHREALTIME
keys='anon file active_file inactive_file shmem kernel sock file_mapped file_dirty file_writeback unevictable'
echo "# t_s group current limit $keys (MiB)"
while :; do
    for g in $(find "$root" -maxdepth 4 -type d -name 'dualblade-*' 2>/dev/null); do
        cur=$(cat "$g/memory.current" 2>/dev/null) || continue
        max=$(cat "$g/memory.max" 2>/dev/null)
        awk -v keys="$keys" -v t="$EPOCHREALTIME" -v t0="$t0" -v g="${g##*/dualblade-}" -v cur="$cur" -v max="$max" '
            BEGIN { n = split(keys, k) } { v[$1] = $2 }
            END { printf "%.2f %s %.0f %s", t - t0, g, cur / 1048576, max == "max" ? "max" : sprintf("%.0f", max / 1048576)
                  for (i = 1; i <= n; i++) printf " %.0f", v[k[i]] / 1048576; printf "\n" }' "$g/memory.stat" 2>/dev/null
    done
    sleep "$period"
done
