// io_uring on the kernel's ABI (uring.c): a ring, its SQEs and CQEs, nothing more.
#ifndef DUALBLADE_URING_H
#define DUALBLADE_URING_H

#ifdef DBLADE_HAVE_URING
#    include <linux/io_uring.h>
#    include <stddef.h>
#    include <stdint.h>

struct dblade_ring {
    int                   fd;
    void *                sq_ring, * cq_ring;
    size_t                sq_bytes, cq_bytes, sqes_bytes;
    unsigned *            sq_head, * sq_tail, * sq_array, * cq_head, * cq_tail;
    unsigned              sq_mask, sq_n, cq_mask;
    struct io_uring_sqe * sqes;
    struct io_uring_cqe * cqes;
    unsigned              sqe_tail, sqe_head; // SQEs handed out / submitted
};

int                   dblade_ring_init(struct dblade_ring * r, unsigned entries);
void                  dblade_ring_exit(struct dblade_ring * r);
struct io_uring_sqe * dblade_ring_sqe(struct dblade_ring * r);    // NULL when the ring is full
int                   dblade_ring_submit(struct dblade_ring * r); // what was filled in; how many the kernel took
int                   dblade_ring_wait(struct dblade_ring * r, struct io_uring_cqe ** out); // the next completion
void                  dblade_ring_seen(struct dblade_ring * r);  // ... consumed
void dblade_ring_prep_rw(struct io_uring_sqe * sqe, int write, int fd, void * buf, uint32_t len, uint64_t off,
                         uint64_t user_data);
void dblade_ring_prep_nop(struct io_uring_sqe * sqe, uint64_t user_data);
#endif

#endif
