// The direct path's hooks (path.h): what the pipeline and the entry points ask of a tensor on it.
//
//  - stage: read what the store holds of [valid, upto) into the tensor's address (a prefetch on the
//    worker, or now, when the graph needs it);
//  - take rows: the blocks new rows land in are staged first (they are written back whole);
//  - retire: write the dirty blocks back, then give the memory back to the staging pool.
//
// It calls jobs.c (the transfers), rows.c (the tensor's rows) and the staging pool.

#define _GNU_SOURCE
#include "direct-impl.h"

#include "../events.h"
#include "../store.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

static void member_remove(struct dblade_direct * d, struct dblade_tensor * t) {
    for (struct dblade_tensor ** p = &d->members; *p; p = &(*p)->direct->member_next) {
        if (*p == t) {
            *p = t->direct->member_next;
            return;
        }
    }
}

// the tensor's direct state goes (nothing staged, nothing queued: the caller made sure)
static void state_free(struct dblade_direct * d, struct dblade_tensor * t) {
    if (!t->direct) {
        return;
    }
    member_remove(d, t);
    free(t->direct->chunks);
    free(t->direct->tail_buf);
    free(t->direct);
    t->direct = NULL;
}

static int direct_attach(struct dblade_tier * p, struct dblade_tensor * t) {
    struct dblade_direct * d = direct_of(p);
    if (!t->direct) {
        struct dblade_direct_tensor * x        = calloc(1, sizeof(*x));
        const uint64_t                n_chunks = dblade_align_up(t->map_bytes, d->staging.chunk) / d->staging.chunk;
        if (x) {
            x->chunks   = malloc(n_chunks * sizeof(*x->chunks));
            x->tail_buf = aligned_alloc(t->page, t->page);
        }
        if (!x || !x->chunks || !x->tail_buf) {
            if (x) {
                free(x->chunks);
                free(x->tail_buf);
            }
            free(x);
            dblade_set_error("no memory for layer %d's direct-path state", t->il);
            return -ENOMEM;
        }
        for (uint64_t i = 0; i < n_chunks; i++) {
            x->chunks[i] = DBLADE_CHUNK_NONE;
        }
        t->direct      = x;
        x->member_next = d->members;
        d->members     = t;
    }
    t->direct->valid = 0, t->direct->tail = NO_TAIL, t->direct->dirty_lo = t->direct->dirty_hi = 0;
    if (d->staging.n_slots == 0 && d->staging.chunk == DBLADE_HUGE_PAGE) {
        madvise(t->addr, t->reserved, MADV_HUGEPAGE); // its own memory, faulted in per pass: huge pages
    }
    return 0;
}

// everything to the store (the tail too) and the memory back: the address range is empty
static int direct_detach(struct dblade_tier * p, struct dblade_tensor * t) {
    struct dblade_direct * d = direct_of(p);
    dblade_direct_retire_now(d, t, true);
    const int rc = p->env->events->error;
    if (rc == 0) {
        state_free(d, t);
    }
    return rc;
}

static void direct_make_resident(struct dblade_tier * p, struct dblade_tensor * t, uint64_t need) {
    dblade_direct_stage_now(direct_of(p), t, need, true);
}

// the blocks the new rows land in must hold what the store has before the rows go in; with a tail
// page, everything up to its end (the dirty range stays in memory)
static void direct_take_rows(struct dblade_tier * p, struct dblade_tensor * t, uint64_t lo, uint64_t hi) {
    struct dblade_direct *        d = direct_of(p);
    struct dblade_direct_tensor * x = t->direct;
    dblade_direct_settle(d, t); // a retire running now may keep a tail: look after it is done
    dblade_direct_stage_now(d, t, x->tail != NO_TAIL && x->tail + t->page > hi ? x->tail + t->page : hi, true);
    if (x->dirty_hi <= x->dirty_lo) {
        x->dirty_lo = lo, x->dirty_hi = hi;
    } else {
        x->dirty_lo = lo < x->dirty_lo ? lo : x->dirty_lo;
        x->dirty_hi = hi > x->dirty_hi ? hi : x->dirty_hi;
    }
}

static uint32_t direct_lookahead(struct dblade_tier * p, const struct dblade_tensor * k) {
    struct dblade_direct * d     = direct_of(p);
    const uint64_t         chunk = d->staging.chunk;
    d->depth = dblade_direct_depth(d, dblade_align_up(k->hwm, chunk) + dblade_align_up(k->pair->hwm, chunk));
    return d->depth;
}

// prefetch only inside the budget: staged + queued + this <= allowance
static void direct_prefetch(struct dblade_tier * p, struct dblade_tensor * t) {
    struct dblade_direct *        d = direct_of(p);
    struct dblade_direct_tensor * x = t->direct;
    if (x->job == JOB_RETIRE && !x->job_running) {
        dblade_direct_withdraw(d, t); // wanted again before it left: it stays staged
    }
    uint64_t upto = dblade_align_up(t->hwm, p->env->store->align);
    upto          = upto < t->map_bytes ? upto : t->map_bytes;
    if (x->job == JOB_NONE && dblade_direct_stage_end(d, t, upto) > x->valid &&
        d->staged_bytes + d->stage_pending + dblade_direct_growth(d, t, upto) <= d->allowance) {
        dblade_direct_enqueue(d, t, JOB_STAGE, upto);
    }
}

static void direct_release(struct dblade_tier * p, struct dblade_tensor * t) {
    struct dblade_direct * d = direct_of(p);
    if (t->direct->job != JOB_NONE || t->direct->valid == 0) {
        return;
    }
    if (!dblade_direct_enqueue(d, t, JOB_RETIRE, 0)) {
        dblade_direct_retire_now(d, t, false);
    }
}

static void direct_settle(struct dblade_tier * p, struct dblade_tensor * t) {
    dblade_direct_settle(direct_of(p), t);
}

static void direct_flush(struct dblade_tier * p, struct dblade_tensor * t) {
    dblade_direct_retire_now(direct_of(p), t, true);
}

// metadata only: nothing is written, rows above hwm are never read back
static void direct_clear(struct dblade_tier * p, struct dblade_tensor * t) {
    struct dblade_direct *        d      = direct_of(p);
    struct dblade_direct_tensor * x      = t->direct;
    const uint64_t                before = dblade_direct_staged(d, t);
    dblade_staging_release(&d->staging, t);
    x->dirty_lo = x->dirty_hi = 0;
    x->valid                  = 0;
    x->tail                   = NO_TAIL;
    dblade_direct_staged_set(d, t, before);
}

// the tensor dies with its cache: its staged memory with it
static void direct_forget(struct dblade_tier * p, struct dblade_tensor * t) {
    struct dblade_direct * d = direct_of(p);
    if (!t->direct) {
        return;
    }
    dblade_direct_withdraw(d, t);
    d->staged_bytes -= dblade_direct_staged(d, t);
    dblade_staging_forget(&d->staging, t);
    state_free(d, t);
}

static void direct_host_begin(struct dblade_tier * p, struct dblade_tensor * t) {
    dblade_direct_stage_now(direct_of(p), t, t->map_bytes, false);
}

// the host wrote rows [0, hi) into memory staged whole (or emptied by a clear in between: then
// it is the tensor's own fresh memory, zeros but for those rows)
static void direct_host_end(struct dblade_tier * p, struct dblade_tensor * t, uint64_t hi) {
    struct dblade_direct *        d      = direct_of(p);
    struct dblade_direct_tensor * x      = t->direct;
    const uint64_t                before = dblade_direct_staged(d, t);
    const uint64_t                n      = dblade_align_up(t->map_bytes, d->staging.chunk) / d->staging.chunk;
    for (uint64_t i = 0; i < n; i++) {
        if (x->chunks[i] == DBLADE_CHUNK_NONE) {
            x->chunks[i] = DBLADE_CHUNK_FRESH;
        }
    }
    x->valid    = t->map_bytes;
    x->tail     = NO_TAIL;
    x->dirty_lo = 0;
    x->dirty_hi = hi;
    dblade_direct_staged_set(d, t, before);
}

// memory first (the staged rows, the tail page), the store for the rest; nothing above what was written
static int direct_snapshot(struct dblade_tier * p, struct dblade_tensor * t, uint64_t len, uint8_t * dst,
                           struct dblade_io_req * reqs, uint32_t cap, bool * buffered,
                           const uint8_t ** copy_from) {
    dblade_direct_settle(direct_of(p), t); // a retire running gives its memory back outside the lock
    const struct dblade_direct_tensor * x = t->direct;
    const uint64_t                      mem = x->valid < len ? x->valid : len;
    memcpy(dst, t->addr, mem);
    int n = 0;
    for (uint64_t lo = mem; lo < len;) {
        uint64_t hi = len;
        if (x->tail != NO_TAIL && x->tail >= lo && x->tail < hi) {
            hi = x->tail; // the store up to the tail page, which memory holds
        }
        if (hi > lo) {
            if ((uint32_t) n >= cap) {
                return -ENOSPC;
            }
            reqs[n++] = (struct dblade_io_req) { .buf  = dst + lo,
                                                 .len  = hi - lo,
                                                 .off  = t->store_off + lo,
                                                 .sums = t->sums ? t->sums + lo / DBLADE_BLOCK : NULL };
        }
        if (hi == x->tail) {
            const uint64_t end = x->tail + t->page < len ? x->tail + t->page : len;
            memcpy(dst + x->tail, x->tail_buf, end - x->tail);
            hi = end;
        }
        lo = hi;
    }
    *buffered = false;
    return n;
}

// Rows computed elsewhere, in whole pages of src: full pages go to the store now, the page the newest rows
// end in stays in memory as the tail (as take_rows and a retire would leave it), so that decode writes no
// block per token. A tail page left below the new rows is full now: written too.
static void direct_store_from(struct dblade_tier * p, struct dblade_tensor * t, uint64_t lo, uint64_t hi,
                              const uint8_t * src, uint64_t src_lo) {
    struct dblade_direct * d = direct_of(p);
    dblade_direct_settle(d, t);
    if (t->direct->valid > 0) {
        dblade_direct_retire_now(d, t, true); // staged by a state copy: the store first, then these rows over it
    }
    struct dblade_direct_tensor * x      = t->direct;
    const uint64_t                before = dblade_direct_staged(d, t);
    const uint64_t                end    = dblade_align_up(hi, t->page);
    const bool                    tail   = hi == t->hwm && hi % t->page != 0;
    const uint64_t                upto   = tail ? end - t->page : end; // what goes to the store
    if (x->tail != NO_TAIL && x->tail < src_lo) {
        // the old tail is complete now (or rows below it were rewritten): to the store from its buffer
        if (dblade_direct_write_now(d, t, x->tail_buf, x->tail, x->tail + t->page) < 0) {
            return;
        }
        x->tail = NO_TAIL;
    }
    if (x->tail != NO_TAIL && x->tail < end) {
        x->tail = NO_TAIL; // these rows' pages supersede it
    }
    if (dblade_direct_write_now(d, t, src, src_lo, upto) < 0) {
        return;
    }
    if (tail) {
        memcpy(x->tail_buf, src + (upto - src_lo), t->page);
        x->tail     = upto;
        x->dirty_lo = upto;
        x->dirty_hi = hi;
    } else if (x->tail == NO_TAIL) {
        x->dirty_lo = x->dirty_hi = 0;
    }
    dblade_direct_staged_set(d, t, before);
}

// memory it holds: whole chunks, as the budget counts them
static uint64_t direct_resident(struct dblade_tier * p, const struct dblade_tensor * t) {
    return dblade_direct_staged(direct_of(p), t);
}

const struct dblade_path_ops dblade_direct_ops = {
    .version       = DBLADE_PATH_OPS_VERSION,
    .name          = "direct",
    .attach        = direct_attach,
    .detach        = direct_detach,
    .make_resident = direct_make_resident,
    .take_rows     = direct_take_rows,
    .lookahead     = direct_lookahead,
    .prefetch      = direct_prefetch,
    .release       = direct_release,
    .settle        = direct_settle,
    .flush         = direct_flush,
    .clear         = direct_clear,
    .forget        = direct_forget,
    .host_begin    = direct_host_begin,
    .host_end      = direct_host_end,
    .resident      = direct_resident,
    .snapshot      = direct_snapshot,
    .store_from    = direct_store_from,
};
