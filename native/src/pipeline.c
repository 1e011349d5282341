// The pipeline: which layer the graph is at, what to bring in ahead of it, what to let go behind it.
//
// When the graph enters layer i (its first fence), the pipeline applies a pending switch of the
// layer (detach from one path, attach to the other: same address, same data), asks the paths of the
// next layers to prefetch them (as many as each path's lookahead wants; the order of layers is
// learned from the previous pass: graphs repeat it) and every other layer to release. The paths turn
// those into work for the worker. It also tells the auto policy that the graph is making progress,
// so that memory is sampled while it computes (never on the graph's thread).
//
// It owns the active layer, the learned order and the compute-time estimate; it calls the paths
// through their method table (path.h), the policy's tick and the events.

#define _GNU_SOURCE
#include "pipeline.h"

#include "base.h"
#include "events.h"
#include "policy.h"
#include "store.h"

#define MAX_AHEAD 8u

static struct dblade_tier * path_of(const struct dblade_pipeline * pl, const struct dblade_tensor * t) {
    return dblade_pipeline_path(pl, t->path);
}

// A pending switch of the layer of k (both tensors): the graph has not touched it yet.
static void layer_switch(struct dblade_pipeline * pl, struct dblade_tensor * k) {
    struct dblade_events * ev = pl->env->events;
    if (k->want == k->path || ev->error) {
        return;
    }
    const uint32_t       from = k->path, to = k->want;
    struct dblade_tier * a = dblade_pipeline_path(pl, from), * b = dblade_pipeline_path(pl, to);
    if (!a || !b) {
        k->want = k->pair->want = from; // no such path here: nothing to switch to
        return;
    }
    for (struct dblade_tensor * t = k; t; t = t == k ? k->pair : NULL) {
        int rc = a->ops->detach(a, t);
        if (rc == 0 && !ev->error) {
            t->path = to;
            rc      = b->ops->attach(b, t);
        }
        if (rc < 0 || ev->error) {
            dblade_fail(ev, rc, "%s", dblade_get_error()); // sticky: nothing is computed from the layer
            return;
        }
    }
    dblade_log_switch(ev, k->il, from, to, k->want_why);
}

// The graph moved to t's layer: the previous layer's attention is done. Apply a pending switch of this
// layer, keep it and the next ones the paths bring in ahead, release every other.
void dblade_pipeline_enter(struct dblade_pipeline * pl, struct dblade_tensor * t) {
    struct dblade_tensor * tk = t->which ? t->pair : t;
    if (pl->active == tk) {
        return;
    }
    struct dblade_path_env * env = pl->env;
    const uint64_t           now = dblade_now_ns();
    if (pl->active) {
        pl->active->succ = tk;
        // compute time of the previous layer: since it was entered, less what it waited for I/O
        const uint64_t span  = now - pl->last_enter_ns;
        const uint64_t stall = env->events->stall_ns;
        if (span > stall && span < 1000000000ull) {
            const double c      = (double) (span - stall);
            env->compute_ema_ns = env->compute_ema_ns > 0 ? 0.9 * env->compute_ema_ns + 0.1 * c : c;
        }
    }
    pl->last_enter_ns     = now;
    env->events->stall_ns = 0;
    if (pl->policy) {
        dblade_policy_tick(pl->policy, now);
    }
    layer_switch(pl, tk);

    // how many layers each path brings in ahead, from this one
    uint32_t want[3] = { 0, 0, 0 }, total = 0;
    for (uint32_t p = 0; p < 3; p++) {
        struct dblade_tier * path = pl->paths[p];
        if (path && path->ops->lookahead && path->ops->prefetch) {
            want[p] = path->ops->lookahead(path, tk);
            total += want[p];
        }
    }
    // the next such layers, as the previous pass went
    struct dblade_tensor * ahead[MAX_AHEAD];
    uint32_t               n_ahead = 0, taken[3] = { 0, 0, 0 };
    uint32_t               hops    = 0; // bounds a walk around a cycle that does not come back here
    // (a layer streamed into VRAM is not: the VRAM tier brings it in from its path, the host never reads it)
    for (struct dblade_tensor * k = tk->succ; k && k != tk && n_ahead < total && n_ahead < MAX_AHEAD && hops < 1024;
         k = k->succ, hops++) {
        if (!k->dev && k->path < 3 && k->want == k->path && taken[k->path] < want[k->path]) {
            taken[k->path]++;
            ahead[n_ahead++] = k;
        }
    }
    for (uint32_t i = 0; i < n_ahead; i++) {
        struct dblade_tier * p = path_of(pl, ahead[i]);
        p->ops->prefetch(p, ahead[i]);
        p->ops->prefetch(p, ahead[i]->pair);
    }
    for (struct dblade_cache * c = *pl->caches; c; c = c->next) {
        for (uint32_t i = 0; i < c->n_tensors; i++) {
            struct dblade_tensor *       x    = &c->tensors[i];
            const struct dblade_tensor * xk   = x->which ? x->pair : x;
            bool                         keep = xk == tk;
            for (uint32_t j = 0; j < n_ahead && !keep; j++) {
                keep = xk == ahead[j];
            }
            struct dblade_tier * p = path_of(pl, x);
            if (!keep && p && p->ops->release) {
                p->ops->release(p, x);
            }
        }
    }
    pl->active  = tk;
    env->active = tk;
}

void dblade_pipeline_take_rows(struct dblade_pipeline * pl, struct dblade_tensor * t, uint64_t lo, uint64_t hi) {
    dblade_pipeline_enter(pl, t);
    struct dblade_tier * p = path_of(pl, t);
    if (p && p->ops->take_rows) {
        p->ops->take_rows(p, t, lo, hi);
    }
    t->hwm = hi > t->hwm ? hi : t->hwm;
    dblade_tensor_changed(t, lo, hi);
    // what a wipe covers
    dblade_store_touch(pl->env->store, t->store_off + dblade_align_up(hi, pl->env->store->align));
    dblade_gate_unblock(&pl->env->events->gate);
}

void dblade_pipeline_make_resident(struct dblade_pipeline * pl, struct dblade_tensor * t, uint64_t need) {
    dblade_pipeline_enter(pl, t);
    struct dblade_tier * p = path_of(pl, t);
    if (p && p->ops->make_resident) {
        p->ops->make_resident(p, t, need);
    }
    dblade_gate_unblock(&pl->env->events->gate);
}

void dblade_pipeline_store_rows(struct dblade_pipeline * pl, struct dblade_tensor * t, uint64_t lo, uint64_t hi,
                                const uint8_t * src, uint64_t src_lo) {
    t->hwm = hi > t->hwm ? hi : t->hwm;
    dblade_tensor_changed(t, lo, hi);
    dblade_store_touch(pl->env->store, t->store_off + dblade_align_up(hi, pl->env->store->align));
    struct dblade_tier * p = path_of(pl, t);
    if (p && p->ops->store_from) {
        p->ops->store_from(p, t, lo, hi, src, src_lo);
    }
}

void dblade_pipeline_leave(struct dblade_pipeline * pl) {
    pl->active      = NULL;
    pl->env->active = NULL;
}

void dblade_pipeline_forget(struct dblade_pipeline * pl, const struct dblade_cache * c) {
    for (struct dblade_cache * o = *pl->caches; o; o = o->next) {
        for (uint32_t i = 0; i < o->n_tensors; i++) {
            if (o->tensors[i].succ && o->tensors[i].succ->cache == c) {
                o->tensors[i].succ = NULL;
            }
        }
    }
    if (pl->active && pl->active->cache == c) {
        dblade_pipeline_leave(pl);
    }
}
