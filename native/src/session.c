// Sessions and caches: which KV caches belong to which embedding object, their placement, and the
// counters the user sees.
//
// A session is created by the embedding program and bound to its thread while it creates a
// llama_context; every llama_kv_cache constructed meanwhile opens a cache handle on it (one for a
// plain model, two for an iSWA model). Caches hold a reference, so the session outlives whichever
// of the two sides lets go first.

#include "dualblade.h"
#include "internal.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

struct dblade_layer {
    struct dblade_layer_desc desc;
    uint32_t                 path;
    _Atomic uint64_t         bytes_read;
    _Atomic uint64_t         bytes_written;
    _Atomic uint64_t         io_wait_ns;
};

struct dblade_cache {
    struct dblade_session * session;
    struct dblade_cache *   next;
    uint32_t                n_layers;
    struct dblade_layer *   layers;
};

struct dblade_session {
    struct dblade_config config;
    char *               kv_dir;
    char *               kv_device;
    _Atomic int          refs;
    pthread_mutex_t      lock; // guards caches
    struct dblade_cache * caches;
};

static _Thread_local struct dblade_session * tls_bound;

int dblade_abi_version(void) {
    return DBLADE_ABI_VERSION;
}

static void session_unref(struct dblade_session * s) {
    if (atomic_fetch_sub(&s->refs, 1) == 1) {
        pthread_mutex_destroy(&s->lock);
        free(s->kv_dir);
        free(s->kv_device);
        free(s);
    }
}

int dblade_session_create(const struct dblade_config * cfg, struct dblade_session ** out) {
    if (!cfg || !out || cfg->policy > DBLADE_POLICY_AUTO || cfg->flags != 0 || cfg->budget_bytes == 0) {
        return -EINVAL;
    }
    struct dblade_session * s = calloc(1, sizeof(*s));
    if (!s) {
        return -ENOMEM;
    }
    s->config = *cfg;
    s->kv_dir    = cfg->kv_dir ? strdup(cfg->kv_dir) : NULL;
    s->kv_device = cfg->kv_device ? strdup(cfg->kv_device) : NULL;
    if ((cfg->kv_dir && !s->kv_dir) || (cfg->kv_device && !s->kv_device)) {
        free(s->kv_dir);
        free(s->kv_device);
        free(s);
        return -ENOMEM;
    }
    s->config.kv_dir    = s->kv_dir;
    s->config.kv_device = s->kv_device;
    atomic_init(&s->refs, 1);
    pthread_mutex_init(&s->lock, NULL);
    *out = s;
    return 0;
}

void dblade_session_release(struct dblade_session * s) {
    if (!s) {
        return;
    }
    if (tls_bound == s) {
        tls_bound = NULL;
    }
    session_unref(s);
}

int dblade_session_bind(struct dblade_session * s) {
    tls_bound = s;
    return 0;
}

int dblade_cache_open(const struct dblade_cache_desc * desc, struct dblade_cache ** out) {
    if (!desc || !out || (desc->n_layers > 0 && !desc->layers)) {
        return -EINVAL;
    }
    *out = NULL;
    struct dblade_session * s = tls_bound;
    if (!s) {
        return 0; // not ours: stock behaviour
    }

    struct dblade_cache * c = calloc(1, sizeof(*c));
    if (!c) {
        return -ENOMEM;
    }
    c->n_layers = desc->n_layers;
    c->layers   = calloc(desc->n_layers ? desc->n_layers : 1, sizeof(*c->layers));
    uint64_t * bytes = calloc(desc->n_layers ? desc->n_layers : 1, sizeof(*bytes));
    uint32_t * paths = calloc(desc->n_layers ? desc->n_layers : 1, sizeof(*paths));
    if (!c->layers || !bytes || !paths) {
        free(bytes);
        free(paths);
        free(c->layers);
        free(c);
        return -ENOMEM;
    }
    for (uint32_t i = 0; i < desc->n_layers; i++) {
        c->layers[i].desc = desc->layers[i];
        bytes[i] = desc->layers[i].k_bytes + desc->layers[i].v_bytes;
    }

    int rc = dblade_plan(s->config.policy, s->config.budget_bytes, desc->n_layers, bytes, paths, NULL);
    for (uint32_t i = 0; rc == 0 && i < desc->n_layers; i++) {
        // the storage paths arrive with the residency engine; until then refuse rather than pretend
        if (paths[i] != DBLADE_PATH_RAM) {
            rc = -EOPNOTSUPP;
        }
        c->layers[i].path = paths[i];
    }
    free(bytes);
    free(paths);
    if (rc != 0) {
        free(c->layers);
        free(c);
        return rc;
    }

    atomic_fetch_add(&s->refs, 1);
    c->session = s;
    pthread_mutex_lock(&s->lock);
    c->next   = s->caches;
    s->caches = c;
    pthread_mutex_unlock(&s->lock);
    *out = c;
    return 0;
}

void dblade_cache_close(struct dblade_cache * c) {
    if (!c) {
        return;
    }
    struct dblade_session * s = c->session;
    pthread_mutex_lock(&s->lock);
    for (struct dblade_cache ** p = &s->caches; *p; p = &(*p)->next) {
        if (*p == c) {
            *p = c->next;
            break;
        }
    }
    pthread_mutex_unlock(&s->lock);
    free(c->layers);
    free(c);
    session_unref(s);
}

static void layer_stats(const struct dblade_layer * l, struct dblade_layer_stats * o) {
    o->il             = l->desc.il;
    o->path           = l->path;
    o->bytes          = l->desc.k_bytes + l->desc.v_bytes;
    o->resident_bytes = l->path == DBLADE_PATH_RAM ? o->bytes : 0;
    o->bytes_read     = atomic_load(&l->bytes_read);
    o->bytes_written  = atomic_load(&l->bytes_written);
    o->io_wait_ns     = atomic_load(&l->io_wait_ns);
}

int dblade_session_stats(struct dblade_session * s, struct dblade_stats * out) {
    if (!s || !out) {
        return -EINVAL;
    }
    memset(out, 0, sizeof(*out));
    out->policy       = s->config.policy;
    out->budget_bytes = s->config.budget_bytes;
    pthread_mutex_lock(&s->lock);
    for (struct dblade_cache * c = s->caches; c; c = c->next) {
        for (uint32_t i = 0; i < c->n_layers; i++) {
            struct dblade_layer_stats ls;
            layer_stats(&c->layers[i], &ls);
            out->n_layers++;
            out->kv_bytes_total += ls.bytes;
            out->resident_bytes += ls.resident_bytes;
            out->bytes_read     += ls.bytes_read;
            out->bytes_written  += ls.bytes_written;
            out->io_wait_ns     += ls.io_wait_ns;
        }
    }
    pthread_mutex_unlock(&s->lock);
    return 0;
}

static int cmp_il(const void * a, const void * b) {
    const struct dblade_layer_stats * x = a;
    const struct dblade_layer_stats * y = b;
    return (x->il > y->il) - (x->il < y->il);
}

int dblade_session_layers(struct dblade_session * s, struct dblade_layer_stats * out, uint32_t cap) {
    if (!s || (cap > 0 && !out)) {
        return -EINVAL;
    }
    pthread_mutex_lock(&s->lock);
    uint32_t n = 0;
    for (struct dblade_cache * c = s->caches; c; c = c->next) {
        n += c->n_layers;
    }
    struct dblade_layer_stats * all = calloc(n ? n : 1, sizeof(*all));
    if (!all) {
        pthread_mutex_unlock(&s->lock);
        return -ENOMEM;
    }
    uint32_t k = 0;
    for (struct dblade_cache * c = s->caches; c; c = c->next) {
        for (uint32_t i = 0; i < c->n_layers; i++) {
            layer_stats(&c->layers[i], &all[k++]);
        }
    }
    pthread_mutex_unlock(&s->lock);
    qsort(all, n, sizeof(*all), cmp_il);
    memcpy(out, all, sizeof(*all) * (n < cap ? n : cap));
    free(all);
    return (int) n;
}
