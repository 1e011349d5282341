// The staging pool: the memory the direct path stages layers into, reused from layer to layer.
//
// A direct tensor keeps its fixed address, but holds memory only while it is staged (the budget
// has room for about two layers). Giving pages back after every layer and faulting fresh ones in on
// the next pass costs a fault and a zeroed page per page, and on a VM that returns free memory to
// its host far more (measured here: a third of the decode time of an I/O-bound model, with base
// pages). So the pages are kept: a pool of chunks, each moved with mremap(MREMAP_DONTUNMAP) from
// its pool slot to the tensor's address when it is staged, and back when it is released. Page
// tables move (a huge page is one entry); no page is freed, zeroed or faulted in. Both sides stay
// mapped throughout (DONTUNMAP leaves the source as empty memory), so no other thread's mmap can
// land in a hole.
//
// A chunk that cannot come from the pool (a kernel without MREMAP_DONTUNMAP, a pool emptied by a
// state copy, which stages every layer at once) is the tensor's own anonymous memory: faulted in on
// use, dropped on release, as before the pool existed.
//
// This file owns the pool's slots and the tensors' chunk maps (t->chunks); it calls nothing else.
// The caller holds the tensor exclusively (session lock, or the tensor's running job); the slots
// are guarded by the pool's own lock, since the worker releases outside the session lock.

#define _GNU_SOURCE
#include "residency.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#ifndef MREMAP_DONTUNMAP
#    define MREMAP_DONTUNMAP 4
#endif

enum { SLOT_EMPTY = 0, SLOT_PAGES = 1, SLOT_TAKEN = 2 };

// whether this kernel moves pages and leaves the source mapped (Linux 5.7 and later)
static bool probe_dontunmap(uint64_t page) {
    uint8_t * p = mmap(NULL, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        return false;
    }
    p[0]          = 1;
    const bool ok = mremap(p, page, page, MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP, p + page) == p + page &&
                    p[page] == 1 && p[0] == 0;
    munmap(p, 2 * page);
    return ok;
}

int dblade_staging_init(struct dblade_staging * p, uint64_t chunk, uint64_t pool_bytes, bool huge) {
    p->chunk   = chunk;
    p->n_slots = 0;
    const char * env = getenv("DUALBLADE_STAGING_POOL");
    p->moves = !(env && !strcmp(env, "0")) && probe_dontunmap((uint64_t) sysconf(_SC_PAGESIZE));
    uint64_t n = pool_bytes / chunk;
    n          = n < DBLADE_STAGING_VMAS ? n : DBLADE_STAGING_VMAS;
    if (!p->moves || n == 0) {
        return 0;
    }
    // the pool's range, on a chunk boundary (huge pages need one); reserved, not populated: a slot
    // gets its pages the first time a layer is staged into it
    const uint64_t bytes = n * chunk;
    uint8_t *      q     = mmap(NULL, bytes + chunk, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                                -1, 0);
    if (q == MAP_FAILED) {
        return -errno;
    }
    uint8_t * a = (uint8_t *) dblade_align_up((uintptr_t) q, chunk);
    if (a > q) {
        munmap(q, (size_t) (a - q));
    }
    munmap(a + bytes, (size_t) (q + bytes + chunk - (a + bytes)));
    p->state = calloc(n, 1);
    if (!p->state) {
        munmap(a, bytes);
        return -ENOMEM;
    }
    if (huge) {
        madvise(a, bytes, MADV_HUGEPAGE);
    }
    p->base    = a;
    p->n_slots = (uint32_t) n;
    p->n_free  = (uint32_t) n;
    return 0;
}

void dblade_staging_destroy(struct dblade_staging * p) {
    if (p->base) {
        munmap(p->base, (size_t) p->n_slots * p->chunk);
    }
    free(p->state);
    pthread_mutex_destroy(&p->lock);
    p->base = NULL, p->state = NULL, p->n_slots = 0;
}

// a free slot, the lowest at or after `from` first (neighbouring chunks of a tensor then come from
// neighbouring slots and move in one call), else any; UINT32_MAX when the pool is empty
static uint32_t take_slot(struct dblade_staging * p, uint32_t from) {
    if (p->n_free == 0) {
        return UINT32_MAX;
    }
    for (uint32_t k = 0; k < p->n_slots; k++) {
        const uint32_t i = (from + k) % p->n_slots;
        if (p->state[i] != SLOT_TAKEN) {
            if (p->state[i] == SLOT_EMPTY) {
                p->populated += p->chunk; // it gets its pages on first use
            }
            p->state[i] = SLOT_TAKEN;
            p->n_free--;
            return i;
        }
    }
    return UINT32_MAX;
}

static bool move(void * from, void * to, uint64_t len) {
    return mremap(from, len, len, MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP, to) == to;
}

int dblade_staging_grow(struct dblade_staging * p, struct dblade_tensor * t, uint64_t upto) {
    const uint64_t n = dblade_align_up(upto, p->chunk) / p->chunk;
    if (p->n_slots == 0) {
        for (uint64_t i = 0; i < n; i++) {
            t->chunks[i] = t->chunks[i] == DBLADE_CHUNK_NONE ? DBLADE_CHUNK_FRESH : t->chunks[i];
        }
        return 0;
    }
    pthread_mutex_lock(&p->lock);
    uint32_t hint = 0;
    for (uint64_t i = 0; i < n;) {
        if (t->chunks[i] != DBLADE_CHUNK_NONE) {
            i++;
            continue;
        }
        // a run of missing chunks filled from consecutive slots: one move
        const uint32_t first = take_slot(p, hint);
        if (first == UINT32_MAX) {
            t->chunks[i++] = DBLADE_CHUNK_FRESH;
            continue;
        }
        uint64_t run = 1;
        while (i + run < n && t->chunks[i + run] == DBLADE_CHUNK_NONE && first + run < p->n_slots &&
               p->state[first + run] != SLOT_TAKEN) {
            take_slot(p, first + (uint32_t) run);
            run++;
        }
        if (!move(p->base + first * p->chunk, t->addr + i * p->chunk, run * p->chunk)) {
            // cannot move (the kernel refuses, or has no room for one more mapping): the slots stay
            // in the pool and these chunks are the tensor's own memory
            for (uint64_t k = 0; k < run; k++) {
                p->state[first + k] = SLOT_PAGES;
                p->n_free++;
                t->chunks[i + k] = DBLADE_CHUNK_FRESH;
            }
        } else {
            for (uint64_t k = 0; k < run; k++) {
                t->chunks[i + k] = first + (uint32_t) k;
            }
        }
        hint = first + (uint32_t) run;
        i += run;
    }
    pthread_mutex_unlock(&p->lock);
    return 0;
}

void dblade_staging_release(struct dblade_staging * p, struct dblade_tensor * t) {
    const uint64_t n    = dblade_align_up(t->map_bytes, p->chunk) / p->chunk;
    bool           held = false;
    if (p->n_slots > 0) {
        pthread_mutex_lock(&p->lock);
    }
    for (uint64_t i = 0; i < n;) {
        const uint32_t slot = t->chunks[i];
        if (slot == DBLADE_CHUNK_NONE || slot == DBLADE_CHUNK_FRESH) {
            held |= slot == DBLADE_CHUNK_FRESH;
            t->chunks[i++] = DBLADE_CHUNK_NONE;
            continue;
        }
        uint64_t run = 1;
        while (i + run < n && t->chunks[i + run] == slot + run) {
            run++;
        }
        if (!move(t->addr + i * p->chunk, p->base + slot * p->chunk, run * p->chunk)) {
            // kept at the tensor: its pages are dropped below and the slot starts empty again
            for (uint64_t k = 0; k < run; k++) {
                p->populated -= p->chunk;
                p->state[slot + k] = SLOT_EMPTY;
            }
        } else {
            for (uint64_t k = 0; k < run; k++) {
                p->state[slot + k] = SLOT_PAGES;
            }
        }
        for (uint64_t k = 0; k < run; k++) {
            t->chunks[i + k] = DBLADE_CHUNK_NONE;
        }
        p->n_free += (uint32_t) run;
        held = true;
        i += run;
    }
    if (p->n_slots > 0) {
        pthread_mutex_unlock(&p->lock);
    }
    if (held) {
        // one fresh mapping over the whole range: drops the tensor's own pages and joins the empty
        // pieces the moves left into one mapping again (each moved chunk was a mapping of its own)
        mmap(t->addr, t->reserved, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1,
             0);
        if (p->chunk == DBLADE_HUGE_PAGE && p->n_slots == 0) {
            madvise(t->addr, t->reserved, MADV_HUGEPAGE);
        }
    }
}

uint64_t dblade_staging_trim(struct dblade_staging * p) {
    uint64_t given = 0;
    if (p->n_slots == 0) {
        return 0;
    }
    pthread_mutex_lock(&p->lock);
    for (uint32_t i = 0; i < p->n_slots;) {
        uint32_t run = 0;
        while (i + run < p->n_slots && p->state[i + run] == SLOT_PAGES) {
            run++;
        }
        if (run == 0) {
            i++;
            continue;
        }
        // the range stays mapped (a tensor's chunks may move in later); only its pages go
        if (madvise(p->base + (uint64_t) i * p->chunk, (size_t) run * p->chunk, MADV_DONTNEED) == 0) {
            memset(p->state + i, SLOT_EMPTY, run);
            p->populated -= (uint64_t) run * p->chunk;
            given += (uint64_t) run * p->chunk;
        }
        i += run;
    }
    pthread_mutex_unlock(&p->lock);
    return given;
}

void dblade_staging_forget(struct dblade_staging * p, struct dblade_tensor * t) {
    if (!t->chunks) {
        return;
    }
    const uint64_t n = dblade_align_up(t->map_bytes, p->chunk) / p->chunk;
    if (p->n_slots > 0) {
        pthread_mutex_lock(&p->lock);
    }
    for (uint64_t i = 0; i < n; i++) {
        const uint32_t slot = t->chunks[i];
        if (slot != DBLADE_CHUNK_NONE && slot != DBLADE_CHUNK_FRESH) {
            // its pages go with the tensor's range: the slot starts empty again
            p->state[slot] = SLOT_EMPTY;
            p->populated -= p->chunk;
            p->n_free++;
        }
        t->chunks[i] = DBLADE_CHUNK_NONE;
    }
    if (p->n_slots > 0) {
        pthread_mutex_unlock(&p->lock);
    }
}
