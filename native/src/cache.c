// Caches and tensors: the KV caches llama.cpp opens on a session, each K/V tensor at an address
// that never changes, and the fences llama.cpp's graph calls around every use of them.
//
// This file owns: a cache's tensors and their address ranges (reserved here, handed to the path
// the layout names), the layer lookup, what the fences do in which order (enter the layer through
// the pipeline, then ask the tensor's path), switches between paths (detach from one, attach to
// the other, same address), clears, and state save/restore. It calls pipeline.c and the paths'
// interface; it knows nothing of how a path keeps its bytes.

#define _GNU_SOURCE
#include "residency.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

const struct dblade_path_ops * dblade_path_ops(uint32_t path) {
    switch (path) {
        case DBLADE_PATH_MMAP:   return &dblade_path_mmap;
        case DBLADE_PATH_DIRECT: return &dblade_path_direct;
        default:                 return &dblade_path_ram;
    }
}

// the store will hold the tensor's rows below hi: what a wipe covers
static void touch(struct dblade_session * s, const struct dblade_tensor * t, uint64_t hi) {
    const uint64_t end = t->store_off + dblade_align_up(hi, s->store.align);
    s->touched_end     = end > s->touched_end ? end : s->touched_end;
}

// --- the fences ---

void dblade_fence_write(struct dblade_tensor * t, const int64_t * rows, int64_t n, uint64_t row_bytes) {
    if (!t || t->path == DBLADE_PATH_RAM || n <= 0 || !rows) {
        return;
    }
    struct dblade_session * s  = t->cache->session;
    int64_t                 r0 = rows[0], r1 = rows[0];
    for (int64_t i = 1; i < n; i++) {
        r0 = rows[i] < r0 ? rows[i] : r0;
        r1 = rows[i] > r1 ? rows[i] : r1;
    }
    const uint64_t lo = (uint64_t) r0 * row_bytes;
    const uint64_t hi = (uint64_t) (r1 + 1) * row_bytes;
    pthread_mutex_lock(&s->lock);
    dblade_pipeline_enter(s, t);
    dblade_path_ops(t->path)->take_rows(s, t, lo, hi);
    t->hwm = hi > t->hwm ? hi : t->hwm;
    touch(s, t, hi);
    dblade_gate_unblock(&s->gate);
    pthread_mutex_unlock(&s->lock);
}

void dblade_fence_read(struct dblade_tensor * t, const void * data, uint64_t nbytes) {
    if (!t || t->path == DBLADE_PATH_RAM) {
        return;
    }
    struct dblade_session * s    = t->cache->session;
    const uint64_t          need = (uint64_t) ((const uint8_t *) data - t->addr) + nbytes;
    pthread_mutex_lock(&s->lock);
    dblade_pipeline_enter(s, t);
    dblade_path_ops(t->path)->make_resident(s, t, need);
    dblade_gate_unblock(&s->gate);
    pthread_mutex_unlock(&s->lock);
}

void dblade_fence_join(struct dblade_tensor * t, int nth) {
    // pinned tensors have no fence work (and never change path): nobody waits
    if (t && t->path != DBLADE_PATH_RAM && nth > 1) {
        struct dblade_session * s = t->cache->session;
        dblade_gate_arrive(&s->gate, (uint32_t) nth);
    }
}

// --- switching a layer between paths (same address, same data) ---

void dblade_layer_switch(struct dblade_session * s, struct dblade_tensor * k) {
    if (!k || k->want == k->path || s->error) {
        return;
    }
    const uint32_t from = k->path, to = k->want;
    for (struct dblade_tensor * t = k; t; t = t == k ? k->pair : NULL) {
        int rc = dblade_path_ops(from)->detach(s, t);
        if (rc == 0 && !s->error) {
            t->path = to;
            rc      = dblade_path_ops(to)->attach(s, t);
        }
        if (rc < 0 || s->error) {
            dblade_fail(s, rc, "%s", dblade_get_error()); // sticky: nothing is computed from the layer
            return;
        }
    }
    dblade_log_switch(s, k->il, from, to, k->want_why);
}

// --- caches ---

static const struct layout_entry * find_layout(const struct dblade_session * s, int32_t il) {
    for (uint32_t i = 0; i < s->n_layout; i++) {
        if (s->layout[i].l.il == il) {
            return &s->layout[i];
        }
    }
    return NULL;
}

static void tensor_unmap(struct dblade_session * s, struct dblade_tensor * t) {
    dblade_vram_detach(s, t);
    dblade_staging_forget(&s->staging, t);
    if (t->addr) {
        munmap(t->addr, t->reserved);
        t->addr = NULL;
    }
    free(t->sums);
    free(t->chunks);
    free(t->tail_buf);
    t->sums = NULL, t->chunks = NULL, t->tail_buf = NULL;
}

// The tensor's address range, for its whole life: anonymous memory to start with, which its path
// then makes its own. Offloaded tensors (any of them may go direct) and pinned ones start on a
// huge-page boundary, so that they can use huge pages and the budget counts what the kernel gives.
static int tensor_map(struct dblade_session * s, struct dblade_tensor * t) {
    const long pg = sysconf(_SC_PAGESIZE);
    t->page       = (uint64_t) pg;
    t->map_bytes  = dblade_align_up(t->bytes ? t->bytes : 1, pg > (long) DBLADE_BLOCK ? (uint64_t) pg : DBLADE_BLOCK);
    // an offloaded tensor's range ends on a huge page too: the staging pool moves whole chunks
    t->reserved          = t->path != DBLADE_PATH_RAM ? dblade_align_up(t->map_bytes, DBLADE_HUGE_PAGE) : t->map_bytes;
    const uint64_t extra = t->path != DBLADE_PATH_RAM || s->thp ? DBLADE_HUGE_PAGE : 0;
    uint8_t * p = mmap(NULL, t->reserved + extra, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                       -1, 0);
    if (p == MAP_FAILED) {
        return -errno;
    }
    if (extra) {
        uint8_t * a = (uint8_t *) dblade_align_up((uintptr_t) p, extra);
        if (a > p) {
            munmap(p, (size_t) (a - p));
        }
        if (a + t->reserved < p + t->reserved + extra) {
            munmap(a + t->reserved, (size_t) (p + t->reserved + extra - (a + t->reserved)));
        }
        p = a;
    }
    t->addr = p;
    t->tail = NO_TAIL;
    t->want = t->path;
    if (t->path != DBLADE_PATH_RAM) {
        // what any offloaded tensor may need once it is on the direct path
        const uint64_t n_chunks = dblade_align_up(t->map_bytes, s->staging.chunk) / s->staging.chunk;
        t->chunks   = malloc(n_chunks * sizeof(*t->chunks));
        t->tail_buf = aligned_alloc(t->page, t->page);
        if (!(s->config.flags & DBLADE_CONFIG_NO_VERIFY)) {
            t->sums = calloc(t->map_bytes / DBLADE_BLOCK, sizeof(*t->sums));
        }
        if (!t->chunks || !t->tail_buf || (!(s->config.flags & DBLADE_CONFIG_NO_VERIFY) && !t->sums)) {
            tensor_unmap(s, t);
            return -ENOMEM;
        }
        for (uint64_t i = 0; i < n_chunks; i++) {
            t->chunks[i] = DBLADE_CHUNK_NONE;
        }
    }
    const int rc = dblade_path_ops(t->path)->attach(s, t);
    if (rc < 0) {
        tensor_unmap(s, t);
    }
    return rc;
}

static void cache_free(struct dblade_session * s, struct dblade_cache * c) {
    for (uint32_t i = 0; i < c->n_tensors; i++) {
        tensor_unmap(s, &c->tensors[i]);
    }
    free(c->by_il);
    free(c->tensors);
    free(c);
}

// The layer stays llama.cpp's (in VRAM as stock): the plan says so, or it has no plan and is on a GPU.
static bool left_to_llama(const struct dblade_session * s, const struct layout_entry * e,
                          const struct dblade_layer_desc * d) {
    return e ? e->l.path == DBLADE_PATH_VRAM : s->n_layout == 0 && d->device != NULL;
}

int dblade_cache_open(const struct dblade_cache_desc * desc, struct dblade_cache ** out) {
    if (!desc || !out || (desc->n_layers > 0 && !desc->layers)) {
        return -EINVAL;
    }
    *out = NULL;
    struct dblade_session * s = dblade_session_bound();
    if (!s) {
        return 0; // not ours: stock behaviour
    }
    struct dblade_cache * c = calloc(1, sizeof(*c));
    if (!c) {
        return -ENOMEM;
    }
    c->session   = s;
    c->max_il    = -1;
    snprintf(c->name, sizeof(c->name), "%s", desc->name ? desc->name : "");
    c->type_k  = desc->type_k;
    c->type_v  = desc->type_v;
    c->v_trans = desc->v_trans;
    for (uint32_t i = 0; i < desc->n_layers; i++) {
        c->max_il = desc->layers[i].il > c->max_il ? desc->layers[i].il : c->max_il;
    }
    c->tensors = calloc(desc->n_layers ? 2 * desc->n_layers : 1, sizeof(*c->tensors));
    c->by_il   = calloc((size_t) (c->max_il + 1) + 1, sizeof(*c->by_il));
    if (!c->tensors || !c->by_il) {
        free(c->tensors);
        free(c->by_il);
        free(c);
        return -ENOMEM;
    }
    int rc = 0;
    for (uint32_t i = 0; i < desc->n_layers && rc == 0; i++) {
        const struct dblade_layer_desc * d     = &desc->layers[i];
        const struct layout_entry *      e     = d->il >= 0 ? find_layout(s, d->il) : NULL;
        uint32_t                         path  = DBLADE_PATH_RAM;
        bool                             split = false; // streamed into VRAM
        if (d->il < 0 || c->by_il[d->il]) {
            dblade_set_error("layer %d of the KV cache is given twice or has no index", d->il);
            rc = -EINVAL;
            break;
        }
        if (s->n_layout > 0) {
            if (!e || e->l.k_bytes != d->k_bytes || e->l.v_bytes != d->v_bytes) {
                dblade_set_error("layer %d of the KV cache (%llu + %llu bytes) is not the planned one (%llu + %llu)",
                                 d->il, (unsigned long long) d->k_bytes, (unsigned long long) d->v_bytes,
                                 e ? (unsigned long long) e->l.k_bytes : 0ull, e ? (unsigned long long) e->l.v_bytes : 0ull);
                rc = -EINVAL;
                break;
            }
            path  = e->l.path;
            split = e->l.flags & DBLADE_LAYOUT_STREAMED;
        }
        if (left_to_llama(s, e, d)) {
            if (!d->device) {
                dblade_set_error("layer %d is planned in VRAM, but llama.cpp keeps its KV in host memory "
                                 "(is the layer on the GPU? n_gpu_layers, offload_kqv)", d->il);
                rc = -EINVAL;
            }
            continue;
        }
        if ((path != DBLADE_PATH_RAM || split) && (desc->v_trans || d->n_stream != 1)) {
            dblade_set_error("offloaded KV layers need flash attention (untransposed V) and one sequence stream");
            rc = -EOPNOTSUPP;
            break;
        }
        struct dblade_tensor * k = &c->tensors[c->n_tensors], * v = &c->tensors[c->n_tensors + 1];
        c->n_tensors += 2;
        k->pair = v, v->pair = k;
        c->by_il[d->il] = k;
        c->n_streamed += split;
        for (uint32_t w = 0; w < 2 && rc == 0; w++) {
            struct dblade_tensor * t = w ? v : k;
            t->cache     = c;
            t->il        = d->il;
            t->which     = w;
            t->path      = path;
            t->bytes     = w ? d->v_bytes : d->k_bytes;
            t->row_bytes = w ? d->v_row_bytes : d->k_row_bytes;
            if (e && path != DBLADE_PATH_RAM) {
                t->store_off = s->store.data_offset + (w ? e->v_off : e->k_off);
            }
            rc = tensor_map(s, t);
            if (rc < 0) {
                dblade_set_error("cannot map layer %d of the KV cache: %s", d->il, strerror(-rc));
            } else if (split) {
                pthread_mutex_lock(&s->lock);
                rc = dblade_vram_attach(s, t, d->device, desc->type_k, desc->type_v);
                pthread_mutex_unlock(&s->lock);
            }
        }
    }
    if (rc != 0) {
        pthread_mutex_lock(&s->lock);
        cache_free(s, c);
        pthread_mutex_unlock(&s->lock);
        return rc;
    }
    atomic_fetch_add(&s->refs, 1);
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
    for (uint32_t i = 0; i < c->n_tensors; i++) {
        struct dblade_tensor * t = &c->tensors[i];
        dblade_pipeline_settle(s, t);
        if (t->path == DBLADE_PATH_DIRECT) {
            s->staged_bytes -= dblade_direct_staged(t); // the contents die with the cache
        }
    }
    // forget predictions that lead into this cache
    for (struct dblade_cache * o = s->caches; o; o = o->next) {
        for (uint32_t i = 0; i < o->n_tensors; i++) {
            if (o->tensors[i].succ && o->tensors[i].succ->cache == c) {
                o->tensors[i].succ = NULL;
            }
        }
    }
    if (s->active && s->active->cache == c) {
        s->active = NULL;
    }
    for (struct dblade_cache ** p = &s->caches; *p; p = &(*p)->next) {
        if (*p == c) {
            *p = c->next;
            break;
        }
    }
    cache_free(s, c);
    pthread_mutex_unlock(&s->lock);
    dblade_session_unref(s);
}

struct dblade_tensor * dblade_cache_tensor(struct dblade_cache * c, int32_t il, uint32_t which) {
    struct dblade_tensor * k = which > 1 ? NULL : dblade_layer_of(c, il);
    return k && which ? k->pair : k;
}

void * dblade_tensor_data(struct dblade_tensor * t) {
    return t ? t->addr : NULL;
}

void * dblade_tensor_device_data(struct dblade_tensor * t) {
    return t && t->dev ? (void *) (uintptr_t) t->dev : NULL;
}

int dblade_tensor_fenced(struct dblade_tensor * t) {
    return t && !t->dev && t->path != DBLADE_PATH_RAM;
}

void dblade_cache_clear(struct dblade_cache * c) {
    if (!c) {
        return;
    }
    struct dblade_session * s = c->session;
    pthread_mutex_lock(&s->lock);
    dblade_vram_forget(s, c);
    for (uint32_t i = 0; i < c->n_tensors; i++) {
        struct dblade_tensor * t = &c->tensors[i];
        dblade_pipeline_settle(s, t);
        // metadata only: nothing is written to the store, rows above hwm are never read back
        dblade_path_ops(t->path)->clear(s, t);
        t->hwm = 0, t->cached = 0;
    }
    if (s->active && s->active->cache == c) {
        s->active = NULL;
    }
    pthread_mutex_unlock(&s->lock);
}

int dblade_cache_can_shift(struct dblade_cache * c) {
    if (!c) {
        return 1;
    }
    // a streamed layer's slot holds other layers between passes
    for (uint32_t i = 0; i < c->n_tensors; i++) {
        if (c->tensors[i].path != DBLADE_PATH_RAM || c->tensors[i].dev) {
            return 0;
        }
    }
    return 1;
}

void dblade_cache_state_begin(struct dblade_cache * c) {
    if (!c) {
        return;
    }
    struct dblade_session * s = c->session;
    if (s->state_mode != DBLADE_STATE_STOCK) {
        return; // metadata only: no row is read or written by llama.cpp
    }
    dblade_vram_settle(s, true); // the rows the last streamed layer stored, before anything reads the copies
    pthread_mutex_lock(&s->lock);
    // nothing is released here: with two caches (iSWA) the other one may hold restored rows that
    // llama.cpp has not copied in yet; staged dirty blocks simply stay staged
    for (uint32_t i = 0; i < c->n_tensors; i++) {
        struct dblade_tensor * t = &c->tensors[i];
        dblade_pipeline_settle(s, t);
        const struct dblade_path_ops * ops = dblade_path_ops(t->path);
        if (ops->host_begin) {
            ops->host_begin(s, t);
        }
    }
    pthread_mutex_unlock(&s->lock);
}

void dblade_cache_state_end(struct dblade_cache * c, uint64_t rows_written) {
    if (!c) {
        return;
    }
    struct dblade_session * s = c->session;
    pthread_mutex_lock(&s->lock);
    if (s->state_mode != DBLADE_STATE_STOCK) {
        rows_written = 0; // metadata only: the rows come from the session file (dblade_sessionfile_restore)
    }
    for (uint32_t i = 0; i < c->n_tensors; i++) {
        struct dblade_tensor * t = &c->tensors[i];
        if (t->path == DBLADE_PATH_RAM || rows_written == 0) {
            continue;
        }
        uint64_t hi = rows_written * t->row_bytes;
        hi          = hi > t->bytes ? t->bytes : hi;
        dblade_pipeline_settle(s, t);
        const struct dblade_path_ops * ops = dblade_path_ops(t->path);
        if (ops->host_end) {
            ops->host_end(s, t, hi);
        }
        t->hwm = hi > t->hwm ? hi : t->hwm;
        touch(s, t, hi);
    }
    // not released here: llama.cpp copies the tensor data when its io object is destroyed, after
    // this returns; the next fence (or a flush) writes the rows back and releases the memory
    s->active = NULL;
    pthread_mutex_unlock(&s->lock);
}

int dblade_session_state_mode(struct dblade_session * s, int mode) {
    if (!s || mode < DBLADE_STATE_STOCK || mode > DBLADE_STATE_LOAD_META) {
        return -EINVAL;
    }
    // streamed layers need nothing of their own: their host copies hold the KV (a save flushes the
    // rows VRAM still holds first), and each graph copies the rows it reads into VRAM again
    pthread_mutex_lock(&s->lock);
    s->state_mode = mode;
    if (mode == DBLADE_STATE_LOAD_META) {
        dblade_vram_forget(s, NULL); // the rows the last graph stored are replaced: none go back
    }
    if (mode == DBLADE_STATE_SAVE_META) {
        for (struct dblade_cache * c = s->caches; c; c = c->next) {
            c->state_rows = 0;
        }
    }
    pthread_mutex_unlock(&s->lock);
    return 0;
}

int dblade_cache_state_mode(struct dblade_cache * c, uint32_t rows) {
    if (!c) {
        return DBLADE_STATE_STOCK;
    }
    struct dblade_session * s = c->session;
    pthread_mutex_lock(&s->lock);
    const int mode = s->state_mode;
    if (mode == DBLADE_STATE_SAVE_META) {
        c->state_rows = rows;
    }
    pthread_mutex_unlock(&s->lock);
    return mode;
}

int dblade_cache_state_skips(struct dblade_cache * c, int32_t il, uint32_t which) {
    if (!c) {
        return 0;
    }
    // read without the lock: the mode only changes between llama_state calls, on the caller's thread
    return c->session->state_mode != DBLADE_STATE_STOCK && dblade_layer_of(c, il) != NULL && which <= 1;
}
