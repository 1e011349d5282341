// Copies between files with no user-space copy where the kernel can do it, and the checksums of
// their blocks (copy.h). It calls the synchronous transfers (io.c) and CRC-32C.

#define _GNU_SOURCE
#include "copy.h"

#include "../base.h"
#include "../crc32c.h"
#include "../io.h"
#include "../stripe.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

// DUALBLADE_SESSION_COPY=clone|copy_file_range|direct: one way only (tests compare them)
static int forced_how(void) {
    const char * e = getenv("DUALBLADE_SESSION_COPY");
    if (!e || !*e) {
        return 0;
    }
    return !strcmp(e, "clone")             ? DBLADE_COPY_CLONE
           : !strcmp(e, "copy_file_range") ? DBLADE_COPY_CFR
           : !strcmp(e, "direct")          ? DBLADE_COPY_DIRECT
                                           : 0;
}

int dblade_copy_set_direct(int fd, bool on) {
    const int fl = fcntl(fd, F_GETFL);
    if (fl < 0) {
        return -errno;
    }
    return fcntl(fd, F_SETFL, on ? (fl | O_DIRECT) : (fl & ~O_DIRECT)) < 0 ? -errno : 0;
}

static int copy_cfr(int src, uint64_t soff, int dst, uint64_t doff, uint64_t len) {
    loff_t   so = (loff_t) soff, dof = (loff_t) doff;
    uint64_t left = len;
    while (left > 0) {
        const ssize_t n = copy_file_range(src, &so, dst, &dof, left, 0);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            return n < 0 ? -errno : -EIO;
        }
        left -= (uint64_t) n;
    }
    return 0;
}

int dblade_read_pieces_at(int fd, uint64_t off, uint64_t len, uint64_t base, dblade_piece_fn fn, void * arg) {
    void *         buf = NULL;
    const uint64_t cap = len < DBLADE_COPY_BUF ? dblade_align_up(len ? len : 1, DBLADE_BLOCK) : DBLADE_COPY_BUF;
    if (posix_memalign(&buf, DBLADE_BLOCK, cap) != 0) {
        return -ENOMEM;
    }
    int rc = 0;
    for (uint64_t done = 0; done < len && rc == 0; done += cap) {
        const uint64_t n = len - done < cap ? len - done : cap;
        rc               = dblade_io_read(fd, buf, n, off + done);
        if (rc == 0) {
            rc = fn(buf, n, base + done, arg);
        }
    }
    free(buf);
    return rc;
}

int dblade_read_pieces(int fd, uint64_t off, uint64_t len, dblade_piece_fn fn, void * arg) {
    return dblade_read_pieces_at(fd, off, len, 0, fn, arg);
}

struct copy_to {
    int                   dst;
    uint64_t              doff;
    struct dblade_fault * fault;
};

static int write_piece(const void * buf, uint64_t n, uint64_t done, void * arg) {
    const struct copy_to * c = arg;
    return dblade_io_rw(c->dst, 1, (void *) buf, n, c->doff + done, c->fault);
}

static int copy_direct(int src, uint64_t soff, int dst, uint64_t doff, uint64_t len, struct dblade_fault * fault) {
    struct copy_to c = { dst, doff, fault };
    return dblade_read_pieces(src, soff, len, write_piece, &c);
}

// two streams at once (halves of the range): the device has reads and writes in flight together
struct copy_half {
    int      src, dst;
    uint64_t soff, doff, len;
    int      rc;
};

static void * copy_half_run(void * arg) {
    struct copy_half * h = arg;
    h->rc                = copy_direct(h->src, h->soff, h->dst, h->doff, h->len, NULL);
    return NULL;
}

static int copy_direct2(int src, uint64_t soff, int dst, uint64_t doff, uint64_t len, struct dblade_fault * fault) {
    if (fault || len < (1u << 20)) { // the fault rules count transfers in order: one stream
        return copy_direct(src, soff, dst, doff, len, fault);
    }
    const uint64_t   half = dblade_align_down(len / 2, DBLADE_BLOCK);
    struct copy_half h    = { src, dst, soff + half, doff + half, len - half, 0 };
    pthread_t        th;
    if (pthread_create(&th, NULL, copy_half_run, &h) != 0) {
        return copy_direct(src, soff, dst, doff, len, NULL);
    }
    const int rc = copy_direct(src, soff, dst, doff, half, NULL);
    pthread_join(th, NULL);
    return rc < 0 ? rc : h.rc;
}

// A reflink where the file system has them (no data moves); else an O_DIRECT copy through a bounded
// buffer (on ext4 about twice as fast as copy_file_range, which goes through the page cache); else,
// where O_DIRECT refuses the transfer, copy_file_range (in the kernel).
int dblade_copy_range(int src, uint64_t soff, int dst, uint64_t doff, uint64_t len, struct dblade_fault * fault,
                      int * how) {
    const int force = fault ? DBLADE_COPY_DIRECT : forced_how();
    if (len == 0) {
        return 0;
    }
    if (!force || force == DBLADE_COPY_CLONE) {
        struct file_clone_range r = { .src_fd = src, .src_offset = soff, .src_length = len, .dest_offset = doff };
        if (ioctl(dst, FICLONERANGE, &r) == 0) {
            *how |= DBLADE_COPY_CLONE;
            return 0;
        }
    }
    if (force == DBLADE_COPY_CFR) {
        *how |= DBLADE_COPY_CFR;
        return copy_cfr(src, soff, dst, doff, len);
    }
    int rc = copy_direct2(src, soff, dst, doff, len, fault);
    if (rc == -EINVAL && !force) {
        *how |= DBLADE_COPY_CFR;
        return copy_cfr(src, soff, dst, doff, len);
    }
    *how |= DBLADE_COPY_DIRECT;
    return rc;
}

int dblade_copy_store(const struct dblade_stripe * map, uint64_t off, int fd, uint64_t foff, uint64_t len,
                      bool to_store, struct dblade_fault * fault, int * how) {
    int rc = 0;
    for (uint64_t done = 0, n; done < len && rc == 0; done += n) {
        uint32_t m;
        uint64_t phys;
        n  = dblade_stripe_piece(map, off + done, len - done, &m, &phys);
        rc = to_store ? dblade_copy_range(fd, foff + done, map->fd[m], phys, n, fault, how)
                      : dblade_copy_range(map->fd[m], phys, fd, foff + done, n, fault, how);
    }
    return rc;
}

void dblade_copy_how_name(int how, char * out, size_t cap) {
    snprintf(out, cap, "%s%s%s%s%s", how & DBLADE_COPY_CLONE ? "clone" : "",
             (how & DBLADE_COPY_CLONE) && (how & ~DBLADE_COPY_CLONE) ? "+" : "",
             how & DBLADE_COPY_CFR ? "copy_file_range" : "",
             (how & DBLADE_COPY_CFR) && (how & DBLADE_COPY_DIRECT) ? "+" : "", how & DBLADE_COPY_DIRECT ? "direct" : "");
}

static int sum_piece(const void * buf, uint64_t n, uint64_t done, void * arg) {
    dblade_sums_of_memory(buf, n, (uint32_t *) arg + done / DBLADE_BLOCK);
    return 0;
}

int dblade_sums_of_file(int fd, uint64_t off, uint64_t len, uint32_t * out) {
    return dblade_read_pieces(fd, off, len, sum_piece, out);
}

void dblade_sums_of_memory(const void * p, uint64_t len, uint32_t * out) {
    const uint64_t n = len / DBLADE_BLOCK;
    dblade_crc32c_blocks(p, n, out);
    for (uint64_t i = 0; i < n; i++) {
        out[i] = dblade_block_sum(out[i]);
    }
}
