// The page-cache path: the tensor's address is a MAP_SHARED mapping of its extent of the store, so
// the kernel caches, faults in and writes back its pages. Cheap while memory holds the layers;
// under pressure every pass re-reads them through faults (the direct path does that better).
//
// It owns the mapping and the counters it can see from the fences (pages a read will fault in,
// pages a write dirties); the kernel owns the rest.

#define _GNU_SOURCE
#include "path.h"

#include "base.h"
#include "engine.h"
#include "events.h"
#include "store.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

// pages of [addr, addr+len) not in memory; walked in chunks with a stack vector (no allocation:
// this runs on every read fence of a page-cache layer)
static uint64_t pages_missing(const uint8_t * addr, uint64_t len, uint64_t pg) {
    uint64_t      n = dblade_align_up(len, pg) / pg, missing = 0;
    unsigned char vec[4096];
    for (uint64_t done = 0; done < n;) {
        const uint64_t k = n - done < sizeof(vec) ? n - done : sizeof(vec);
        if (mincore((void *) (addr + done * pg), k * pg, vec) != 0) {
            return 0;
        }
        for (uint64_t i = 0; i < k; i++) {
            missing += !(vec[i] & 1);
        }
        done += k;
    }
    return missing * pg;
}

static int mmap_attach(struct dblade_tier * p, struct dblade_tensor * t) {
    const struct dblade_store * st = p->env->store;
    // same address, now the extent of the store: the page cache holds it
    const int rc = dblade_store_mmap(st, t->addr, t->store_off, t->map_bytes);
    if (rc < 0) {
        dblade_set_error("cannot map layer %d of %s: %s", t->il, st->path, strerror(-rc));
        // the address keeps its reservation: what was mapped of the store becomes anonymous again
        mmap(t->addr, t->map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE,
             -1, 0);
        return rc;
    }
    if (p->env->thp) {
        // a file's large folios mapped whole: attention walks these pages as fast as a pinned layer's
        // (4 KiB pages cost 5-10% of decode and more of prefill here, in TLB misses)
        madvise(t->addr, t->map_bytes, MADV_HUGEPAGE);
    }
#ifndef MADV_POPULATE_READ
#    define MADV_POPULATE_READ 22
#endif
    if (p->env->populate_page_cache && t->hwm == 0) {
        // memory holds every offloaded layer: its page cache is filled now, as a pinned layer's memory
        // is, not by a fault and a zeroed page per 4 KiB of the first prefill
        madvise(t->addr, t->map_bytes, MADV_POPULATE_READ);
    }
    if (t->sums) {
        // the kernel writes this extent from now on: its blocks are checked again once the direct
        // path has written them
        memset(t->sums, 0, t->map_bytes / DBLADE_BLOCK * sizeof(*t->sums));
    }
    t->cached  = DBLADE_CACHED_UNKNOWN; // the policy does not judge the cache by a layer it has not read yet
    t->missing = 0;
    t->around  = false;
    return 0;
}

// the store gets every dirty page, the page cache lets go of the extent, and the address becomes
// empty anonymous memory
static int mmap_detach(struct dblade_tier * p, struct dblade_tensor * t) {
    const struct dblade_store * st = p->env->store;
    if (msync(t->addr, t->map_bytes, MS_SYNC) != 0) {
        const int e = errno;
        dblade_set_error("writing layer %d %c to %s failed: %s", t->il, "KV"[t->which], st->path, strerror(e));
        return -e;
    }
    if (mmap(t->addr, t->map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE,
             -1, 0) == MAP_FAILED) {
        const int e = errno;
        dblade_set_error("cannot remap layer %d: %s", t->il, strerror(e));
        return -e;
    }
    dblade_store_dontneed(st, t->store_off, t->map_bytes);
    return 0;
}

// what a read fence found of [0, upto): the policy judges the cache by it, unless rows were written around the
// cache since the last read (their pages are missing on purpose, and this read brings them in)
static void found(struct dblade_tensor * t, uint64_t upto, uint64_t missing) {
    t->cached  = t->around ? DBLADE_CACHED_UNKNOWN : dblade_align_up(upto, t->page) - missing;
    t->missing = t->around ? 0 : missing;
    t->around  = false;
}

// what attention will fault in from the store; what was still cached is what the policy counts
static void mmap_make_resident(struct dblade_tier * p, struct dblade_tensor * t, uint64_t need) {
    const uint64_t upto    = need < t->hwm ? need : t->hwm;
    const uint64_t missing = pages_missing(t->addr, upto, t->page);
    atomic_fetch_add(&t->bytes_read, missing);
    found(t, upto, missing);
}

// the kernel writes back the pages these rows dirty
static void mmap_take_rows(struct dblade_tier * p, struct dblade_tensor * t, uint64_t lo, uint64_t hi) {
    atomic_fetch_add(&t->bytes_written, dblade_align_up(hi, t->page) - dblade_align_down(lo, t->page));
}

static uint64_t mmap_resident(struct dblade_tier * p, const struct dblade_tensor * t) {
    return t->map_bytes - pages_missing(t->addr, t->map_bytes, t->page);
}

#define WRITE_AROUND_MIN (256u << 10) // rows of a prompt's ubatch; a decode step's stay below

// Where auto found no room for every offloaded layer (a memory limit), a prompt's rows go to the store with
// O_DIRECT, around the page cache, and the layer's first read brings them in: written into the mapping, they
// were dirty pages the limit made the prompt write back under reclaim, at a third of O_DIRECT's pace (writing
// 960 MiB under a 400 MiB cgroup limit on the dev machine: 0.50-0.73 GiB/s against 1.68-1.71). Whole pages
// (src holds the tensor's bytes around the rows), so nothing the page cache held is lost: the kernel writes
// the range's dirty pages back and drops its pages first. DUALBLADE_WRITE_AROUND=0 never, =1 every store.
static bool write_around(const struct dblade_tier * p, uint64_t lo, uint64_t hi) {
    if (p->env->write_around_env >= 0) {
        return p->env->write_around_env;
    }
    return p->env->write_around && hi - lo >= WRITE_AROUND_MIN;
}

// into the mapping (the kernel writes the pages back), or around it
static void mmap_store_from(struct dblade_tier * p, struct dblade_tensor * t, uint64_t lo, uint64_t hi,
                            const uint8_t * src, uint64_t src_lo) {
    const uint64_t end = dblade_align_up(hi, t->page) < t->map_bytes ? dblade_align_up(hi, t->page) : t->map_bytes;
    if (write_around(p, lo, hi)) {
        const int rc = dblade_store_write_direct(p->env->store, src, t->store_off + src_lo, end - src_lo);
        if (rc == 0) {
            mmap_take_rows(p, t, lo, hi);
            t->around = true;
            return;
        }
        if (rc != -EINVAL) {
            dblade_fail(p->env->events, rc, "writing layer %d %c to %s failed: %s", t->il, "KV"[t->which],
                        p->env->store->path, strerror(-rc));
            return;
        }
        // (an alignment the store's O_DIRECT does not take: through the mapping)
    }
    memcpy(t->addr + lo, src + (lo - src_lo), hi - lo);
    mmap_take_rows(p, t, lo, hi);
}

// DUALBLADE_PCOPY=0: the mapping is never handed out (every snapshot a buffered read), for a bisection
static bool copy_from_mapping(void) {
    static int off = -1;
    if (off < 0) {
        off = dblade_env_off("DUALBLADE_PCOPY");
    }
    return !off;
}

// Every page cached: the caller copies from the mapping (several threads copy the page cache out at
// memory speed; one buffered read runs at one thread's). Some missing: a buffered read of the extent, which
// reads the missing pages in large requests where faults would bring them in a few pages at a time (the page
// cache has the newest bytes either way, the mapping's dirty pages too).
static int mmap_snapshot(struct dblade_tier * p, struct dblade_tensor * t, uint64_t len, uint8_t * dst,
                         struct dblade_io_req * reqs, uint32_t cap, bool * buffered, const uint8_t ** copy_from) {
    if (len == 0) {
        return 0;
    }
    if (cap < 1) {
        return -ENOSPC;
    }
    // Mid-prompt, rows written around the cache are read back around it too (O_DIRECT, as the direct path reads):
    // brought in under the limit that made auto write them around, they only pushed each other and the weights
    // out before the prompt ended (GPU run 12: kv-heavy's prefill 0.90x direct's, its four page-cache layers read
    // through the cache). around stays set: the first read after the prompt brings them in, its misses not the
    // cache's. The kernel writes the range's dirty pages (rows stored through the mapping) before the read.
    const struct dblade_store * st = p->env->store;
    if (t->around && p->env->prompt && p->env->read_around && len <= t->map_bytes && len % st->align == 0 &&
        (uintptr_t) dst % st->mem_align == 0) {
        t->cached  = DBLADE_CACHED_UNKNOWN; // (the caller counts an O_DIRECT read's bytes)
        t->missing = 0;
        reqs[0]    = (struct dblade_io_req) { .buf = dst, .len = len, .off = t->store_off };
        *buffered  = false;
        return 1;
    }
    // what is not in the page cache is read from storage: counted as the read fence counts it
    const uint64_t upto    = len < t->hwm ? len : t->hwm;
    const uint64_t missing = pages_missing(t->addr, upto, t->page);
    atomic_fetch_add(&t->bytes_read, missing);
    found(t, upto, missing);
    if (missing == 0 && len <= t->map_bytes && copy_from_mapping()) {
        *copy_from = t->addr;
        return 0;
    }
    reqs[0]   = (struct dblade_io_req) { .buf = dst, .len = len, .off = t->store_off };
    *buffered = true;
    return 1;
}

const struct dblade_path_ops dblade_path_mmap_ops = {
    .version       = DBLADE_PATH_OPS_VERSION,
    .name          = "mmap",
    .attach        = mmap_attach,
    .detach        = mmap_detach,
    .make_resident = mmap_make_resident,
    .take_rows     = mmap_take_rows,
    .resident      = mmap_resident,
    .snapshot      = mmap_snapshot,
    .store_from    = mmap_store_from,
};
