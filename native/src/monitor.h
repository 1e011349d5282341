// The memory monitor (monitor.c): what memory the process may really use, from its cgroup (v1 or v2),
// /proc/meminfo and PSI.
#ifndef DUALBLADE_MONITOR_H
#define DUALBLADE_MONITOR_H

#include <stdint.h>

#define DBLADE_MONITOR_PERIOD_NS (20ull * 1000 * 1000) // at most one sample per 20 ms

struct dblade_monitor {
    int  cg_version; // 0 none found, 1, 2
    char cg_dir[512];
};

struct dblade_mem_sample {
    uint64_t t_ns;
    uint64_t cg_limit; // UINT64_MAX: no limit
    // what the group holds that it cannot reclaim: its usage less its file LRU (anonymous memory, kernel memory,
    // and shmem, which the GPU driver's page-locked host buffers are: without swap, as good as anonymous)
    uint64_t cg_held;
    uint64_t mem_total, mem_available; // UINT64_MAX: unknown
    uint64_t psi_us;                   // memory stall ("some"), cumulative microseconds; UINT64_MAX: no PSI
};

void dblade_monitor_init(struct dblade_monitor * m);
void dblade_monitor_sample(const struct dblade_monitor * m, struct dblade_mem_sample * o);

#endif
