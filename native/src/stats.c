// Statistics: the session's counters and every layer's placement, as one snapshot.
//
// It owns nothing; it reads the session under its lock (the worker keeps staging and writing back
// between two calls) and asks each tensor's path what it holds.

#define _GNU_SOURCE
#include "residency.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void layer_stats(const struct dblade_tensor * k, struct dblade_layer_stats * o) {
    const struct dblade_tensor * v = k->pair;
    o->il                          = k->il;
    o->path                        = k->path;
    o->bytes                       = k->bytes + v->bytes;
    o->resident_bytes = dblade_path_ops(k->path)->resident(k) + dblade_path_ops(v->path)->resident(v);
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

int dblade_session_snapshot(struct dblade_session * s, struct dblade_stats * out, struct dblade_layer_stats * layers,
                            uint32_t cap) {
    if (!s || !out || (cap > 0 && !layers)) {
        return -EINVAL;
    }
    memset(out, 0, sizeof(*out));
    out->policy       = s->config.policy;
    out->budget_bytes = s->config.budget_bytes;
    pthread_mutex_lock(&s->lock);
    uint32_t n = 0;
    for (struct dblade_cache * c = s->caches; c; c = c->next) {
        n += c->n_tensors / 2;
    }
    struct dblade_layer_stats * all = calloc(n ? n : 1, sizeof(*all));
    if (!all) {
        pthread_mutex_unlock(&s->lock);
        return -ENOMEM;
    }
    out->io_engine = (uint32_t) dblade_io_kind(s->io);
    snprintf(out->io_engine_why, sizeof(out->io_engine_why), "%s", dblade_io_why(s->io));
    out->depth           = s->depth;
    out->n_switches      = s->n_switches;
    out->mem_limit       = s->last_sample.t_ns ? s->last_sample.cg_limit : UINT64_MAX;
    out->mem_available   = s->last_sample.t_ns ? s->last_sample.mem_available : 0;
    out->page_cache_room = s->auto_state.cap_bytes;
    out->page_cache_need = s->auto_state.need_bytes;
    out->reserve_bytes   = s->config.reserve_bytes;
    out->chunk_bytes     = s->n_offloaded > 0 ? s->staging.chunk : 0;
    out->huge_page_bytes = s->n_offloaded > 0 && s->thp && s->staging.chunk == DBLADE_HUGE_PAGE ? DBLADE_HUGE_PAGE : 0;
    out->n_io_errors     = s->n_io_errors;
    out->staged_bytes    = s->staged_bytes;
    out->staged_peak     = s->staged_peak;
    pthread_mutex_lock(&s->staging.lock);
    out->pool_bytes      = s->staging.populated;
    out->pool_moves      = s->staging.moves && s->staging.n_slots > 0;
    pthread_mutex_unlock(&s->staging.lock);
    dblade_vram_stats(s, out);
    for (struct dblade_cache * c = s->caches; c; c = c->next) {
        for (uint32_t i = 0; i + 1 < c->n_tensors; i += 2) {
            struct dblade_layer_stats * ls = &all[out->n_layers++];
            layer_stats(&c->tensors[i], ls);
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
    pthread_mutex_unlock(&s->lock);
    qsort(all, n, sizeof(*all), cmp_il);
    if (cap > 0) {
        memcpy(layers, all, sizeof(*all) * (n < cap ? n : cap));
    }
    free(all);
    return (int) n;
}

int dblade_session_stats(struct dblade_session * s, struct dblade_stats * out) {
    const int n = dblade_session_snapshot(s, out, NULL, 0);
    return n < 0 ? n : 0;
}

int dblade_session_layers(struct dblade_session * s, struct dblade_layer_stats * out, uint32_t cap) {
    struct dblade_stats st;
    return dblade_session_snapshot(s, &st, out, cap);
}

int dblade_session_switches(struct dblade_session * s, struct dblade_switch * out, uint32_t cap) {
    if (!s || (cap > 0 && !out)) {
        return -EINVAL;
    }
    pthread_mutex_lock(&s->lock);
    const uint64_t n     = s->n_switches;
    const uint64_t kept  = n < DBLADE_SWITCH_LOG ? n : DBLADE_SWITCH_LOG;
    const uint64_t first = n - kept;
    for (uint64_t i = 0; i < kept && i < cap; i++) {
        out[i] = s->switches[(first + i) % DBLADE_SWITCH_LOG];
    }
    pthread_mutex_unlock(&s->lock);
    return (int) (n > INT32_MAX ? INT32_MAX : n);
}
