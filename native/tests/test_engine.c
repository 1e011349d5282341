// The I/O engine: both engines move many chunks in flight and get every byte right, errors come
// back per request, a batch's tail hook starts the next batch on another engine while its last chunks are in
// flight, and the engine choice follows DUALBLADE_IO_ENGINE.
#define _GNU_SOURCE
#include "../src/base.h"
#include "../src/engine.h"
#include "check.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

// the tail hook: counts its calls and starts the next batch (on another engine, on a thread of its own)
struct next_batch {
    int                    tails;
    struct dblade_io *     io;
    struct dblade_io_req * reqs;
    uint32_t               n;
    int                    rc;
    pthread_t              thread;
};

static void * next_main(void * arg) {
    struct next_batch * b = arg;
    b->rc                 = dblade_io_run(b->io, b->reqs, b->n);
    return NULL;
}

static void start_next(void * arg) {
    struct next_batch * b = arg;
    if (b->tails++ == 0 && b->io) {
        CHECK(pthread_create(&b->thread, NULL, next_main, b) == 0);
    }
}

static void exercise(const char * engine) {
    const int fd = test_open_direct("engine", NULL);
    struct dblade_io * io = NULL;
    if (!test_io_open(engine, fd, &io)) {
        close(fd);
        return;
    }
    CHECK(strcmp(dblade_io_engine_name(dblade_io_kind(io)), engine) == 0);

    // 3 requests, 41 MiB in all: more chunks than the depth, one request not a chunk multiple
    const uint64_t sizes[3] = { 24u << 20, 4096, (17u << 20) - 8192 };
    uint8_t * buf[3], * back[3];
    struct dblade_io_req w[3], r[3];
    uint64_t off = 0;
    for (int i = 0; i < 3; i++) {
        CHECK(posix_memalign((void **) &buf[i], 4096, sizes[i]) == 0);
        CHECK(posix_memalign((void **) &back[i], 4096, sizes[i]) == 0);
        for (uint64_t j = 0; j < sizes[i]; j++) {
            buf[i][j] = (uint8_t) (j * 131 + i * 7 + (j >> 12));
        }
        memset(back[i], 0xEE, sizes[i]);
        w[i] = (struct dblade_io_req) { .buf = buf[i], .len = sizes[i], .off = off, .write = 1 };
        r[i] = (struct dblade_io_req) { .buf = back[i], .len = sizes[i], .off = off };
        off += sizes[i] + (1u << 20);
    }
    CHECK_EQ(dblade_io_run(io, w, 3), 0);
    CHECK_EQ(dblade_io_run(io, r, 3), 0);
    for (int i = 0; i < 3; i++) {
        CHECK(memcmp(buf[i], back[i], sizes[i]) == 0);
    }

    // a stream of two batches: the first's tail starts the second on another engine (as the VRAM tier's
    // lanes do), once; both get every byte
    struct dblade_io * io2 = NULL;
    CHECK(test_io_open(engine, fd, &io2));
    for (int i = 0; i < 3; i++) {
        memset(back[i], 0xEE, sizes[i]);
    }
    struct next_batch next = { .io = io2, .reqs = r + 1, .n = 2 };
    CHECK_EQ(dblade_io_run_tail(io, r, 1, start_next, &next), 0);
    CHECK_EQ(next.tails, 1);
    CHECK(pthread_join(next.thread, NULL) == 0);
    CHECK_EQ(next.rc, 0);
    for (int i = 0; i < 3; i++) {
        CHECK(memcmp(buf[i], back[i], sizes[i]) == 0);
    }
    // once per batch, a batch of one chunk too; none for an empty one
    struct next_batch count = { 0 };
    CHECK_EQ(dblade_io_run_tail(io, r + 1, 1, start_next, &count), 0);
    CHECK_EQ(count.tails, 1);
    CHECK_EQ(dblade_io_run_tail(io, NULL, 0, start_next, &count), 0);
    CHECK_EQ(count.tails, 1);
    dblade_io_close(io2);

    // a read past the end of the file fails with -EIO, the good request next to it succeeds
    struct dblade_io_req mixed[2] = {
        { .buf = back[1], .len = 4096, .off = off + (64u << 20) },
        { .buf = back[0], .len = 1u << 20, .off = 0 },
    };
    struct next_batch failing = { 0 };
    CHECK_EQ(dblade_io_run_tail(io, mixed, 2, start_next, &failing), -EIO);
    CHECK_EQ(failing.tails, 1); // its chunks all went to the device
    CHECK_EQ(mixed[0].res, -EIO);
    CHECK_EQ(mixed[1].res, 0);
    CHECK(memcmp(back[0], buf[0], 1u << 20) == 0);

    // misaligned O_DIRECT: the kernel's -EINVAL comes back
    struct dblade_io_req bad = { .buf = back[0] + 1, .len = 4096, .off = 0 };
    CHECK_EQ(dblade_io_run(io, &bad, 1), -EINVAL);

    // nothing to do is fine
    CHECK_EQ(dblade_io_run(io, NULL, 0), 0);

    dblade_io_close(io);
    close(fd);
    for (int i = 0; i < 3; i++) {
        free(buf[i]);
        free(back[i]);
    }
    printf("%s: ok\n", engine);
}

int main(void) {
    exercise("threads");
    exercise("io_uring");

    setenv("DUALBLADE_IO_ENGINE", "nonsense", 1);
    struct dblade_io * io = NULL;
    CHECK_EQ(dblade_io_open(&io, 0), -EINVAL);
    CHECK(strstr(dblade_get_error(), "DUALBLADE_IO_ENGINE=nonsense"));

    // auto picks io_uring where this build and kernel have it
    unsetenv("DUALBLADE_IO_ENGINE");
    const int fd = test_open_direct("engine", NULL);
    CHECK_EQ(dblade_io_open(&io, fd), 0);
    printf("auto: %s (%s)\n", dblade_io_engine_name(dblade_io_kind(io)), dblade_io_why(io));
#ifdef DBLADE_HAVE_URING
    if (access("/proc/sys/kernel/io_uring_disabled", F_OK) == 0) {
        FILE * f = fopen("/proc/sys/kernel/io_uring_disabled", "r");
        int    v = 0;
        CHECK(f && fscanf(f, "%d", &v) == 1);
        fclose(f);
        if (v == 0) {
            CHECK_EQ(dblade_io_kind(io), DBLADE_IO_URING);
        }
    }
#endif
    dblade_io_close(io);
    close(fd);
    return 0;
}
