// The request shape of a store's reads: the tuner tries every candidate, keeps the fastest, finds a new
// fastest when the device changes, leaves writes and small batches alone; DUALBLADE_IO_SHAPE fixes a shape
// or is refused with its reason; and the engine really cuts its transfers as the shape says (counted on a
// real O_DIRECT file with the fault injector's transfer numbers).
#define _GNU_SOURCE
#include "../src/base.h"
#include "../src/engine.h"
#include "../src/shape.h"
#include "check.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MiB (1ull << 20)

// one measured batch of 32 MiB: the shape picked and its rate as the device gives it (GiB/s per shape)
static int batch(struct dblade_io_shape * s, const double * gib_s) {
    uint32_t chunk = 0, depth = 0;
    int      which = -1;
    dblade_io_shape_pick(s, 0, 32 * MiB, &chunk, &depth, &which);
    CHECK(which >= 0 && which < DBLADE_SHAPES);
    CHECK(chunk >= MiB && depth >= 1 && depth <= DBLADE_IO_DEPTH);
    dblade_io_shape_done(s, which, 32 * MiB, (uint64_t) (32.0 * MiB / (gib_s[which] * (1u << 30)) * 1e9));
    return which;
}

static void tunes(void) {
    unsetenv("DUALBLADE_IO_SHAPE");
    struct dblade_io_shape * s = NULL;
    CHECK_EQ(dblade_io_shape_new(&s), 0);
    struct dblade_io_shape_report r;
    dblade_io_shape_report(s, &r);
    CHECK_EQ(r.fixed, 0);
    CHECK_EQ(r.n, DBLADE_SHAPES);
    const uint32_t first_chunk = r.chunk, first_depth = r.depth;
    CHECK_EQ(first_chunk, DBLADE_IO_CHUNK); // until measured: the engine's old shape
    CHECK_EQ(first_depth, DBLADE_IO_DEPTH);

    // every candidate is tried before any is kept
    double rate[DBLADE_SHAPES];
    for (int i = 0; i < DBLADE_SHAPES; i++) {
        rate[i] = 1.0 + 0.1 * i;
    }
    rate[2]                    = 2.5; // the device likes this one
    int tried[DBLADE_SHAPES] = { 0 };
    for (int i = 0; i < 3 * DBLADE_SHAPES; i++) {
        tried[batch(s, rate)]++;
    }
    for (int i = 0; i < DBLADE_SHAPES; i++) {
        CHECK_EQ(tried[i], 3);
    }
    dblade_io_shape_report(s, &r);
    CHECK_EQ(r.chunk, r.rates[2].chunk);
    CHECK_EQ(r.depth, r.rates[2].depth);
    CHECK(r.rates[2].gib_s > 2.4 && r.rates[2].gib_s < 2.6);

    // then the fastest takes nearly every batch, and the others are still tried now and then
    int kept = 0, others = 0;
    for (int i = 0; i < 160; i++) {
        batch(s, rate) == 2 ? kept++ : others++;
    }
    CHECK(kept >= 145 && others >= 5);

    // the device changes its mind: another shape gets faster, and is found
    rate[2]     = 1.2;
    rate[0]     = 3.0; // the one that measured slowest at first
    int last_16 = 0;
    for (int i = 0; i < 400; i++) {
        last_16 += i >= 384 && batch(s, rate) == 0;
        if (i < 384) {
            batch(s, rate);
        }
    }
    CHECK(last_16 >= 15);
    dblade_io_shape_report(s, &r);
    CHECK_EQ(r.chunk, r.rates[0].chunk);
    CHECK_EQ(r.depth, r.rates[0].depth);

    // writes and small reads take the shape in use, and are not measured
    uint32_t chunk, depth;
    int      which;
    uint64_t before = 0, after = 0;
    for (int i = 0; i < DBLADE_SHAPES; i++) {
        before += r.rates[i].batches;
    }
    dblade_io_shape_pick(s, 1, 64 * MiB, &chunk, &depth, &which);
    CHECK_EQ(which, -1);
    CHECK_EQ(chunk, r.chunk);
    dblade_io_shape_pick(s, 0, 4 * MiB, &chunk, &depth, &which);
    CHECK_EQ(which, -1);
    CHECK_EQ(chunk, r.chunk);
    dblade_io_shape_done(s, which, 4 * MiB, 1000);
    dblade_io_shape_report(s, &r);
    for (int i = 0; i < DBLADE_SHAPES; i++) {
        after += r.rates[i].batches;
    }
    CHECK_EQ(after, before);
    dblade_io_shape_free(s);
}

static void fixed_by_env(void) {
    struct dblade_io_shape * s = NULL;
    setenv("DUALBLADE_IO_SHAPE", "512K:8", 1);
    CHECK_EQ(dblade_io_shape_new(&s), 0);
    uint32_t chunk, depth;
    int      which;
    dblade_io_shape_pick(s, 0, 64 * MiB, &chunk, &depth, &which);
    CHECK_EQ(chunk, 512u << 10);
    CHECK_EQ(depth, 8u);
    CHECK_EQ(which, -1);
    struct dblade_io_shape_report r;
    dblade_io_shape_report(s, &r);
    CHECK_EQ(r.fixed, 1);
    CHECK_EQ(r.n, 0u);
    dblade_io_shape_free(s);

    setenv("DUALBLADE_IO_SHAPE", "auto", 1);
    CHECK_EQ(dblade_io_shape_new(&s), 0);
    dblade_io_shape_report(s, &r);
    CHECK_EQ(r.fixed, 0);
    dblade_io_shape_free(s);

    const char * bad[] = { "1M", "0:4", "1M:0", "1M:17", "3000:4", "128M:4", "x", "1M:4x", "1G:4", ":4" };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        setenv("DUALBLADE_IO_SHAPE", bad[i], 1);
        s = NULL;
        CHECK_EQ(dblade_io_shape_new(&s), -EINVAL);
        CHECK(s == NULL);
        CHECK(strstr(dblade_get_error(), "DUALBLADE_IO_SHAPE") != NULL);
        CHECK(strstr(dblade_get_error(), bad[i]) != NULL);
    }
    unsetenv("DUALBLADE_IO_SHAPE");
}

// a 16 MiB read with the 9th read transfer failing: in 1 MiB chunks there is a 9th, in 4 MiB ones (and the
// last 4 MiB in 1 MiB pieces) only 7
static int read_with_ninth_failing(const char * shape, int fd, uint8_t * buf) {
    setenv("DUALBLADE_IO_SHAPE", shape, 1);
    setenv("DUALBLADE_FAULT", "read:9:eio", 1);
    struct dblade_io_shape * s  = NULL;
    struct dblade_io *       io = NULL;
    CHECK_EQ(dblade_io_shape_new(&s), 0);
    CHECK_EQ(dblade_io_open(&io, fd), 0);
    dblade_io_tune(io, s);
    struct dblade_io_req r  = { .buf = buf, .len = 16 * MiB, .off = 0 };
    const int            rc = dblade_io_run(io, &r, 1);
    dblade_io_close(io);
    dblade_io_shape_free(s);
    unsetenv("DUALBLADE_FAULT");
    unsetenv("DUALBLADE_IO_SHAPE");
    return rc;
}

static void engine_follows_the_shape(void) {
    const int fd  = test_open_direct("shape", NULL);
    uint8_t * buf = NULL, * back = NULL;
    CHECK(posix_memalign((void **) &buf, 4096, 16 * MiB) == 0);
    CHECK(posix_memalign((void **) &back, 4096, 16 * MiB) == 0);
    for (uint64_t i = 0; i < 16 * MiB; i++) {
        buf[i] = (uint8_t) (i * 29 + (i >> 12));
    }
    struct dblade_io * io = NULL;
    CHECK_EQ(dblade_io_open(&io, fd), 0);
    struct dblade_io_req w = { .buf = buf, .len = 16 * MiB, .off = 0, .write = 1 };
    CHECK_EQ(dblade_io_run(io, &w, 1), 0);
    dblade_io_close(io);

    CHECK_EQ(read_with_ninth_failing("1M:4", fd, back), -EIO);
    CHECK_EQ(read_with_ninth_failing("4M:4", fd, back), 0);
    CHECK(memcmp(buf, back, 16 * MiB) == 0);

    // tuned: every candidate reads every byte right, and each batch is measured
    struct dblade_io_shape * s = NULL;
    CHECK_EQ(dblade_io_shape_new(&s), 0);
    CHECK_EQ(dblade_io_open(&io, fd), 0);
    dblade_io_tune(io, s);
    for (int i = 0; i < 3 * DBLADE_SHAPES; i++) {
        memset(back, 0xEE, 16 * MiB);
        struct dblade_io_req r = { .buf = back, .len = 16 * MiB, .off = 0 };
        CHECK_EQ(dblade_io_run(io, &r, 1), 0);
        CHECK(memcmp(buf, back, 16 * MiB) == 0);
    }
    struct dblade_io_shape_report rep;
    dblade_io_shape_report(s, &rep);
    for (uint32_t i = 0; i < rep.n; i++) {
        CHECK_EQ(rep.rates[i].batches, 3u);
        CHECK(rep.rates[i].gib_s > 0);
    }
    dblade_io_close(io);
    dblade_io_shape_free(s);
    free(buf);
    free(back);
    close(fd);
}

int main(void) {
    tunes();
    fixed_by_env();
    engine_follows_the_shape();
    printf("test_shape: ok\n");
    return 0;
}
