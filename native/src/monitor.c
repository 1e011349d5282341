// The memory monitor and the `auto` policy's decision.
//
// The monitor reads what memory the process may really use: its cgroup's limit and usage (v2
// memory.max/current/stat/pressure, v1 memory.limit_in_bytes/usage_in_bytes/stat with the
// hierarchical limit), /proc/meminfo's MemAvailable, and memory stall time (PSI) from the cgroup
// (v2) or /proc/pressure/memory. A sample costs a few small file reads; the session takes one at
// most every DBLADE_MONITOR_PERIOD_NS.
//
// The decision (pure, tested on its own): offloaded layers stay on the page-cache path while the
// memory left for file pages holds them plus the model's weights (both are mmap'ed and compete for
// the same page cache: letting the KV push the weights out would make every token re-read them);
// the largest move to the direct path when it does not, or when tasks stall on memory; they come
// back, smallest first, only when they fit with a wide margin, nothing stalls, and the last
// switch is a while ago (hysteresis: no flapping).

#define _GNU_SOURCE
#include "internal.h"

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
        o->cg_usage = read_u64(m->cg_dir, "memory.usage_in_bytes");
        char path[600];
        snprintf(path, sizeof(path), "%s/memory.stat", m->cg_dir);
        if (read_small(path, buf, sizeof(buf)) > 0) {
            o->cg_limit = find_key(buf, "hierarchical_memory_limit", 1);
            o->cg_anon  = find_key(buf, "total_rss", 1);
            o->cg_file  = find_key(buf, "total_cache", 1);
        }
        const uint64_t own = read_u64(m->cg_dir, "memory.limit_in_bytes");
        o->cg_limit        = own < o->cg_limit ? own : o->cg_limit;
    } else if (m->cg_version == 2) {
        o->cg_usage = read_u64(m->cg_dir, "memory.current");
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
            o->cg_anon = find_key(buf, "anon", 1);
            o->cg_file = find_key(buf, "file", 1);
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
    if (o->cg_anon == UINT64_MAX) {
        o->cg_anon = 0;
    }
    if (o->cg_file == UINT64_MAX) {
        o->cg_file = 0;
    }
}

// --- the decision ---

static uint64_t sub0(uint64_t a, uint64_t b) {
    return a > b ? a - b : 0;
}

uint64_t dblade_auto_capacity(const struct dblade_mem_sample * m, uint64_t reserve, uint64_t page_cached) {
    // system: what could be freed plus what our own layers already hold, less the weights
    uint64_t cap = UINT64_MAX;
    if (m->mem_available != UINT64_MAX && m->mem_total != UINT64_MAX && m->mem_total > 0) {
        const uint64_t margin = m->mem_total / 32 > (128ull << 20) ? m->mem_total / 32 : (128ull << 20);
        cap = sub0(m->mem_available + page_cached, reserve + margin);
    }
    if (m->cg_limit != UINT64_MAX) {
        // the group: its limit less its anonymous memory (ours: pinned KV, staging, compute buffers)
        const uint64_t margin = m->cg_limit / 16 > (32ull << 20) ? m->cg_limit / 16 : (32ull << 20);
        const uint64_t c      = sub0(m->cg_limit, m->cg_anon + reserve + margin);
        cap = c < cap ? c : cap;
    }
    return cap;
}

int dblade_auto_decide(struct dblade_auto_state * st, const struct dblade_mem_sample * m, uint64_t reserve,
                       struct dblade_auto_layer * layers, uint32_t n, char * why, size_t why_cap) {
    uint64_t need = 0, cached = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (layers[i].want == DBLADE_PATH_MMAP) {
            need += layers[i].need_bytes;
            cached += layers[i].resident_bytes;
        }
    }
    const uint64_t cap = dblade_auto_capacity(m, reserve, cached);

    // stall share since the previous sample
    double stall = 0;
    if (m->psi_us != UINT64_MAX && st->last_psi_us != UINT64_MAX && st->last_t_ns && m->t_ns > st->last_t_ns &&
        m->psi_us >= st->last_psi_us) {
        stall = (double) (m->psi_us - st->last_psi_us) * 1000.0 / (double) (m->t_ns - st->last_t_ns);
    }
    // how fast the context fills: a prefill writes rows much faster than decoding does
    uint64_t all = 0;
    for (uint32_t i = 0; i < n; i++) {
        all += layers[i].need_bytes;
    }
    if (st->fill_t_ns == 0 || all < st->fill_bytes) {
        st->fill_t_ns = m->t_ns, st->fill_bytes = all, st->fill_rate = -1; // the start, or a clear: not known yet
    } else if (m->t_ns - st->fill_t_ns >= DBLADE_AUTO_FILL_WINDOW_NS) {
        st->fill_rate = (double) (all - st->fill_bytes) * 1e9 / (double) (m->t_ns - st->fill_t_ns);
        st->fill_t_ns = m->t_ns, st->fill_bytes = all;
    }

    const bool had_prev = st->last_t_ns != 0;
    st->last_psi_us     = m->psi_us;
    st->last_t_ns       = m->t_ns;
    st->cap_bytes       = cap;
    st->need_bytes      = need;

    if (st->hold_ns == 0 || m->t_ns - st->last_switch_ns > DBLADE_AUTO_HOLD_MAX_NS) {
        st->hold_ns = DBLADE_AUTO_HOLD_NS; // calm for a long while: back to the short hold
    }
    int changed = 0;
    const bool over     = need > cap;
    const bool stalling = had_prev && stall > DBLADE_AUTO_STALL_HIGH && need > 0;
    if (over || stalling) {
        // largest first: the most memory back per switch
        uint64_t target = over ? cap - cap / 8 : need - need / 4;
        while (need > target) {
            int best = -1;
            for (uint32_t i = 0; i < n; i++) {
                if (layers[i].want == DBLADE_PATH_MMAP &&
                    (best < 0 || layers[i].need_bytes > layers[best].need_bytes)) {
                    best = (int) i;
                }
            }
            if (best < 0) {
                break;
            }
            layers[best].want = DBLADE_PATH_DIRECT;
            need -= layers[best].need_bytes;
            changed++;
        }
        if (changed) {
            // demoted again soon after a promotion: that promotion was a mistake, wait longer next time
            if (st->last_promote_ns && m->t_ns - st->last_promote_ns < 4 * st->hold_ns) {
                st->hold_ns = st->hold_ns * 2 < DBLADE_AUTO_HOLD_MAX_NS ? st->hold_ns * 2 : DBLADE_AUTO_HOLD_MAX_NS;
            }
            if (over) {
                snprintf(why, why_cap, "page cache short: layers need %llu MiB, %llu MiB available",
                         (unsigned long long) (st->need_bytes >> 20), (unsigned long long) (cap >> 20));
            } else {
                snprintf(why, why_cap, "memory pressure: %.0f%% of the time stalled", stall * 100);
            }
            st->last_switch_ns = m->t_ns;
        }
        return changed;
    }
    // back to the page cache: calm, room with a wide margin, and not right after a switch. The
    // context grows: a layer comes back only if the page-cache layers still fit once full, and not
    // while a prefill fills it (its pages would be dirtied faster than written back, and reclaim
    // stalls: it would promote early and demote again, paying both ways)
    if (stall < DBLADE_AUTO_STALL_LOW && m->t_ns - st->last_switch_ns >= st->hold_ns &&
        st->fill_rate >= 0 && st->fill_rate < (double) DBLADE_AUTO_FILL_RATE) {
        const uint64_t room = cap / 10 * 7;
        uint64_t       full = 0;
        for (uint32_t i = 0; i < n; i++) {
            if (layers[i].want == DBLADE_PATH_MMAP) {
                full += layers[i].full_bytes > layers[i].need_bytes ? layers[i].full_bytes : layers[i].need_bytes;
            }
        }
        for (;;) {
            int best = -1;
            for (uint32_t i = 0; i < n; i++) {
                const uint64_t f = layers[i].full_bytes > layers[i].need_bytes ? layers[i].full_bytes : layers[i].need_bytes;
                if (layers[i].want == DBLADE_PATH_DIRECT && full + f <= room &&
                    (best < 0 || f < layers[best].full_bytes)) {
                    best = (int) i;
                }
            }
            if (best < 0) {
                break;
            }
            layers[best].want = DBLADE_PATH_MMAP;
            need += layers[best].need_bytes;
            full += layers[best].full_bytes > layers[best].need_bytes ? layers[best].full_bytes : layers[best].need_bytes;
            changed++;
        }
        if (changed) {
            snprintf(why, why_cap, "memory available again: layers need %llu MiB (full: %llu), %llu MiB available",
                     (unsigned long long) (need >> 20), (unsigned long long) (full >> 20),
                     (unsigned long long) (cap >> 20));
            st->last_switch_ns  = m->t_ns;
            st->last_promote_ns = m->t_ns;
        }
    }
    return changed;
}
