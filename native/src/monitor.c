// The memory monitor: what memory the process may really use.
//
// It reads its cgroup's limit and usage (v2 memory.max/current/stat/pressure, v1
// memory.limit_in_bytes/usage_in_bytes/stat with the hierarchical limit), /proc/meminfo's
// MemAvailable, and memory stall time (PSI) from the cgroup (v2) or /proc/pressure/memory. A sample
// costs a few small file reads; the pipeline's worker takes one at most every
// DBLADE_MONITOR_PERIOD_NS, outside the session lock. What to do with it is policy.c's.
//
// It owns nothing but its cgroup's path; it calls nothing else.

#define _GNU_SOURCE
#include "monitor.h"

#include "base.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int read_small(const char * path, char * buf, size_t cap) {
    const int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        return -errno;
    }
    ssize_t n;
    do {
        n = read(fd, buf, cap - 1);
    } while (n < 0 && errno == EINTR);
    const int e = errno;
    close(fd);
    if (n < 0) {
        return -e;
    }
    buf[n] = '\0';
    return (int) n;
}

// a number file ("max" and v1's near-2^63 "no limit" read as UINT64_MAX)
static uint64_t read_u64(const char * dir, const char * name) {
    char path[600], buf[64];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    if (read_small(path, buf, sizeof(buf)) <= 0 || !strncmp(buf, "max", 3)) {
        return UINT64_MAX;
    }
    const unsigned long long v = strtoull(buf, NULL, 10);
    return v >= (1ull << 62) ? UINT64_MAX : (uint64_t) v;
}

// "key value" lines (memory.stat, meminfo: value in kB when scale is 1024)
static uint64_t find_key(const char * text, const char * key, uint64_t scale) {
    const size_t klen = strlen(key);
    for (const char * p = text; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL) {
        if (!strncmp(p, key, klen) && (p[klen] == ' ' || p[klen] == ':')) {
            const unsigned long long v = strtoull(p + klen + 1 + (p[klen] == ':'), NULL, 10);
            return v >= (1ull << 62) / scale ? UINT64_MAX : (uint64_t) v * scale;
        }
    }
    return UINT64_MAX;
}

// What a group cannot reclaim: its usage less the file pages on its LRU lists. Anonymous memory alone
// leaves out shmem (on a GPU machine the driver's page-locked host buffers, hundreds of MiB for a large
// prompt ubatch: room counted from anon alone was overcommitted by as much, run 14) and kernel memory.
// stat: the group's memory.stat; anon_key where the usage or the LRU is unknown.
static uint64_t held(uint64_t usage, const char * stat, const char * active, const char * inactive,
                     const char * anon_key) {
    const uint64_t a = find_key(stat, active, 1), i = find_key(stat, inactive, 1);
    if (usage == UINT64_MAX || a == UINT64_MAX || i == UINT64_MAX) {
        return find_key(stat, anon_key, 1);
    }
    return usage > a + i ? usage - a - i : 0;
}

// "some avg10=0.00 avg60=0.00 avg300=0.00 total=123" -> the total stall, microseconds
static uint64_t psi_some_total(const char * path) {
    char buf[512];
    if (read_small(path, buf, sizeof(buf)) <= 0) {
        return UINT64_MAX;
    }
    const char * p = strstr(buf, "some ");
    p              = p ? strstr(p, "total=") : NULL;
    return p ? (uint64_t) strtoull(p + 6, NULL, 10) : UINT64_MAX;
}

void dblade_monitor_init(struct dblade_monitor * m) {
    memset(m, 0, sizeof(*m));
    char buf[4096];
    if (read_small("/proc/self/cgroup", buf, sizeof(buf)) <= 0) {
        return;
    }
    // v1: "N:memory:/path" (possibly "N:memory,other:/path"); v2: "0::/path"
    for (char * line = strtok(buf, "\n"); line; line = strtok(NULL, "\n")) {
        char * c1 = strchr(line, ':');
        char * c2 = c1 ? strchr(c1 + 1, ':') : NULL;
        if (!c2) {
            continue;
        }
        *c2 = '\0';
        const char * ctrls = c1 + 1;
        const char * path  = c2 + 1;
        if (strstr(ctrls, "memory")) {
            snprintf(m->cg_dir, sizeof(m->cg_dir), "/sys/fs/cgroup/memory%s", path);
            if (access(m->cg_dir, R_OK) == 0) {
                m->cg_version = 1;
                break;
            }
        } else if (*ctrls == '\0') {
            snprintf(m->cg_dir, sizeof(m->cg_dir), "/sys/fs/cgroup%s", path);
            char probe[600];
            snprintf(probe, sizeof(probe), "%s/memory.current", m->cg_dir);
            if (access(probe, R_OK) == 0) {
                m->cg_version = 2;
            }
        }
    }
    if (!m->cg_version) {
        m->cg_dir[0] = '\0';
    }
}

void dblade_monitor_sample(const struct dblade_monitor * m, struct dblade_mem_sample * o) {
    memset(o, 0, sizeof(*o));
    o->t_ns     = dblade_now_ns();
    o->cg_limit = UINT64_MAX;
    o->psi_us   = UINT64_MAX;
    char buf[8192];
    if (m->cg_version == 1) {
        // the hierarchical limit is the tightest one on the way up, this group's own included
        char path[600];
        snprintf(path, sizeof(path), "%s/memory.stat", m->cg_dir);
        if (read_small(path, buf, sizeof(buf)) > 0) {
            o->cg_limit = find_key(buf, "hierarchical_memory_limit", 1);
            o->cg_held  = held(read_u64(m->cg_dir, "memory.usage_in_bytes"), buf, "total_active_file",
                               "total_inactive_file", "total_rss");
        }
    } else if (m->cg_version == 2) {
        // the tightest memory.max on the way up to the root
        char dir[512];
        snprintf(dir, sizeof(dir), "%s", m->cg_dir);
        while (strlen(dir) > strlen("/sys/fs/cgroup")) {
            const uint64_t lim = read_u64(dir, "memory.max");
            o->cg_limit        = lim < o->cg_limit ? lim : o->cg_limit;
            char * slash       = strrchr(dir, '/');
            if (!slash) {
                break;
            }
            *slash = '\0';
        }
        char path[600];
        snprintf(path, sizeof(path), "%s/memory.stat", m->cg_dir);
        if (read_small(path, buf, sizeof(buf)) > 0) {
            o->cg_held = held(read_u64(m->cg_dir, "memory.current"), buf, "active_file", "inactive_file", "anon");
        }
        snprintf(path, sizeof(path), "%s/memory.pressure", m->cg_dir);
        o->psi_us = psi_some_total(path);
    }
    if (o->psi_us == UINT64_MAX) {
        o->psi_us = psi_some_total("/proc/pressure/memory");
    }
    if (read_small("/proc/meminfo", buf, sizeof(buf)) > 0) {
        o->mem_total     = find_key(buf, "MemTotal", 1024);
        o->mem_available = find_key(buf, "MemAvailable", 1024);
    }
    if (o->cg_held == UINT64_MAX) {
        o->cg_held = 0;
    }
}
