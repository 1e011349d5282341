// A tensor's rows on the direct path: what is staged in memory, what is dirty, the tail page kept
// between passes, and the plans of the transfers that move them (jobs.c runs them).
//
// The tail: in decode every token adds one row per layer, far less than a block. Writing the block
// it lands in after every token would rewrite (and, on a new pass, re-read) it each time, so the
// page holding the newest rows stays in memory (tail_buf), dirty, while the rest of the layer is
// released; it is written once full, or on a flush (save_state, close, a switch of path).
// Durability rule: the store holds every row of a direct layer except those in its tail page,
// until the next flush.
//
// It calls the staging pool (memory) and the events (failures); the invariants are direct-impl.h's.

#define _GNU_SOURCE
#include "direct-impl.h"

#include "../events.h"
#include "../store.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

// memory the tensor holds: staged bytes in whole chunks, and its tail page
uint64_t dblade_direct_staged(const struct dblade_direct * d, const struct dblade_tensor * t) {
    const struct dblade_direct_tensor * x = t->direct;
    return x ? dblade_align_up(x->valid, d->staging.chunk) + (x->tail != NO_TAIL ? t->page : 0) : 0;
}

// staging up to upto brings the tail page back in too when it lies below upto
static uint64_t with_tail(const struct dblade_tensor * t, uint64_t upto) {
    const struct dblade_direct_tensor * x = t->direct;
    return x->tail != NO_TAIL && x->tail < upto && x->tail + t->page > upto ? x->tail + t->page : upto;
}

// what staging t up to upto adds to its memory
uint64_t dblade_direct_growth(const struct dblade_direct * d, const struct dblade_tensor * t, uint64_t upto) {
    const uint64_t chunk = d->staging.chunk;
    const uint64_t now = dblade_align_up(t->direct->valid, chunk), then = dblade_align_up(with_tail(t, upto), chunk);
    return then > now ? then - now : 0;
}

void dblade_direct_staged_set(struct dblade_direct * d, const struct dblade_tensor * t, uint64_t before) {
    d->staged_bytes += dblade_direct_staged(d, t);
    d->staged_bytes -= before;
    d->staged_peak = d->staged_bytes > d->staged_peak ? d->staged_bytes : d->staged_peak;
}

// where the store's data for a stage up to upto ends: nothing above hwm, nothing over the tail
uint64_t dblade_direct_stage_end(const struct dblade_direct * d, const struct dblade_tensor * t, uint64_t upto) {
    uint64_t end = dblade_align_up(t->hwm, d->base.env->store->align);
    end          = end < upto ? end : upto;
    return end < t->direct->tail ? end : t->direct->tail;
}

// the transfer of bytes [lo, hi) of t's extent, from or to memory at buf, with their checksums
static struct dblade_io_req transfer(const struct dblade_tensor * t, uint8_t * buf, uint64_t lo, uint64_t hi, int write) {
    return (struct dblade_io_req) { .buf   = buf,
                                    .len   = hi - lo,
                                    .off   = t->store_off + lo,
                                    .write = write,
                                    .sums  = t->sums ? t->sums + lo / DBLADE_BLOCK : NULL };
}

// memory behind [0, upto), and the read that brings [valid, upto) in (false: nothing to read)
bool dblade_direct_stage_plan(struct dblade_direct * d, struct dblade_tensor * t, uint64_t upto,
                              struct dblade_io_req * r) {
    dblade_staging_grow(&d->staging, t, with_tail(t, upto));
    const uint64_t end = dblade_direct_stage_end(d, t, upto);
    if (end <= t->direct->valid) {
        return false;
    }
    *r = transfer(t, t->addr + t->direct->valid, t->direct->valid, end, 0);
    return true;
}

// after the read: what the store does not hold is zeros (staging memory is recycled and may hold
// another tensor's bytes; attention reads padding rows, which must be finite), and the tail page
// comes back from its buffer
void dblade_direct_stage_finish(struct dblade_direct * d, struct dblade_tensor * t, uint64_t upto) {
    struct dblade_direct_tensor * x = t->direct;
    if (upto <= x->valid) {
        return;
    }
    const uint64_t before = dblade_direct_staged(d, t);
    const uint64_t end    = dblade_direct_stage_end(d, t, upto);
    const uint64_t from   = end > x->valid ? end : x->valid;
    if (upto > from) {
        memset(t->addr + from, 0, upto - from);
    }
    x->valid = upto;
    if (x->tail != NO_TAIL && x->valid > x->tail) {
        memcpy(t->addr + x->tail, x->tail_buf, t->page);
        x->valid = x->valid > x->tail + t->page ? x->valid : x->tail + t->page;
        x->tail  = NO_TAIL;
    }
    dblade_direct_staged_set(d, t, before);
}

// every byte of the page at p is authoritative in memory
static bool page_in_memory(const struct dblade_direct * d, const struct dblade_tensor * t, uint64_t p) {
    if (t->direct->tail == p) {
        return true;
    }
    const uint64_t data_end = dblade_align_up(t->hwm, d->base.env->store->align);
    const uint64_t need     = p + t->page < data_end ? p + t->page : data_end;
    return t->direct->valid >= need;
}

// The write of a retire (full: the tail too) and the tail page to keep (NO_TAIL for none).
bool dblade_direct_retire_plan(struct dblade_direct * d, struct dblade_tensor * t, bool full, struct dblade_io_req * r,
                               uint64_t * keep) {
    const struct dblade_direct_tensor * x = t->direct;
    *keep                                 = NO_TAIL;
    if (x->dirty_hi <= x->dirty_lo) {
        return false;
    }
    const uint64_t a  = d->base.env->store->align;
    uint64_t       lo = dblade_align_down(x->dirty_lo, a);
    uint64_t       hi = dblade_align_up(x->dirty_hi, a);
    hi                = hi < t->map_bytes ? hi : t->map_bytes;
    if (x->tail != NO_TAIL) {
        // not staged since it was kept: every dirty row is in the tail page, in its buffer
        if (!full) {
            *keep = x->tail;
            return false;
        }
        *r = transfer(t, x->tail_buf + (lo - x->tail), lo, hi, 1);
        return true;
    }
    if (!full && x->dirty_hi % t->page != 0) {
        const uint64_t tp = dblade_align_down(x->dirty_hi - 1, t->page);
        if (dblade_align_up(t->hwm, t->page) == tp + t->page && page_in_memory(d, t, tp)) {
            *keep = tp;
            hi    = tp > lo ? tp : lo;
        }
    }
    if (hi <= lo) {
        return false;
    }
    *r = transfer(t, t->addr + lo, lo, hi, 1);
    return true;
}

// after the write: the tail page to its buffer, the memory back to the pool (no lock needed: the
// tensor's job is running or the lock is held, nobody else touches it)
void dblade_direct_retire_release(struct dblade_direct * d, struct dblade_tensor * t, uint64_t keep) {
    if (keep != NO_TAIL && keep != t->direct->tail) {
        memcpy(t->direct->tail_buf, t->addr + keep, t->page);
    }
    dblade_staging_release(&d->staging, t);
}

void dblade_direct_retire_finish(struct dblade_direct * d, struct dblade_tensor * t, uint64_t keep) {
    struct dblade_direct_tensor * x      = t->direct;
    const uint64_t                before = dblade_direct_staged(d, t);
    x->valid                             = 0;
    x->tail                              = keep;
    if (keep == NO_TAIL) {
        x->dirty_lo = x->dirty_hi = 0;
    } else if (x->dirty_lo < keep) {
        x->dirty_lo = keep;
    }
    dblade_direct_staged_set(d, t, before);
}

// a transfer of t completed: counted, or its failure made the KV object's sticky error
void dblade_direct_io_done(struct dblade_direct * d, struct dblade_tensor * t, const struct dblade_io_req * r) {
    if (r->res == 0) {
        atomic_fetch_add(r->write ? &t->bytes_written : &t->bytes_read, r->len);
        return;
    }
    struct dblade_events * ev = d->base.env->events;
    char                   where[600];
    ev->n_io_errors++;
    dblade_fail(ev, r->res, "%s layer %d %c %s %s failed: %s", r->write ? "writing" : "reading", t->il, "KV"[t->which],
                r->write ? "to" : "from", dblade_store_where(d->base.env->store, r->member, where, sizeof(where)),
                r->res == -EBADMSG ? "checksum mismatch (the store returned other data than was written)"
                                   : strerror(-r->res));
}
