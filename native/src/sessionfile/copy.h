// Moving KV between files without carrying it through the process (copy.c): a reflink where the file
// system has them, else an O_DIRECT copy through a bounded buffer, else copy_file_range; and the
// block checksums of what is copied.
#ifndef DUALBLADE_SESSIONFILE_COPY_H
#define DUALBLADE_SESSIONFILE_COPY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct dblade_fault;

#define DBLADE_COPY_BUF (4u << 20) // the bounded buffer

// what a copy used (a mask: one save may use several)
enum { DBLADE_COPY_CLONE = 1, DBLADE_COPY_CFR = 2, DBLADE_COPY_DIRECT = 4 };

// [soff, soff + len) of src to [doff, ...) of dst; all multiples of DBLADE_BLOCK; *how gets what did
// it. fault (NULL: none) forces the O_DIRECT copy and may fail its writes (tests).
int  dblade_copy_range(int src, uint64_t soff, int dst, uint64_t doff, uint64_t len, struct dblade_fault * fault,
                       int * how);
// the same between [off, off + len) of a (striped) store and [foff, ...) of fd, stripe piece by stripe piece;
// to_store: from fd into the store
struct dblade_stripe;
int  dblade_copy_store(const struct dblade_stripe * map, uint64_t off, int fd, uint64_t foff, uint64_t len,
                       bool to_store, struct dblade_fault * fault, int * how);
// "clone", "copy_file_range", "direct" or a mix ("clone+direct")
void dblade_copy_how_name(int how, char * out, size_t cap);
// O_DIRECT on or off for an open file; -errno where the file system refuses it
int  dblade_copy_set_direct(int fd, bool on);

// [off, off + len) of fd read through the bounded buffer, each piece handed to fn(buf, n, done, arg)
// with done its offset in the range; the first error ends it (a read's -errno, or fn's)
typedef int (*dblade_piece_fn)(const void * buf, uint64_t n, uint64_t done, void * arg);
int  dblade_read_pieces(int fd, uint64_t off, uint64_t len, dblade_piece_fn fn, void * arg);
// the same, each piece's done counted from base
int  dblade_read_pieces_at(int fd, uint64_t off, uint64_t len, uint64_t base, dblade_piece_fn fn, void * arg);
// the recorded sum (dblade_block_sum) of each block of [off, off + len) of fd / of memory
int  dblade_sums_of_file(int fd, uint64_t off, uint64_t len, uint32_t * out);
void dblade_sums_of_memory(const void * p, uint64_t len, uint32_t * out);

#endif
