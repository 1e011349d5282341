// Caches and tensors: the KV caches llama.cpp opens on a KV object, each K/V tensor at an address
// that never changes, and the fences llama.cpp's graph calls around every use of them.
//
// This file owns: a cache's tensors and their address ranges (reserved here, handed to the path the
// layout names), the layer lookup, the fences (the pipeline enters the layer, the tensor's path does
// the rest) and clears. It calls the pipeline, the paths through their method table, and the VRAM
// tier for streamed layers; it knows nothing of how a path keeps its bytes.

#define _GNU_SOURCE
#include "kv.h"

#include "base.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

// --- the fences ---

void dblade_fence_write(struct dblade_tensor * t, const int64_t * rows, int64_t n, uint64_t row_bytes) {
    if (!t || t->path == DBLADE_PATH_RAM || n <= 0 || !rows) {
        return;
    }
    struct dblade_kv * kv = t->cache->kv;
    int64_t            r0 = rows[0], r1 = rows[0];
    for (int64_t i = 1; i < n; i++) {
        r0 = rows[i] < r0 ? rows[i] : r0;
        r1 = rows[i] > r1 ? rows[i] : r1;
    }
    pthread_mutex_lock(&kv->lock);
    dblade_pipeline_take_rows(&kv->pipeline, t, (uint64_t) r0 * row_bytes, (uint64_t) (r1 + 1) * row_bytes);
    pthread_mutex_unlock(&kv->lock);
}

void dblade_fence_read(struct dblade_tensor * t, const void * data, uint64_t nbytes) {
    if (!t || t->path == DBLADE_PATH_RAM) {
        return;
    }
    struct dblade_kv * kv   = t->cache->kv;
    const uint64_t     need = (uint64_t) ((const uint8_t *) data - t->addr) + nbytes;
    pthread_mutex_lock(&kv->lock);
    dblade_pipeline_make_resident(&kv->pipeline, t, need);
    pthread_mutex_unlock(&kv->lock);
}

void dblade_fence_join(struct dblade_tensor * t, int nth) {
    // pinned tensors have no fence work (and never change path): nobody waits
    if (t && t->path != DBLADE_PATH_RAM && nth > 1) {
        dblade_gate_arrive(&t->cache->kv->events.gate, (uint32_t) nth);
    }
}

// --- tensors ---

static void tensor_unmap(struct dblade_kv * kv, struct dblade_tensor * t) {
    DBLADE_KV_PATH_CALL(kv, t, forget);
    dblade_vram_detach(kv->vram, t);
    if (t->addr) {
        munmap(t->addr, t->reserved);
        t->addr = NULL;
    }
    free(t->sums);
    free(t->changed);
    t->sums = NULL, t->changed = NULL;
}

// The tensor's address range, for its whole life: anonymous memory to start with, which its path
// then makes its own. Offloaded tensors (any of them may go direct) and pinned ones start on a
// huge-page boundary, so that they can use huge pages and the budget counts what the kernel gives.
static int tensor_map(struct dblade_kv * kv, struct dblade_tensor * t) {
    const long pg = sysconf(_SC_PAGESIZE);
    t->page       = (uint64_t) pg;
    t->map_bytes  = dblade_align_up(t->bytes ? t->bytes : 1, pg > (long) DBLADE_BLOCK ? (uint64_t) pg : DBLADE_BLOCK);
    // an offloaded tensor's range ends on a huge page too: the staging pool moves whole chunks
    t->reserved          = t->path != DBLADE_PATH_RAM ? dblade_align_up(t->map_bytes, DBLADE_HUGE_PAGE) : t->map_bytes;
    const uint64_t extra = t->path != DBLADE_PATH_RAM || kv->env.thp ? DBLADE_HUGE_PAGE : 0;
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
    t->want = t->path;
    if (t->path != DBLADE_PATH_RAM && kv->env.verify) {
        // the store's integrity record of the extent: any offloaded tensor may go direct
        t->sums = calloc(t->map_bytes / DBLADE_BLOCK, sizeof(*t->sums));
        if (!t->sums) {
            tensor_unmap(kv, t);
            return -ENOMEM;
        }
    }
    if (t->path != DBLADE_PATH_RAM) {
        // what a session append writes (pinned tensors are compared with the file's checksums instead)
        t->changed = calloc((t->map_bytes / DBLADE_BLOCK + 63) / 64, sizeof(*t->changed));
        if (!t->changed) {
            tensor_unmap(kv, t);
            return -ENOMEM;
        }
    }
    struct dblade_tier * path = dblade_kv_path(kv, t);
    const int            rc   = path ? path->ops->attach(path, t) : -EINVAL;
    if (rc < 0) {
        tensor_unmap(kv, t);
    }
    return rc;
}

static void cache_free(struct dblade_kv * kv, struct dblade_cache * c) {
    for (uint32_t i = 0; i < c->n_tensors; i++) {
        tensor_unmap(kv, &c->tensors[i]);
    }
    free(c->by_il);
    free(c->tensors);
    free(c);
}

// --- caches ---

// The layer stays llama.cpp's (in VRAM as stock): the plan says so, or it has no plan and is on a GPU.
static bool left_to_llama(const struct dblade_kv * kv, const struct dblade_layout_layer * l,
                          const struct dblade_layer_desc * d) {
    return l ? l->path == DBLADE_PATH_VRAM : kv->n_layout == 0 && d->device != NULL;
}

// the K and V tensors of one layer of c, on the planned path
static int layer_open(struct dblade_kv * kv, struct dblade_cache * c, const struct dblade_cache_desc * desc,
                      const struct dblade_layer_desc * d) {
    const int32_t                      li    = d->il >= 0 ? dblade_kv_find_layout(kv, d->il) : -1;
    const struct dblade_layout_layer * l     = li >= 0 ? &kv->layout[li] : NULL;
    uint32_t                           path  = DBLADE_PATH_RAM;
    bool                               split = false; // streamed into VRAM
    if (d->il < 0 || c->by_il[d->il]) {
        dblade_set_error("layer %d of the KV cache is given twice or has no index", d->il);
        return -EINVAL;
    }
    if (kv->n_layout > 0) {
        if (!l || l->k_bytes != d->k_bytes || l->v_bytes != d->v_bytes) {
            dblade_set_error("layer %d of the KV cache (%llu + %llu bytes) is not the planned one (%llu + %llu)", d->il,
                             (unsigned long long) d->k_bytes, (unsigned long long) d->v_bytes,
                             l ? (unsigned long long) l->k_bytes : 0ull, l ? (unsigned long long) l->v_bytes : 0ull);
            return -EINVAL;
        }
        path  = l->path;
        split = l->flags & DBLADE_LAYOUT_STREAMED;
    }
    if (left_to_llama(kv, l, d)) {
        if (!d->device) {
            dblade_set_error("layer %d is planned in VRAM, but llama.cpp keeps its KV in host memory "
                             "(is the layer on the GPU? n_gpu_layers, offload_kqv)", d->il);
            return -EINVAL;
        }
        return 0;
    }
    if ((path != DBLADE_PATH_RAM || split) && (desc->v_trans || d->n_stream != 1)) {
        dblade_set_error("offloaded KV layers need flash attention (untransposed V) and one sequence stream");
        return -EOPNOTSUPP;
    }
    struct dblade_tensor * k = &c->tensors[c->n_tensors], * v = &c->tensors[c->n_tensors + 1];
    c->n_tensors += 2;
    k->pair = v, v->pair = k;
    c->by_il[d->il] = k;
    c->n_streamed += split;
    int rc = 0;
    for (uint32_t w = 0; w < 2 && rc == 0; w++) {
        struct dblade_tensor * t = w ? v : k;
        t->cache                 = c;
        t->il                    = d->il;
        t->which                 = w;
        t->path                  = path;
        t->bytes                 = w ? d->v_bytes : d->k_bytes;
        t->row_bytes             = w ? d->v_row_bytes : d->k_row_bytes;
        if (l && path != DBLADE_PATH_RAM) {
            t->store_off = kv->store.data_offset + (w ? kv->extents[li].v_off : kv->extents[li].k_off);
        }
        pthread_mutex_lock(&kv->lock);
        rc = tensor_map(kv, t);
        if (rc < 0) {
            dblade_set_error("cannot map layer %d of the KV cache: %s", d->il, strerror(-rc));
        } else if (split) {
            rc = dblade_vram_attach(&kv->vram, &kv->vram_env, t, d->device, desc->type_k, desc->type_v);
        }
        pthread_mutex_unlock(&kv->lock);
    }
    return rc;
}

int dblade_cache_open(const struct dblade_cache_desc * desc, struct dblade_cache ** out) {
    if (!desc || !out || (desc->n_layers > 0 && !desc->layers)) {
        return -EINVAL;
    }
    *out                  = NULL;
    struct dblade_kv * kv = dblade_kv_bound();
    if (!kv) {
        return 0; // not ours: stock behaviour
    }
    struct dblade_cache * c = calloc(1, sizeof(*c));
    if (!c) {
        return -ENOMEM;
    }
    c->kv     = kv;
    c->max_il = -1;
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
        rc = layer_open(kv, c, desc, &desc->layers[i]);
    }
    pthread_mutex_lock(&kv->lock);
    if (rc != 0) {
        cache_free(kv, c);
        pthread_mutex_unlock(&kv->lock);
        return rc;
    }
    dblade_kv_ref(kv);
    c->next    = kv->caches;
    kv->caches = c;
    pthread_mutex_unlock(&kv->lock);
    *out = c;
    return 0;
}

void dblade_cache_close(struct dblade_cache * c) {
    if (!c) {
        return;
    }
    struct dblade_kv * kv = c->kv;
    pthread_mutex_lock(&kv->lock);
    dblade_vram_forget(kv->vram, c); // its reads ahead done, its rows in VRAM dropped
    for (uint32_t i = 0; i < c->n_tensors; i++) {
        DBLADE_KV_PATH_CALL(kv, &c->tensors[i], settle);
    }
    dblade_pipeline_forget(&kv->pipeline, c);
    for (struct dblade_cache ** p = &kv->caches; *p; p = &(*p)->next) {
        if (*p == c) {
            *p = c->next;
            break;
        }
    }
    cache_free(kv, c); // the contents die with the cache
    pthread_mutex_unlock(&kv->lock);
    dblade_kv_unref(kv);
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
    struct dblade_kv * kv = c->kv;
    pthread_mutex_lock(&kv->lock);
    dblade_vram_forget(kv->vram, c);
    for (uint32_t i = 0; i < c->n_tensors; i++) {
        struct dblade_tensor * t = &c->tensors[i];
        DBLADE_KV_PATH_CALL(kv, t, settle);
        // metadata only: nothing is written to the store, rows above hwm are never read back
        DBLADE_KV_PATH_CALL(kv, t, clear);
        t->hwm = 0, t->cached = 0, t->missing = 0;
    }
    if (kv->pipeline.active && kv->pipeline.active->cache == c) {
        dblade_pipeline_leave(&kv->pipeline);
    }
    pthread_mutex_unlock(&kv->lock);
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

void dblade_cache_ubatch(struct dblade_cache * c, const int64_t * rows, int64_t n, uint32_t n_kv) {
    if (c) {
        dblade_vram_ubatch(c->kv->vram, c, rows, n, n_kv);
    }
}
