// The VRAM tier's copies: each streamed layer's rows go from its host path into its VRAM slot before the
// layer computes, and the rows it stores come back after, with the storage reads, the copies and the
// compute of three layers in flight at once.
//
//  - Reads ahead (a lane, or two with DUALBLADE_READ_LANES=2: a worker each): the host paths' bytes of the
//    next layers, in graph order, into the ring (page-locked): O_DIRECT reads of the direct path (checked
//    against their CRC-32C as they arrive), the page cache copied out of its mapping by several threads
//    (pcopy.c) or, where pages are missing, read buffered; what only memory holds copied (path.h's
//    snapshot). Layer i+2 is read while layer i+1 is copied and layer i computes; two lanes read two direct
//    layers at once, each with its own engines.
//  - Copies (our stream): a layer's bytes from the ring (or from a pinned host copy) into its slot, queued as
//    soon as the slot's last layer is done with it, with an event per slot: at the layer's cut the host waits
//    for that event only.
//  - Cuts (llama.cpp's eval callback stops the graph after each streamed layer's attn_norm-<il>, and after
//    result_norm; there the GPU is idle): the previous layer's new rows come back (whole pages, through the
//    page-locked write-back buffer, to the layer's host path: path.h's store_from), this layer's copy is
//    waited for, the next layers' copies queued.
// Rows a slot holds beyond what was copied belong to another layer or are unwritten: finite, and masked.
//
// It calls the driver, the pipeline (the host paths, through their method table) and the events.

#define _GNU_SOURCE
#include "vram-impl.h"

#include "../events.h"
#include "../store.h"
#include "../pipeline.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_REQS 8 // a layer's reads: at most 2 per tensor (the direct path: around its tail page)

// the KV object's sticky error (the lock not held)
static void fail(struct dblade_vram * v, int rc, const char * fmt, ...) __attribute__((format(printf, 3, 4)));
static void fail(struct dblade_vram * v, int rc, const char * fmt, ...) {
    char    msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    pthread_mutex_lock(v->env.lock);
    dblade_fail(v->env.events, rc, "%s", msg);
    pthread_mutex_unlock(v->env.lock);
}

static int sticky_error(struct dblade_vram * v) {
    pthread_mutex_lock(v->env.lock);
    const int rc = v->env.events->error;
    pthread_mutex_unlock(v->env.lock);
    return rc;
}

// a layer whose host copies are pinned RAM: copied into its slot straight from there, never through the ring
static bool from_host_copy(const struct dblade_streamed * s) {
    return s->k->path == DBLADE_PATH_RAM && s->k->pair->path == DBLADE_PATH_RAM;
}

// --- the ring: a FIFO of layers' bytes, entered and left in graph order ---

static bool ring_alloc(struct dblade_vram * v, uint64_t bytes, uint64_t * off) {
    bytes = dblade_align_up(bytes ? bytes : DBLADE_BLOCK, DBLADE_BLOCK);
    if (bytes > v->ring_bytes) {
        return false;
    }
    if (v->ring_used == 0) {
        v->ring_head = v->ring_tail = 0;
        *off                        = 0;
    } else if (v->ring_head > v->ring_tail) { // free: [head, end) and [0, tail)
        if (v->ring_bytes - v->ring_head >= bytes) {
            *off = v->ring_head;
        } else if (v->ring_tail >= bytes) {
            v->ring_used += v->ring_bytes - v->ring_head; // the end is skipped until the layer before it leaves
            *off = 0;
        } else {
            return false;
        }
    } else if (v->ring_tail - v->ring_head >= bytes) { // wrapped: free [head, tail)
        *off = v->ring_head;
    } else {
        return false;
    }
    v->ring_head = *off + bytes;
    v->ring_used += bytes;
    return true;
}

// the oldest layer in the ring leaves it (the lock held)
static void ring_free(struct dblade_vram * v, const struct dblade_streamed * s) {
    const uint64_t bytes = dblade_align_up(s->bytes ? s->bytes : DBLADE_BLOCK, DBLADE_BLOCK);
    if (s->off != v->ring_tail) {
        v->ring_used -= v->ring_bytes - v->ring_tail; // it wrapped: the skipped end goes with it
    }
    v->ring_tail = s->off + bytes;
    v->ring_used -= bytes;
}

// layer x's slot still holds its rows: the last copy into the slot was x's, and nothing has changed its
// host copy since it computed (the lock held)
static bool held_in_slot(const struct dblade_vram * v, int32_t x) {
    return v->sl[x].in_slot && v->slot_owner[v->sl[x].slot] == x;
}

// layer x goes into its slot: the layer there before is no longer held in it (the lock held)
static void take_slot(struct dblade_vram * v, int32_t x) {
    const int32_t o = v->slot_owner[v->sl[x].slot];
    if (o >= 0 && o != x) {
        v->sl[o].in_slot = false;
    }
    v->slot_owner[v->sl[x].slot] = x;
}

// --- reads ahead, on the worker ---

// the next layer to read into the ring: the first at rest, in graph order from the one the graph computes
// next, and not past the layer whose new rows are still in VRAM (a read of it must see them); -1 for none
// (the lock held)
static int32_t next_to_read(const struct dblade_vram * v) {
    for (uint32_t m = 0; m < v->n_streamed; m++) {
        const int32_t                  x = (int32_t) ((v->next + m) % v->n_streamed);
        const struct dblade_streamed * s = &v->sl[x];
        if (x == v->pending) {
            return -1;
        }
        if (!s->k || from_host_copy(s) || s->state != SL_IDLE || held_in_slot(v, x)) {
            continue;
        }
        return x;
    }
    return -1;
}

static void kick(struct dblade_vram * v);

// some layer is READING, or layer x is (x >= 0) (the lock held)
static bool reading(const struct dblade_vram * v, int32_t x) {
    for (uint32_t i = 0; i < v->n_streamed; i++) {
        if (v->sl[i].state == SL_READING && (x < 0 || (int32_t) i == x)) {
            return true;
        }
    }
    return false;
}

// every read of layer x has gone to the device: the next layer's may start beside its last (on the engine's
// thread, the lock not held)
struct read_tail {
    struct dblade_vram * v;
    int32_t              x;
};

static void read_issued(void * arg) {
    const struct read_tail * t = arg;
    pthread_mutex_lock(t->v->env.lock);
    t->v->sl[t->x].issued = true;
    kick(t->v);
    pthread_mutex_unlock(t->v->env.lock);
}

// Layer x into the ring: what only memory holds is copied now, the rest read without the lock, on the
// calling thread (a lane's worker, or the graph's when it needs the layer now) with the lane's engines.
// False when the ring is full.
static bool read_one(struct dblade_vram * v, struct dblade_vram_lane * lane, int32_t x) {
    struct dblade_streamed * s = &v->sl[x];
    struct dblade_tensor *   k = s->k, * vt = k->pair;
    s->k_len                   = dblade_vram_tensor_len(k);
    s->v_len                   = dblade_vram_tensor_len(vt);
    s->bytes                   = s->k_len + s->v_len;
    if (!ring_alloc(v, s->bytes, &s->off)) {
        return false; // full: the cuts free it, and ask again
    }
    struct dblade_io_req reqs[MAX_REQS];
    bool                 buffered[2]  = { false, false };
    const uint8_t *      copy_from[2] = { NULL, NULL };
    int                  n[2]         = { 0, 0 };
    // READING from here: a snapshot may drop the lock (the direct path waits for a retire running on the
    // other lane's worker), and nobody may copy the layer or take its place in the ring meanwhile
    if (reading(v, -1)) {
        atomic_fetch_add(&v->ring_overlapped, 1);
    }
    s->state  = SL_READING;
    s->issued = false;
    for (int w = 0; w < 2; w++) {
        struct dblade_tensor * t = w ? vt : k;
        struct dblade_tier *   p = dblade_pipeline_path(v->env.pipeline, t->path);
        n[w] = p && p->ops->snapshot ? p->ops->snapshot(p, t, w ? s->v_len : s->k_len,
                                                        v->ring + s->off + (w ? s->k_len : 0), reqs + n[0],
                                                        MAX_REQS / 2, &buffered[w], &copy_from[w])
                                     : -EOPNOTSUPP;
        if (n[w] < 0) {
            dblade_fail(v->env.events, n[w], "reading layer %d %c for VRAM: %s", t->il, "KV"[w], strerror(-n[w]));
            s->state = SL_READY; // the sticky error stops the graph at its cut
            pthread_cond_broadcast(&v->read_done);
            return true;
        }
    }
    pthread_mutex_unlock(v->env.lock);
    int rc = 0;
    for (int w = 0; w < 2; w++) {
        const uint64_t len = w ? s->v_len : s->k_len;
        if (copy_from[w] && len > 0) { // memory: copied by several threads
            dblade_pcopy_run(v->pcopy, v->ring + s->off + (w ? s->k_len : 0), copy_from[w], len);
            atomic_fetch_add(&v->ring_read_bytes, len);
        }
    }
    // K and V in one batch where one engine reads both: the device's queue does not drain between them
    const int batches = n[0] > 0 && n[1] > 0 && buffered[0] == buffered[1] ? 1 : 2;
    // the last batch's tail lets the other lane start the next layer (where there is one)
    struct read_tail tail = { v, x };
    void (*issued)(void *) = v->n_lanes > 1 ? read_issued : NULL;
    for (int w = 0; w < batches && rc == 0; w++) {
        struct dblade_io * io = buffered[w] ? lane->io_buffered : lane->io_direct;
        const int          nr = batches == 1 ? n[0] + n[1] : n[w];
        if (nr > 0) {
            rc = io ? dblade_io_run_tail(io, reqs + (w ? n[0] : 0), (uint32_t) nr,
                                         w == batches - 1 ? issued : NULL, &tail)
                    : -EBADF;
        }
    }
    pthread_mutex_lock(v->env.lock);
    for (int i = 0; i < n[0] + n[1]; i++) {
        struct dblade_tensor * t = i < n[0] ? k : vt;
        const int              e = reqs[i].res < 0 ? reqs[i].res : rc == -EBADF ? rc : 0;
        if (e < 0) {
            v->env.events->n_io_errors++;
            char where[600];
            dblade_fail(v->env.events, e, "reading layer %d %c from %s for VRAM failed: %s", t->il, "KV"[t->which],
                        v->env.store ? dblade_store_where(v->env.store, reqs[i].member, where, sizeof(where))
                                     : "the KV store",
                        e == -EBADMSG ? "checksum mismatch (the store returned other data than was written)"
                                      : strerror(-e));
        } else if (!buffered[t->which]) {
            atomic_fetch_add(&t->bytes_read, reqs[i].len); // the page cache counts its own misses
        }
        atomic_fetch_add(&v->ring_read_bytes, e < 0 ? 0 : reqs[i].len);
        if (e == 0 && !buffered[t->which] && t->path == DBLADE_PATH_MMAP) {
            atomic_fetch_add(&v->ring_around_bytes, reqs[i].len); // a prompt's, read around the cache
        }
    }
    s->state = SL_READY;
    pthread_cond_broadcast(&v->read_done);
    return true;
}

// the lock held: until no layer is READING, or layer x is not (x >= 0)
static void wait_reads(struct dblade_vram * v, int32_t x) {
    while (reading(v, x)) {
        pthread_cond_wait(&v->read_done, v->env.lock);
    }
}

static bool on_direct_path(const struct dblade_streamed * s) {
    return s->k->path == DBLADE_PATH_DIRECT && s->k->pair->path == DBLADE_PATH_DIRECT;
}

// Layer x may be read now beside the reads in flight: with two lanes, only O_DIRECT reads run together, and
// only beside a layer whose reads have all gone to the device (its last in flight), unless side_by_side; with
// one lane (DUALBLADE_READ_LANES=1), never beside another (the graph's thread reads too). A page-cache
// layer's buffered reads beside another layer's O_DIRECT ones were slower than the two in turn (bench_ring
// mixed: 0.88-0.94x); two direct layers read whole side by side measured both faster and slower than one
// lane (slots.c). The lock held.
static bool may_read_now(const struct dblade_vram * v, int32_t x) {
    bool others = false, all_direct = true, all_issued = true;
    for (uint32_t i = 0; i < v->n_streamed; i++) {
        if (v->sl[i].state == SL_READING) {
            others = true;
            all_direct &= on_direct_path(&v->sl[i]);
            all_issued &= v->sl[i].issued;
        }
    }
    return !others ||
           (v->n_lanes > 1 && all_direct && on_direct_path(&v->sl[x]) && (all_issued || v->side_by_side));
}

static void read_ahead(struct dblade_work * w) {
    struct dblade_vram_lane * lane = (struct dblade_vram_lane *) ((char *) w - offsetof(struct dblade_vram_lane, work));
    struct dblade_vram *      v    = lane->v;
    const int32_t             x    = next_to_read(v);
    if (x >= 0 && may_read_now(v, x) && read_one(v, lane, x) && next_to_read(v) >= 0) {
        dblade_worker_queue(lane->worker, &lane->work, true);
    }
}

// more to read ahead: the lanes are asked (the lock held; a lane that finds nothing it may read returns)
static void kick(struct dblade_vram * v) {
    if (v->ring && !v->ahead_held && next_to_read(v) >= 0) {
        for (uint32_t l = 0; l < v->n_lanes; l++) {
            v->lanes[l].work.run = read_ahead;
            dblade_worker_queue(v->lanes[l].worker, &v->lanes[l].work, true);
        }
    }
}

// --- copies ---

// the time the graph waits, counted as the layer's
static void waited(struct dblade_vram * v, struct dblade_tensor * k, uint64_t t0) {
    const uint64_t dt = dblade_now_ns() - t0;
    atomic_fetch_add(&v->copy_wait_ns, dt);
    atomic_fetch_add(&k->io_wait_ns, dt);
}

// queues the copy of layer x into its slot and records the slot's event; the layer's bytes are in the ring,
// or its pinned host copies (the lock held)
static CUresult load_async(struct dblade_vram * v, int32_t x) {
    struct dblade_streamed * s = &v->sl[x];
    const bool               host = from_host_copy(s);
    CUresult                 r    = 0;
    for (struct dblade_tensor * t = s->k; t && r == 0; t = t == s->k ? s->k->pair : NULL) {
        const uint64_t  len = host ? dblade_vram_tensor_len(t) : t->which ? s->v_len : s->k_len;
        const uint8_t * src = host ? t->addr : v->ring + s->off + (t->which ? s->k_len : 0);
        if (len > 0) {
            r = v->cu.MemcpyHtoDAsync(t->dev, src, len, v->stream);
            atomic_fetch_add(&v->h2d_bytes, len);
            atomic_fetch_add(&v->h2d_pinned_bytes, (host ? t->host_registered : v->ring_pinned) ? len : 0);
        }
    }
    if (r == 0) {
        r = v->cu.EventRecord(v->slot_ev[s->slot], v->stream);
    }
    if (r == 0) {
        s->state = SL_LOADING;
        take_slot(v, x);
    }
    return r;
}

// the slot is free: the layer copied into it last has computed and its rows came back (or it holds none)
static bool slot_free(const struct dblade_vram * v, uint32_t slot) {
    const int32_t o = v->slot_owner[slot];
    return o < 0 || (v->sl[o].state == SL_IDLE || v->sl[o].state == SL_READING || v->sl[o].state == SL_READY);
}

// The copies of the layers the graph computes next (from the streamed layer `from`, as many as there are
// slots) are queued where their bytes are ready and their slots free (the lock held).
static void load_ahead(struct dblade_vram * v, int32_t from) {
    for (uint32_t m = 0; m < v->n_slots; m++) {
        const int32_t            x = (int32_t) ((from + m) % v->n_streamed);
        struct dblade_streamed * s = &v->sl[x];
        if (!s->k || x == v->pending || s->state == SL_LOADING || s->state == SL_LOADED || held_in_slot(v, x)) {
            continue;
        }
        const bool ready = from_host_copy(s) ? s->state == SL_IDLE : s->state == SL_READY;
        if (!ready || !slot_free(v, s->slot) || load_async(v, x) != 0) {
            break; // in order: a later layer is not copied before this one
        }
    }
}

// Every copy and read in flight finished, and nothing of the ring kept: the host copies may change (a
// clear, a state restore) or the order the graph goes in did (the lock held).
static void drop_ahead(struct dblade_vram * v) {
    wait_reads(v, -1);
    v->cu.StreamSynchronize(v->stream);
    for (uint32_t x = 0; x < v->n_streamed; x++) {
        if ((int32_t) x != v->pending) {
            v->sl[x].state = SL_IDLE;
        }
        v->sl[x].in_slot = false; // the host copies may change
    }
    v->ring_used = v->ring_head = v->ring_tail = 0;
}

// Layer x (the graph is at its cut) into its slot, waited for: copied ahead already, or now (the lock
// not held on entry or return).
static int load(struct dblade_vram * v, int32_t x) {
    struct dblade_streamed * s  = &v->sl[x];
    const uint64_t           t0 = dblade_now_ns();
    pthread_mutex_lock(v->env.lock);
    if (s->state == SL_IDLE && held_in_slot(v, x)) {
        s->state = SL_LOADED; // the graph before computed this layer too, and its rows went back from the slot
        pthread_mutex_unlock(v->env.lock);
        return 0;
    }
    if (s->state == SL_IDLE && !from_host_copy(s)) {
        if (!v->ring || dblade_vram_tensor_len(s->k) + dblade_vram_tensor_len(s->k->pair) > v->ring_bytes) {
            pthread_mutex_unlock(v->env.lock);
            return -ENOSPC; // the caller copies from the host path's staging
        }
        if (v->ring_used > 0) {
            drop_ahead(v); // read for another order than the graph's: start again from this layer
        }
        v->next = x;
        read_one(v, &v->lanes[0], x); // not read ahead: now, on this thread (lane 0's engines wait their turn)
    }
    wait_reads(v, x);
    CUresult r = 0;
    if (s->state != SL_LOADING && !v->env.events->error) {
        if (!slot_free(v, s->slot)) {
            // another layer is on its way into this one's slot: the copies went out of the graph's order
            dblade_fail(v->env.events, -EPROTO, "VRAM slot %u of layer %d is taken by layer %d", s->slot, s->il,
                        v->sl[v->slot_owner[s->slot]].il);
        } else {
            r = load_async(v, x);
        }
    }
    const int err = v->env.events->error;
    pthread_mutex_unlock(v->env.lock);
    if (r == 0 && !err) {
        r = v->cu.EventSynchronize(v->slot_ev[s->slot]);
    }
    waited(v, s->k, t0);
    if (r != 0) {
        fail(v, -EIO, "CUDA: copying layer %d into VRAM failed: %s (%d)", s->il, dblade_cuda_error(&v->cu, r), r);
        return -EIO;
    }
    if (err) {
        return err;
    }
    pthread_mutex_lock(v->env.lock);
    if (!from_host_copy(s)) {
        ring_free(v, s); // a layer with no rows yet holds a block of the ring too (ring_alloc)
    }
    s->state   = SL_LOADED;
    s->in_slot = true;
    kick(v); // room in the ring
    pthread_mutex_unlock(v->env.lock);
    return 0;
}

// Without room in the ring: the layer is staged by its host path (the CPU's own fences) and copied from
// there, pageable (the lock not held).
static int load_from_staging(struct dblade_vram * v, int32_t x) {
    struct dblade_streamed * s  = &v->sl[x];
    const uint64_t           t0 = dblade_now_ns();
    pthread_mutex_lock(v->env.lock);
    for (struct dblade_tensor * t = s->k; t; t = t == s->k ? s->k->pair : NULL) {
        dblade_pipeline_make_resident(v->env.pipeline, t, dblade_vram_tensor_len(t));
    }
    int      err = v->env.events->error;
    CUresult r   = 0;
    for (struct dblade_tensor * t = s->k; t && !err && r == 0; t = t == s->k ? s->k->pair : NULL) {
        const uint64_t len = dblade_vram_tensor_len(t);
        r                  = len ? v->cu.MemcpyHtoDAsync(t->dev, t->addr, len, v->stream) : 0;
        atomic_fetch_add(&v->h2d_bytes, len);
    }
    if (!err && r == 0) {
        r = v->cu.StreamSynchronize(v->stream);
    }
    s->state   = SL_LOADED;
    take_slot(v, x);
    s->in_slot = !err && r == 0;
    pthread_mutex_unlock(v->env.lock);
    waited(v, s->k, t0);
    if (r != 0) {
        fail(v, -EIO, "CUDA: copying layer %d into VRAM failed: %s (%d)", s->il, dblade_cuda_error(&v->cu, r), r);
        return -EIO;
    }
    return err;
}

// The rows the layer that computed last stored go back to its host path: a pinned host copy gets them
// straight; the page cache and the direct path get whole pages through the write-back buffer (the lock
// not held).
static int write_back(struct dblade_vram * v) {
    const int32_t x = v->pending; // the graph's thread is the only one to change it (under the lock)
    if (x < 0) {
        return 0;
    }
    struct dblade_streamed * s = &v->sl[x];
    uint64_t                 lo[2], hi[2], page_lo[2], page_hi[2], wb_off[2], need = 0;
    for (int w = 0; w < 2; w++) {
        const struct dblade_tensor * t = w ? s->k->pair : s->k;
        lo[w]                          = v->pending_lo * t->row_bytes;
        hi[w]                          = v->pending_hi * t->row_bytes < t->bytes ? v->pending_hi * t->row_bytes : t->bytes;
        page_lo[w]                     = dblade_align_down(lo[w], t->page);
        page_hi[w]                     = dblade_align_up(hi[w], t->page);
        page_hi[w]                     = page_hi[w] < t->map_bytes ? page_hi[w] : t->map_bytes;
        wb_off[w]                      = need;
        need += t->path == DBLADE_PATH_RAM || hi[w] <= lo[w] ? 0 : page_hi[w] - page_lo[w];
    }
    if (dblade_vram_wb_reserve(v, need) < 0) {
        fail(v, -ENOMEM, "no memory for layer %d's rows back from VRAM", s->il);
        pthread_mutex_lock(v->env.lock);
        v->pending = -1;
        pthread_mutex_unlock(v->env.lock);
        return -ENOMEM;
    }
    const uint64_t t0 = dblade_now_ns();
    CUresult       r  = 0;
    for (int w = 0; w < 2 && r == 0; w++) {
        struct dblade_tensor * t = w ? s->k->pair : s->k;
        if (hi[w] <= lo[w]) {
            continue;
        }
        if (t->path == DBLADE_PATH_RAM) {
            r = v->cu.MemcpyDtoHAsync(t->addr + lo[w], t->dev + lo[w], hi[w] - lo[w], v->stream);
            atomic_fetch_add(&v->d2h_bytes, hi[w] - lo[w]);
        } else {
            r = v->cu.MemcpyDtoHAsync(v->wb + wb_off[w], t->dev + page_lo[w], page_hi[w] - page_lo[w], v->stream);
            atomic_fetch_add(&v->d2h_bytes, page_hi[w] - page_lo[w]);
        }
    }
    if (r == 0) {
        r = v->cu.StreamSynchronize(v->stream);
    }
    waited(v, s->k, t0);
    pthread_mutex_lock(v->env.lock);
    v->pending = -1;
    if (r != 0) {
        pthread_mutex_unlock(v->env.lock);
        fail(v, -EIO, "CUDA: copying layer %d out of VRAM failed: %s (%d)", s->il, dblade_cuda_error(&v->cu, r), r);
        return -EIO;
    }
    for (int w = 0; w < 2; w++) {
        struct dblade_tensor * t = w ? s->k->pair : s->k;
        if (hi[w] <= lo[w]) {
            continue;
        }
        if (t->path == DBLADE_PATH_RAM) {
            t->hwm = hi[w] > t->hwm ? hi[w] : t->hwm;
        } else {
            dblade_pipeline_store_rows(v->env.pipeline, t, lo[w], hi[w], v->wb + wb_off[w], page_lo[w]);
        }
    }
    s->state  = SL_IDLE;
    const int rc = v->env.events->error;
    kick(v); // its bytes may be read for the next pass now
    pthread_mutex_unlock(v->env.lock);
    return rc;
}

int dblade_vram_settle(struct dblade_vram * v, bool sync_gpu) {
    if (!v) {
        return 0;
    }
    CUcontext popped;
    v->cu.CtxPushCurrent(v->ctx);
    int rc = 0;
    if (v->pending >= 0) {
        if (sync_gpu) {
            v->cu.CtxSynchronize(); // outside a cut the graph's last kernels may still run
        }
        rc = write_back(v);
    }
    pthread_mutex_lock(v->env.lock);
    drop_ahead(v); // outside a graph: host copies may change before the next one
    v->next = 0;
    pthread_mutex_unlock(v->env.lock);
    v->cu.CtxPopCurrent(&popped);
    return rc;
}

void dblade_vram_forget(struct dblade_vram * v, const struct dblade_cache * c) {
    if (!v) {
        return;
    }
    CUcontext popped;
    v->cu.CtxPushCurrent(v->ctx);
    if (v->pending >= 0 && (!c || v->sl[v->pending].k->cache == c)) {
        v->sl[v->pending].state = SL_IDLE;
        v->pending              = -1; // the cells were emptied: nothing to bring back
    }
    drop_ahead(v);
    v->next = 0;
    v->cu.CtxPopCurrent(&popped);
    // a graph cut short (cleared in between) is not checked for its cuts
    for (struct dblade_cache * o = *v->env.caches; o; o = o->next) {
        if (!c || o == c) {
            o->ub.set = false;
        }
    }
}

// --- the cut protocol ---

// the first streamed layer a graph computes: of all, or of the segment a prompt computed layer by layer is at
// (the lock held)
static int32_t first_of_graph(const struct dblade_vram * v) {
    for (uint32_t x = 0; x < v->n_streamed; x++) {
        if (v->sl[x].il >= v->il0) {
            return (int32_t) x;
        }
    }
    return 0;
}

// "attn_norm-<il>" -> il; "result_norm" -> INT32_MAX; anything else -> -1
static int32_t cut_layer(const char * name) {
    if (name[0] == 'a' && !strncmp(name, "attn_norm-", 10)) {
        char *     end;
        const long il = strtol(name + 10, &end, 10);
        return *end == 0 && il >= 0 && il < INT32_MAX ? (int32_t) il : -1;
    }
    return name[0] == 'r' && !strcmp(name, "result_norm") ? INT32_MAX : -1;
}

static int32_t streamed_index(const struct dblade_vram * v, int32_t il) {
    return il >= 0 && il <= v->max_il && v->sl[v->index_of[il]].k ? v->index_of[il] : -1;
}

int dblade_vram_cut(struct dblade_vram * v, const char * name, int ask) {
    if (!v || !name) {
        return ask ? 0 : 1;
    }
    const int32_t il = cut_layer(name);
    if (il < 0) {
        return ask ? 0 : 1;
    }
    const int32_t x = streamed_index(v, il);
    if (ask) {
        return x >= 0 || v->pending >= 0;
    }
    CUcontext popped;
    v->cu.CtxPushCurrent(v->ctx);
    int rc = write_back(v);
    if (rc == 0 && x >= 0) {
        struct dblade_streamed * s = &v->sl[x];
        struct dblade_cache *    c = s->k->cache;
        if (!c->ub.set) {
            fail(v, -EPROTO, "layer %d computed without its rows being known (dblade_cache_ubatch)", il);
            rc = -EPROTO;
        } else {
            c->ub.cuts++;
            pthread_mutex_lock(v->env.lock);
            if (!from_host_copy(s)) {
                dblade_pipeline_enter(v->env.pipeline, s->k); // a pending switch, the layers behind let go
            }
            pthread_mutex_unlock(v->env.lock);
            rc = load(v, x);
            if (rc == -ENOSPC) {
                rc = load_from_staging(v, x);
            }
            if (rc == 0) {
                pthread_mutex_lock(v->env.lock);
                v->pending    = x;
                v->pending_lo = c->ub.lo;
                v->pending_hi = c->ub.hi;
                v->next       = (int32_t) ((x + 1) % v->n_streamed);
                load_ahead(v, v->next);
                kick(v);
                pthread_mutex_unlock(v->env.lock);
            }
        }
    } else if (rc == 0) {
        // result_norm: every layer of this graph has computed; the next graph starts from the first again
        pthread_mutex_lock(v->env.lock);
        v->next = first_of_graph(v);
        load_ahead(v, v->next);
        kick(v);
        pthread_mutex_unlock(v->env.lock);
    }
    v->cu.CtxPopCurrent(&popped);
    return rc == 0 && !sticky_error(v);
}

void dblade_vram_layers(struct dblade_vram * v, int32_t il0, int32_t il1) {
    if (v) {
        pthread_mutex_lock(v->env.lock);
        v->il0 = il0;
        v->il1 = il1;
        pthread_mutex_unlock(v->env.lock);
    }
}

void dblade_vram_ubatch(struct dblade_vram * v, struct dblade_cache * c, const int64_t * rows, int64_t n,
                        uint32_t n_kv) {
    if (!v || !c || n <= 0 || !rows) {
        return;
    }
    // every streamed layer of the last graph stopped at its cut, or its slot held another layer
    if (c->ub.set && c->ub.cuts < c->ub.expect) {
        fail(v, -EPROTO, "the graph stopped before %u of %u streamed layers: this model's graph does not name its "
             "layers' attention norms (attn_norm-<il>); VRAM streaming cannot run it",
             c->ub.expect - c->ub.cuts, c->ub.expect);
    }
    int64_t lo = rows[0], hi = rows[0];
    for (int64_t i = 1; i < n; i++) {
        lo = rows[i] < lo ? rows[i] : lo;
        hi = rows[i] > hi ? rows[i] : hi;
    }
    c->ub.lo   = (uint64_t) lo;
    c->ub.hi   = (uint64_t) hi + 1;
    c->ub.n_kv = n_kv;
    c->ub.cuts   = 0;
    c->ub.set    = true;
    c->ub.expect = 0;
    for (uint32_t x = 0; x < v->n_streamed; x++) {
        const struct dblade_streamed * s = &v->sl[x];
        c->ub.expect += s->k && s->k->cache == c && s->il >= v->il0 && s->il < v->il1;
    }
    // the graph's first streamed layers are copied while the layers before them compute (and the inputs
    // travel), where their slots are free
    CUcontext popped;
    v->cu.CtxPushCurrent(v->ctx);
    pthread_mutex_lock(v->env.lock);
    // DUALBLADE_AHEAD_MAX_ROWS: a ubatch larger than this reads each layer at its cut, none ahead (a bisection's
    // knob; the inexact tokens it once isolated were the ring's lost block, fixed in ring_free's caller)
    v->ahead_held = n > (int64_t) v->ahead_max_rows;
    v->env.pipeline->env->prompt = n > 1; // (path_mmap.c reads a prompt's rows written around back around the cache)
    if (v->pending < 0) {
        v->next = first_of_graph(v);
        load_ahead(v, v->next);
        kick(v);
    }
    pthread_mutex_unlock(v->env.lock);
    v->cu.CtxPopCurrent(&popped);
}
