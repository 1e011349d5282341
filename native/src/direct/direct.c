// The direct path of a KV object: set up (the staging pool sized from the layers and the allowance,
// the two I/O engines on the store), reported on, trimmed and taken down. direct/direct-impl.h says
// what each part of direct/ owns.

#define _GNU_SOURCE
#include "direct-impl.h"

#include "../plan.h"
#include "../store.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

// The staging pool: chunks as large as the budget allows (a huge page where it holds two offloaded
// layers rounded up to huge pages: the layer in use and the one being prefetched; no larger than the
// largest tensor), as many as the allowance holds once every tensor's tail page is set aside, no more
// than the offloaded layers could ever stage.
static int staging_open(struct dblade_direct * d, const struct dblade_direct_extent * layers, uint32_t n,
                        uint64_t allowance, bool thp) {
    const uint64_t page = (uint64_t) sysconf(_SC_PAGESIZE);
    uint64_t       chunk = page, largest = 0; // no chunk larger than the largest tensor needs
    for (uint32_t i = 0; i < n; i++) {
        largest = layers[i].k_bytes > largest ? layers[i].k_bytes : largest;
        largest = layers[i].v_bytes > largest ? layers[i].v_bytes : largest;
    }
    uint64_t top = page;
    while (top < largest && top < DBLADE_HUGE_PAGE) {
        top *= 2;
    }
    for (uint64_t c = top; c > page; c /= 2) {
        uint64_t max_layer = 0;
        for (uint32_t i = 0; i < n; i++) {
            const uint64_t fp = dblade_align_up(layers[i].k_bytes, c) + dblade_align_up(layers[i].v_bytes, c);
            max_layer         = fp > max_layer ? fp : max_layer;
        }
        if (allowance >= dblade_plan_staging(max_layer, n)) {
            chunk = c;
            break;
        }
    }
    uint64_t all = 0;
    for (uint32_t i = 0; i < n; i++) {
        all += dblade_align_up(layers[i].k_bytes, chunk) + dblade_align_up(layers[i].v_bytes, chunk);
    }
    const uint64_t tails = (uint64_t) n * 2 * page;
    uint64_t       pool  = allowance > tails ? allowance - tails : 0;
    pool                 = pool < all ? pool : all;
    return dblade_staging_init(&d->staging, chunk, pool, thp && chunk == DBLADE_HUGE_PAGE);
}

int dblade_direct_open(struct dblade_tier ** out, struct dblade_path_env * env, struct dblade_worker * worker,
                       const struct dblade_direct_extent * layers, uint32_t n_layers, uint64_t allowance) {
    struct dblade_direct * d = calloc(1, sizeof(*d));
    if (!d) {
        return -ENOMEM;
    }
    d->base.ops  = &dblade_direct_ops;
    d->base.env  = env;
    d->worker    = worker;
    d->work.run  = dblade_direct_run_batch;
    d->allowance = allowance;
    pthread_mutex_init(&d->staging.lock, NULL);
    int rc = staging_open(d, layers, n_layers, allowance, env->thp);
    if (rc < 0) {
        dblade_set_error("cannot reserve the staging memory: %s", strerror(-rc));
    }
    if (rc == 0 && env->store->n > 0) {
        rc = dblade_io_open_map(&d->io, &env->store->map);
        if (rc == 0) {
            rc = dblade_io_open_map(&d->io_now, &env->store->map);
        }
        if (rc == 0) {
            dblade_io_tune(d->io, env->store->shape);
            dblade_io_tune(d->io_now, env->store->shape);
        }
    }
    if (rc < 0) {
        dblade_direct_close(&d->base);
        return rc;
    }
    *out = &d->base;
    return 0;
}

void dblade_direct_close(struct dblade_tier * p) {
    struct dblade_direct * d = direct_of(p);
    if (!d) {
        return;
    }
    dblade_io_close(d->io);
    dblade_io_close(d->io_now);
    dblade_staging_destroy(&d->staging);
    free(d);
}

void dblade_direct_stats(struct dblade_tier * p, struct dblade_direct_stats * out) {
    struct dblade_direct * d = direct_of(p);
    memset(out, 0, sizeof(*out));
    out->io_engine     = (uint32_t) dblade_io_kind(d->io);
    out->io_engine_why = dblade_io_why(d->io);
    out->depth         = d->depth;
    out->chunk_bytes   = d->staging.chunk;
    out->huge_pages    = p->env->thp && d->staging.chunk == DBLADE_HUGE_PAGE;
    out->staged_bytes  = d->staged_bytes;
    out->staged_peak   = d->staged_peak;
    pthread_mutex_lock(&d->staging.lock);
    out->pool_bytes = d->staging.populated;
    out->pool_moves = d->staging.moves && d->staging.n_slots > 0;
    pthread_mutex_unlock(&d->staging.lock);
}

uint64_t dblade_direct_trim(struct dblade_tier * p) {
    return dblade_staging_trim(&direct_of(p)->staging);
}

uint64_t dblade_direct_unheld(struct dblade_tier * p) {
    struct dblade_direct * d = direct_of(p);
    if (d->allowance == UINT64_MAX) {
        return 0;
    }
    pthread_mutex_lock(&d->staging.lock);
    const uint64_t pool = d->staging.populated;
    pthread_mutex_unlock(&d->staging.lock);
    const uint64_t held = pool > d->staged_bytes ? pool : d->staged_bytes;
    return d->allowance > held ? d->allowance - held : 0;
}

void dblade_direct_quiesce(struct dblade_tier * p) {
    struct dblade_direct * d = direct_of(p);
    pthread_mutex_lock(p->env->lock);
    for (;;) {
        bool busy = d->q_head != NULL;
        for (struct dblade_tensor * x = d->members; x && !busy; x = x->direct->member_next) {
            busy = x->direct->job != JOB_NONE;
        }
        if (!busy) {
            break;
        }
        dblade_worker_wait(d->worker);
    }
    pthread_mutex_unlock(p->env->lock);
}
