// Sessions: what one llama_context's KV caches belong to, and their lifetime.
//
// A session is created by the embedding program with a layout (a path per layer) and bound to its
// thread while it creates a llama_context; every llama_kv_cache constructed meanwhile opens a cache
// on it (cache.c; one for a plain model, two for an iSWA model). Caches hold a reference, so the
// session outlives whichever side lets go first.
//
// This file owns: the configuration, the store's extents (one per offloaded tensor, laid out here),
// the store and the two I/O engines, the staging pool's size, the sticky I/O error, the switch log,
// and the calls that act on the whole session (flush, wipe, set_path). It calls the paths through
// their interface (residency.h) and starts the pipeline and the policy; nothing calls back into it
// but for the helpers residency.h declares.

#define _GNU_SOURCE
#include "residency.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static _Thread_local struct dblade_session * tls_bound;

int dblade_abi_version(void) {
    return DBLADE_ABI_VERSION;
}

struct dblade_session * dblade_session_bound(void) {
    return tls_bound;
}

void dblade_session_unref(struct dblade_session * s) {
    if (atomic_fetch_sub(&s->refs, 1) != 1) {
        return;
    }
    dblade_pipeline_stop(s);
    dblade_vram_destroy(s);
    pthread_cond_destroy(&s->work);
    pthread_cond_destroy(&s->done);
    dblade_io_close(s->io);
    dblade_io_close(s->io_now);
    dblade_store_close(&s->store);
    dblade_staging_destroy(&s->staging);
    free(s->auto_layers);
    pthread_mutex_destroy(&s->lock);
    free(s->layout);
    free(s->kv_dir);
    free(s->kv_device);
    free(s);
}

uint64_t dblade_layout_geometry(uint32_t n, const struct dblade_layout_layer * layers) {
    uint32_t h = 0x9E3779B9u;
    uint64_t g = 0;
    for (uint32_t i = 0; i < n; i++) {
        const uint64_t rec[3] = { (uint64_t) (uint32_t) layers[i].il, layers[i].k_bytes, layers[i].v_bytes };
        h = dblade_crc32c(rec, sizeof(rec)) ^ (h * 31u);
        g = g * 1000003u + h;
    }
    return g ^ n;
}

// The offloaded layers' extents of the store, in layer order: each K and V on a huge-page boundary,
// so that the page-cache path can map a file's large folios with huge pages (the tensors' addresses
// are huge-page aligned too). Returns where the next one starts (the store's size after the last).
static uint64_t extents(struct layout_entry * e, uint64_t cursor) {
    e->k_off = cursor;
    cursor += dblade_align_up(e->l.k_bytes, DBLADE_HUGE_PAGE);
    e->v_off = cursor;
    return cursor + dblade_align_up(e->l.v_bytes, DBLADE_HUGE_PAGE);
}

int dblade_store_check(const struct dblade_config * cfg, uint32_t n_layers, const struct dblade_layout_layer * layers,
                       char * msg, size_t cap) {
    dblade_set_error("%s", "");
    uint64_t data = 0;
    for (uint32_t i = 0; i < n_layers; i++) {
        struct layout_entry e = { .l = layers[i] };
        data                  = dblade_path_offloaded(layers[i].path) ? extents(&e, data) : data;
    }
    struct dblade_store st = { .fd = -1 };
    const int rc = dblade_store_open(&st, cfg, data, dblade_layout_geometry(n_layers, layers), true);
    if (rc == 0) {
        dblade_store_close(&st);
    } else if (msg && cap) {
        snprintf(msg, cap, "%s", dblade_get_error());
    }
    return rc;
}

// transparent huge pages, unless the kernel says "never" or DUALBLADE_HUGE_PAGES=0
static bool thp_available(void) {
    const char * env = getenv("DUALBLADE_HUGE_PAGES");
    if (env && !strcmp(env, "0")) {
        return false;
    }
    char buf[128] = "";
    FILE * f      = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
    if (!f) {
        return false;
    }
    const bool ok = fgets(buf, sizeof(buf), f) && !strstr(buf, "[never]");
    fclose(f);
    return ok;
}

// The staging pool: chunks as large as the budget allows (a huge page where it holds two offloaded
// layers rounded up to huge pages: the layer in use and the one being prefetched; no larger than
// the largest tensor), as many as the
// allowance holds once every tensor's tail page is set aside, no more than the offloaded layers
// could ever stage.
static int staging_open(struct dblade_session * s) {
    const uint64_t page = (uint64_t) sysconf(_SC_PAGESIZE);
    uint64_t       chunk = page, largest = 0; // no chunk larger than the largest tensor needs
    for (uint32_t i = 0; i < s->n_layout; i++) {
        const struct layout_entry * e = &s->layout[i];
        if (dblade_path_offloaded(e->l.path)) {
            largest = e->l.k_bytes > largest ? e->l.k_bytes : largest;
            largest = e->l.v_bytes > largest ? e->l.v_bytes : largest;
        }
    }
    uint64_t top = page;
    while (top < largest && top < DBLADE_HUGE_PAGE) {
        top *= 2;
    }
    for (uint64_t c = top; c > page; c /= 2) {
        uint64_t max_layer = 0;
        for (uint32_t i = 0; i < s->n_layout; i++) {
            const struct layout_entry * e = &s->layout[i];
            if (dblade_path_offloaded(e->l.path)) {
                const uint64_t fp = dblade_align_up(e->l.k_bytes, c) + dblade_align_up(e->l.v_bytes, c);
                max_layer         = fp > max_layer ? fp : max_layer;
            }
        }
        if (s->allowance >= dblade_staging_bytes(max_layer, s->n_offloaded)) {
            chunk = c;
            break;
        }
    }
    uint64_t all = 0;
    for (uint32_t i = 0; i < s->n_layout; i++) {
        const struct layout_entry * e = &s->layout[i];
        if (dblade_path_offloaded(e->l.path)) {
            all += dblade_align_up(e->l.k_bytes, chunk) + dblade_align_up(e->l.v_bytes, chunk);
        }
    }
    const uint64_t tails = (uint64_t) s->n_offloaded * 2 * page;
    uint64_t       pool  = s->allowance > tails ? s->allowance - tails : 0;
    pool                 = pool < all ? pool : all;
    return dblade_staging_init(&s->staging, chunk, pool, s->thp && chunk == DBLADE_HUGE_PAGE);
}

int dblade_session_create(const struct dblade_config * cfg, uint32_t n_layers,
                          const struct dblade_layout_layer * layers, struct dblade_session ** out) {
    dblade_set_error("%s", "");
    if (!cfg || !out || cfg->policy > DBLADE_POLICY_AUTO ||
        (cfg->flags & ~(uint32_t) (DBLADE_CONFIG_FORCE | DBLADE_CONFIG_NO_VERIFY)) ||
        cfg->budget_bytes == 0 || (n_layers > 0 && !layers)) {
        dblade_set_error("invalid session configuration");
        return -EINVAL;
    }
    struct dblade_session * s = calloc(1, sizeof(*s));
    if (!s) {
        return -ENOMEM;
    }
    s->store.fd  = -1;
    s->config    = *cfg;
    s->kv_dir    = cfg->kv_dir ? strdup(cfg->kv_dir) : NULL;
    s->kv_device = cfg->kv_device ? strdup(cfg->kv_device) : NULL;
    s->layout    = calloc(n_layers ? n_layers : 1, sizeof(*s->layout));
    atomic_init(&s->refs, 1);
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->work, NULL);
    pthread_cond_init(&s->done, NULL);
    pthread_mutex_init(&s->staging.lock, NULL);
    s->t0_ns       = dblade_now_ns();
    s->auto_layers = calloc(n_layers ? n_layers : 1, sizeof(*s->auto_layers));
    if ((cfg->kv_dir && !s->kv_dir) || (cfg->kv_device && !s->kv_device) || !s->layout || !s->auto_layers) {
        dblade_session_unref(s);
        return -ENOMEM;
    }
    s->config.kv_dir    = s->kv_dir;
    s->config.kv_device = s->kv_device;

    uint64_t cursor = 0, pinned = 0;
    for (uint32_t i = 0; i < n_layers; i++) {
        struct layout_entry * e = &s->layout[i];
        e->l = layers[i];
        if (e->l.path > DBLADE_PATH_VRAM || (e->l.flags & ~(uint32_t) DBLADE_LAYOUT_STREAMED) ||
            (e->l.path == DBLADE_PATH_VRAM && e->l.flags)) {
            dblade_set_error("invalid path %u (flags %#x) for layer %d", e->l.path, e->l.flags, e->l.il);
            dblade_session_unref(s);
            return -EINVAL;
        }
        if (e->l.path == DBLADE_PATH_RAM) {
            pinned += e->l.k_bytes + e->l.v_bytes;
        } else if (e->l.path != DBLADE_PATH_VRAM) {
            s->n_offloaded++;
            cursor = extents(e, cursor);
        }
    }
    s->n_layout  = n_layers;
    s->allowance = cfg->budget_bytes == DBLADE_BUDGET_UNLIMITED ? UINT64_MAX
                   : cfg->budget_bytes > pinned                 ? cfg->budget_bytes - pinned
                                                                : 0;
    s->thp = thp_available();
    int rc = staging_open(s);
    if (rc < 0) {
        dblade_set_error("cannot reserve the staging memory: %s", strerror(-rc));
        dblade_session_unref(s);
        return rc;
    }
    if (cursor > 0) {
        rc = dblade_store_open(&s->store, &s->config, cursor, dblade_layout_geometry(n_layers, layers), false);
        if (rc == 0) {
            rc = dblade_io_open(&s->io, s->store.fd);
        }
        if (rc == 0) {
            rc = dblade_io_open(&s->io_now, s->store.fd);
        }
        if (rc < 0) {
            dblade_session_unref(s);
            return rc;
        }
    }
    if (cfg->policy == DBLADE_POLICY_AUTO && s->n_offloaded > 0) {
        dblade_policy_start(s);
    }
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
    dblade_session_unref(s);
}

int dblade_session_bind(struct dblade_session * s) {
    tls_bound = s;
    return 0;
}

struct dblade_session * dblade_session_current(void) {
    if (tls_bound) {
        atomic_fetch_add(&tls_bound->refs, 1);
    }
    return tls_bound;
}

void dblade_session_put(struct dblade_session * s) {
    if (s) {
        dblade_session_unref(s);
    }
}

int dblade_session_streams(struct dblade_session * s) {
    for (uint32_t i = 0; s && i < s->n_layout; i++) {
        if (s->layout[i].l.flags & DBLADE_LAYOUT_STREAMED) {
            return 1;
        }
    }
    return 0;
}

int dblade_session_set_reserve(struct dblade_session * s, uint64_t reserve_bytes) {
    if (!s) {
        return -EINVAL;
    }
    pthread_mutex_lock(&s->lock);
    s->config.reserve_bytes = reserve_bytes;
    pthread_mutex_unlock(&s->lock);
    return 0;
}

void dblade_fail(struct dblade_session * s, int rc, const char * fmt, ...) {
    if (s->error == 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(s->error_msg, sizeof(s->error_msg), fmt, ap);
        va_end(ap);
        s->error = rc;
    }
}

uint64_t dblade_stall_begin(struct dblade_session * s) {
    dblade_gate_block(&s->gate);
    return dblade_now_ns();
}

void dblade_stall_end(struct dblade_session * s, struct dblade_tensor * t, uint64_t t0) {
    dblade_gate_unblock(&s->gate); // the other compute threads wake while this one finishes the fence
    const uint64_t dt = dblade_now_ns() - t0;
    if (t) {
        atomic_fetch_add(&t->io_wait_ns, dt);
    }
    s->stall_since_enter += dt;
}

void dblade_log_switch(struct dblade_session * s, int32_t il, uint32_t from, uint32_t to, const char * why) {
    struct dblade_switch * e = &s->switches[s->n_switches % DBLADE_SWITCH_LOG];
    e->t_ms                  = (dblade_now_ns() - s->t0_ns) / 1000000u;
    e->il                    = il;
    e->from                  = from;
    e->to                    = to;
    snprintf(e->reason, sizeof(e->reason), "%s", why);
    s->n_switches++;
}

int dblade_session_flush(struct dblade_session * s) {
    if (!s) {
        return -EINVAL;
    }
    dblade_vram_settle(s, true); // the last streamed layer's rows first
    pthread_mutex_lock(&s->lock);
    // everything to the store, tails too: what save_state and close rely on
    for (struct dblade_cache * c = s->caches; c; c = c->next) {
        for (uint32_t i = 0; i < c->n_tensors; i++) {
            struct dblade_tensor * t = &c->tensors[i];
            const struct dblade_path_ops * ops = dblade_path_ops(t->path);
            if (ops->flush) {
                ops->flush(s, t);
            }
        }
    }
    s->active    = NULL;
    const int rc = s->error;
    pthread_mutex_unlock(&s->lock);
    return rc;
}

int64_t dblade_session_trim(struct dblade_session * s) {
    if (!s) {
        return -EINVAL;
    }
    const int rc = dblade_session_flush(s);
    return rc < 0 ? rc : (int64_t) dblade_staging_trim(&s->staging);
}

int dblade_session_error(struct dblade_session * s, char * msg, size_t cap) {
    if (!s) {
        return -EINVAL;
    }
    pthread_mutex_lock(&s->lock);
    const int rc = s->error;
    if (msg && cap) {
        snprintf(msg, cap, "%s", s->error_msg);
    }
    pthread_mutex_unlock(&s->lock);
    return rc;
}

int dblade_session_clear_error(struct dblade_session * s) {
    if (!s) {
        return -EINVAL;
    }
    pthread_mutex_lock(&s->lock);
    s->error        = 0;
    s->error_msg[0] = 0;
    pthread_mutex_unlock(&s->lock);
    return 0;
}

int dblade_session_wipe(struct dblade_session * s, int zero) {
    if (!s) {
        return -EINVAL;
    }
    pthread_mutex_lock(&s->lock);
    const int rc = dblade_store_wipe(&s->store, s->touched_end, zero != 0);
    if (rc == 0) {
        s->touched_end = 0;
    }
    pthread_mutex_unlock(&s->lock);
    return rc;
}

int dblade_session_store(struct dblade_session * s, struct dblade_store_info * out) {
    if (!s || !out) {
        return -EINVAL;
    }
    memset(out, 0, sizeof(*out));
    if (s->store.fd >= 0) {
        out->kind       = (uint32_t) s->store.kind;
        out->align      = s->store.align;
        out->n_extents  = s->store.n_extents;
        out->data_bytes = s->store.data_bytes;
        snprintf(out->path, sizeof(out->path), "%s", s->store.path);
    }
    return 0;
}

int dblade_session_set_path(struct dblade_session * s, int32_t il, uint32_t path) {
    if (!s || (path != DBLADE_PATH_MMAP && path != DBLADE_PATH_DIRECT)) {
        return -EINVAL;
    }
    int rc = -EINVAL;
    pthread_mutex_lock(&s->lock);
    for (struct dblade_cache * c = s->caches; c; c = c->next) {
        struct dblade_tensor * k = dblade_layer_of(c, il);
        if (k && k->path != DBLADE_PATH_RAM) {
            k->want = k->pair->want = path;
            snprintf(k->want_why, sizeof(k->want_why), "requested");
            rc = 0;
        }
    }
    pthread_mutex_unlock(&s->lock);
    return rc;
}
