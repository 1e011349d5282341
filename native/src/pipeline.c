// The pipeline: which layer the graph is at, what to bring in ahead of it, what to let go behind
// it, and the worker thread that does that I/O while the graph computes.
//
// When the graph enters layer i (its first fence), the pipeline applies a pending switch of the
// layer, asks the paths of the next `depth` direct layers to prefetch (the order of layers is
// learned from the previous pass: graphs repeat it) and every other layer to release. The direct
// path turns those into jobs, one per tensor at a time, which the worker runs in batches that keep
// the device busy (DBLADE_IO_BATCH in flight). What the graph needs right now never waits behind a
// batch: a queued job is withdrawn or a running one waited for, and the demand read goes through
// the graph's own engine (path_direct.c).
//
// The worker also takes the auto policy's memory samples (policy.c), so that the graph's thread
// never reads a file under the session lock.
//
// This file owns the queue, the worker and the depth; it calls the paths' interface, the direct
// path's job plans, the engine, and the policy's sampler.

#define _GNU_SOURCE
#include "residency.h"

#include <stdlib.h>

#define DBLADE_IO_BATCH    (32ull << 20) // a worker batch: enough bytes in flight to saturate a device
#define DBLADE_IO_INFLIGHT (32ull << 20) // what the pipeline aims to keep in flight when I/O bound

bool dblade_pipeline_is_active(const struct dblade_session * s, const struct dblade_tensor * t) {
    return s->active && (s->active == t || s->active == t->pair);
}

static void queue_remove(struct dblade_session * s, struct dblade_tensor * t) {
    struct dblade_tensor * prev = NULL;
    for (struct dblade_tensor * q = s->q_head; q; prev = q, q = q->job_next) {
        if (q == t) {
            if (prev) {
                prev->job_next = t->job_next;
            } else {
                s->q_head = t->job_next;
            }
            if (s->q_tail == t) {
                s->q_tail = prev;
            }
            t->job_next = NULL;
            return;
        }
    }
}

static void job_done(struct dblade_session * s, struct dblade_tensor * t) {
    if (t->job == JOB_STAGE) {
        s->stage_pending -= t->job_pending;
    }
    t->job_pending = 0;
    t->job         = JOB_NONE;
    t->job_running = false;
}

void dblade_pipeline_withdraw(struct dblade_session * s, struct dblade_tensor * t) {
    if (t->job != JOB_NONE && !t->job_running) {
        queue_remove(s, t);
        job_done(s, t);
    }
}

// one batch: jobs in queue order until enough bytes are in flight; runs it without the lock
static void worker_batch(struct dblade_session * s) {
    struct dblade_tensor * batch = NULL, ** link = &batch;
    uint32_t               n     = 0;
    uint64_t               bytes = 0;
    while (s->q_head && bytes < DBLADE_IO_BATCH && n < WORKER_BATCH) {
        struct dblade_tensor * t = s->q_head;
        s->q_head                = t->job_next;
        if (!s->q_head) {
            s->q_tail = NULL;
        }
        t->job_next    = NULL;
        t->job_running = true;
        t->job_has_req = t->job == JOB_STAGE
                             ? dblade_direct_stage_plan(s, t, t->job_upto, &s->batch_reqs[n])
                             : dblade_direct_retire_plan(s, t, false, &s->batch_reqs[n], &t->job_keep);
        if (t->job_has_req) {
            t->job_req = n;
            bytes += s->batch_reqs[n].len;
            n++;
        }
        *link = t;
        link  = &t->job_batch;
    }
    *link = NULL;
    pthread_mutex_unlock(&s->lock);

    const uint64_t t0 = dblade_now_ns();
    dblade_io_run(s->io, s->batch_reqs, n);
    const uint64_t dt = dblade_now_ns() - t0;
    for (struct dblade_tensor * t = batch; t; t = t->job_batch) {
        if (t->job == JOB_RETIRE && (!t->job_has_req || s->batch_reqs[t->job_req].res == 0)) {
            dblade_direct_retire_release(s, t, t->job_keep);
        }
    }

    pthread_mutex_lock(&s->lock);
    if (bytes >= (1u << 20) && dt > 0) {
        // device speed, for the pipeline depth (bytes per ns, smoothed)
        const double bw = (double) bytes / (double) dt;
        s->bw_ema       = s->bw_ema > 0 ? 0.8 * s->bw_ema + 0.2 * bw : bw;
    }
    for (struct dblade_tensor * t = batch, * next; t; t = next) {
        next         = t->job_batch;
        t->job_batch = NULL;
        bool ok      = true;
        if (t->job_has_req) {
            struct dblade_io_req * r = &s->batch_reqs[t->job_req];
            dblade_direct_io_account(t, r);
            if (r->res < 0) {
                dblade_direct_io_failed(s, t, r);
                ok = false;
            }
        }
        if (ok) {
            if (t->job == JOB_STAGE) {
                dblade_direct_stage_finish(s, t, t->job_upto);
            } else {
                dblade_direct_retire_finish(s, t, t->job_keep);
            }
        }
        job_done(s, t);
    }
    pthread_cond_broadcast(&s->done);
    // a fence waiting for this batch: its other compute threads get up now, with it, not after it
    dblade_gate_unblock(&s->gate);
}

static void * worker_main(void * arg) {
    struct dblade_session * s = arg;
    pthread_mutex_lock(&s->lock);
    for (;;) {
        while (!s->q_head && !s->sample_due && !s->worker_stop) {
            pthread_cond_wait(&s->work, &s->lock);
        }
        if (s->worker_stop) {
            break;
        }
        if (s->q_head) {
            worker_batch(s); // the I/O first: a sample can wait a batch, the graph cannot
        } else {
            s->sample_due = false;
            dblade_policy_sample(s);
        }
    }
    pthread_mutex_unlock(&s->lock);
    return NULL;
}

static bool worker_start(struct dblade_session * s) {
    if (!s->worker_started && pthread_create(&s->worker, NULL, worker_main, s) == 0) {
        s->worker_started = true;
    }
    return s->worker_started;
}

void dblade_pipeline_stop(struct dblade_session * s) {
    if (s->worker_started) {
        pthread_mutex_lock(&s->lock);
        s->worker_stop = true;
        pthread_cond_broadcast(&s->work);
        pthread_mutex_unlock(&s->lock);
        pthread_join(s->worker, NULL);
        s->worker_started = false;
    }
}

// t has no job left: a queued one is withdrawn (a stage) or cancelled (a retire: t stays staged),
// a running one waited for; the wait is the graph's stall
void dblade_pipeline_settle(struct dblade_session * s, struct dblade_tensor * t) {
    if (t->job == JOB_NONE) {
        return;
    }
    if (!t->job_running) {
        dblade_pipeline_withdraw(s, t);
        return;
    }
    const uint64_t t0 = dblade_stall_begin(s);
    while (t->job != JOB_NONE) {
        pthread_cond_wait(&s->done, &s->lock);
    }
    dblade_stall_end(s, t, t0);
}

// false when there is no worker (the caller then does the transfer itself)
bool dblade_pipeline_enqueue(struct dblade_session * s, struct dblade_tensor * t, int job, uint64_t upto) {
    if (!worker_start(s)) {
        return false;
    }
    t->job      = job;
    t->job_upto = upto;
    t->job_next = NULL;
    if (job == JOB_STAGE) {
        t->job_pending = dblade_direct_growth(t, upto);
        s->stage_pending += t->job_pending;
    }
    if (s->q_tail) {
        s->q_tail->job_next = t;
    } else {
        s->q_head = t;
    }
    s->q_tail = t;
    pthread_cond_signal(&s->work);
    return true;
}

// Staging `bytes` more must stay inside the budget: withdraw queued prefetches, retire staged
// layers other than the one computing, and wait for the worker to give their memory back.
void dblade_pipeline_make_room(struct dblade_session * s, uint64_t bytes) {
    if (s->staged_bytes + s->stage_pending + bytes <= s->allowance) {
        return;
    }
    const uint64_t t0 = dblade_stall_begin(s);
    while (s->staged_bytes + s->stage_pending + bytes > s->allowance) {
        bool acted = false;
        for (struct dblade_tensor * q = s->q_head, * next; q; q = next) {
            next = q->job_next;
            if (q->job == JOB_STAGE && !dblade_pipeline_is_active(s, q)) {
                dblade_pipeline_withdraw(s, q);
                acted = true;
            }
        }
        for (struct dblade_cache * c = s->caches; c && !acted; c = c->next) {
            for (uint32_t i = 0; i < c->n_tensors; i++) {
                struct dblade_tensor * x = &c->tensors[i];
                if (x->path == DBLADE_PATH_DIRECT && x->job == JOB_NONE && x->valid > 0 &&
                    !dblade_pipeline_is_active(s, x)) {
                    dblade_path_direct.release(s, x);
                    acted = true;
                }
            }
        }
        if (acted) {
            continue;
        }
        bool busy = s->q_head != NULL;
        for (struct dblade_cache * c = s->caches; c && !busy; c = c->next) {
            for (uint32_t i = 0; i < c->n_tensors && !busy; i++) {
                busy = c->tensors[i].job != JOB_NONE && !dblade_pipeline_is_active(s, &c->tensors[i]);
            }
        }
        if (!busy) {
            break; // what is left is the layer computing: the plan's staging reserve covers it
        }
        pthread_cond_wait(&s->done, &s->lock);
    }
    dblade_stall_end(s, NULL, t0);
}

// how many direct layers ahead to stage: one when compute hides the I/O; when it does not, enough
// to keep DBLADE_IO_INFLIGHT bytes in flight; never more than the budget left after the pinned layers
static uint32_t pipeline_depth(struct dblade_session * s, uint64_t layer_bytes) {
    if (layer_bytes == 0) {
        return 1;
    }
    uint64_t d_mem = s->allowance / layer_bytes;
    d_mem          = d_mem > 1 ? d_mem - 1 : 1; // the current layer is staged too
    d_mem          = d_mem < DBLADE_MAX_DEPTH ? d_mem : DBLADE_MAX_DEPTH;
    uint32_t d     = 1;
    if (s->bw_ema > 0 && s->compute_ema_ns > 0) {
        const double io_ns = (double) layer_bytes / s->bw_ema;
        if (io_ns > 0.8 * s->compute_ema_ns) {
            const uint64_t fill = (DBLADE_IO_INFLIGHT + layer_bytes - 1) / layer_bytes;
            d                   = fill > 2 ? (uint32_t) fill : 2;
        }
    }
    return d < d_mem ? d : (uint32_t) d_mem;
}

// The graph moved to t's layer: the previous layer's attention is done. Apply a pending switch of
// this layer, retire every other staged layer but the next `depth` direct ones, and queue theirs.
void dblade_pipeline_enter(struct dblade_session * s, struct dblade_tensor * t) {
    struct dblade_tensor * tk = t->which ? t->pair : t;
    if (s->active == tk) {
        return;
    }
    const uint64_t now = dblade_now_ns();
    if (s->active) {
        s->active->succ = tk;
        // compute time of the previous layer: since it was entered, less what it waited for I/O
        const uint64_t span = now - s->last_enter_ns;
        if (span > s->stall_since_enter && span < 1000000000ull) {
            const double c    = (double) (span - s->stall_since_enter);
            s->compute_ema_ns = s->compute_ema_ns > 0 ? 0.9 * s->compute_ema_ns + 0.1 * c : c;
        }
    }
    s->last_enter_ns     = now;
    s->stall_since_enter = 0;
    if (s->config.policy == DBLADE_POLICY_AUTO && now >= s->next_sample_ns && worker_start(s)) {
        s->next_sample_ns = now + DBLADE_MONITOR_PERIOD_NS;
        s->sample_due     = true; // the worker reads memory; the graph goes on
        pthread_cond_signal(&s->work);
    }
    dblade_layer_switch(s, tk);

    const struct dblade_tensor * tv          = tk->pair;
    const uint64_t               chunk       = s->staging.chunk;
    const uint64_t               layer_bytes = dblade_align_up(tk->hwm, chunk) + dblade_align_up(tv->hwm, chunk);
    const uint32_t               depth       = pipeline_depth(s, layer_bytes);
    s->depth                                 = depth;

    // the next direct layers, as the previous pass went
    struct dblade_tensor * ahead[DBLADE_MAX_DEPTH];
    uint32_t               n_ahead = 0;
    uint32_t               hops    = 0; // bounds a walk around a cycle that does not come back here
    for (struct dblade_tensor * k = tk->succ; k && k != tk && n_ahead < depth && hops < 1024; k = k->succ, hops++) {
        if (k->path == DBLADE_PATH_DIRECT && k->want == DBLADE_PATH_DIRECT) {
            ahead[n_ahead++] = k;
        }
    }
    for (uint32_t i = 0; i < n_ahead; i++) {
        dblade_path_direct.prefetch(s, ahead[i]);
        dblade_path_direct.prefetch(s, ahead[i]->pair);
    }
    for (struct dblade_cache * c = s->caches; c; c = c->next) {
        for (uint32_t i = 0; i < c->n_tensors; i++) {
            struct dblade_tensor * x    = &c->tensors[i];
            const struct dblade_tensor * xk = x->which ? x->pair : x;
            bool                   keep = xk == tk;
            for (uint32_t j = 0; j < n_ahead && !keep; j++) {
                keep = xk == ahead[j];
            }
            const struct dblade_path_ops * ops = dblade_path_ops(x->path);
            if (!keep && ops->release) {
                ops->release(s, x);
            }
        }
    }
    s->active = tk;
}

void dblade_session_quiesce(struct dblade_session * s) {
    pthread_mutex_lock(&s->lock);
    for (;;) {
        bool busy = s->q_head != NULL;
        for (struct dblade_cache * c = s->caches; c && !busy; c = c->next) {
            for (uint32_t i = 0; i < c->n_tensors && !busy; i++) {
                busy = c->tensors[i].job != JOB_NONE;
            }
        }
        if (!busy) {
            break;
        }
        pthread_cond_wait(&s->done, &s->lock);
    }
    pthread_mutex_unlock(&s->lock);
}
