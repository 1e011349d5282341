// The direct path: the tensor's extent of the store is read and written with O_DIRECT, bypassing
// the page cache; its address holds memory only while the layer is staged (staging.c).
//
//  - stage: read what the store holds of [valid, upto) into the tensor's address (a prefetch by the
//    pipeline's worker, or now, when the graph needs it);
//  - take rows: the blocks new rows land in are staged first (they are written back whole);
//  - retire: write the dirty blocks back, then give the memory back to the staging pool.
//
// The tail: in decode every token adds one row per layer, far less than a block. Writing the block
// it lands in after every token would rewrite (and, on a new pass, re-read) it each time, so the
// page holding the newest rows stays in memory (tail_buf), dirty, while the rest of the layer is
// released; it is written once full, or on a flush (save_state, close, a switch of path).
// Durability rule: the store holds every row of a direct layer except those in its tail page,
// until the next flush.
//
// This file owns the tensor's direct-path state (residency.h says its invariants) and the plans of
// its transfers; the pipeline runs them (queued jobs), the engine moves the bytes, staging.c the
// memory.

#define _GNU_SOURCE
#include "residency.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

// memory the tensor holds: staged bytes in whole chunks, and its tail page
uint64_t dblade_direct_staged(const struct dblade_tensor * t) {
    const uint64_t chunk = t->cache->session->staging.chunk;
    return dblade_align_up(t->valid, chunk) + (t->tail != NO_TAIL ? t->page : 0);
}

// staging up to upto brings the tail page back in too when it lies below upto
static uint64_t with_tail(const struct dblade_tensor * t, uint64_t upto) {
    return t->tail != NO_TAIL && t->tail < upto && t->tail + t->page > upto ? t->tail + t->page : upto;
}

// what staging t up to upto adds to its memory
uint64_t dblade_direct_growth(const struct dblade_tensor * t, uint64_t upto) {
    const uint64_t chunk = t->cache->session->staging.chunk;
    const uint64_t now = dblade_align_up(t->valid, chunk), then = dblade_align_up(with_tail(t, upto), chunk);
    return then > now ? then - now : 0;
}

static void staged_set(struct dblade_session * s, struct dblade_tensor * t, uint64_t before) {
    s->staged_bytes += dblade_direct_staged(t);
    s->staged_bytes -= before;
    s->staged_peak = s->staged_bytes > s->staged_peak ? s->staged_bytes : s->staged_peak;
}

// where the store's data for a stage up to upto ends: nothing above hwm, nothing over the tail
uint64_t dblade_direct_stage_end(const struct dblade_session * s, const struct dblade_tensor * t, uint64_t upto) {
    uint64_t end = dblade_align_up(t->hwm, s->store.align);
    end          = end < upto ? end : upto;
    return end < t->tail ? end : t->tail;
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
bool dblade_direct_stage_plan(struct dblade_session * s, struct dblade_tensor * t, uint64_t upto,
                              struct dblade_io_req * r) {
    dblade_staging_grow(&s->staging, t, with_tail(t, upto));
    const uint64_t end = dblade_direct_stage_end(s, t, upto);
    if (end <= t->valid) {
        return false;
    }
    *r = transfer(t, t->addr + t->valid, t->valid, end, 0);
    return true;
}

// after the read: what the store does not hold is zeros (staging memory is recycled and may hold
// another tensor's bytes; attention reads padding rows, which must be finite), and the tail page
// comes back from its buffer
void dblade_direct_stage_finish(struct dblade_session * s, struct dblade_tensor * t, uint64_t upto) {
    if (upto <= t->valid) {
        return;
    }
    const uint64_t before = dblade_direct_staged(t);
    const uint64_t end    = dblade_direct_stage_end(s, t, upto);
    const uint64_t from   = end > t->valid ? end : t->valid;
    if (upto > from) {
        memset(t->addr + from, 0, upto - from);
    }
    t->valid = upto;
    if (t->tail != NO_TAIL && t->valid > t->tail) {
        memcpy(t->addr + t->tail, t->tail_buf, t->page);
        t->valid = t->valid > t->tail + t->page ? t->valid : t->tail + t->page;
        t->tail  = NO_TAIL;
    }
    staged_set(s, t, before);
}

// every byte of the page at p is authoritative in memory
static bool page_in_memory(const struct dblade_session * s, const struct dblade_tensor * t, uint64_t p) {
    if (t->tail == p) {
        return true;
    }
    const uint64_t data_end = dblade_align_up(t->hwm, s->store.align);
    const uint64_t need     = p + t->page < data_end ? p + t->page : data_end;
    return t->valid >= need;
}

// The write of a retire (full: the tail too) and the tail page to keep (NO_TAIL for none).
bool dblade_direct_retire_plan(struct dblade_session * s, struct dblade_tensor * t, bool full, struct dblade_io_req * r,
                               uint64_t * keep) {
    *keep = NO_TAIL;
    if (t->dirty_hi <= t->dirty_lo) {
        return false;
    }
    const uint64_t a  = s->store.align;
    uint64_t       lo = dblade_align_down(t->dirty_lo, a);
    uint64_t       hi = dblade_align_up(t->dirty_hi, a);
    hi                = hi < t->map_bytes ? hi : t->map_bytes;
    if (t->tail != NO_TAIL) {
        // not staged since it was kept: every dirty row is in the tail page, in its buffer
        if (!full) {
            *keep = t->tail;
            return false;
        }
        *r = transfer(t, t->tail_buf + (lo - t->tail), lo, hi, 1);
        return true;
    }
    if (!full && t->dirty_hi % t->page != 0) {
        const uint64_t tp = dblade_align_down(t->dirty_hi - 1, t->page);
        if (dblade_align_up(t->hwm, t->page) == tp + t->page && page_in_memory(s, t, tp)) {
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

// after the write: the tail page to its buffer, the memory back to the pool (no session lock
// needed: the tensor's job is running or the lock is held, nobody else touches it)
void dblade_direct_retire_release(struct dblade_session * s, struct dblade_tensor * t, uint64_t keep) {
    if (keep != NO_TAIL && keep != t->tail) {
        memcpy(t->tail_buf, t->addr + keep, t->page);
    }
    dblade_staging_release(&s->staging, t);
}

void dblade_direct_retire_finish(struct dblade_session * s, struct dblade_tensor * t, uint64_t keep) {
    const uint64_t before = dblade_direct_staged(t);
    t->valid              = 0;
    t->tail               = keep;
    if (keep == NO_TAIL) {
        t->dirty_lo = t->dirty_hi = 0;
    } else if (t->dirty_lo < keep) {
        t->dirty_lo = keep;
    }
    staged_set(s, t, before);
}

void dblade_direct_io_failed(struct dblade_session * s, struct dblade_tensor * t, const struct dblade_io_req * r) {
    s->n_io_errors++;
    dblade_fail(s, r->res, "%s layer %d %c %s %s failed: %s", r->write ? "writing" : "reading", t->il, "KV"[t->which],
                r->write ? "to" : "from", s->store.path,
                r->res == -EBADMSG ? "checksum mismatch (the store returned other data than was written)"
                                   : strerror(-r->res));
}

void dblade_direct_io_account(struct dblade_tensor * t, const struct dblade_io_req * r) {
    if (r->res == 0) {
        atomic_fetch_add(r->write ? &t->bytes_written : &t->bytes_read, r->len);
    }
}

// one transfer on the calling thread, on the graph's own engine: the graph needs it now
static int io_now(struct dblade_session * s, struct dblade_tensor * t, struct dblade_io_req * r) {
    const uint64_t t0 = dblade_stall_begin(s);
    dblade_io_run(s->io_now, r, 1);
    dblade_stall_end(s, t, t0);
    dblade_direct_io_account(t, r);
    if (r->res < 0) {
        dblade_direct_io_failed(s, t, r);
    }
    return r->res;
}

// t in memory up to upto (at least), now; inside the budget unless for a state copy (which
// llama.cpp makes of every layer at once, outside any graph)
static void stage_now(struct dblade_session * s, struct dblade_tensor * t, uint64_t upto, bool budgeted) {
    dblade_pipeline_settle(s, t);
    upto = dblade_align_up(upto, s->store.align);
    upto = upto < t->map_bytes ? upto : t->map_bytes;
    if (t->valid >= upto) {
        return;
    }
    if (budgeted) {
        dblade_pipeline_make_room(s, dblade_direct_growth(t, upto));
    }
    struct dblade_io_req r;
    if (dblade_direct_stage_plan(s, t, upto, &r) && io_now(s, t, &r) < 0) {
        return;
    }
    dblade_direct_stage_finish(s, t, upto);
}

// write back (all of it when full) and release now
static void retire_now(struct dblade_session * s, struct dblade_tensor * t, bool full) {
    dblade_pipeline_settle(s, t);
    if (t->valid == 0 && (!full || t->tail == NO_TAIL)) {
        return;
    }
    struct dblade_io_req r;
    uint64_t             keep;
    if (dblade_direct_retire_plan(s, t, full, &r, &keep) && io_now(s, t, &r) < 0) {
        return;
    }
    dblade_direct_retire_release(s, t, keep);
    dblade_direct_retire_finish(s, t, keep);
}

// --- the path's interface ---

static int direct_attach(struct dblade_session * s, struct dblade_tensor * t) {
    t->valid = 0, t->tail = NO_TAIL, t->dirty_lo = t->dirty_hi = 0;
    if (s->staging.n_slots == 0 && s->staging.chunk == DBLADE_HUGE_PAGE) {
        madvise(t->addr, t->reserved, MADV_HUGEPAGE); // its own memory, faulted in per pass: huge pages
    }
    return 0;
}

// everything to the store (the tail too) and the memory back: the address range is empty
static int direct_detach(struct dblade_session * s, struct dblade_tensor * t) {
    retire_now(s, t, true);
    return s->error;
}

static void direct_make_resident(struct dblade_session * s, struct dblade_tensor * t, uint64_t need) {
    stage_now(s, t, need, true);
}

// the blocks the new rows land in must hold what the store has before the rows go in; with a tail
// page, everything up to its end (the dirty range stays in memory)
static void direct_take_rows(struct dblade_session * s, struct dblade_tensor * t, uint64_t lo, uint64_t hi) {
    dblade_pipeline_settle(s, t); // a retire running now may keep a tail: look after it is done
    stage_now(s, t, t->tail != NO_TAIL && t->tail + t->page > hi ? t->tail + t->page : hi, true);
    if (t->dirty_hi <= t->dirty_lo) {
        t->dirty_lo = lo, t->dirty_hi = hi;
    } else {
        t->dirty_lo = lo < t->dirty_lo ? lo : t->dirty_lo;
        t->dirty_hi = hi > t->dirty_hi ? hi : t->dirty_hi;
    }
}

// prefetch only inside the budget: staged + queued + this <= allowance
static void direct_prefetch(struct dblade_session * s, struct dblade_tensor * t) {
    if (t->job == JOB_RETIRE && !t->job_running) {
        dblade_pipeline_withdraw(s, t); // wanted again before it left: it stays staged
    }
    uint64_t upto = dblade_align_up(t->hwm, s->store.align);
    upto          = upto < t->map_bytes ? upto : t->map_bytes;
    if (t->job == JOB_NONE && dblade_direct_stage_end(s, t, upto) > t->valid &&
        s->staged_bytes + s->stage_pending + dblade_direct_growth(t, upto) <= s->allowance) {
        dblade_pipeline_enqueue(s, t, JOB_STAGE, upto);
    }
}

static void direct_release(struct dblade_session * s, struct dblade_tensor * t) {
    if (t->job != JOB_NONE || t->valid == 0) {
        return;
    }
    if (!dblade_pipeline_enqueue(s, t, JOB_RETIRE, 0)) {
        retire_now(s, t, false);
    }
}

static void direct_flush(struct dblade_session * s, struct dblade_tensor * t) {
    retire_now(s, t, true);
}

// metadata only: nothing is written, rows above hwm are never read back
static void direct_clear(struct dblade_session * s, struct dblade_tensor * t) {
    const uint64_t before = dblade_direct_staged(t);
    dblade_staging_release(&s->staging, t);
    t->dirty_lo = t->dirty_hi = 0;
    t->valid                  = 0;
    t->tail                   = NO_TAIL;
    staged_set(s, t, before);
}

static void direct_host_begin(struct dblade_session * s, struct dblade_tensor * t) {
    stage_now(s, t, t->map_bytes, false);
}

// the host wrote rows [0, hi) into memory staged whole (or emptied by a clear in between: then
// it is the tensor's own fresh memory, zeros but for those rows)
static void direct_host_end(struct dblade_session * s, struct dblade_tensor * t, uint64_t hi) {
    const uint64_t before = dblade_direct_staged(t);
    const uint64_t n      = dblade_align_up(t->map_bytes, s->staging.chunk) / s->staging.chunk;
    for (uint64_t i = 0; i < n; i++) {
        if (t->chunks[i] == DBLADE_CHUNK_NONE) {
            t->chunks[i] = DBLADE_CHUNK_FRESH;
        }
    }
    t->valid    = t->map_bytes;
    t->tail     = NO_TAIL;
    t->dirty_lo = 0;
    t->dirty_hi = hi;
    staged_set(s, t, before);
}

// memory it holds: whole chunks, as the budget counts them
static uint64_t direct_resident(const struct dblade_tensor * t) {
    return dblade_direct_staged(t);
}

const struct dblade_path_ops dblade_path_direct = {
    .name          = "direct",
    .attach        = direct_attach,
    .detach        = direct_detach,
    .make_resident = direct_make_resident,
    .take_rows     = direct_take_rows,
    .prefetch      = direct_prefetch,
    .release       = direct_release,
    .flush         = direct_flush,
    .clear         = direct_clear,
    .host_begin    = direct_host_begin,
    .host_end      = direct_host_end,
    .resident      = direct_resident,
};
