// The pinned path: the tensor is anonymous memory, faulted in once and never released. What every
// layer gets without a budget, and what the plan gives the largest layers that fit one.
//
// It owns nothing but its pages; the fences pass it by (nothing to stage, nothing to write back).

#define _GNU_SOURCE
#include "path.h"

#include <errno.h>
#include <string.h>
#include <sys/mman.h>

#ifndef MADV_POPULATE_WRITE
#    define MADV_POPULATE_WRITE 23
#endif

// Faulted in at creation, as stock llama.cpp does when it clears its KV buffer: otherwise the first
// prefill pays a page fault and a zeroed page per 4 KiB (on a VM that hands free memory back to its
// host, seconds per GiB). Huge pages where the kernel has them.
static int ram_attach(struct dblade_tier * p, struct dblade_tensor * t) {
    if (p->env->thp) {
        madvise(t->addr, t->map_bytes, MADV_HUGEPAGE);
    }
    if (madvise(t->addr, t->map_bytes, MADV_POPULATE_WRITE) != 0) {
        for (uint64_t off = 0; off < t->map_bytes; off += t->page) {
            ((volatile uint8_t *) t->addr)[off] = 0;
        }
    }
    return 0;
}

static int ram_detach(struct dblade_tier * p, struct dblade_tensor * t) {
    return -EINVAL; // pinned layers stay pinned
}

static void ram_clear(struct dblade_tier * p, struct dblade_tensor * t) {
    memset(t->addr, 0, t->bytes); // zeros, like the stock clear (and the pages stay)
}

static uint64_t ram_resident(struct dblade_tier * p, const struct dblade_tensor * t) {
    return t->bytes;
}

static void ram_store_from(struct dblade_tier * p, struct dblade_tensor * t, uint64_t lo, uint64_t hi,
                           const uint8_t * src, uint64_t src_lo) {
    memcpy(t->addr + lo, src + (lo - src_lo), hi - lo);
}

// the caller copies from RAM
static int ram_snapshot(struct dblade_tier * p, struct dblade_tensor * t, uint64_t len, uint8_t * dst,
                        struct dblade_io_req * reqs, uint32_t cap, bool * buffered, const uint8_t ** copy_from) {
    if (len > t->map_bytes) {
        return -EINVAL;
    }
    *copy_from = t->addr;
    return 0;
}

const struct dblade_path_ops dblade_path_ram_ops = {
    .version  = DBLADE_PATH_OPS_VERSION,
    .name     = "ram",
    .attach   = ram_attach,
    .detach   = ram_detach,
    .clear    = ram_clear,
    .resident = ram_resident,
    .snapshot = ram_snapshot,
    .store_from = ram_store_from,
};
