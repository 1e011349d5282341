// The direct path's transfers: queued as jobs for the worker, which runs them in batches that keep
// the device busy (DBLADE_IO_BATCH in flight), or done now on the graph's own engine when the graph
// needs a layer that is not in. What the graph needs right now never waits behind a batch: a queued
// job is withdrawn or a running one waited for, and the demand read goes through its own engine.
//
// It owns the queue, the batches and the staging allowance; it calls rows.c for the plans of the
// transfers, the engine, the worker and the events.

#define _GNU_SOURCE
#include "direct-impl.h"

#include "../events.h"
#include "../store.h"

#include <stddef.h>

#define DBLADE_IO_BATCH    (32ull << 20) // a worker batch: enough bytes in flight to saturate a device
#define DBLADE_IO_INFLIGHT (32ull << 20) // what the pipeline aims to keep in flight when I/O bound

static void queue_remove(struct dblade_direct * d, struct dblade_tensor * t) {
    struct dblade_tensor * prev = NULL;
    for (struct dblade_tensor * q = d->q_head; q; prev = q, q = q->direct->job_next) {
        if (q == t) {
            if (prev) {
                prev->direct->job_next = t->direct->job_next;
            } else {
                d->q_head = t->direct->job_next;
            }
            if (d->q_tail == t) {
                d->q_tail = prev;
            }
            t->direct->job_next = NULL;
            return;
        }
    }
}

static void job_done(struct dblade_direct * d, struct dblade_tensor * t) {
    struct dblade_direct_tensor * x = t->direct;
    if (x->job == JOB_STAGE) {
        d->stage_pending -= x->job_pending;
    }
    x->job_pending = 0;
    x->job         = JOB_NONE;
    x->job_running = false;
}

void dblade_direct_withdraw(struct dblade_direct * d, struct dblade_tensor * t) {
    if (t->direct->job != JOB_NONE && !t->direct->job_running) {
        queue_remove(d, t);
        job_done(d, t);
    }
}

// one batch: jobs in queue order until enough bytes are in flight; runs it without the lock
static void batch(struct dblade_direct * d) {
    struct dblade_path_env * env   = d->base.env;
    struct dblade_tensor *   first = NULL, ** link = &first;
    uint32_t                 n     = 0;
    uint64_t                 bytes = 0;
    while (d->q_head && bytes < DBLADE_IO_BATCH && n < WORKER_BATCH) {
        struct dblade_tensor *        t = d->q_head;
        struct dblade_direct_tensor * x = t->direct;
        d->q_head                       = x->job_next;
        if (!d->q_head) {
            d->q_tail = NULL;
        }
        x->job_next    = NULL;
        x->job_running = true;
        x->job_has_req = x->job == JOB_STAGE ? dblade_direct_stage_plan(d, t, x->job_upto, &d->batch_reqs[n])
                                             : dblade_direct_retire_plan(d, t, false, &d->batch_reqs[n], &x->job_keep);
        if (x->job_has_req) {
            x->job_req = n;
            bytes += d->batch_reqs[n].len;
            n++;
        }
        *link = t;
        link  = &x->job_batch;
    }
    *link = NULL;
    pthread_mutex_unlock(env->lock);

    const uint64_t t0 = dblade_now_ns();
    dblade_io_run(d->io, d->batch_reqs, n);
    const uint64_t dt = dblade_now_ns() - t0;
    for (struct dblade_tensor * t = first; t; t = t->direct->job_batch) {
        struct dblade_direct_tensor * x = t->direct;
        if (x->job == JOB_RETIRE && (!x->job_has_req || d->batch_reqs[x->job_req].res == 0)) {
            dblade_direct_retire_release(d, t, x->job_keep);
        }
    }

    pthread_mutex_lock(env->lock);
    if (bytes >= (1u << 20) && dt > 0) {
        // device speed, for the pipeline depth (bytes per ns, smoothed)
        const double bw = (double) bytes / (double) dt;
        d->bw_ema       = d->bw_ema > 0 ? 0.8 * d->bw_ema + 0.2 * bw : bw;
    }
    for (struct dblade_tensor * t = first, * next; t; t = next) {
        struct dblade_direct_tensor * x = t->direct;
        next                            = x->job_batch;
        x->job_batch                    = NULL;
        bool ok                         = true;
        if (x->job_has_req) {
            const struct dblade_io_req * r = &d->batch_reqs[x->job_req];
            dblade_direct_io_done(d, t, r);
            ok = r->res == 0;
        }
        if (ok) {
            if (x->job == JOB_STAGE) {
                dblade_direct_stage_finish(d, t, x->job_upto);
            } else {
                dblade_direct_retire_finish(d, t, x->job_keep);
            }
        }
        job_done(d, t);
    }
}

void dblade_direct_run_batch(struct dblade_work * w) {
    struct dblade_direct * d = (struct dblade_direct *) ((char *) w - offsetof(struct dblade_direct, work));
    if (d->q_head) {
        batch(d);
    }
    if (d->q_head) {
        dblade_worker_queue(d->worker, &d->work, true); // the I/O first: a memory sample can wait a batch
    }
    // a fence waiting for this batch: its other compute threads get up now, with it, not after it
    dblade_gate_unblock(&d->base.env->events->gate);
}

// t has no job left: a queued one is withdrawn (a stage) or cancelled (a retire: t stays staged),
// a running one waited for; the wait is the graph's stall
void dblade_direct_settle(struct dblade_direct * d, struct dblade_tensor * t) {
    struct dblade_direct_tensor * x = t->direct;
    if (!x || x->job == JOB_NONE) {
        return;
    }
    if (!x->job_running) {
        dblade_direct_withdraw(d, t);
        return;
    }
    struct dblade_events * ev = d->base.env->events;
    const uint64_t         t0 = dblade_stall_begin(ev);
    while (x->job != JOB_NONE) {
        dblade_worker_wait(d->worker);
    }
    dblade_stall_end(ev, &t->io_wait_ns, t0);
}

bool dblade_direct_enqueue(struct dblade_direct * d, struct dblade_tensor * t, int job, uint64_t upto) {
    if (!dblade_worker_queue(d->worker, &d->work, true)) {
        return false;
    }
    struct dblade_direct_tensor * x = t->direct;
    x->job                          = job;
    x->job_upto                     = upto;
    x->job_next                     = NULL;
    if (job == JOB_STAGE) {
        x->job_pending = dblade_direct_growth(d, t, upto);
        d->stage_pending += x->job_pending;
    }
    if (d->q_tail) {
        d->q_tail->direct->job_next = t;
    } else {
        d->q_head = t;
    }
    d->q_tail = t;
    return true;
}

// one transfer on the calling thread, on the graph's own engine: the graph needs it now
static int io_now(struct dblade_direct * d, struct dblade_tensor * t, struct dblade_io_req * r) {
    struct dblade_events * ev = d->base.env->events;
    const uint64_t         t0 = dblade_stall_begin(ev);
    dblade_io_run(d->io_now, r, 1);
    dblade_stall_end(ev, &t->io_wait_ns, t0);
    dblade_direct_io_done(d, t, r);
    return r->res;
}

int dblade_direct_write_now(struct dblade_direct * d, struct dblade_tensor * t, const uint8_t * buf, uint64_t lo,
                            uint64_t hi) {
    if (hi <= lo) {
        return 0;
    }
    struct dblade_io_req r = { .buf   = (void *) buf,
                               .len   = hi - lo,
                               .off   = t->store_off + lo,
                               .write = 1,
                               .sums  = t->sums ? t->sums + lo / DBLADE_BLOCK : NULL };
    return io_now(d, t, &r);
}

void dblade_direct_stage_now(struct dblade_direct * d, struct dblade_tensor * t, uint64_t upto, bool budgeted) {
    dblade_direct_settle(d, t);
    const uint64_t align = d->base.env->store->align;
    upto                 = dblade_align_up(upto, align);
    upto                 = upto < t->map_bytes ? upto : t->map_bytes;
    if (t->direct->valid >= upto) {
        return;
    }
    if (budgeted) {
        dblade_direct_make_room(d, dblade_direct_growth(d, t, upto));
    }
    struct dblade_io_req r;
    if (dblade_direct_stage_plan(d, t, upto, &r) && io_now(d, t, &r) < 0) {
        return;
    }
    dblade_direct_stage_finish(d, t, upto);
}

void dblade_direct_retire_now(struct dblade_direct * d, struct dblade_tensor * t, bool full) {
    dblade_direct_settle(d, t);
    if (t->direct->valid == 0 && (!full || t->direct->tail == NO_TAIL)) {
        return;
    }
    struct dblade_io_req r;
    uint64_t             keep;
    if (dblade_direct_retire_plan(d, t, full, &r, &keep) && io_now(d, t, &r) < 0) {
        return;
    }
    dblade_direct_retire_release(d, t, keep);
    dblade_direct_retire_finish(d, t, keep);
}

// write back and release t: on the worker where there is one, else now
static void retire(struct dblade_direct * d, struct dblade_tensor * t) {
    if (!dblade_direct_enqueue(d, t, JOB_RETIRE, 0)) {
        dblade_direct_retire_now(d, t, false);
    }
}

// Staging `bytes` more must stay inside the budget: withdraw queued prefetches, retire staged
// layers other than the one computing, and wait for the worker to give their memory back.
void dblade_direct_make_room(struct dblade_direct * d, uint64_t bytes) {
    if (d->staged_bytes + d->stage_pending + bytes <= d->allowance) {
        return;
    }
    struct dblade_events * ev = d->base.env->events;
    const uint64_t         t0 = dblade_stall_begin(ev);
    while (d->staged_bytes + d->stage_pending + bytes > d->allowance) {
        bool acted = false;
        for (struct dblade_tensor * q = d->q_head, * next; q; q = next) {
            next = q->direct->job_next;
            if (q->direct->job == JOB_STAGE && !dblade_path_is_active(&d->base, q)) {
                dblade_direct_withdraw(d, q);
                acted = true;
            }
        }
        for (struct dblade_tensor * x = d->members; x && !acted; x = x->direct->member_next) {
            if (x->direct->job == JOB_NONE && x->direct->valid > 0 && !dblade_path_is_active(&d->base, x)) {
                retire(d, x);
                acted = true;
            }
        }
        if (acted) {
            continue;
        }
        bool busy = d->q_head != NULL;
        for (struct dblade_tensor * x = d->members; x && !busy; x = x->direct->member_next) {
            busy = x->direct->job != JOB_NONE && !dblade_path_is_active(&d->base, x);
        }
        if (!busy) {
            break; // what is left is the layer computing: the plan's staging reserve covers it
        }
        dblade_worker_wait(d->worker);
    }
    dblade_stall_end(ev, NULL, t0);
}

// how many direct layers ahead to stage: one when compute hides the I/O; when it does not, enough
// to keep DBLADE_IO_INFLIGHT bytes in flight; never more than the budget left after the pinned layers
uint32_t dblade_direct_depth(struct dblade_direct * d, uint64_t layer_bytes) {
    if (layer_bytes == 0) {
        return 1;
    }
    uint64_t d_mem = d->allowance / layer_bytes;
    d_mem          = d_mem > 1 ? d_mem - 1 : 1; // the current layer is staged too
    d_mem          = d_mem < DBLADE_MAX_DEPTH ? d_mem : DBLADE_MAX_DEPTH;
    uint32_t depth = 1;
    const double compute = d->base.env->compute_ema_ns;
    if (d->bw_ema > 0 && compute > 0) {
        const double io_ns = (double) layer_bytes / d->bw_ema;
        if (io_ns > 0.8 * compute) {
            const uint64_t fill = (DBLADE_IO_INFLIGHT + layer_bytes - 1) / layer_bytes;
            depth               = fill > 2 ? (uint32_t) fill : 2;
        }
    }
    return depth < d_mem ? depth : (uint32_t) d_mem;
}
