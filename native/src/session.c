// Sessions, caches and tensors: which KV belongs to which embedding object, where each tensor
// lives, and the fences that keep offloaded tensors correct.
//
// A session is created by the embedding program with a layout (a path per layer) and bound to its
// thread while it creates a llama_context; every llama_kv_cache constructed meanwhile opens a cache
// on it (one for a plain model, two for an iSWA model). Caches hold a reference, so the session
// outlives whichever side lets go first.
//
// Every tensor of a managed cache has one address for its whole life (graph reuse depends on it):
//  - ram:    anonymous memory, never released;
//  - mmap:   a MAP_SHARED mapping of the tensor's extent of the store (the page-cache path);
//  - direct: anonymous memory staged from the tensor's extent with O_DIRECT reads before use,
//            dirty blocks written back with O_DIRECT writes, then released (MADV_DONTNEED).
//
// Direct-path invariants, per tensor (all offsets in bytes from the tensor start):
//  - [0, valid) in memory is authoritative; [valid, end) in memory is zero;
//  - the store holds every row below hwm that is not dirty; rows at or above hwm were never
//    written since the last clear: whatever they hold (zeros, stale rows) is finite and masked;
//  - the dirty range lies inside [0, valid); valid is a multiple of the store's alignment.
// Only one layer is staged at a time (plus the one being staged): the staging the plan reserves.

#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

struct dblade_tensor {
    struct dblade_cache * cache;
    int32_t               il;
    uint32_t              which; // 0 K, 1 V
    uint32_t              path;
    uint64_t              bytes;     // the ggml tensor
    uint64_t              map_bytes; // its address range, whole pages
    uint64_t              row_bytes;
    uint8_t *             addr;
    uint64_t              store_off; // absolute offset of the extent in the store (offloaded only)
    uint64_t              valid, hwm, dirty_lo, dirty_hi;
    _Atomic uint64_t      bytes_read, bytes_written, io_wait_ns;
    // prefetch (guarded by the session lock)
    int                    pf_state; // PF_IDLE, PF_QUEUED (or in flight), PF_READY
    uint64_t               pf_upto;
    struct dblade_tensor * pf_next;    // queue link
    struct dblade_cache *  succ_cache; // K tensor: the layer the graph entered after this one
    int32_t                succ_il;
};

enum { PF_IDLE = 0, PF_QUEUED = 1, PF_READY = 2 };

struct dblade_cache {
    struct dblade_session * session;
    struct dblade_cache *   next;
    uint32_t                n_tensors;
    struct dblade_tensor *  tensors; // 2 per layer: K, V
};

struct layout_entry {
    struct dblade_layout_layer l;
    uint64_t                   k_off, v_off; // relative to the store's data offset
};

struct dblade_session {
    struct dblade_config  config;
    char *                kv_dir;
    char *                kv_device;
    _Atomic int           refs;
    pthread_mutex_t       lock; // guards everything below
    struct dblade_cache * caches;
    uint32_t              n_layout;
    struct layout_entry * layout;
    struct dblade_store   store;
    uint64_t              staged_bytes, staged_peak;
    struct dblade_cache * active_cache; // the layer the graph is at
    int32_t               active_il;
    int                   error;
    char                  error_msg[256];
    // the prefetcher: one thread staging the next layer while the current one computes
    pthread_t              pf_thread;
    bool                   pf_started, pf_stop;
    pthread_cond_t         pf_work, pf_done;
    struct dblade_tensor * pf_head, * pf_tail, * pf_busy;
};

static _Thread_local struct dblade_session * tls_bound;

int dblade_abi_version(void) {
    return DBLADE_ABI_VERSION;
}

static void session_unref(struct dblade_session * s) {
    if (atomic_fetch_sub(&s->refs, 1) == 1) {
        if (s->pf_started) {
            pthread_mutex_lock(&s->lock);
            s->pf_stop = true;
            pthread_cond_broadcast(&s->pf_work);
            pthread_mutex_unlock(&s->lock);
            pthread_join(s->pf_thread, NULL);
        }
        pthread_cond_destroy(&s->pf_work);
        pthread_cond_destroy(&s->pf_done);
        dblade_store_close(&s->store);
        pthread_mutex_destroy(&s->lock);
        free(s->layout);
        free(s->kv_dir);
        free(s->kv_device);
        free(s);
    }
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

int dblade_session_create(const struct dblade_config * cfg, uint32_t n_layers,
                          const struct dblade_layout_layer * layers, struct dblade_session ** out) {
    dblade_set_error("%s", "");
    if (!cfg || !out || cfg->policy > DBLADE_POLICY_AUTO || (cfg->flags & ~(uint32_t) DBLADE_CONFIG_FORCE) ||
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
    s->active_il = -1;
    atomic_init(&s->refs, 1);
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->pf_work, NULL);
    pthread_cond_init(&s->pf_done, NULL);
    if ((cfg->kv_dir && !s->kv_dir) || (cfg->kv_device && !s->kv_device) || !s->layout) {
        session_unref(s);
        return -ENOMEM;
    }
    s->config.kv_dir    = s->kv_dir;
    s->config.kv_device = s->kv_device;

    // extents for the offloaded layers, in layer order, aligned
    uint64_t cursor = 0;
    for (uint32_t i = 0; i < n_layers; i++) {
        struct layout_entry * e = &s->layout[i];
        e->l = layers[i];
        if (e->l.path > DBLADE_PATH_DIRECT) {
            dblade_set_error("invalid path %u for layer %d", e->l.path, e->l.il);
            session_unref(s);
            return -EINVAL;
        }
        if (e->l.path != DBLADE_PATH_RAM) {
            e->k_off = cursor;
            cursor += dblade_align_up(e->l.k_bytes, 1u << 20);
            e->v_off = cursor;
            cursor += dblade_align_up(e->l.v_bytes, 1u << 20);
        }
    }
    s->n_layout = n_layers;
    if (cursor > 0) {
        int rc = dblade_store_open(&s->store, &s->config, cursor, dblade_layout_geometry(n_layers, layers), false);
        if (rc < 0) {
            session_unref(s);
            return rc;
        }
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
    session_unref(s);
}

int dblade_session_bind(struct dblade_session * s) {
    tls_bound = s;
    return 0;
}

static void fail(struct dblade_session * s, int rc, const char * fmt, ...) __attribute__((format(printf, 3, 4)));

static void fail(struct dblade_session * s, int rc, const char * fmt, ...) {
    if (s->error == 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(s->error_msg, sizeof(s->error_msg), fmt, ap);
        va_end(ap);
        s->error = rc;
    }
}

// --- the direct path: stage, write back, release ---

static void tensor_ensure_valid(struct dblade_session * s, struct dblade_tensor * t, uint64_t upto) {
    const uint64_t a = s->store.align;
    upto = dblade_align_up(upto, a);
    if (upto > t->map_bytes) {
        upto = t->map_bytes;
    }
    if (t->valid >= upto) {
        return;
    }
    uint64_t read_end = dblade_align_up(t->hwm, a);
    if (read_end > upto) {
        read_end = upto;
    }
    if (read_end > t->valid) {
        const uint64_t t0 = dblade_now_ns();
        const int      rc = dblade_io_read(s->store.fd, t->addr + t->valid, read_end - t->valid, t->store_off + t->valid);
        atomic_fetch_add(&t->io_wait_ns, dblade_now_ns() - t0);
        if (rc < 0) {
            fail(s, rc, "reading layer %d %c from %s failed: %s", t->il, "KV"[t->which], s->store.path, strerror(-rc));
        } else {
            atomic_fetch_add(&t->bytes_read, read_end - t->valid);
        }
    }
    s->staged_bytes += upto - t->valid;
    if (s->staged_bytes > s->staged_peak) {
        s->staged_peak = s->staged_bytes;
    }
    t->valid = upto;
}

static void tensor_release(struct dblade_session * s, struct dblade_tensor * t) {
    if (t->path != DBLADE_PATH_DIRECT || t->valid == 0) {
        return;
    }
    const uint64_t a = s->store.align;
    if (t->dirty_hi > t->dirty_lo) {
        const uint64_t lo = dblade_align_down(t->dirty_lo, a);
        const uint64_t hi = dblade_align_up(t->dirty_hi, a);
        const uint64_t t0 = dblade_now_ns();
        const int      rc = dblade_io_write(s->store.fd, t->addr + lo, hi - lo, t->store_off + lo);
        atomic_fetch_add(&t->io_wait_ns, dblade_now_ns() - t0);
        if (rc < 0) {
            fail(s, rc, "writing layer %d %c to %s failed: %s", t->il, "KV"[t->which], s->store.path, strerror(-rc));
        } else {
            atomic_fetch_add(&t->bytes_written, hi - lo);
        }
        t->dirty_lo = t->dirty_hi = 0;
    }
    madvise(t->addr, t->valid, MADV_DONTNEED);
    s->staged_bytes -= t->valid;
    t->valid = 0;
}

// --- the prefetcher ---

static struct dblade_tensor * tensor_of(struct dblade_cache * c, int32_t il, uint32_t which) {
    for (uint32_t i = 0; c && i < c->n_tensors; i++) {
        if (c->tensors[i].il == il && c->tensors[i].which == which) {
            return &c->tensors[i];
        }
    }
    return NULL;
}

static void * prefetch_main(void * arg) {
    struct dblade_session * s = arg;
    pthread_mutex_lock(&s->lock);
    for (;;) {
        while (!s->pf_head && !s->pf_stop) {
            pthread_cond_wait(&s->pf_work, &s->lock);
        }
        if (s->pf_stop) {
            break;
        }
        struct dblade_tensor * t = s->pf_head;
        s->pf_head = t->pf_next;
        if (!s->pf_head) {
            s->pf_tail = NULL;
        }
        t->pf_next = NULL;
        s->pf_busy = t;
        // nobody else touches t until it is READY: a fence for its layer waits for it first
        const uint64_t a    = s->store.align;
        const uint64_t off  = t->valid;
        uint64_t       end  = dblade_align_up(t->hwm, a);
        end = end < t->pf_upto ? end : t->pf_upto;
        pthread_mutex_unlock(&s->lock);

        int rc = 0;
        if (end > off) {
            rc = dblade_io_read(s->store.fd, t->addr + off, end - off, t->store_off + off);
        }

        pthread_mutex_lock(&s->lock);
        if (rc < 0) {
            fail(s, rc, "reading layer %d %c from %s failed: %s", t->il, "KV"[t->which], s->store.path, strerror(-rc));
        } else if (end > off) {
            atomic_fetch_add(&t->bytes_read, end - off);
        }
        if (t->pf_upto > t->valid) {
            s->staged_bytes += t->pf_upto - t->valid;
            s->staged_peak = s->staged_bytes > s->staged_peak ? s->staged_bytes : s->staged_peak;
            t->valid = t->pf_upto;
        }
        t->pf_state = PF_READY;
        s->pf_busy  = NULL;
        pthread_cond_broadcast(&s->pf_done);
    }
    pthread_mutex_unlock(&s->lock);
    return NULL;
}

// t's prefetch is finished or withdrawn; the time the graph waits for it is its stall
static void pf_settle(struct dblade_session * s, struct dblade_tensor * t) {
    if (t->pf_state != PF_QUEUED) {
        return;
    }
    if (s->pf_busy != t) {
        // still queued: withdraw it
        struct dblade_tensor ** p = &s->pf_head;
        while (*p && *p != t) {
            p = &(*p)->pf_next;
        }
        if (*p) {
            *p = t->pf_next;
            if (s->pf_tail == t) {
                s->pf_tail = NULL;
                for (struct dblade_tensor * q = s->pf_head; q; q = q->pf_next) {
                    s->pf_tail = q;
                }
            }
            t->pf_next  = NULL;
            t->pf_state = PF_IDLE;
            return;
        }
    }
    const uint64_t t0 = dblade_now_ns();
    while (t->pf_state == PF_QUEUED) {
        pthread_cond_wait(&s->pf_done, &s->lock);
    }
    atomic_fetch_add(&t->io_wait_ns, dblade_now_ns() - t0);
}

static void pf_enqueue(struct dblade_session * s, struct dblade_tensor * t) {
    const uint64_t a = s->store.align;
    if (!t || t->path != DBLADE_PATH_DIRECT || t->pf_state != PF_IDLE || t->valid >= dblade_align_up(t->hwm, a)) {
        return;
    }
    if (!s->pf_started) {
        if (pthread_create(&s->pf_thread, NULL, prefetch_main, s) != 0) {
            return; // no prefetch: fences stage synchronously
        }
        s->pf_started = true;
    }
    uint64_t upto = dblade_align_up(t->hwm, a);
    t->pf_upto  = upto < t->map_bytes ? upto : t->map_bytes;
    t->pf_state = PF_QUEUED;
    t->pf_next  = NULL;
    if (s->pf_tail) {
        s->pf_tail->pf_next = t;
    } else {
        s->pf_head = t;
    }
    s->pf_tail = t;
    pthread_cond_signal(&s->pf_work);
}

static void release_tensor(struct dblade_session * s, struct dblade_tensor * t) {
    pf_settle(s, t);
    tensor_release(s, t);
    t->pf_state = PF_IDLE;
}

static void release_all(struct dblade_session * s, struct dblade_cache * only) {
    for (struct dblade_cache * c = s->caches; c; c = c->next) {
        if (only && c != only) {
            continue;
        }
        for (uint32_t i = 0; i < c->n_tensors; i++) {
            release_tensor(s, &c->tensors[i]);
        }
    }
    s->active_cache = NULL;
    s->active_il    = -1;
}

static void settle_cache(struct dblade_session * s, struct dblade_cache * c) {
    for (uint32_t i = 0; i < c->n_tensors; i++) {
        pf_settle(s, &c->tensors[i]);
    }
}

// The graph moved to t's layer: the previous layer's attention is done. Wait for this layer's
// prefetch, release every other staged layer but the one predicted next, and start staging that
// one (the order of layers is learned from the previous pass: graphs repeat it).
static void enter_layer(struct dblade_session * s, struct dblade_tensor * t) {
    if (s->active_cache == t->cache && s->active_il == t->il) {
        return;
    }
    struct dblade_tensor * prev_k = tensor_of(s->active_cache, s->active_il, 0);
    if (prev_k) {
        prev_k->succ_cache = t->cache;
        prev_k->succ_il    = t->il;
    }
    for (uint32_t w = 0; w < 2; w++) {
        struct dblade_tensor * x = tensor_of(t->cache, t->il, w);
        if (x) {
            pf_settle(s, x);
            x->pf_state = PF_IDLE;
        }
    }
    // the next layer on the direct path, as the previous pass went
    struct dblade_cache * nc = NULL;
    int32_t               nl = -1;
    struct dblade_tensor * k = tensor_of(t->cache, t->il, 0);
    for (int hops = 0; k && k->succ_cache && hops < 1024; hops++) {
        struct dblade_tensor * nk = tensor_of(k->succ_cache, k->succ_il, 0);
        if (!nk || (nk->cache == t->cache && nk->il == t->il)) {
            break;
        }
        if (nk->path == DBLADE_PATH_DIRECT) {
            nc = nk->cache, nl = nk->il;
            break;
        }
        k = nk;
    }
    for (struct dblade_cache * c = s->caches; c; c = c->next) {
        for (uint32_t i = 0; i < c->n_tensors; i++) {
            struct dblade_tensor * x = &c->tensors[i];
            const bool keep = (c == t->cache && x->il == t->il) || (c == nc && x->il == nl);
            if (!keep) {
                release_tensor(s, x);
            }
        }
    }
    s->active_cache = t->cache;
    s->active_il    = t->il;
    if (nc) {
        pf_enqueue(s, tensor_of(nc, nl, 0));
        pf_enqueue(s, tensor_of(nc, nl, 1));
    }
}

void dblade_fence_write(struct dblade_tensor * t, const int64_t * rows, int64_t n, uint64_t row_bytes) {
    if (!t || t->path == DBLADE_PATH_RAM || n <= 0 || !rows) {
        return;
    }
    struct dblade_session * s = t->cache->session;
    int64_t                 r0 = rows[0], r1 = rows[0];
    for (int64_t i = 1; i < n; i++) {
        r0 = rows[i] < r0 ? rows[i] : r0;
        r1 = rows[i] > r1 ? rows[i] : r1;
    }
    const uint64_t lo = (uint64_t) r0 * row_bytes;
    const uint64_t hi = (uint64_t) (r1 + 1) * row_bytes;
    pthread_mutex_lock(&s->lock);
    enter_layer(s, t);
    if (t->path == DBLADE_PATH_DIRECT) {
        // the blocks the new rows land in must hold what the store has before the rows go in
        tensor_ensure_valid(s, t, hi);
        if (t->dirty_hi <= t->dirty_lo) {
            t->dirty_lo = lo, t->dirty_hi = hi;
        } else {
            t->dirty_lo = lo < t->dirty_lo ? lo : t->dirty_lo;
            t->dirty_hi = hi > t->dirty_hi ? hi : t->dirty_hi;
        }
    } else {
        // page-cache path: the kernel writes back the pages these rows dirty
        const long pg = sysconf(_SC_PAGESIZE);
        atomic_fetch_add(&t->bytes_written, dblade_align_up(hi, pg) - dblade_align_down(lo, pg));
    }
    if (hi > t->hwm) {
        t->hwm = hi;
    }
    pthread_mutex_unlock(&s->lock);
}

// pages of [addr, addr+len) not in memory; walked in chunks with a stack vector (no allocation:
// this runs on every read fence of a page-cache layer)
static uint64_t pages_missing(const uint8_t * addr, uint64_t len) {
    const uint64_t pg = (uint64_t) sysconf(_SC_PAGESIZE);
    uint64_t       n  = dblade_align_up(len, pg) / pg, missing = 0;
    unsigned char  vec[4096];
    for (uint64_t done = 0; done < n;) {
        const uint64_t k = n - done < sizeof(vec) ? n - done : sizeof(vec);
        if (mincore((void *) (addr + done * pg), k * pg, vec) != 0) {
            return 0;
        }
        for (uint64_t i = 0; i < k; i++) {
            missing += !(vec[i] & 1);
        }
        done += k;
    }
    return missing * pg;
}

void dblade_fence_read(struct dblade_tensor * t, const void * data, uint64_t nbytes) {
    if (!t || t->path == DBLADE_PATH_RAM) {
        return;
    }
    struct dblade_session * s = t->cache->session;
    const uint64_t          need = (uint64_t) ((const uint8_t *) data - t->addr) + nbytes;
    pthread_mutex_lock(&s->lock);
    enter_layer(s, t);
    if (t->path == DBLADE_PATH_DIRECT) {
        tensor_ensure_valid(s, t, need);
    } else {
        // page-cache path: what attention will fault in from the store
        const uint64_t upto = need < t->hwm ? need : t->hwm;
        atomic_fetch_add(&t->bytes_read, pages_missing(t->addr, upto));
    }
    pthread_mutex_unlock(&s->lock);
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

static void tensor_unmap(struct dblade_tensor * t) {
    if (t->addr) {
        munmap(t->addr, t->map_bytes);
        t->addr = NULL;
    }
}

static int tensor_map(struct dblade_session * s, struct dblade_tensor * t) {
    const long pg = sysconf(_SC_PAGESIZE);
    t->map_bytes = dblade_align_up(t->bytes ? t->bytes : 1, pg > (long) DBLADE_BLOCK ? (uint64_t) pg : DBLADE_BLOCK);
    void * p = mmap(NULL, t->map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
        return -errno;
    }
    t->addr = p;
    if (t->path == DBLADE_PATH_MMAP) {
        // same address, now the extent of the store: the page cache holds it
        void * q = mmap(p, t->map_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, s->store.fd, (off_t) t->store_off);
        if (q == MAP_FAILED) {
            int e = errno;
            tensor_unmap(t);
            return -e;
        }
    }
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
    c->session   = s;
    c->n_tensors = 2 * desc->n_layers;
    c->tensors   = calloc(c->n_tensors ? c->n_tensors : 1, sizeof(*c->tensors));
    if (!c->tensors) {
        free(c);
        return -ENOMEM;
    }
    int rc = 0;
    for (uint32_t i = 0; i < desc->n_layers && rc == 0; i++) {
        const struct dblade_layer_desc * d = &desc->layers[i];
        const struct layout_entry *      e = find_layout(s, d->il);
        uint32_t                         path = DBLADE_PATH_RAM;
        if (s->n_layout > 0) {
            if (!e || e->l.k_bytes != d->k_bytes || e->l.v_bytes != d->v_bytes) {
                dblade_set_error("layer %d of the KV cache (%llu + %llu bytes) is not the planned one (%llu + %llu)",
                                 d->il, (unsigned long long) d->k_bytes, (unsigned long long) d->v_bytes,
                                 e ? (unsigned long long) e->l.k_bytes : 0ull, e ? (unsigned long long) e->l.v_bytes : 0ull);
                rc = -EINVAL;
                break;
            }
            path = e->l.path;
        }
        if (path != DBLADE_PATH_RAM && (desc->v_trans || d->n_stream != 1)) {
            dblade_set_error("offloaded KV layers need flash attention (untransposed V) and one sequence stream");
            rc = -EOPNOTSUPP;
            break;
        }
        for (uint32_t w = 0; w < 2; w++) {
            struct dblade_tensor * t = &c->tensors[2 * i + w];
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
                break;
            }
        }
    }
    if (rc != 0) {
        for (uint32_t i = 0; i < c->n_tensors; i++) {
            tensor_unmap(&c->tensors[i]);
        }
        free(c->tensors);
        free(c);
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
    settle_cache(s, c);
    for (uint32_t i = 0; i < c->n_tensors; i++) {
        if (c->tensors[i].path == DBLADE_PATH_DIRECT) {
            s->staged_bytes -= c->tensors[i].valid; // the contents die with the cache
        }
    }
    // forget predictions that lead into this cache
    for (struct dblade_cache * o = s->caches; o; o = o->next) {
        for (uint32_t i = 0; i < o->n_tensors; i++) {
            if (o->tensors[i].succ_cache == c) {
                o->tensors[i].succ_cache = NULL;
            }
        }
    }
    if (s->active_cache == c) {
        s->active_cache = NULL;
        s->active_il    = -1;
    }
    for (struct dblade_cache ** p = &s->caches; *p; p = &(*p)->next) {
        if (*p == c) {
            *p = c->next;
            break;
        }
    }
    pthread_mutex_unlock(&s->lock);
    for (uint32_t i = 0; i < c->n_tensors; i++) {
        tensor_unmap(&c->tensors[i]);
    }
    free(c->tensors);
    free(c);
    session_unref(s);
}

struct dblade_tensor * dblade_cache_tensor(struct dblade_cache * c, int32_t il, uint32_t which) {
    return which > 1 ? NULL : tensor_of(c, il, which);
}

void * dblade_tensor_data(struct dblade_tensor * t) {
    return t ? t->addr : NULL;
}

void dblade_cache_clear(struct dblade_cache * c) {
    if (!c) {
        return;
    }
    struct dblade_session * s = c->session;
    pthread_mutex_lock(&s->lock);
    settle_cache(s, c);
    for (uint32_t i = 0; i < c->n_tensors; i++) {
        struct dblade_tensor * t = &c->tensors[i];
        t->pf_state = PF_IDLE;
        // metadata only: nothing is written to the store, rows above hwm are never read back
        if (t->path == DBLADE_PATH_DIRECT) {
            t->dirty_lo = t->dirty_hi = 0;
            madvise(t->addr, t->valid, MADV_DONTNEED);
            s->staged_bytes -= t->valid;
            t->valid = 0;
        } else if (t->path == DBLADE_PATH_RAM) {
            madvise(t->addr, t->map_bytes, MADV_DONTNEED); // zeros, like the stock clear
        }
        t->hwm = 0;
    }
    if (s->active_cache == c) {
        s->active_cache = NULL;
        s->active_il    = -1;
    }
    pthread_mutex_unlock(&s->lock);
}

int dblade_cache_can_shift(struct dblade_cache * c) {
    if (!c) {
        return 1;
    }
    for (uint32_t i = 0; i < c->n_tensors; i++) {
        if (c->tensors[i].path != DBLADE_PATH_RAM) {
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
    pthread_mutex_lock(&s->lock);
    // nothing is released here: with two caches (iSWA) the other one may hold restored rows that
    // llama.cpp has not copied in yet; staged dirty blocks simply stay staged
    settle_cache(s, c);
    for (uint32_t i = 0; i < c->n_tensors; i++) {
        if (c->tensors[i].path == DBLADE_PATH_DIRECT) {
            tensor_ensure_valid(s, &c->tensors[i], c->tensors[i].map_bytes);
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
    for (uint32_t i = 0; i < c->n_tensors; i++) {
        struct dblade_tensor * t = &c->tensors[i];
        if (t->path == DBLADE_PATH_RAM || rows_written == 0) {
            continue;
        }
        uint64_t hi = rows_written * t->row_bytes;
        hi = hi > t->bytes ? t->bytes : hi;
        if (t->path == DBLADE_PATH_DIRECT) {
            // memory was staged whole (or zeroed by a clear) before the host wrote the rows
            s->staged_bytes += t->map_bytes - t->valid;
            t->valid    = t->map_bytes;
            t->dirty_lo = 0;
            t->dirty_hi = hi;
        }
        t->hwm = hi > t->hwm ? hi : t->hwm;
    }
    if (s->staged_bytes > s->staged_peak) {
        s->staged_peak = s->staged_bytes;
    }
    // not released here: llama.cpp copies the tensor data when its io object is destroyed, after
    // this returns; the next fence (or a flush) writes the rows back and releases the memory
    s->active_cache = NULL;
    s->active_il    = -1;
    pthread_mutex_unlock(&s->lock);
}

int dblade_session_flush(struct dblade_session * s) {
    if (!s) {
        return -EINVAL;
    }
    pthread_mutex_lock(&s->lock);
    release_all(s, NULL);
    const int rc = s->error;
    pthread_mutex_unlock(&s->lock);
    return rc;
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

// --- statistics ---

static uint64_t tensor_resident(const struct dblade_tensor * t) {
    switch (t->path) {
        case DBLADE_PATH_RAM:    return t->bytes;
        case DBLADE_PATH_DIRECT: return t->valid;
        default:                 return t->map_bytes - pages_missing(t->addr, t->map_bytes);
    }
}

static void layer_stats(const struct dblade_tensor * k, const struct dblade_tensor * v, struct dblade_layer_stats * o) {
    o->il             = k->il;
    o->path           = k->path;
    o->bytes          = k->bytes + v->bytes;
    o->resident_bytes = tensor_resident(k) + tensor_resident(v);
    if (o->resident_bytes > o->bytes) {
        o->resident_bytes = o->bytes;
    }
    o->bytes_read    = atomic_load(&k->bytes_read) + atomic_load(&v->bytes_read);
    o->bytes_written = atomic_load(&k->bytes_written) + atomic_load(&v->bytes_written);
    o->io_wait_ns    = atomic_load(&k->io_wait_ns) + atomic_load(&v->io_wait_ns);
}

int dblade_session_stats(struct dblade_session * s, struct dblade_stats * out) {
    if (!s || !out) {
        return -EINVAL;
    }
    memset(out, 0, sizeof(*out));
    out->policy       = s->config.policy;
    out->budget_bytes = s->config.budget_bytes;
    pthread_mutex_lock(&s->lock);
    out->staged_bytes = s->staged_bytes;
    out->staged_peak  = s->staged_peak;
    for (struct dblade_cache * c = s->caches; c; c = c->next) {
        for (uint32_t i = 0; i + 1 < c->n_tensors; i += 2) {
            struct dblade_layer_stats ls;
            layer_stats(&c->tensors[i], &c->tensors[i + 1], &ls);
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
        n += c->n_tensors / 2;
    }
    struct dblade_layer_stats * all = calloc(n ? n : 1, sizeof(*all));
    if (!all) {
        pthread_mutex_unlock(&s->lock);
        return -ENOMEM;
    }
    uint32_t k = 0;
    for (struct dblade_cache * c = s->caches; c; c = c->next) {
        for (uint32_t i = 0; i + 1 < c->n_tensors; i += 2) {
            layer_stats(&c->tensors[i], &c->tensors[i + 1], &all[k++]);
        }
    }
    pthread_mutex_unlock(&s->lock);
    qsort(all, n, sizeof(*all), cmp_il);
    memcpy(out, all, sizeof(*all) * (n < cap ? n : cap));
    free(all);
    return (int) n;
}
