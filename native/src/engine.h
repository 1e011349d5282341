// The asynchronous I/O engine (engine.c): batches of O_DIRECT transfers, DBLADE_IO_DEPTH chunks in
// flight, on io_uring or a pool of threads, with a CRC-32C per block recorded on write and checked on
// read.
#ifndef DUALBLADE_ENGINE_H
#define DUALBLADE_ENGINE_H

#include <stdint.h>

// the shape of an engine without a store's (shape.h: a store's engines measure theirs)
#define DBLADE_IO_CHUNK      (4u << 20)
#define DBLADE_IO_TAIL_CHUNK (1u << 20) // the last chunk of a batch goes in pieces of this (or the chunk's size)
#define DBLADE_IO_DEPTH      16u        // 64 MiB in flight; also the most any shape keeps in flight

enum { DBLADE_IO_URING = 1, DBLADE_IO_THREADS = 2 };

struct dblade_io_req {
    void *     buf;
    uint64_t   len;
    uint64_t   off;
    int        write;
    int        res;  // out: 0 or the first -errno of this request (-EBADMSG: a checksum mismatch)
    int        member; // out: the member of a striped store whose transfer failed first (-1: none)
    uint32_t * sums; // per DBLADE_BLOCK of the request, or NULL: a write records the blocks' CRC-32C,
                     // a read checks them (0: not known, not checked)
};

struct dblade_io;
struct dblade_io_shape;
struct dblade_stripe;
// picks io_uring where it works, else the thread pool (DUALBLADE_IO_ENGINE forces one); requests' offsets
// are the map's logical ones, and a striped map's members all have transfers in flight at once
int          dblade_io_open_map(struct dblade_io ** out, const struct dblade_stripe * map);
// one file, at its own offsets
int          dblade_io_open(struct dblade_io ** out, int fd);
void         dblade_io_close(struct dblade_io * io);
// the engine's batches take their shape from (and report their reads' speed to) the store's shape
void         dblade_io_tune(struct dblade_io * io, struct dblade_io_shape * shape);
int          dblade_io_kind(const struct dblade_io * io);
const char * dblade_io_why(const struct dblade_io * io);
const char * dblade_io_engine_name(int kind);
// every request to completion; 0 or the first failing request's -errno
int          dblade_io_run(struct dblade_io * io, struct dblade_io_req * reqs, uint32_t n);
// ... and tail(arg) is called once on the calling thread as soon as every chunk of the batch has gone to the
// device, while the last are in flight where the engine sees them so (at the latest before it returns; not at
// all where a submission failed, or for an empty batch): a caller that reads a
// stream of batches starts the next one on another engine then, so that the device's queue does not drain
// between two batches. tail may take the session's lock: the caller must not hold it (nor any lock a holder of
// the session's takes) while it runs the batch.
int          dblade_io_run_tail(struct dblade_io * io, struct dblade_io_req * reqs, uint32_t n, void (*tail)(void *),
                                void * arg);

#endif
