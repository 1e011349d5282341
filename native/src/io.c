// Synchronous O_DIRECT transfers of whole aligned ranges: device headers, session files, the
// thread-pool engine's workers. It calls the fault injector and nothing else.

#define _GNU_SOURCE
#include "io.h"

#include "base.h"
#include "fault.h"

#include <errno.h>
#include <unistd.h>

// large transfers are split so that one request never exceeds what the kernel takes in one go
#define IO_CHUNK (8u << 20)

int dblade_io_rw(int fd, int write, void * buf, uint64_t len, uint64_t off, struct dblade_fault * fault) {
    return dblade_io_rw_member(fd, 0, write, buf, len, off, fault);
}

int dblade_io_rw_member(int fd, uint32_t m, int write, void * buf, uint64_t len, uint64_t off,
                        struct dblade_fault * fault) {
    uint8_t * p = buf;
    while (len > 0) {
        const size_t  n = len < IO_CHUNK ? (size_t) len : IO_CHUNK;
        const ssize_t r = write ? pwrite(fd, p, n, (off_t) off) : pread(fd, p, n, (off_t) off);
        if (r < 0 && errno == EINTR) {
            continue;
        }
        int64_t res = r < 0 ? -errno : (int64_t) r;
        if (fault) {
            res = dblade_fault_apply(fault, write, m, off, n, res);
        }
        if (res < 0) {
            return (int) res;
        }
        if (res == 0) {
            return write ? -ENOSPC : -EIO; // the store ended inside a reserved extent
        }
        p += res, off += (uint64_t) res, len -= (uint64_t) res;
    }
    return 0;
}

int dblade_io_read(int fd, void * buf, uint64_t len, uint64_t off) {
    return dblade_io_rw(fd, 0, buf, len, off, NULL);
}

int dblade_io_write(int fd, const void * buf, uint64_t len, uint64_t off) {
    return dblade_io_rw(fd, 1, (void *) buf, len, off, NULL);
}
