// The KV object: what one llama_context's KV caches belong to, and its lifetime.
//
// It is created by the embedding program with a layout (a path per layer) and bound to its thread
// while it creates a llama_context; every llama_kv_cache constructed meanwhile opens a cache on it
// (cache.c; one for a plain model, two for an iSWA model). Caches hold a reference, so the KV object
// outlives whichever side lets go first.
//
// This file assembles the parts: the store and the offloaded layers' extents in it (laid out here),
// the paths (RAM, page cache, the direct path with its staging and engines), the worker, the
// pipeline, the auto policy; and it owns the calls that act on the whole object (flush, wipe, trim,
// set_path, errors). The parts below never see this struct: each is handed what it works with.

#define _GNU_SOURCE
#include "kv.h"

#include "base.h"
#include "crc32c.h"
#include "direct/direct.h"
#include "plan.h"
#include "policy.h"
#include "testing.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static _Thread_local struct dblade_kv * tls_bound;

int dblade_abi_version(void) {
    return DBLADE_ABI_VERSION;
}

struct dblade_kv * dblade_kv_bound(void) {
    return tls_bound;
}

void dblade_kv_ref(struct dblade_kv * kv) {
    atomic_fetch_add(&kv->refs, 1);
}

void dblade_kv_unref(struct dblade_kv * kv) {
    if (atomic_fetch_sub(&kv->refs, 1) != 1) {
        return;
    }
    dblade_policy_close(kv->policy); // its samples first: they read the caches and the direct path
    dblade_worker_destroy(&kv->worker); // nothing runs in the background from here on
    dblade_vram_destroy(kv->vram);
    if (kv->direct) {
        dblade_direct_close(kv->direct);
    }
    dblade_store_close(&kv->store);
    pthread_mutex_destroy(&kv->lock);
    free(kv->layout);
    free(kv->extents);
    free(kv->kv_dir);
    free(kv->kv_device);
    free(kv);
}

int32_t dblade_kv_find_layout(const struct dblade_kv * kv, int32_t il) {
    for (uint32_t i = 0; i < kv->n_layout; i++) {
        if (kv->layout[i].il == il) {
            return (int32_t) i;
        }
    }
    return -1;
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
static uint64_t extent(const struct dblade_layout_layer * l, struct dblade_extent * e, uint64_t cursor) {
    e->k_off = cursor;
    cursor += dblade_align_up(l->k_bytes, DBLADE_HUGE_PAGE);
    e->v_off = cursor;
    return cursor + dblade_align_up(l->v_bytes, DBLADE_HUGE_PAGE);
}

int dblade_store_check(const struct dblade_config * cfg, uint32_t n_layers, const struct dblade_layout_layer * layers,
                       char * msg, size_t cap) {
    dblade_set_error("%s", "");
    uint64_t data = 0;
    for (uint32_t i = 0; i < n_layers; i++) {
        struct dblade_extent e;
        data = dblade_path_offloaded(layers[i].path) ? extent(&layers[i], &e, data) : data;
    }
    struct dblade_store st = { .n = 0 };
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
    char   buf[128] = "";
    FILE * f        = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
    if (!f) {
        return false;
    }
    const bool ok = fgets(buf, sizeof(buf), f) && !strstr(buf, "[never]");
    fclose(f);
    return ok;
}

// The ring the VRAM tier reads streamed layers into (page-locked host memory) takes the allowance's share
// the direct path would stage them in: up to four of the largest, at least one (else none: they are staged
// by their host path and copied from there). What is left stages the layers the CPU reads and the tails.
static uint64_t ring_share(const struct dblade_kv * kv, uint64_t allowance) {
    uint64_t streamed = 0, cpu = 0;
    for (uint32_t i = 0; i < kv->n_layout; i++) {
        const struct dblade_layout_layer * l = &kv->layout[i];
        const uint64_t                     b = dblade_align_up(l->k_bytes, DBLADE_BLOCK) + dblade_align_up(l->v_bytes, DBLADE_BLOCK);
        if (dblade_path_offloaded(l->path)) {
            uint64_t * m = (l->flags & DBLADE_LAYOUT_STREAMED) ? &streamed : &cpu;
            *m           = b > *m ? b : *m;
        }
    }
    if (streamed == 0) {
        return 0;
    }
    if (allowance == UINT64_MAX) {
        return 4 * streamed;
    }
    const uint64_t keep = (cpu ? dblade_plan_staging(cpu, kv->n_offloaded) : 0) + (uint64_t) kv->n_offloaded * 2 * DBLADE_BLOCK;
    const uint64_t room = allowance > keep ? allowance - keep : 0;
    const uint64_t ring = room < 4 * streamed ? room : 4 * streamed;
    return ring >= streamed ? dblade_align_down(ring, DBLADE_BLOCK) : 0;
}

// the direct path over the offloaded layers, inside the allowance (the budget less the pinned layers and
// the VRAM tier's ring)
static int direct_open(struct dblade_kv * kv, uint64_t pinned) {
    uint64_t allowance = kv->config.budget_bytes == DBLADE_BUDGET_UNLIMITED ? UINT64_MAX
                         : kv->config.budget_bytes > pinned               ? kv->config.budget_bytes - pinned
                                                                          : 0;
    kv->ring_bytes = ring_share(kv, allowance);
    allowance      = allowance == UINT64_MAX ? allowance : allowance - kv->ring_bytes;
    struct dblade_direct_extent * ext = calloc(kv->n_offloaded ? kv->n_offloaded : 1, sizeof(*ext));
    if (!ext) {
        return -ENOMEM;
    }
    uint32_t n = 0;
    for (uint32_t i = 0; i < kv->n_layout; i++) {
        if (dblade_path_offloaded(kv->layout[i].path)) {
            ext[n++] = (struct dblade_direct_extent) { kv->layout[i].k_bytes, kv->layout[i].v_bytes };
        }
    }
    const int rc = dblade_direct_open(&kv->direct, &kv->env, &kv->worker, ext, n, allowance);
    free(ext);
    return rc;
}

// DUALBLADE_WRITE_AROUND (path_mmap.c), read once: -1 unset, 0 never, 1 every store
static int8_t write_around_env(void) {
    const char * e = getenv("DUALBLADE_WRITE_AROUND");
    return e && *e ? e[0] != '0' : -1;
}

int dblade_kv_create(const struct dblade_config * cfg, uint32_t n_layers, const struct dblade_layout_layer * layers,
                     struct dblade_kv ** out) {
    dblade_set_error("%s", "");
    if (!cfg || !out || cfg->policy > DBLADE_POLICY_AUTO ||
        (cfg->flags & ~(uint32_t) (DBLADE_CONFIG_FORCE | DBLADE_CONFIG_NO_VERIFY)) || cfg->budget_bytes == 0 ||
        (n_layers > 0 && !layers)) {
        dblade_set_error("invalid KV configuration");
        return -EINVAL;
    }
    struct dblade_kv * kv = calloc(1, sizeof(*kv));
    if (!kv) {
        return -ENOMEM;
    }
    kv->config    = *cfg;
    kv->kv_dir    = cfg->kv_dir ? strdup(cfg->kv_dir) : NULL;
    kv->kv_device = cfg->kv_device ? strdup(cfg->kv_device) : NULL;
    kv->layout    = calloc(n_layers ? n_layers : 1, sizeof(*kv->layout));
    kv->extents   = calloc(n_layers ? n_layers : 1, sizeof(*kv->extents));
    atomic_init(&kv->refs, 1);
    pthread_mutex_init(&kv->lock, NULL);
    dblade_events_init(&kv->events);
    dblade_worker_init(&kv->worker, &kv->lock);
    kv->env = (struct dblade_path_env) { .lock   = &kv->lock,
                                         .store  = &kv->store,
                                         .events = &kv->events,
                                         .thp    = thp_available(),
                                         .verify = !(cfg->flags & DBLADE_CONFIG_NO_VERIFY),
                                         .write_around_env = write_around_env(),
                                         .read_around      = !dblade_env_off("DUALBLADE_READ_AROUND") };
    kv->ram      = (struct dblade_tier) { &dblade_path_ram_ops, &kv->env };
    kv->mmap     = (struct dblade_tier) { &dblade_path_mmap_ops, &kv->env };
    kv->pipeline = (struct dblade_pipeline) { .env = &kv->env, .caches = &kv->caches };
    kv->pipeline.paths[DBLADE_PATH_RAM] = &kv->ram;
    if ((cfg->kv_dir && !kv->kv_dir) || (cfg->kv_device && !kv->kv_device) || !kv->layout || !kv->extents) {
        dblade_kv_unref(kv);
        return -ENOMEM;
    }
    kv->config.kv_dir    = kv->kv_dir;
    kv->config.kv_device = kv->kv_device;

    uint64_t cursor = 0, pinned = 0;
    for (uint32_t i = 0; i < n_layers; i++) {
        struct dblade_layout_layer * l = &kv->layout[i];
        *l                             = layers[i];
        if (l->path > DBLADE_PATH_VRAM || (l->flags & ~(uint32_t) DBLADE_LAYOUT_STREAMED) ||
            (l->path == DBLADE_PATH_VRAM && l->flags)) {
            dblade_set_error("invalid path %u (flags %#x) for layer %d", l->path, l->flags, l->il);
            dblade_kv_unref(kv);
            return -EINVAL;
        }
        if (l->path == DBLADE_PATH_RAM) {
            pinned += l->k_bytes + l->v_bytes;
        } else if (l->path != DBLADE_PATH_VRAM) {
            kv->n_offloaded++;
            cursor = extent(l, &kv->extents[i], cursor);
        }
    }
    kv->n_layout = n_layers;
    int rc       = 0;
    if (cursor > 0) {
        rc = dblade_store_open(&kv->store, &kv->config, cursor, dblade_layout_geometry(n_layers, layers), false);
    }
    if (rc == 0 && kv->n_offloaded > 0) {
        rc = direct_open(kv, pinned);
    }
    if (rc < 0) {
        dblade_kv_unref(kv);
        return rc;
    }
    if (kv->n_offloaded > 0) {
        kv->pipeline.paths[DBLADE_PATH_MMAP]   = &kv->mmap;
        kv->pipeline.paths[DBLADE_PATH_DIRECT] = kv->direct;
    }
    if (cfg->policy == DBLADE_POLICY_AUTO && kv->n_offloaded > 0) {
        // the first room leaves out the VRAM tier's ring, allocated (page-locked) when the context is
        rc = dblade_policy_open(&kv->policy, &kv->env, &kv->caches, kv->direct, cfg->reserve_bytes + kv->ring_bytes,
                                kv->layout, kv->n_layout);
        if (rc < 0) {
            dblade_kv_unref(kv);
            return rc;
        }
        kv->pipeline.policy = kv->policy;
    }
    kv->vram_env = (struct dblade_vram_env) { .lock       = &kv->lock,
                                              .events     = &kv->events,
                                              .pipeline   = &kv->pipeline,
                                              .worker     = &kv->worker,
                                              .caches     = &kv->caches,
                                              .layout     = kv->layout,
                                              .n_layout   = kv->n_layout,
                                              .store      = kv->store.n > 0 ? &kv->store : NULL,
                                              .ring_bytes = kv->ring_bytes };
    *out = kv;
    return 0;
}

void dblade_kv_release(struct dblade_kv * kv) {
    if (!kv) {
        return;
    }
    if (tls_bound == kv) {
        tls_bound = NULL;
    }
    dblade_kv_unref(kv);
}

int dblade_kv_bind(struct dblade_kv * kv) {
    tls_bound = kv;
    return 0;
}

struct dblade_kv * dblade_kv_current(void) {
    if (tls_bound) {
        dblade_kv_ref(tls_bound);
    }
    return tls_bound;
}

void dblade_kv_put(struct dblade_kv * kv) {
    if (kv) {
        dblade_kv_unref(kv);
    }
}

int dblade_kv_streams(struct dblade_kv * kv) {
    for (uint32_t i = 0; kv && i < kv->n_layout; i++) {
        if (kv->layout[i].flags & DBLADE_LAYOUT_STREAMED) {
            return 1;
        }
    }
    return 0;
}

int dblade_kv_set_outputs_max(struct dblade_kv * kv, uint32_t n_outputs) {
    if (!kv) {
        return -EINVAL;
    }
    kv->outputs_max = n_outputs;
    return 0;
}

int dblade_kv_abort(struct dblade_kv * kv, int on) {
    if (!kv) {
        return -EINVAL;
    }
    atomic_store(&kv->abort, on != 0);
    return 0;
}

bool dblade_kv_aborting(void * kv) {
    // llama.cpp's CPU backend asks between the nodes of a graph: an atomic load, no lock
    return kv && atomic_load(&((struct dblade_kv *) kv)->abort) != 0;
}

uint32_t dblade_kv_outputs_max(struct dblade_kv * kv) {
    return kv ? kv->outputs_max : 0;
}

int dblade_kv_graph_cut(struct dblade_kv * kv, const char * name, int ask) {
    return dblade_vram_cut(kv ? kv->vram : NULL, name, ask);
}

// layer il's rows are brought in per graph that computes it: read from storage by the direct path, or copied
// into VRAM (the lock held). (The page cache keeps what a prompt's graphs read of a layer for the next one.)
static bool layer_brought_in(const struct dblade_kv * kv, int32_t il) {
    for (const struct dblade_cache * c = kv->caches; c; c = c->next) {
        const struct dblade_tensor * k = dblade_layer_of(c, il);
        if (k && (k->dev || k->path == DBLADE_PATH_DIRECT)) {
            return true;
        }
    }
    return false;
}

int dblade_prefill_layer_major(int streamed) {
    // Each graph of a ubatch fills its attention masks on the host (as large as the ubatch times n_kv; on a GPU
    // copied over too), so each segment costs the masks again. On a GPU a prompt's large ubatches cost more
    // than the reads they save (GPU run 16, kv-heavy, 30K prompt in 3 ubatches: reads 0.27x of the writes
    // instead of 1.20x, TTFT 14.6 s instead of 2.5 s), so by default only where no layer is streamed into VRAM.
    const char * env = getenv("DUALBLADE_LAYER_MAJOR");
    if (env && !strcmp(env, "0")) {
        return 0;
    }
    return !streamed || (env && !strcmp(env, "1"));
}

uint32_t dblade_kv_prefill_segments(struct dblade_kv * kv, uint32_t n_ubatches, uint32_t n_layer, int32_t * starts,
                                    uint32_t max) {
    // A segment starts at each layer the direct path stages (more segments cost more masks)
    if (!kv || !starts || max < 2 || n_ubatches < 2 || n_layer < 2 ||
        !dblade_prefill_layer_major(dblade_kv_streams(kv))) {
        return 0;
    }
    uint32_t n = 0;
    starts[n++] = 0;
    pthread_mutex_lock(&kv->lock);
    // a segment from each such layer to the next: one of them per segment
    for (uint32_t il = 1; il < n_layer && n < max; il++) {
        if (layer_brought_in(kv, (int32_t) il)) {
            starts[n++] = (int32_t) il;
        }
    }
    if (n == 1 && layer_brought_in(kv, 0)) {
        starts[n++] = 1; // layer 0 alone, then the rest
    }
    pthread_mutex_unlock(&kv->lock);
    return n;
}

void dblade_kv_graph_layers(struct dblade_kv * kv, int32_t il0, int32_t il1) {
    if (kv) {
        dblade_vram_layers(kv->vram, il0, il1);
    }
}

int dblade_kv_set_reserve(struct dblade_kv * kv, uint64_t reserve_bytes) {
    if (!kv) {
        return -EINVAL;
    }
    pthread_mutex_lock(&kv->lock);
    kv->config.reserve_bytes = reserve_bytes;
    if (kv->policy) {
        dblade_policy_set_reserve(kv->policy, reserve_bytes);
    }
    pthread_mutex_unlock(&kv->lock);
    return 0;
}

int dblade_kv_flush(struct dblade_kv * kv) {
    if (!kv) {
        return -EINVAL;
    }
    dblade_vram_settle(kv->vram, true); // the last streamed layer's rows first
    pthread_mutex_lock(&kv->lock);
    // everything to the store, tails too: what save_state and close rely on
    for (struct dblade_cache * c = kv->caches; c; c = c->next) {
        for (uint32_t i = 0; i < c->n_tensors; i++) {
            DBLADE_KV_PATH_CALL(kv, &c->tensors[i], flush);
        }
    }
    dblade_pipeline_leave(&kv->pipeline);
    const int rc = kv->events.error;
    pthread_mutex_unlock(&kv->lock);
    return rc;
}

int64_t dblade_kv_trim(struct dblade_kv * kv) {
    if (!kv) {
        return -EINVAL;
    }
    const int rc = dblade_kv_flush(kv);
    if (rc < 0 || !kv->direct) {
        return rc;
    }
    pthread_mutex_lock(&kv->lock);
    const uint64_t given = dblade_direct_trim(kv->direct);
    pthread_mutex_unlock(&kv->lock);
    return (int64_t) given;
}

int dblade_kv_error(struct dblade_kv * kv, char * msg, size_t cap) {
    if (!kv) {
        return -EINVAL;
    }
    pthread_mutex_lock(&kv->lock);
    const int rc = kv->events.error;
    if (msg && cap) {
        snprintf(msg, cap, "%s", kv->events.error_msg);
    }
    pthread_mutex_unlock(&kv->lock);
    return rc;
}

int dblade_kv_clear_error(struct dblade_kv * kv) {
    if (!kv) {
        return -EINVAL;
    }
    pthread_mutex_lock(&kv->lock);
    kv->events.error        = 0;
    kv->events.error_msg[0] = 0;
    pthread_mutex_unlock(&kv->lock);
    return 0;
}

int dblade_kv_wipe(struct dblade_kv * kv, int zero) {
    if (!kv) {
        return -EINVAL;
    }
    pthread_mutex_lock(&kv->lock);
    const int rc = dblade_store_wipe(&kv->store, zero != 0);
    pthread_mutex_unlock(&kv->lock);
    return rc;
}

int dblade_kv_store(struct dblade_kv * kv, struct dblade_store_info * out) {
    if (!kv || !out) {
        return -EINVAL;
    }
    memset(out, 0, sizeof(*out));
    const struct dblade_store * st = &kv->store;
    if (st->n == 0) {
        return 0;
    }
    out->kind        = (uint32_t) st->members[0].kind;
    out->align       = st->align;
    out->n_members   = st->n;
    out->data_bytes  = st->data_bytes;
    out->stripe_unit = st->n > 1 ? st->map.unit : 0;
    out->n_extents   = 0;
    for (uint32_t m = 0; m < st->n; m++) {
        out->n_extents = st->members[m].n_extents > out->n_extents ? st->members[m].n_extents : out->n_extents;
    }
    snprintf(out->path, sizeof(out->path), "%s", st->path);
    return 0;
}

int dblade_kv_store_member(struct dblade_kv * kv, uint32_t m, struct dblade_store_info * out) {
    if (!kv || !out || m >= kv->store.n) {
        return -EINVAL;
    }
    const struct dblade_store *        st = &kv->store;
    const struct dblade_store_member * sm = &st->members[m];
    memset(out, 0, sizeof(*out));
    out->kind        = (uint32_t) sm->kind;
    out->align       = sm->align;
    out->n_extents   = sm->n_extents;
    out->n_members   = st->n;
    out->data_bytes  = sm->data_bytes;
    out->stripe_unit = st->n > 1 ? st->map.unit : 0;
    out->read_bps    = (uint64_t) sm->read_bps;
    out->share       = st->n > 1 ? st->map.share[m] : 1;
    out->n_pattern   = st->n > 1 ? st->map.n_pattern : 1;
    snprintf(out->path, sizeof(out->path), "%s", sm->path);
    return 0;
}

int dblade_kv_set_path(struct dblade_kv * kv, int32_t il, uint32_t path) {
    if (!kv || (path != DBLADE_PATH_MMAP && path != DBLADE_PATH_DIRECT)) {
        return -EINVAL;
    }
    int rc = -EINVAL;
    pthread_mutex_lock(&kv->lock);
    for (struct dblade_cache * c = kv->caches; c; c = c->next) {
        struct dblade_tensor * k = dblade_layer_of(c, il);
        if (k && k->path != DBLADE_PATH_RAM) {
            k->want = k->pair->want = path;
            snprintf(k->want_why, sizeof(k->want_why), "requested");
            rc = 0;
        }
    }
    pthread_mutex_unlock(&kv->lock);
    return rc;
}

// for tests (testing.h): returns once the worker has nothing queued or running
void dblade_kv_quiesce(struct dblade_kv * kv) {
    if (kv->direct) {
        dblade_direct_quiesce(kv->direct);
    }
}

void dblade_kv_lock(struct dblade_kv * kv) {
    pthread_mutex_lock(&kv->lock);
}

void dblade_kv_unlock(struct dblade_kv * kv) {
    pthread_mutex_unlock(&kv->lock);
}
