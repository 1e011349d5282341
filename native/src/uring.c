// A minimal io_uring, straight on the kernel's ABI (<linux/io_uring.h> and two system calls).
//
// The engine needs little of liburing: a ring, an SQE to fill, submit, wait for a completion. The
// kernel headers that every C toolchain on Linux ships are enough for that, so every build gets
// the io_uring engine without a library to find or link (a fresh machine has no liburing-dev).
//
// The rings are shared with the kernel: the producer publishes its tail with a release store, the
// consumer reads it with an acquire load, as liburing does. One thread uses a ring at a time (the
// engine's lock).

#define _GNU_SOURCE
#include "uring.h"

#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifdef DBLADE_HAVE_URING

static int sys_setup(unsigned entries, struct io_uring_params * p) {
    const long rc = syscall(__NR_io_uring_setup, entries, p);
    return rc < 0 ? -errno : (int) rc;
}

static int sys_enter(int fd, unsigned to_submit, unsigned min_complete, unsigned flags) {
    const long rc = syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, NULL, 0);
    return rc < 0 ? -errno : (int) rc;
}

#define RING_FIELD(base, off) ((unsigned *) ((uint8_t *) (base) + (off)))

int dblade_ring_init(struct dblade_ring * r, unsigned entries) {
    memset(r, 0, sizeof(*r));
    r->fd = -1;
    struct io_uring_params p;
    memset(&p, 0, sizeof(p));
    const int fd = sys_setup(entries, &p);
    if (fd < 0) {
        return fd;
    }
    r->fd       = fd;
    r->sq_bytes = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    r->cq_bytes = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        r->sq_bytes = r->cq_bytes = r->sq_bytes > r->cq_bytes ? r->sq_bytes : r->cq_bytes;
    }
    r->sq_ring = mmap(NULL, r->sq_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQ_RING);
    if (r->sq_ring == MAP_FAILED) {
        r->sq_ring = NULL;
        goto fail;
    }
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        r->cq_ring = r->sq_ring;
    } else {
        r->cq_ring = mmap(NULL, r->cq_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_CQ_RING);
        if (r->cq_ring == MAP_FAILED) {
            r->cq_ring = NULL;
            goto fail;
        }
    }
    r->sqes_bytes = p.sq_entries * sizeof(struct io_uring_sqe);
    r->sqes = mmap(NULL, r->sqes_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES);
    if (r->sqes == MAP_FAILED) {
        r->sqes = NULL;
        goto fail;
    }
    r->sq_head  = RING_FIELD(r->sq_ring, p.sq_off.head);
    r->sq_tail  = RING_FIELD(r->sq_ring, p.sq_off.tail);
    r->sq_mask  = *RING_FIELD(r->sq_ring, p.sq_off.ring_mask);
    r->sq_array = RING_FIELD(r->sq_ring, p.sq_off.array);
    r->sq_n     = p.sq_entries;
    r->cq_head  = RING_FIELD(r->cq_ring, p.cq_off.head);
    r->cq_tail  = RING_FIELD(r->cq_ring, p.cq_off.tail);
    r->cq_mask  = *RING_FIELD(r->cq_ring, p.cq_off.ring_mask);
    r->cqes     = (struct io_uring_cqe *) ((uint8_t *) r->cq_ring + p.cq_off.cqes);
    // the SQ array maps slot i to SQE i for good: the kernel reads entries in tail order
    for (unsigned i = 0; i < p.sq_entries; i++) {
        r->sq_array[i] = i;
    }
    r->sqe_tail = r->sqe_head = *r->sq_tail;
    return 0;
fail:;
    const int e = -errno;
    dblade_ring_exit(r);
    return e;
}

void dblade_ring_exit(struct dblade_ring * r) {
    if (r->sqes) {
        munmap(r->sqes, r->sqes_bytes);
    }
    if (r->cq_ring && r->cq_ring != r->sq_ring) {
        munmap(r->cq_ring, r->cq_bytes);
    }
    if (r->sq_ring) {
        munmap(r->sq_ring, r->sq_bytes);
    }
    if (r->fd >= 0) {
        close(r->fd);
    }
    memset(r, 0, sizeof(*r));
    r->fd = -1;
}

struct io_uring_sqe * dblade_ring_sqe(struct dblade_ring * r) {
    const unsigned head = __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
    if (r->sqe_tail - head >= r->sq_n) {
        return NULL; // full
    }
    struct io_uring_sqe * sqe = &r->sqes[r->sqe_tail & r->sq_mask];
    memset(sqe, 0, sizeof(*sqe));
    r->sqe_tail++;
    return sqe;
}

int dblade_ring_submit(struct dblade_ring * r) {
    const unsigned n = r->sqe_tail - r->sqe_head;
    if (n == 0) {
        return 0;
    }
    __atomic_store_n(r->sq_tail, r->sqe_tail, __ATOMIC_RELEASE); // the entries are filled in
    const int rc = sys_enter(r->fd, n, 0, 0);
    if (rc > 0) {
        r->sqe_head += (unsigned) rc;
    }
    return rc;
}

int dblade_ring_wait(struct dblade_ring * r, struct io_uring_cqe ** out) {
    for (;;) {
        const unsigned head = *r->cq_head;
        if (head != __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE)) {
            *out = &r->cqes[head & r->cq_mask];
            return 0;
        }
        const int rc = sys_enter(r->fd, 0, 1, IORING_ENTER_GETEVENTS);
        if (rc < 0 && rc != -EINTR) {
            return rc;
        }
    }
}

void dblade_ring_seen(struct dblade_ring * r) {
    __atomic_store_n(r->cq_head, *r->cq_head + 1, __ATOMIC_RELEASE);
}

void dblade_ring_prep_rw(struct io_uring_sqe * sqe, int write, int fd, void * buf, uint32_t len, uint64_t off,
                         uint64_t user_data) {
    sqe->opcode    = write ? IORING_OP_WRITE : IORING_OP_READ;
    sqe->fd        = fd;
    sqe->addr      = (uint64_t) (uintptr_t) buf;
    sqe->len       = len;
    sqe->off       = off;
    sqe->user_data = user_data;
}

void dblade_ring_prep_nop(struct io_uring_sqe * sqe, uint64_t user_data) {
    sqe->opcode    = IORING_OP_NOP;
    sqe->user_data = user_data;
}

#endif
