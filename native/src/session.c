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
    uint32_t              want;          // path wanted (auto policy, set_path); applied when the layer is entered
    char                  want_why[100];  // why (K tensor)
    uint64_t              bytes;     // the ggml tensor
    uint64_t              map_bytes; // its address range, whole pages
    uint64_t              page;
    uint64_t              gran; // allocation unit of its staged memory: a page, or a huge page
    uint64_t              row_bytes;
    uint8_t *             addr;
    uint64_t              store_off; // absolute offset of the extent in the store (offloaded only)
    uint64_t              valid, hwm, dirty_lo, dirty_hi;
    uint64_t              tail;      // direct: page kept in memory (dirty) while the rest is released
    uint32_t *            sums;      // offloaded: CRC-32C per block as last written by the direct path (0: unknown)
    _Atomic uint64_t      bytes_read, bytes_written, io_wait_ns;
    // the I/O job (guarded by the session lock)
    int                    job; // JOB_NONE, JOB_STAGE, JOB_RETIRE
    bool                   job_running, job_has_req;
    uint32_t               job_req;
    uint64_t               job_upto, job_keep, job_pending;
    struct dblade_tensor * job_next;   // queue link
    struct dblade_tensor * job_batch;  // the worker's batch
    struct dblade_cache *  succ_cache; // K tensor: the layer the graph entered after this one
    int32_t                succ_il;
};

#define NO_TAIL UINT64_MAX
enum { JOB_NONE = 0, JOB_STAGE = 1, JOB_RETIRE = 2 };

#define DBLADE_IO_BATCH    (32ull << 20) // a worker batch: enough bytes in flight to saturate a device
#define DBLADE_IO_INFLIGHT (32ull << 20) // what the pipeline aims to keep in flight when I/O bound
#define DBLADE_MAX_DEPTH   8u
#define WORKER_BATCH       64u
#define DBLADE_SWITCH_LOG  64u

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
    uint64_t              t0_ns;
    pthread_mutex_t       lock; // guards everything below
    struct dblade_cache * caches;
    uint32_t              n_layout;
    struct layout_entry * layout;
    uint64_t              allowance;    // what the direct path may stage: the budget less the pinned layers
    uint64_t              stage_pending; // bytes queued STAGE jobs will add
    uint64_t              huge;          // direct tensors use transparent huge pages of this size (0: no)
    bool                  thp;           // the kernel has transparent huge pages
    struct dblade_store   store;
    struct dblade_io *    io;
    uint64_t              staged_bytes, staged_peak;
    struct dblade_cache * active_cache; // the layer the graph is at
    int32_t               active_il;
    int                   error;
    char                  error_msg[256];
    uint64_t              n_io_errors;
    uint64_t              touched_end; // the store was written below this offset
    // the worker: runs the direct path's jobs while the graph computes
    pthread_t              worker;
    bool                   worker_started, worker_stop;
    pthread_cond_t         work, done;
    struct dblade_tensor * q_head, * q_tail;
    struct dblade_io_req   batch_reqs[WORKER_BATCH];
    // the pipeline
    uint32_t depth;
    double   bw_ema;         // bytes per ns the device gave the worker
    double   compute_ema_ns; // between entering two offloaded layers, stalls excluded
    uint64_t last_enter_ns, stall_since_enter;
    // the auto policy
    struct dblade_monitor      monitor;
    struct dblade_mem_sample   last_sample;
    struct dblade_auto_state   auto_state;
    struct dblade_auto_layer * auto_layers;
    uint32_t                   n_auto;
    uint64_t                   next_sample_ns;
    struct dblade_switch       switches[DBLADE_SWITCH_LOG];
    uint64_t                   n_switches;
};

static _Thread_local struct dblade_session * tls_bound;

int dblade_abi_version(void) {
    return DBLADE_ABI_VERSION;
}

static void session_unref(struct dblade_session * s) {
    if (atomic_fetch_sub(&s->refs, 1) == 1) {
        if (s->worker_started) {
            pthread_mutex_lock(&s->lock);
            s->worker_stop = true;
            pthread_cond_broadcast(&s->work);
            pthread_mutex_unlock(&s->lock);
            pthread_join(s->worker, NULL);
        }
        pthread_cond_destroy(&s->work);
        pthread_cond_destroy(&s->done);
        dblade_io_close(s->io);
        dblade_store_close(&s->store);
        free(s->auto_layers);
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

static void auto_start(struct dblade_session * s);

// Huge pages for the direct path's staging when the kernel offers them (THP not "never";
// DUALBLADE_HUGE_PAGES=0 turns them off) and the budget holds two offloaded layers rounded up to them.
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

static uint64_t huge_page_size(const struct dblade_session * s) {
    const uint64_t huge = DBLADE_HUGE_PAGE;
    if (!s->thp) {
        return 0;
    }
    uint64_t max_layer = 0;
    for (uint32_t i = 0; i < s->n_layout; i++) {
        const struct layout_entry * e = &s->layout[i];
        if (e->l.path != DBLADE_PATH_RAM) {
            const uint64_t fp = dblade_align_up(e->l.k_bytes, huge) + dblade_align_up(e->l.v_bytes, huge);
            max_layer         = fp > max_layer ? fp : max_layer;
        }
    }
    return max_layer > 0 && s->allowance >= dblade_staging_bytes(max_layer, s->n_auto) ? huge : 0;
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
    s->active_il = -1;
    atomic_init(&s->refs, 1);
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->work, NULL);
    pthread_cond_init(&s->done, NULL);
    s->t0_ns       = dblade_now_ns();
    s->auto_layers = calloc(n_layers ? n_layers : 1, sizeof(*s->auto_layers));
    if ((cfg->kv_dir && !s->kv_dir) || (cfg->kv_device && !s->kv_device) || !s->layout || !s->auto_layers) {
        session_unref(s);
        return -ENOMEM;
    }
    s->config.kv_dir    = s->kv_dir;
    s->config.kv_device = s->kv_device;

    // extents for the offloaded layers, in layer order, aligned
    uint64_t cursor = 0, pinned = 0;
    for (uint32_t i = 0; i < n_layers; i++) {
        struct layout_entry * e = &s->layout[i];
        e->l = layers[i];
        if (e->l.path > DBLADE_PATH_DIRECT) {
            dblade_set_error("invalid path %u for layer %d", e->l.path, e->l.il);
            session_unref(s);
            return -EINVAL;
        }
        if (e->l.path == DBLADE_PATH_RAM) {
            pinned += e->l.k_bytes + e->l.v_bytes;
        } else {
            s->n_auto++;
            e->k_off = cursor;
            cursor += dblade_align_up(e->l.k_bytes, 1u << 20);
            e->v_off = cursor;
            cursor += dblade_align_up(e->l.v_bytes, 1u << 20);
        }
    }
    s->n_layout  = n_layers;
    s->allowance = cfg->budget_bytes == DBLADE_BUDGET_UNLIMITED ? UINT64_MAX
                   : cfg->budget_bytes > pinned                 ? cfg->budget_bytes - pinned
                                                                : 0;
    s->thp  = thp_available();
    s->huge = huge_page_size(s);
    if (cursor > 0) {
        int rc = dblade_store_open(&s->store, &s->config, cursor, dblade_layout_geometry(n_layers, layers), false);
        if (rc < 0) {
            session_unref(s);
            return rc;
        }
        rc = dblade_io_open(&s->io, s->store.fd);
        if (rc < 0) {
            session_unref(s);
            return rc;
        }
    }
    if (cfg->policy == DBLADE_POLICY_AUTO && s->n_auto > 0) {
        auto_start(s);
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
//
// Each direct tensor has at most one I/O job at a time, queued for the worker thread or run by it:
//  - STAGE: read [valid, upto) of what the store holds (nothing above hwm, nothing over the tail);
//  - RETIRE: write the dirty blocks back and give the memory back, keeping the tail (below).
// A job still queued can be withdrawn (a STAGE) or cancelled (a RETIRE: the tensor stays staged);
// one running is waited for. Nobody else touches a tensor's memory or fields while its job runs.
//
// The tail: in decode every token adds one row per layer, far less than a block. Writing the
// block it lands in after every token would rewrite (and, on a new pass, re-read) it each time, so
// the page holding the newest rows stays in memory, dirty, while the rest of the layer is released;
// it is written once full, or on a flush (save_state, close, a switch of path). Durability rule:
// the store holds every row of a direct layer except those in its tail page, until the next flush.

static struct dblade_tensor * tensor_of(struct dblade_cache * c, int32_t il, uint32_t which) {
    for (uint32_t i = 0; c && i < c->n_tensors; i++) {
        if (c->tensors[i].il == il && c->tensors[i].which == which) {
            return &c->tensors[i];
        }
    }
    return NULL;
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

static uint64_t pages_resident(const uint8_t * addr, uint64_t len) {
    const uint64_t pg = (uint64_t) sysconf(_SC_PAGESIZE);
    return dblade_align_up(len, pg) - pages_missing(addr, len);
}

// Staging memory given back after every layer and touched again on the next pass costs a page
// fault and a zeroed page per 4 KiB (measured here: a third of the decode time of an I/O-bound
// model); huge pages cut that 512-fold. Used where the budget has room for their rounding.
static void use_huge_pages(struct dblade_session * s, struct dblade_tensor * t) {
    if (s->huge && madvise(t->addr, t->map_bytes, MADV_HUGEPAGE) == 0) {
        t->gran = s->huge;
    }
}

// A pinned tensor is faulted in when the cache is created, as stock llama.cpp does when it clears
// its KV buffer: otherwise the first prefill pays a page fault and a zeroed page per 4 KiB (on a VM
// that hands free memory back to its host, seconds per GiB). Huge pages where the kernel has them.
static void pin_pages(struct dblade_session * s, struct dblade_tensor * t) {
    if (s->thp) {
        madvise(t->addr, t->map_bytes, MADV_HUGEPAGE);
    }
#ifndef MADV_POPULATE_WRITE
#    define MADV_POPULATE_WRITE 23
#endif
    if (madvise(t->addr, t->map_bytes, MADV_POPULATE_WRITE) != 0) {
        for (uint64_t off = 0; off < t->map_bytes; off += t->page) {
            ((volatile uint8_t *) t->addr)[off] = 0;
        }
    }
}

// memory a direct tensor holds: staged bytes in whole pages of its granularity (a huge page is
// allocated whole), and its tail page
static uint64_t tensor_staged(const struct dblade_tensor * t) {
    return dblade_align_up(t->valid, t->gran) + (t->tail != NO_TAIL ? t->page : 0);
}

// what staging t up to upto adds to its memory
static uint64_t stage_growth(const struct dblade_tensor * t, uint64_t upto) {
    const uint64_t now = dblade_align_up(t->valid, t->gran), then = dblade_align_up(upto, t->gran);
    return then > now ? then - now : 0;
}

static void staged_set(struct dblade_session * s, struct dblade_tensor * t, uint64_t before) {
    s->staged_bytes += tensor_staged(t);
    s->staged_bytes -= before;
    if (s->staged_bytes > s->staged_peak) {
        s->staged_peak = s->staged_bytes;
    }
}

static uint64_t tensor_stage_end(const struct dblade_session * s, const struct dblade_tensor * t, uint64_t upto) {
    uint64_t end = dblade_align_up(t->hwm, s->store.align);
    end          = end < upto ? end : upto;
    return end < t->tail ? end : t->tail;
}

// the read that brings [valid, upto) in; upto is aligned by the caller
static bool stage_plan(struct dblade_session * s, struct dblade_tensor * t, uint64_t upto, struct dblade_io_req * r) {
    const uint64_t end = tensor_stage_end(s, t, upto);
    if (end <= t->valid) {
        return false;
    }
    *r = (struct dblade_io_req) { .buf  = t->addr + t->valid,
                                  .len  = end - t->valid,
                                  .off  = t->store_off + t->valid,
                                  .sums = t->sums ? t->sums + t->valid / DBLADE_BLOCK : NULL };
    return true;
}

static void stage_finish(struct dblade_session * s, struct dblade_tensor * t, uint64_t upto) {
    const uint64_t before = tensor_staged(t);
    if (upto > t->valid) {
        t->valid = upto;
    }
    if (t->tail != NO_TAIL && t->valid > t->tail) {
        // the tail page is inside the staged range now: all of it is in memory
        t->valid = t->valid > t->tail + t->page ? t->valid : t->tail + t->page;
        t->tail  = NO_TAIL;
    }
    staged_set(s, t, before);
}

// every byte of the page at p is authoritative in memory
static bool page_in_memory(const struct dblade_session * s, const struct dblade_tensor * t, uint64_t p) {
    if (t->tail == p) {
        return true;
    }
    const uint64_t data_end = dblade_align_up(t->hwm, s->store.align);
    const uint64_t need     = p + t->page < data_end ? p + t->page : data_end;
    return t->valid >= need;
}

// The write of a RETIRE (full: the tail too) and the tail page to keep (NO_TAIL for none).
static bool retire_plan(struct dblade_session * s, struct dblade_tensor * t, bool full, struct dblade_io_req * r,
                        uint64_t * keep) {
    *keep = NO_TAIL;
    if (t->dirty_hi <= t->dirty_lo) {
        return false;
    }
    const uint64_t a  = s->store.align;
    uint64_t       lo = dblade_align_down(t->dirty_lo, a);
    uint64_t       hi = dblade_align_up(t->dirty_hi, a);
    hi                = hi < t->map_bytes ? hi : t->map_bytes;
    if (!full && t->dirty_hi % t->page != 0) {
        const uint64_t tp = dblade_align_down(t->dirty_hi - 1, t->page);
        if (dblade_align_up(t->hwm, t->page) == tp + t->page && page_in_memory(s, t, tp)) {
            *keep = tp;
            hi    = tp > lo ? tp : lo;
        }
    }
    if (hi <= lo) {
        return false;
    }
    *r = (struct dblade_io_req) { .buf   = t->addr + lo,
                                  .len   = hi - lo,
                                  .off   = t->store_off + lo,
                                  .write = 1,
                                  .sums  = t->sums ? t->sums + lo / DBLADE_BLOCK : NULL };
    return true;
}

// after the write: give the memory back, all but the kept tail page (no lock needed: the tensor's
// job is running, nobody else touches it)
static void retire_release(struct dblade_tensor * t, uint64_t keep) {
    const uint64_t tail_end = t->tail != NO_TAIL ? t->tail + t->page : 0;
    const uint64_t end      = dblade_align_up(t->valid > tail_end ? t->valid : tail_end, t->page);
    if (keep == NO_TAIL) {
        madvise(t->addr, end, MADV_DONTNEED);
        return;
    }
    if (keep > 0) {
        madvise(t->addr, keep, MADV_DONTNEED);
    }
    if (end > keep + t->page) {
        madvise(t->addr + keep + t->page, end - keep - t->page, MADV_DONTNEED);
    }
}

static void retire_finish(struct dblade_session * s, struct dblade_tensor * t, uint64_t keep) {
    const uint64_t before = tensor_staged(t);
    t->valid              = 0;
    t->tail               = keep;
    if (keep == NO_TAIL) {
        t->dirty_lo = t->dirty_hi = 0;
    } else if (t->dirty_lo < keep) {
        t->dirty_lo = keep;
    }
    staged_set(s, t, before);
}

static void io_failed(struct dblade_session * s, struct dblade_tensor * t, const struct dblade_io_req * r) {
    s->n_io_errors++;
    fail(s, r->res, "%s layer %d %c %s %s failed: %s", r->write ? "writing" : "reading", t->il, "KV"[t->which],
         r->write ? "to" : "from", s->store.path,
         r->res == -EBADMSG ? "checksum mismatch (the store returned other data than was written)"
                            : strerror(-r->res));
}

static void io_account(struct dblade_tensor * t, const struct dblade_io_req * r) {
    if (r->res == 0) {
        atomic_fetch_add(r->write ? &t->bytes_written : &t->bytes_read, r->len);
    }
}

// one transfer on the calling thread (the session lock held): the graph needs it now
static int io_now(struct dblade_session * s, struct dblade_tensor * t, struct dblade_io_req * r) {
    const uint64_t t0 = dblade_now_ns();
    dblade_io_run(s->io, r, 1);
    const uint64_t dt = dblade_now_ns() - t0;
    atomic_fetch_add(&t->io_wait_ns, dt);
    s->stall_since_enter += dt;
    io_account(t, r);
    if (r->res < 0) {
        io_failed(s, t, r);
    }
    return r->res;
}

// --- the worker: runs queued jobs in batches that keep the device busy ---

static void queue_remove(struct dblade_session * s, struct dblade_tensor * t) {
    struct dblade_tensor * prev = NULL;
    for (struct dblade_tensor * q = s->q_head; q; prev = q, q = q->job_next) {
        if (q == t) {
            if (prev) {
                prev->job_next = t->job_next;
            } else {
                s->q_head = t->job_next;
            }
            if (s->q_tail == t) {
                s->q_tail = prev;
            }
            t->job_next = NULL;
            return;
        }
    }
}

static void job_done(struct dblade_session * s, struct dblade_tensor * t) {
    if (t->job == JOB_STAGE) {
        s->stage_pending -= t->job_pending;
    }
    t->job_pending = 0;
    t->job         = JOB_NONE;
    t->job_running = false;
}

static void * worker_main(void * arg) {
    struct dblade_session * s = arg;
    pthread_mutex_lock(&s->lock);
    for (;;) {
        while (!s->q_head && !s->worker_stop) {
            pthread_cond_wait(&s->work, &s->lock);
        }
        if (s->worker_stop) {
            break;
        }
        // a batch: jobs in queue order until enough bytes are in flight
        struct dblade_tensor * batch = NULL, ** link = &batch;
        uint32_t               n     = 0;
        uint64_t               bytes = 0;
        while (s->q_head && bytes < DBLADE_IO_BATCH && n < WORKER_BATCH) {
            struct dblade_tensor * t = s->q_head;
            s->q_head                = t->job_next;
            if (!s->q_head) {
                s->q_tail = NULL;
            }
            t->job_next    = NULL;
            t->job_running = true;
            t->job_has_req = t->job == JOB_STAGE ? stage_plan(s, t, t->job_upto, &s->batch_reqs[n])
                                                 : retire_plan(s, t, false, &s->batch_reqs[n], &t->job_keep);
            if (t->job_has_req) {
                t->job_req = n;
                bytes += s->batch_reqs[n].len;
                n++;
            }
            *link = t;
            link  = &t->job_batch;
        }
        *link = NULL;
        pthread_mutex_unlock(&s->lock);

        const uint64_t t0 = dblade_now_ns();
        dblade_io_run(s->io, s->batch_reqs, n);
        const uint64_t dt = dblade_now_ns() - t0;
        for (struct dblade_tensor * t = batch; t; t = t->job_batch) {
            if (t->job == JOB_RETIRE && (!t->job_has_req || s->batch_reqs[t->job_req].res == 0)) {
                retire_release(t, t->job_keep);
            }
        }

        pthread_mutex_lock(&s->lock);
        if (bytes >= (1u << 20) && dt > 0) {
            // device speed, for the pipeline depth (bytes per ns, smoothed)
            const double bw = (double) bytes / (double) dt;
            s->bw_ema       = s->bw_ema > 0 ? 0.8 * s->bw_ema + 0.2 * bw : bw;
        }
        for (struct dblade_tensor * t = batch, * next; t; t = next) {
            next         = t->job_batch;
            t->job_batch = NULL;
            bool ok      = true;
            if (t->job_has_req) {
                struct dblade_io_req * r = &s->batch_reqs[t->job_req];
                io_account(t, r);
                if (r->res < 0) {
                    io_failed(s, t, r);
                    ok = false;
                }
            }
            if (ok) {
                if (t->job == JOB_STAGE) {
                    stage_finish(s, t, t->job_upto);
                } else {
                    retire_finish(s, t, t->job_keep);
                }
            }
            job_done(s, t);
        }
        pthread_cond_broadcast(&s->done);
    }
    pthread_mutex_unlock(&s->lock);
    return NULL;
}

// t has no job left: a queued one is withdrawn (STAGE) or cancelled (RETIRE, t stays staged),
// a running one waited for; the wait is the graph's stall
static void settle(struct dblade_session * s, struct dblade_tensor * t) {
    if (t->job == JOB_NONE) {
        return;
    }
    if (!t->job_running) {
        queue_remove(s, t);
        job_done(s, t);
        return;
    }
    const uint64_t t0 = dblade_now_ns();
    while (t->job != JOB_NONE) {
        pthread_cond_wait(&s->done, &s->lock);
    }
    const uint64_t dt = dblade_now_ns() - t0;
    atomic_fetch_add(&t->io_wait_ns, dt);
    s->stall_since_enter += dt;
}

static bool enqueue(struct dblade_session * s, struct dblade_tensor * t, int job, uint64_t upto) {
    if (!s->worker_started) {
        if (pthread_create(&s->worker, NULL, worker_main, s) != 0) {
            return false; // no worker: the fences do every transfer themselves
        }
        s->worker_started = true;
    }
    t->job      = job;
    t->job_upto = upto;
    t->job_next = NULL;
    if (job == JOB_STAGE) {
        t->job_pending = stage_growth(t, upto);
        s->stage_pending += t->job_pending;
    }
    if (s->q_tail) {
        s->q_tail->job_next = t;
    } else {
        s->q_head = t;
    }
    s->q_tail = t;
    pthread_cond_signal(&s->work);
    return true;
}

static void retire_later(struct dblade_session * s, struct dblade_tensor * t);

static bool is_active(const struct dblade_session * s, const struct dblade_tensor * t) {
    return t->cache == s->active_cache && t->il == s->active_il;
}

// Staging `bytes` more must stay inside the budget: withdraw queued prefetches, retire staged
// layers other than the one computing, and wait for the worker to give their memory back.
static void make_room(struct dblade_session * s, uint64_t bytes) {
    const uint64_t t0 = dblade_now_ns();
    while (s->staged_bytes + s->stage_pending + bytes > s->allowance) {
        bool acted = false;
        for (struct dblade_tensor * q = s->q_head, * next; q; q = next) {
            next = q->job_next;
            if (q->job == JOB_STAGE && !is_active(s, q)) {
                queue_remove(s, q);
                job_done(s, q);
                acted = true;
            }
        }
        for (struct dblade_cache * c = s->caches; c && !acted; c = c->next) {
            for (uint32_t i = 0; i < c->n_tensors; i++) {
                struct dblade_tensor * x = &c->tensors[i];
                if (x->path == DBLADE_PATH_DIRECT && x->job == JOB_NONE && x->valid > 0 && !is_active(s, x)) {
                    retire_later(s, x);
                    acted = true;
                }
            }
        }
        if (acted) {
            continue;
        }
        bool busy = s->q_head != NULL;
        for (struct dblade_cache * c = s->caches; c && !busy; c = c->next) {
            for (uint32_t i = 0; i < c->n_tensors && !busy; i++) {
                busy = c->tensors[i].job != JOB_NONE && !is_active(s, &c->tensors[i]);
            }
        }
        if (!busy) {
            break; // what is left is the layer computing: the plan's staging reserve covers it
        }
        pthread_cond_wait(&s->done, &s->lock);
    }
    s->stall_since_enter += dblade_now_ns() - t0;
}

// t in memory up to upto (at least), now; inside the budget unless for a state copy (which
// llama.cpp makes of every layer at once, outside any graph)
static void tensor_stage_now(struct dblade_session * s, struct dblade_tensor * t, uint64_t upto, bool budgeted) {
    settle(s, t);
    upto = dblade_align_up(upto, s->store.align);
    upto = upto < t->map_bytes ? upto : t->map_bytes;
    if (t->valid >= upto) {
        return;
    }
    if (budgeted) {
        make_room(s, stage_growth(t, upto));
    }
    struct dblade_io_req r;
    if (stage_plan(s, t, upto, &r) && io_now(s, t, &r) < 0) {
        return;
    }
    stage_finish(s, t, upto);
}

// write back (all of it when full) and release now
static void tensor_retire_now(struct dblade_session * s, struct dblade_tensor * t, bool full) {
    settle(s, t);
    if (t->path != DBLADE_PATH_DIRECT || (t->valid == 0 && (!full || t->tail == NO_TAIL))) {
        return;
    }
    struct dblade_io_req r;
    uint64_t             keep;
    if (retire_plan(s, t, full, &r, &keep) && io_now(s, t, &r) < 0) {
        return;
    }
    retire_release(t, keep);
    retire_finish(s, t, keep);
}

static void retire_later(struct dblade_session * s, struct dblade_tensor * t) {
    if (t->path != DBLADE_PATH_DIRECT || t->job != JOB_NONE || t->valid == 0) {
        return;
    }
    if (!enqueue(s, t, JOB_RETIRE, 0)) {
        tensor_retire_now(s, t, false);
    }
}

static void stage_later(struct dblade_session * s, struct dblade_tensor * t) {
    if (!t || t->path != DBLADE_PATH_DIRECT) {
        return;
    }
    if (t->job == JOB_RETIRE && !t->job_running) {
        queue_remove(s, t); // wanted again before it left: it stays staged
        job_done(s, t);
    }
    uint64_t upto = dblade_align_up(t->hwm, s->store.align);
    upto          = upto < t->map_bytes ? upto : t->map_bytes;
    // prefetch only inside the budget: staged + queued + this <= allowance
    if (t->job == JOB_NONE && tensor_stage_end(s, t, upto) > t->valid &&
        s->staged_bytes + s->stage_pending + stage_growth(t, upto) <= s->allowance) {
        enqueue(s, t, JOB_STAGE, upto);
    }
}

// --- switching a layer between the page-cache and the direct path (same address, same data) ---

static void log_switch(struct dblade_session * s, int32_t il, uint32_t from, uint32_t to, const char * why) {
    struct dblade_switch * e = &s->switches[s->n_switches % DBLADE_SWITCH_LOG];
    e->t_ms                  = (dblade_now_ns() - s->t0_ns) / 1000000u;
    e->il                    = il;
    e->from                  = from;
    e->to                    = to;
    snprintf(e->reason, sizeof(e->reason), "%s", why);
    s->n_switches++;
}

static void tensor_switch(struct dblade_session * s, struct dblade_tensor * t, uint32_t to) {
    if (to == DBLADE_PATH_DIRECT) {
        // page cache -> direct: the store gets every dirty page, the page cache lets go of the
        // extent, and the address becomes anonymous memory with nothing staged
        if (msync(t->addr, t->map_bytes, MS_SYNC) != 0) {
            fail(s, -errno, "writing layer %d %c to %s failed: %s", t->il, "KV"[t->which], s->store.path, strerror(errno));
            return;
        }
        if (mmap(t->addr, t->map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE,
                 -1, 0) == MAP_FAILED) {
            fail(s, -errno, "cannot remap layer %d: %s", t->il, strerror(errno));
            return;
        }
        posix_fadvise(s->store.fd, (off_t) t->store_off, (off_t) t->map_bytes, POSIX_FADV_DONTNEED);
        t->valid = 0, t->tail = NO_TAIL, t->dirty_lo = t->dirty_hi = 0;
        use_huge_pages(s, t);
    } else {
        // direct -> page cache: everything written (the tail too), then the extent mapped in place
        tensor_retire_now(s, t, true);
        if (s->error) {
            return;
        }
        if (mmap(t->addr, t->map_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, s->store.fd,
                 (off_t) t->store_off) == MAP_FAILED) {
            fail(s, -errno, "cannot map layer %d of %s: %s", t->il, s->store.path, strerror(errno));
            return;
        }
        t->gran = t->page;
        if (t->sums) {
            // the kernel writes this extent from now on: its blocks are checked again once the
            // direct path has written them
            memset(t->sums, 0, t->map_bytes / DBLADE_BLOCK * sizeof(*t->sums));
        }
    }
    t->path = to;
}

// apply a pending switch of t's layer (both tensors); the graph has not touched the layer yet
static void layer_switch(struct dblade_session * s, struct dblade_tensor * t) {
    struct dblade_tensor * k = tensor_of(t->cache, t->il, 0);
    struct dblade_tensor * v = tensor_of(t->cache, t->il, 1);
    if (!k || !v || k->want == k->path || s->error) {
        return;
    }
    const uint32_t from = k->path, to = k->want;
    tensor_switch(s, k, to);
    tensor_switch(s, v, to);
    log_switch(s, t->il, from, to, k->want_why);
}

// --- the auto policy: sample memory now and then, decide, mark layers to switch ---

static void auto_tick(struct dblade_session * s) {
    const uint64_t now = dblade_now_ns();
    if (s->config.policy != DBLADE_POLICY_AUTO || now < s->next_sample_ns) {
        return;
    }
    s->next_sample_ns = now + DBLADE_MONITOR_PERIOD_NS;
    dblade_monitor_sample(&s->monitor, &s->last_sample);
    uint32_t n = 0;
    for (struct dblade_cache * c = s->caches; c; c = c->next) {
        for (uint32_t i = 0; i + 1 < c->n_tensors; i += 2) {
            struct dblade_tensor * k = &c->tensors[i], * v = &c->tensors[i + 1];
            if (k->path == DBLADE_PATH_RAM || n >= s->n_auto) {
                continue;
            }
            struct dblade_auto_layer * a = &s->auto_layers[n++];
            a->want                      = k->want;
            a->need_bytes                = dblade_align_up(k->hwm, k->page) + dblade_align_up(v->hwm, v->page);
            a->full_bytes                = k->map_bytes + v->map_bytes;
            a->resident_bytes            = k->path == DBLADE_PATH_MMAP
                                               ? pages_resident(k->addr, k->hwm) + pages_resident(v->addr, v->hwm)
                                               : 0;
        }
    }
    // the direct path's staging comes and goes between layers: a sample taken while it is released
    // must not read its allowance as room for the page cache
    uint64_t reserve = s->config.reserve_bytes;
    if (s->allowance != UINT64_MAX && s->allowance > s->staged_bytes) {
        reserve += s->allowance - s->staged_bytes;
    }
    char      why[sizeof(((struct dblade_switch *) 0)->reason)];
    const int changed = dblade_auto_decide(&s->auto_state, &s->last_sample, reserve, s->auto_layers, n, why,
                                           sizeof(why));
    if (changed <= 0) {
        return;
    }
    uint32_t j = 0;
    for (struct dblade_cache * c = s->caches; c; c = c->next) {
        for (uint32_t i = 0; i + 1 < c->n_tensors; i += 2) {
            struct dblade_tensor * k = &c->tensors[i], * v = &c->tensors[i + 1];
            if (k->path == DBLADE_PATH_RAM || j >= n) {
                continue;
            }
            const uint32_t want = s->auto_layers[j++].want;
            if (want != k->want) {
                k->want = v->want = want;
                snprintf(k->want_why, sizeof(k->want_why), "%s", why);
            }
        }
    }
}

// --- the pipeline ---

// how many direct layers ahead to stage: one when compute hides the I/O; when it does not, enough
// to keep DBLADE_IO_INFLIGHT bytes in flight; never more than the budget left after the pinned layers
static uint32_t pipeline_depth(struct dblade_session * s, uint64_t layer_bytes) {
    if (layer_bytes == 0) {
        return 1;
    }
    uint64_t d_mem = s->allowance / layer_bytes;
    d_mem          = d_mem > 1 ? d_mem - 1 : 1; // the current layer is staged too
    d_mem          = d_mem < DBLADE_MAX_DEPTH ? d_mem : DBLADE_MAX_DEPTH;
    uint32_t d     = 1;
    if (s->bw_ema > 0 && s->compute_ema_ns > 0) {
        const double io_ns = (double) layer_bytes / s->bw_ema;
        if (io_ns > 0.8 * s->compute_ema_ns) {
            const uint64_t fill = (DBLADE_IO_INFLIGHT + layer_bytes - 1) / layer_bytes;
            d                   = fill > 2 ? (uint32_t) fill : 2;
        }
    }
    return d < d_mem ? d : (uint32_t) d_mem;
}

// The graph moved to t's layer: the previous layer's attention is done. Apply a pending switch of
// this layer, wait for its staging, retire every other staged layer but the next `depth` direct
// ones (the order of layers is learned from the previous pass: graphs repeat it), and queue theirs.
static void enter_layer(struct dblade_session * s, struct dblade_tensor * t) {
    if (s->active_cache == t->cache && s->active_il == t->il) {
        return;
    }
    const uint64_t now = dblade_now_ns();
    struct dblade_tensor * prev_k = tensor_of(s->active_cache, s->active_il, 0);
    if (prev_k) {
        prev_k->succ_cache = t->cache;
        prev_k->succ_il    = t->il;
        // compute time of the previous layer: since it was entered, less what it waited for I/O
        const uint64_t span = now - s->last_enter_ns;
        if (span > s->stall_since_enter && span < 1000000000ull) {
            const double c    = (double) (span - s->stall_since_enter);
            s->compute_ema_ns = s->compute_ema_ns > 0 ? 0.9 * s->compute_ema_ns + 0.1 * c : c;
        }
    }
    s->last_enter_ns     = now;
    s->stall_since_enter = 0;

    auto_tick(s);
    layer_switch(s, t);

    struct dblade_tensor * tk = tensor_of(t->cache, t->il, 0);
    struct dblade_tensor * tv = tensor_of(t->cache, t->il, 1);
    const uint64_t         layer_bytes = (tk ? dblade_align_up(tk->hwm, tk->gran) : 0) +
                                 (tv ? dblade_align_up(tv->hwm, tv->gran) : 0);
    const uint32_t depth = pipeline_depth(s, layer_bytes);
    s->depth             = depth;

    // the next direct layers, as the previous pass went
    struct dblade_tensor * ahead[DBLADE_MAX_DEPTH];
    uint32_t               n_ahead = 0;
    struct dblade_tensor * k       = tk;
    for (int hops = 0; k && k->succ_cache && hops < 1024 && n_ahead < depth; hops++) {
        struct dblade_tensor * nk = tensor_of(k->succ_cache, k->succ_il, 0);
        if (!nk || nk == tk) {
            break;
        }
        if (nk->path == DBLADE_PATH_DIRECT && nk->want == DBLADE_PATH_DIRECT) {
            ahead[n_ahead++] = nk;
        }
        k = nk;
    }
    for (uint32_t i = 0; i < n_ahead; i++) {
        stage_later(s, ahead[i]);
        stage_later(s, tensor_of(ahead[i]->cache, ahead[i]->il, 1));
    }
    for (struct dblade_cache * c = s->caches; c; c = c->next) {
        for (uint32_t i = 0; i < c->n_tensors; i++) {
            struct dblade_tensor * x    = &c->tensors[i];
            bool                   keep = c == t->cache && x->il == t->il;
            for (uint32_t j = 0; j < n_ahead && !keep; j++) {
                keep = c == ahead[j]->cache && x->il == ahead[j]->il;
            }
            if (!keep) {
                retire_later(s, x);
            }
        }
    }
    s->active_cache = t->cache;
    s->active_il    = t->il;
}

// the initial placement of the auto policy: the page cache when what is available can hold every
// offloaded layer whole next to the weights, else the direct path; the monitor revises it as the
// context fills and memory comes and goes
static void auto_start(struct dblade_session * s) {
    dblade_monitor_init(&s->monitor);
    dblade_monitor_sample(&s->monitor, &s->last_sample);
    uint64_t offloaded = 0;
    for (uint32_t i = 0; i < s->n_layout; i++) {
        if (s->layout[i].l.path != DBLADE_PATH_RAM) {
            offloaded += s->layout[i].l.k_bytes + s->layout[i].l.v_bytes;
        }
    }
    const uint64_t staging = s->allowance != UINT64_MAX ? s->allowance : 0; // as auto_tick counts it
    const uint64_t room    = dblade_auto_capacity(&s->last_sample, s->config.reserve_bytes + staging, 0);
    const uint32_t path = room >= offloaded ? DBLADE_PATH_MMAP : DBLADE_PATH_DIRECT;
    for (uint32_t i = 0; i < s->n_layout; i++) {
        if (s->layout[i].l.path != DBLADE_PATH_RAM) {
            s->layout[i].l.path = path;
        }
    }
    s->auto_state.cap_bytes      = room;
    s->auto_state.last_switch_ns = dblade_now_ns();
    s->auto_state.last_psi_us    = UINT64_MAX;
    char why[100];
    if (room == UINT64_MAX) {
        snprintf(why, sizeof(why), "start: no memory limit known, %llu MiB offloaded",
                 (unsigned long long) (offloaded >> 20));
    } else {
        snprintf(why, sizeof(why), "start: %llu MiB offloaded, page cache room %llu MiB",
                 (unsigned long long) (offloaded >> 20), (unsigned long long) (room >> 20));
    }
    log_switch(s, -1, DBLADE_PATH_DIRECT, path, why);
}

// the store will hold the tensor's rows below hi: what a wipe covers
static void touch(struct dblade_session * s, const struct dblade_tensor * t, uint64_t hi) {
    const uint64_t end = t->store_off + dblade_align_up(hi, s->store.align);
    s->touched_end     = end > s->touched_end ? end : s->touched_end;
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
        // the blocks the new rows land in must hold what the store has before the rows go in; with
        // a tail page in memory, everything below it too (the dirty range stays in memory)
        tensor_stage_now(s, t, t->tail != NO_TAIL && t->tail + t->page > hi ? t->tail + t->page : hi, true);
        if (t->dirty_hi <= t->dirty_lo) {
            t->dirty_lo = lo, t->dirty_hi = hi;
        } else {
            t->dirty_lo = lo < t->dirty_lo ? lo : t->dirty_lo;
            t->dirty_hi = hi > t->dirty_hi ? hi : t->dirty_hi;
        }
    } else {
        // page-cache path: the kernel writes back the pages these rows dirty
        atomic_fetch_add(&t->bytes_written, dblade_align_up(hi, t->page) - dblade_align_down(lo, t->page));
    }
    if (hi > t->hwm) {
        t->hwm = hi;
    }
    touch(s, t, hi);
    pthread_mutex_unlock(&s->lock);
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
        tensor_stage_now(s, t, need, true);
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
    free(t->sums);
    t->sums = NULL;
}

static int tensor_map(struct dblade_session * s, struct dblade_tensor * t) {
    const long pg = sysconf(_SC_PAGESIZE);
    t->map_bytes = dblade_align_up(t->bytes ? t->bytes : 1, pg > (long) DBLADE_BLOCK ? (uint64_t) pg : DBLADE_BLOCK);
    // offloaded tensors (any may go direct: auto and set_path move them) and pinned ones start on a
    // huge-page boundary, so that they can use huge pages and the budget counts what the kernel gives
    const uint64_t extra = (t->path != DBLADE_PATH_RAM && s->huge) || (t->path == DBLADE_PATH_RAM && s->thp)
                               ? DBLADE_HUGE_PAGE
                               : 0;
    uint8_t *      p     = mmap(NULL, t->map_bytes + extra, PROT_READ | PROT_WRITE,
                                MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
        return -errno;
    }
    if (extra) {
        uint8_t * a = (uint8_t *) dblade_align_up((uintptr_t) p, extra);
        if (a > p) {
            munmap(p, (size_t) (a - p));
        }
        if (a + t->map_bytes < p + t->map_bytes + extra) {
            munmap(a + t->map_bytes, (size_t) (p + t->map_bytes + extra - (a + t->map_bytes)));
        }
        p = a;
    }
    t->addr = p;
    t->page = (uint64_t) pg;
    t->gran = t->page;
    if (t->path == DBLADE_PATH_DIRECT) {
        use_huge_pages(s, t);
    } else if (t->path == DBLADE_PATH_RAM) {
        pin_pages(s, t);
    }
    t->tail = NO_TAIL;
    t->want = t->path;
    if (t->path != DBLADE_PATH_RAM && !(s->config.flags & DBLADE_CONFIG_NO_VERIFY)) {
        t->sums = calloc(t->map_bytes / DBLADE_BLOCK, sizeof(*t->sums));
        if (!t->sums) {
            tensor_unmap(t);
            return -ENOMEM;
        }
    }
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
    for (uint32_t i = 0; i < c->n_tensors; i++) {
        settle(s, &c->tensors[i]);
        if (c->tensors[i].path == DBLADE_PATH_DIRECT) {
            s->staged_bytes -= tensor_staged(&c->tensors[i]); // the contents die with the cache
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
    for (uint32_t i = 0; i < c->n_tensors; i++) {
        struct dblade_tensor * t = &c->tensors[i];
        settle(s, t);
        // metadata only: nothing is written to the store, rows above hwm are never read back
        if (t->path == DBLADE_PATH_DIRECT) {
            const uint64_t before = tensor_staged(t);
            madvise(t->addr, t->map_bytes, MADV_DONTNEED);
            t->dirty_lo = t->dirty_hi = 0;
            t->valid                  = 0;
            t->tail                   = NO_TAIL;
            staged_set(s, t, before);
        } else if (t->path == DBLADE_PATH_RAM) {
            memset(t->addr, 0, t->bytes); // zeros, like the stock clear (and the pages stay)
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
    for (uint32_t i = 0; i < c->n_tensors; i++) {
        settle(s, &c->tensors[i]);
        if (c->tensors[i].path == DBLADE_PATH_DIRECT) {
            tensor_stage_now(s, &c->tensors[i], c->tensors[i].map_bytes, false);
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
            settle(s, t);
            const uint64_t before = tensor_staged(t);
            t->valid              = t->map_bytes;
            t->tail               = NO_TAIL;
            t->dirty_lo           = 0;
            t->dirty_hi           = hi;
            staged_set(s, t, before);
        }
        t->hwm = hi > t->hwm ? hi : t->hwm;
        touch(s, t, hi);
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
    // everything to the store, tails too: what save_state and close rely on
    for (struct dblade_cache * c = s->caches; c; c = c->next) {
        for (uint32_t i = 0; i < c->n_tensors; i++) {
            tensor_retire_now(s, &c->tensors[i], true);
        }
    }
    s->active_cache = NULL;
    s->active_il    = -1;
    const int rc    = s->error;
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

// --- statistics ---

static uint64_t tensor_resident(const struct dblade_tensor * t) {
    switch (t->path) {
        case DBLADE_PATH_RAM:    return t->bytes;
        case DBLADE_PATH_DIRECT: return tensor_staged(t);
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
    out->huge_page_bytes = s->huge;
    out->n_io_errors     = s->n_io_errors;
    out->staged_bytes    = s->staged_bytes;
    out->staged_peak     = s->staged_peak;
    for (struct dblade_cache * c = s->caches; c; c = c->next) {
        for (uint32_t i = 0; i + 1 < c->n_tensors; i += 2) {
            struct dblade_layer_stats * ls = &all[out->n_layers++];
            layer_stats(&c->tensors[i], &c->tensors[i + 1], ls);
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

int dblade_session_set_path(struct dblade_session * s, int32_t il, uint32_t path) {
    if (!s || (path != DBLADE_PATH_MMAP && path != DBLADE_PATH_DIRECT)) {
        return -EINVAL;
    }
    int rc = -EINVAL;
    pthread_mutex_lock(&s->lock);
    for (struct dblade_cache * c = s->caches; c; c = c->next) {
        struct dblade_tensor * k = tensor_of(c, il, 0);
        struct dblade_tensor * v = tensor_of(c, il, 1);
        if (k && v && k->path != DBLADE_PATH_RAM) {
            k->want = v->want = path;
            snprintf(k->want_why, sizeof(k->want_why), "requested");
            rc = 0;
        }
    }
    pthread_mutex_unlock(&s->lock);
    return rc;
}

void dblade_session_quiesce(struct dblade_session * s) {
    pthread_mutex_lock(&s->lock);
    for (;;) {
        bool busy = s->q_head != NULL;
        for (struct dblade_cache * c = s->caches; c && !busy; c = c->next) {
            for (uint32_t i = 0; i < c->n_tensors && !busy; i++) {
                busy = c->tensors[i].job != JOB_NONE;
            }
        }
        if (!busy) {
            break;
        }
        pthread_cond_wait(&s->done, &s->lock);
    }
    pthread_mutex_unlock(&s->lock);
}
