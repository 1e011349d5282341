// The request shape of a store's O_DIRECT reads (shape.c): the chunk size and the chunks kept in flight.
// Devices disagree: this machine's disk reaches its ceiling with 32 MiB in flight and loses with 1 MiB
// chunks, the GPU machine's reads 1 MiB x 4 at 2.3 GiB/s and 4 MiB x 16 at 1.7 (bench probes, runs 1-10).
// So the engines of one store try a few shapes on their own reads and keep the fastest, trying the others
// now and then as the device changes its mind. DUALBLADE_IO_SHAPE=SIZE:DEPTH (e.g. 1M:4) fixes one.
#ifndef DUALBLADE_SHAPE_H
#define DUALBLADE_SHAPE_H

#include <stdint.h>

#define DBLADE_SHAPES 5 // the candidates tried (shape.c)

struct dblade_io_shape;

// -EINVAL with dblade_get_error() set for a DUALBLADE_IO_SHAPE that is not a shape
int  dblade_io_shape_new(struct dblade_io_shape ** out);
void dblade_io_shape_free(struct dblade_io_shape * s);

// the shape for the next batch of a store's engine; *which is what dblade_io_shape_done takes (-1: the
// batch is not measured: a fixed shape, a write, or too few bytes to tell shapes apart)
void dblade_io_shape_pick(struct dblade_io_shape * s, int write, uint64_t bytes, uint32_t * chunk,
                          uint32_t * depth, int * which);
// a measured batch took ns (every request succeeded)
void dblade_io_shape_done(struct dblade_io_shape * s, int which, uint64_t bytes, uint64_t ns);

struct dblade_io_shape_rate {
    uint32_t chunk, depth;
    uint64_t batches; // measured so far
    double   gib_s;   // their recent average
};

struct dblade_io_shape_report {
    uint32_t                    chunk, depth; // what reads use now
    int                         fixed;        // 1: DUALBLADE_IO_SHAPE
    uint32_t                    n;            // rates filled
    struct dblade_io_shape_rate rates[DBLADE_SHAPES];
};
void dblade_io_shape_report(struct dblade_io_shape * s, struct dblade_io_shape_report * out);

#endif
