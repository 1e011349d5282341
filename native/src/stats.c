// Statistics: a KV object's counters and every layer's placement, as one snapshot.
//
// It owns nothing; it reads the KV object under its lock (the worker keeps staging and writing back
// between two calls), asks each tensor's path what it holds, and the direct path, the policy and the
// VRAM tier for their counters.

#define _GNU_SOURCE
#include "kv.h"

#include "base.h"
#include "direct/direct.h"
#include "policy.h"
#include "shape.h"
#include "store.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t resident(const struct dblade_kv * kv, const struct dblade_tensor * t) {
    struct dblade_tier * p = dblade_kv_path(kv, t);
    return p && p->ops->resident ? p->ops->resident(p, t) : 0;
}

static void layer_stats(const struct dblade_kv * kv, const struct dblade_tensor * k, struct dblade_layer_stats * o) {
    const struct dblade_tensor * v = k->pair;
    o->il                          = k->il;
    o->path                        = k->path;
    o->bytes                       = k->bytes + v->bytes;
    o->resident_bytes              = resident(kv, k) + resident(kv, v);
    if (o->resident_bytes > o->bytes) {
        o->resident_bytes = o->bytes;
    }
    o->bytes_read    = atomic_load(&k->bytes_read) + atomic_load(&v->bytes_read);
    o->bytes_written = atomic_load(&k->bytes_written) + atomic_load(&v->bytes_written);
    o->io_wait_ns    = atomic_load(&k->io_wait_ns) + atomic_load(&v->io_wait_ns);
    o->flags         = k->dev ? DBLADE_LAYOUT_STREAMED : 0;
}

static int cmp_il(const void * a, const void * b) {
    const struct dblade_layer_stats * x = a;
    const struct dblade_layer_stats * y = b;
    return (x->il > y->il) - (x->il < y->il);
}

int dblade_kv_snapshot(struct dblade_kv * kv, struct dblade_stats * out, struct dblade_layer_stats * layers,
                       uint32_t cap) {
    if (!kv || !out || (cap > 0 && !layers)) {
        return -EINVAL;
    }
    memset(out, 0, sizeof(*out));
    out->policy       = kv->config.policy;
    out->budget_bytes = kv->config.budget_bytes;
    pthread_mutex_lock(&kv->lock);
    uint32_t n = 0;
    for (struct dblade_cache * c = kv->caches; c; c = c->next) {
        n += c->n_tensors / 2;
    }
    struct dblade_layer_stats * all = calloc(n ? n : 1, sizeof(*all));
    if (!all) {
        pthread_mutex_unlock(&kv->lock);
        return -ENOMEM;
    }
    out->n_switches    = kv->events.n_switches;
    out->n_io_errors   = kv->events.n_io_errors;
    out->reserve_bytes = kv->config.reserve_bytes;
    out->mem_limit     = UINT64_MAX;
    snprintf(out->io_engine_why, sizeof(out->io_engine_why), "%s", "");
    if (kv->policy) {
        struct dblade_policy_stats ps;
        dblade_policy_stats(kv->policy, &ps);
        out->mem_limit       = ps.mem_limit;
        out->mem_available   = ps.mem_available;
        out->page_cache_room = ps.page_cache_room;
        out->page_cache_need = ps.page_cache_need;
    }
    if (kv->direct) {
        struct dblade_direct_stats ds;
        dblade_direct_stats(kv->direct, &ds);
        out->io_engine = ds.io_engine;
        snprintf(out->io_engine_why, sizeof(out->io_engine_why), "%s", ds.io_engine_why);
        out->depth           = ds.depth;
        out->chunk_bytes     = ds.chunk_bytes;
        out->huge_page_bytes = ds.huge_pages ? DBLADE_HUGE_PAGE : 0;
        out->staged_bytes    = ds.staged_bytes;
        out->staged_peak     = ds.staged_peak;
        out->pool_bytes      = ds.pool_bytes;
        out->pool_moves      = ds.pool_moves;
    }
    if (kv->store.shape) {
        struct dblade_io_shape_report r;
        dblade_io_shape_report(kv->store.shape, &r);
        out->io_chunk_bytes = r.chunk;
        out->io_depth       = r.depth;
        out->io_shape_fixed = (uint32_t) r.fixed;
        for (uint32_t i = 0; i < r.n && i < sizeof(out->io_shapes) / sizeof(out->io_shapes[0]); i++) {
            out->io_shapes[out->io_n_shapes++] = (struct dblade_io_shape_stats) {
                r.rates[i].chunk, r.rates[i].depth, r.rates[i].batches, r.rates[i].gib_s
            };
        }
    }
    dblade_vram_stats(kv->vram, out);
    for (struct dblade_cache * c = kv->caches; c; c = c->next) {
        for (uint32_t i = 0; i + 1 < c->n_tensors; i += 2) {
            struct dblade_layer_stats * ls = &all[out->n_layers++];
            layer_stats(kv, &c->tensors[i], ls);
            for (uint32_t w = 0; w < 2; w++) {
                if (c->tensors[i + w].sums) {
                    out->checksum_bytes += c->tensors[i + w].map_bytes / DBLADE_BLOCK * sizeof(uint32_t);
                }
            }
            out->kv_bytes_total += ls->bytes;
            out->resident_bytes += ls->resident_bytes;
            out->bytes_read     += ls->bytes_read;
            out->bytes_written  += ls->bytes_written;
            out->io_wait_ns     += ls->io_wait_ns;
        }
    }
    pthread_mutex_unlock(&kv->lock);
    qsort(all, n, sizeof(*all), cmp_il);
    if (cap > 0) {
        memcpy(layers, all, sizeof(*all) * (n < cap ? n : cap));
    }
    free(all);
    return (int) n;
}

uint64_t dblade_kv_bytes_read(struct dblade_kv * kv) {
    uint64_t n = 0;
    pthread_mutex_lock(&kv->lock);
    for (struct dblade_cache * c = kv->caches; c; c = c->next) {
        for (uint32_t i = 0; i < c->n_tensors; i++) {
            n += atomic_load(&c->tensors[i].bytes_read);
        }
    }
    pthread_mutex_unlock(&kv->lock);
    return n;
}

int dblade_kv_stats(struct dblade_kv * kv, struct dblade_stats * out) {
    const int n = dblade_kv_snapshot(kv, out, NULL, 0);
    return n < 0 ? n : 0;
}

int dblade_kv_layers(struct dblade_kv * kv, struct dblade_layer_stats * out, uint32_t cap) {
    struct dblade_stats st;
    return dblade_kv_snapshot(kv, &st, out, cap);
}

int dblade_kv_switches(struct dblade_kv * kv, struct dblade_switch * out, uint32_t cap) {
    if (!kv || (cap > 0 && !out)) {
        return -EINVAL;
    }
    pthread_mutex_lock(&kv->lock);
    const uint64_t n     = kv->events.n_switches;
    const uint64_t kept  = n < DBLADE_SWITCH_LOG ? n : DBLADE_SWITCH_LOG;
    const uint64_t first = n - kept;
    for (uint64_t i = 0; i < kept && i < cap; i++) {
        out[i] = kv->events.switches[(first + i) % DBLADE_SWITCH_LOG];
    }
    pthread_mutex_unlock(&kv->lock);
    return (int) (n > INT32_MAX ? INT32_MAX : n);
}
