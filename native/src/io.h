// Synchronous transfers of whole aligned ranges (io.c): device headers, session files, the thread-pool
// engine's workers. Retried on EINTR and short transfers.
#ifndef DUALBLADE_IO_H
#define DUALBLADE_IO_H

#include <stdint.h>

struct dblade_fault;

// fault (NULL: none) may replace each transfer's result (DUALBLADE_FAULT, for tests)
int dblade_io_rw(int fd, int write, void * buf, uint64_t len, uint64_t off, struct dblade_fault * fault);
// ... of member m of a striped store (what a fault rule's @m matches)
int dblade_io_rw_member(int fd, uint32_t m, int write, void * buf, uint64_t len, uint64_t off,
                        struct dblade_fault * fault);
int dblade_io_read(int fd, void * buf, uint64_t len, uint64_t off);
int dblade_io_write(int fd, const void * buf, uint64_t len, uint64_t off);

#endif
