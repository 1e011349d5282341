// The asynchronous I/O engine of the direct path: a batch of O_DIRECT transfers is cut into chunks
// and kept several chunks deep in flight, so one staged layer (or several) saturates the device (one
// request at a time does not). How large and how deep is the store's measured shape (shape.c): devices
// disagree.
//
// Two engines, picked at run time:
//  - io_uring (uring.c, on the kernel's ABI, where the kernel lets us: it may be missing, disabled
//    by sysctl or refused by a container's seccomp profile), one ring per engine;
//  - a small pool of threads doing pread/pwrite, everywhere else.
// DUALBLADE_IO_ENGINE=io_uring|threads forces one (io_uring fails loudly where it is missing).
//
// Buffers are not registered with the ring: registration binds a buffer to the pages it has at that
// moment, while the direct path's staging memory moves between the pool and the layers' addresses
// (staging.c) and a layer's address holds no memory between passes. The kernel pins the pages per
// request instead, which is cheap for multi-MiB requests.
//
// One batch runs at a time per engine (callers serialize on its lock); the lock is never held while
// taking the session's, except by a batch's tail callback (dblade_io_run_tail), whose callers hold no
// session lock while they run a batch.

#define _GNU_SOURCE
#include "engine.h"

#include "base.h"
#include "crc32c.h"
#include "fault.h"
#include "io.h"
#include "shape.h"
#include "stripe.h"
#include "uring.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define IO_THREADS 4 // also the thread pool's depth, whatever the shape says

struct chunk {
    uint32_t req;
    uint64_t pos; // from the request's start (moves on after a short transfer)
    uint64_t len;
    uint64_t start, total; // the whole chunk, for its checksums
    uint32_t member;       // where the whole chunk lives (it never crosses a stripe)
    uint64_t phys;
};

struct dblade_io {
    struct dblade_stripe map;
    int             kind;
    int             broken;   // io_uring: a submission failed, the ring cannot be trusted
    struct dblade_fault fault; // DUALBLADE_FAULT, for tests
    char            why[160]; // why this engine (a fallback says what failed)
    pthread_mutex_t lock;     // one batch at a time
    struct dblade_io_shape * shape; // the store's, or NULL: DBLADE_IO_CHUNK x DBLADE_IO_DEPTH
    // the batch in progress
    uint32_t               chunk, depth; // its shape
    struct dblade_io_req * reqs;
    uint32_t               n_reqs;
    uint32_t               cur_req; // next chunk: request and position
    uint64_t               cur_pos;
    uint64_t               left; // bytes not handed out yet
    void (*tail)(void *);        // called once when left reaches 0 with chunks in flight (NULL: none, or done)
    void * tail_arg;
#ifdef DBLADE_HAVE_URING
    struct dblade_ring ring;
#endif
    // thread pool
    pthread_t       threads[IO_THREADS];
    uint32_t        n_threads;
    pthread_mutex_t pool_lock;
    pthread_cond_t  pool_work, pool_done;
    uint64_t        generation;
    uint32_t        busy;
    bool            stop;
};

const char * dblade_io_engine_name(int kind) {
    switch (kind) {
        case DBLADE_IO_URING:   return "io_uring";
        case DBLADE_IO_THREADS: return "threads";
        default:                return "none";
    }
}

// the next chunk of the batch, or false when every byte has been handed out
static bool next_chunk(struct dblade_io * io, struct chunk * c) {
    while (io->cur_req < io->n_reqs) {
        const struct dblade_io_req * r = &io->reqs[io->cur_req];
        if (io->cur_pos < r->len && r->res == 0) {
            c->req = io->cur_req;
            c->pos = io->cur_pos;
            // the last bytes of a batch go in smaller chunks: whoever waits for the batch waits for
            // the last chunk to arrive and be checked, and a smaller one is checked sooner
            const uint64_t tail = io->chunk < DBLADE_IO_TAIL_CHUNK ? io->chunk : DBLADE_IO_TAIL_CHUNK;
            const uint64_t cap  = io->left <= io->chunk ? tail : io->chunk;
            const uint64_t rest = r->len - io->cur_pos;
            // ... and a chunk ends where its stripe does
            c->len = dblade_stripe_piece(&io->map, r->off + io->cur_pos, rest < cap ? rest : cap, &c->member, &c->phys);
            io->cur_pos += c->len;
            io->left -= c->len;
            c->start = c->pos, c->total = c->len;
            return true;
        }
        io->left -= r->len - io->cur_pos; // a failed request's rest is not handed out
        io->cur_req++;
        io->cur_pos = 0;
    }
    return false;
}

static void chunk_failed(struct dblade_io * io, const struct chunk * c, int err) {
    if (io->reqs[c->req].res == 0) {
        io->reqs[c->req].res    = err;
        io->reqs[c->req].member = (int) c->member;
    }
}

// every chunk has gone to the device: the caller's next batch may start on another engine (once per batch)
static void tail_reached(struct dblade_io * io) {
    void (*tail)(void *) = io->tail;
    io->tail             = NULL;
    if (tail) {
        tail(io->tail_arg);
    }
}

// --- checksums: a write records each block's CRC-32C before it leaves, a read checks them once
// its chunk has arrived (while other chunks are in flight). 0 means "not known": never checked.

static void sums_record(const struct dblade_io_req * r, uint64_t pos, uint64_t len) {
    if (!r->sums) {
        return;
    }
    uint32_t *   s = r->sums + pos / DBLADE_BLOCK;
    const size_t n = (size_t) (len / DBLADE_BLOCK);
    dblade_crc32c_blocks((const uint8_t *) r->buf + pos, n, s);
    for (size_t i = 0; i < n; i++) {
        s[i] = dblade_block_sum(s[i]);
    }
}

static int sums_check(const struct dblade_io_req * r, uint64_t pos, uint64_t len) {
    if (!r->sums) {
        return 0;
    }
    const uint32_t * want = r->sums + pos / DBLADE_BLOCK;
    const uint8_t *  p    = (const uint8_t *) r->buf + pos;
    const size_t     n    = (size_t) (len / DBLADE_BLOCK);
    uint32_t         got[48];
    for (size_t b = 0; b < n; b += 48) {
        const size_t m = n - b < 48 ? n - b : 48;
        dblade_crc32c_blocks(p + b * DBLADE_BLOCK, m, got);
        for (size_t i = 0; i < m; i++) {
            if (want[b + i] != 0 && want[b + i] != dblade_block_sum(got[i])) {
                return -EBADMSG;
            }
        }
    }
    return 0;
}

// --- the thread pool ---

static void * pool_main(void * arg) {
    struct dblade_io * io = arg;
    uint64_t           seen = 0;
    pthread_mutex_lock(&io->pool_lock);
    for (;;) {
        while (!io->stop && io->generation == seen) {
            pthread_cond_wait(&io->pool_work, &io->pool_lock);
        }
        if (io->stop) {
            break;
        }
        struct chunk c;
        if (!next_chunk(io, &c)) {
            seen = io->generation; // this batch is handed out; wait for the next one
            continue;
        }
        io->busy++;
        const struct dblade_io_req r = io->reqs[c.req];
        pthread_mutex_unlock(&io->pool_lock);
        if (r.write) {
            sums_record(&r, c.pos, c.len);
        }
        int rc = dblade_io_rw_member(io->map.fd[c.member], c.member, r.write, (uint8_t *) r.buf + c.pos, c.len,
                                     c.phys, &io->fault);
        if (rc == 0 && !r.write) {
            rc = sums_check(&r, c.pos, c.len);
        }
        pthread_mutex_lock(&io->pool_lock);
        if (rc < 0) {
            chunk_failed(io, &c, rc);
        }
        io->busy--;
        pthread_cond_broadcast(&io->pool_done);
    }
    pthread_mutex_unlock(&io->pool_lock);
    return NULL;
}

static int pool_run(struct dblade_io * io) {
    pthread_mutex_lock(&io->pool_lock);
    io->generation++;
    pthread_cond_broadcast(&io->pool_work);
    for (;;) {
        // done when every chunk was handed out and none is in flight
        struct chunk c;
        const uint32_t save_req = io->cur_req;
        const uint64_t save_pos = io->cur_pos, save_left = io->left;
        const bool     more     = next_chunk(io, &c);
        io->cur_req = save_req, io->cur_pos = save_pos, io->left = save_left;
        if (!more && io->busy == 0) {
            break;
        }
        if (!more && io->tail) { // the pool's threads hold the last chunks
            pthread_mutex_unlock(&io->pool_lock);
            tail_reached(io);
            pthread_mutex_lock(&io->pool_lock);
            continue;
        }
        pthread_cond_wait(&io->pool_done, &io->pool_lock);
    }
    pthread_mutex_unlock(&io->pool_lock);
    return 0;
}

static int pool_start(struct dblade_io * io) {
    pthread_mutex_init(&io->pool_lock, NULL);
    pthread_cond_init(&io->pool_work, NULL);
    pthread_cond_init(&io->pool_done, NULL);
    for (uint32_t i = 0; i < IO_THREADS; i++) {
        if (pthread_create(&io->threads[i], NULL, pool_main, io) != 0) {
            break;
        }
        io->n_threads++;
    }
    return io->n_threads > 0 ? 0 : -EAGAIN;
}

static void pool_stop(struct dblade_io * io) {
    pthread_mutex_lock(&io->pool_lock);
    io->stop = true;
    pthread_cond_broadcast(&io->pool_work);
    pthread_mutex_unlock(&io->pool_lock);
    for (uint32_t i = 0; i < io->n_threads; i++) {
        pthread_join(io->threads[i], NULL);
    }
    pthread_cond_destroy(&io->pool_work);
    pthread_cond_destroy(&io->pool_done);
    pthread_mutex_destroy(&io->pool_lock);
}

// --- io_uring ---

#ifdef DBLADE_HAVE_URING
static int uring_start(struct dblade_io * io) {
    int rc = dblade_ring_init(&io->ring, 2 * DBLADE_IO_DEPTH);
    if (rc < 0) {
        return rc;
    }
    // a container may allow the ring's setup and still refuse io_uring_enter: try one no-op
    dblade_ring_prep_nop(dblade_ring_sqe(&io->ring), 0);
    rc = dblade_ring_submit(&io->ring);
    if (rc >= 0) {
        struct io_uring_cqe * cqe = NULL;
        rc = dblade_ring_wait(&io->ring, &cqe);
        if (rc == 0) {
            rc = cqe->res;
            dblade_ring_seen(&io->ring);
        }
    }
    if (rc < 0) {
        dblade_ring_exit(&io->ring);
    }
    return rc < 0 ? rc : 0;
}

static void uring_prep(struct dblade_io * io, struct chunk * c, uint32_t slot) {
    const struct dblade_io_req * r = &io->reqs[c->req];
    dblade_ring_prep_rw(dblade_ring_sqe(&io->ring), r->write, io->map.fd[c->member], (uint8_t *) r->buf + c->pos,
                        (uint32_t) c->len, c->phys + (c->pos - c->start), slot);
}

static int uring_run(struct dblade_io * io) {
    struct chunk slots[DBLADE_IO_DEPTH];
    uint32_t     free_slots[DBLADE_IO_DEPTH], n_free = io->depth, in_flight = 0;
    for (uint32_t i = 0; i < io->depth; i++) {
        free_slots[i] = io->depth - 1 - i;
    }
    uint32_t retry[DBLADE_IO_DEPTH], n_retry = 0; // slots to submit again (short or interrupted)
    int      fatal = 0;
    for (;;) {
        uint32_t queued = 0;
        while (n_retry > 0) {
            uring_prep(io, &slots[retry[n_retry - 1]], retry[n_retry - 1]);
            n_retry--, queued++;
        }
        while (!fatal && n_free > 0) {
            struct chunk c;
            if (!next_chunk(io, &c)) {
                break;
            }
            const uint32_t slot = free_slots[--n_free];
            slots[slot] = c;
            if (io->reqs[c.req].write) {
                sums_record(&io->reqs[c.req], c.pos, c.len);
            }
            uring_prep(io, &slots[slot], slot);
            queued++;
        }
        if (queued > 0) {
            int rc;
            do {
                rc = dblade_ring_submit(&io->ring);
            } while (rc == -EINTR);
            if (rc < 0) {
                // the entries never reached the kernel and stay in the ring: this engine is done for;
                // wait for what is in flight (its buffers belong to the caller), then report
                io->broken = rc;
                fatal      = rc;
                queued     = 0;
            }
            in_flight += queued;
        }
        if (io->tail && !fatal && io->left == 0 && n_retry == 0 && in_flight > 0) {
            tail_reached(io);
        }
        if (in_flight == 0) {
            break;
        }
        struct io_uring_cqe * cqe = NULL;
        int                   rc  = dblade_ring_wait(&io->ring, &cqe);
        if (rc == -EINTR) {
            continue;
        }
        if (rc < 0) {
            // the ring cannot be trusted: no later batch may find these completions, and the buffers
            // in flight belong to the caller once we return, so reap what can still be reaped
            io->broken = rc;
            while (in_flight > 0 && (dblade_ring_wait(&io->ring, &cqe) == 0)) {
                dblade_ring_seen(&io->ring);
                in_flight--;
            }
            return rc;
        }
        const uint32_t slot = (uint32_t) cqe->user_data;
        struct chunk * c    = &slots[slot];
        const struct dblade_io_req * r = &io->reqs[c->req];
        const int res = (int) dblade_fault_apply(&io->fault, r->write, c->member, c->phys + (c->pos - c->start),
                                                 c->len, cqe->res);
        dblade_ring_seen(&io->ring);
        in_flight--;
        if (!fatal && (res == -EINTR || res == -EAGAIN)) {
            retry[n_retry++] = slot;
            continue;
        }
        if (res < 0 || res == 0) {
            chunk_failed(io, c, res < 0 ? res : (r->write ? -ENOSPC : -EIO));
        } else if (!fatal && (uint64_t) res < c->len) {
            c->pos += (uint64_t) res, c->len -= (uint64_t) res; // short: the rest again
            retry[n_retry++] = slot;
            continue;
        } else if (!r->write) {
            const int bad = sums_check(r, c->start, c->total);
            if (bad) {
                chunk_failed(io, c, bad);
            }
        }
        free_slots[n_free++] = slot;
    }
    return fatal;
}
#endif

// --- the engine ---

int dblade_io_open(struct dblade_io ** out, int fd) {
    struct dblade_stripe map;
    dblade_stripe_single(&map, fd);
    return dblade_io_open_map(out, &map);
}

int dblade_io_open_map(struct dblade_io ** out, const struct dblade_stripe * map) {
    struct dblade_io * io = calloc(1, sizeof(*io));
    if (!io) {
        return -ENOMEM;
    }
    io->map = *map;
    if (dblade_fault_init(&io->fault, getenv("DUALBLADE_FAULT")) < 0) {
        free(io);
        return -EINVAL;
    }
    pthread_mutex_init(&io->lock, NULL);
    const char * want = getenv("DUALBLADE_IO_ENGINE");
    if (want && *want && strcmp(want, "io_uring") && strcmp(want, "threads") && strcmp(want, "auto")) {
        dblade_set_error("DUALBLADE_IO_ENGINE=%s is not an engine: use io_uring, threads or auto", want);
        free(io);
        return -EINVAL;
    }
    const bool force_uring   = want && !strcmp(want, "io_uring");
    const bool force_threads = want && !strcmp(want, "threads");
    int        rc            = -ENOSYS;
#ifdef DBLADE_HAVE_URING
    if (!force_threads) {
        rc = uring_start(io);
        if (rc == 0) {
            io->kind = DBLADE_IO_URING;
            snprintf(io->why, sizeof(io->why), "%s", force_uring ? "forced by DUALBLADE_IO_ENGINE" : "available");
        } else {
            snprintf(io->why, sizeof(io->why), "io_uring unavailable (%s)", strerror(-rc));
        }
    } else {
        snprintf(io->why, sizeof(io->why), "forced by DUALBLADE_IO_ENGINE");
    }
#else
    snprintf(io->why, sizeof(io->why), force_threads ? "forced by DUALBLADE_IO_ENGINE" : "built without io_uring headers");
#endif
    if (io->kind == 0) {
        if (force_uring) {
            dblade_set_error("DUALBLADE_IO_ENGINE=io_uring, but %s",
                             rc == -ENOSYS ? "this build has no io_uring support" : io->why);
            free(io);
            return rc;
        }
        rc = pool_start(io);
        if (rc < 0) {
            dblade_set_error("cannot start the I/O threads");
            free(io);
            return rc;
        }
        io->kind = DBLADE_IO_THREADS;
    }
    *out = io;
    return 0;
}

void dblade_io_close(struct dblade_io * io) {
    if (!io) {
        return;
    }
#ifdef DBLADE_HAVE_URING
    if (io->kind == DBLADE_IO_URING) {
        dblade_ring_exit(&io->ring);
    }
#endif
    if (io->kind == DBLADE_IO_THREADS) {
        pool_stop(io);
    }
    pthread_mutex_destroy(&io->lock);
    free(io);
}

void dblade_io_tune(struct dblade_io * io, struct dblade_io_shape * shape) {
    io->shape = shape;
}

int dblade_io_kind(const struct dblade_io * io) {
    return io ? io->kind : 0;
}

const char * dblade_io_why(const struct dblade_io * io) {
    return io ? io->why : "";
}

int dblade_io_run(struct dblade_io * io, struct dblade_io_req * reqs, uint32_t n) {
    return dblade_io_run_tail(io, reqs, n, NULL, NULL);
}

int dblade_io_run_tail(struct dblade_io * io, struct dblade_io_req * reqs, uint32_t n, void (*tail)(void *),
                       void * arg) {
    for (uint32_t i = 0; i < n; i++) {
        reqs[i].res    = 0;
        reqs[i].member = -1;
    }
    if (n == 0) {
        return 0;
    }
    pthread_mutex_lock(&io->lock);
    if (io->broken) {
        pthread_mutex_unlock(&io->lock);
        return io->broken;
    }
    if (io->kind == DBLADE_IO_THREADS) {
        pthread_mutex_lock(&io->pool_lock);
    }
    io->reqs    = reqs;
    io->n_reqs  = n;
    io->cur_req = 0;
    io->cur_pos = 0;
    io->left    = 0;
    io->tail    = tail;
    io->tail_arg = arg;
    int write   = 0;
    for (uint32_t i = 0; i < n; i++) {
        io->left += reqs[i].len;
        write |= reqs[i].write;
    }
    const uint64_t bytes = io->left;
    int            which = -1;
    io->chunk = DBLADE_IO_CHUNK, io->depth = DBLADE_IO_DEPTH;
    if (io->shape) {
        dblade_io_shape_pick(io->shape, write, bytes, &io->chunk, &io->depth, &which);
    }
    if (io->kind == DBLADE_IO_THREADS) {
        pthread_mutex_unlock(&io->pool_lock);
    }
    const uint64_t t0 = dblade_now_ns();
    int            rc = 0;
#ifdef DBLADE_HAVE_URING
    if (io->kind == DBLADE_IO_URING) {
        rc = uring_run(io);
    }
#endif
    if (io->kind == DBLADE_IO_THREADS) {
        rc = pool_run(io);
    }
    if (rc == 0) {
        tail_reached(io); // where the last chunks came back before anyone looked
    }
    for (uint32_t i = 0; rc == 0 && i < n; i++) {
        rc = reqs[i].res;
    }
    if (rc == 0 && which >= 0) {
        dblade_io_shape_done(io->shape, which, bytes, dblade_now_ns() - t0);
    }
    if (io->kind == DBLADE_IO_THREADS) {
        pthread_mutex_lock(&io->pool_lock); // a thread waking late must see the batch gone
    }
    io->reqs   = NULL;
    io->n_reqs = 0;
    io->tail   = NULL;
    if (io->kind == DBLADE_IO_THREADS) {
        pthread_mutex_unlock(&io->pool_lock);
    }
    pthread_mutex_unlock(&io->lock);
    return rc;
}
