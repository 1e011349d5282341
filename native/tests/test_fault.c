// Fault injection (DUALBLADE_FAULT): the n-th read or write fails with EIO or ENOSPC or comes back
// short, on both engines; a session turns a failed transfer into its sticky error, which a caller
// can clear; a wipe leaves nothing of what was written.
#define _GNU_SOURCE
#include "../src/base.h"
#include "../src/engine.h"
#include "../src/fault.h"
#include "dualblade-llama.h"
#include "check.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void parse(void) {
    struct dblade_fault f;
    CHECK_EQ(dblade_fault_init(&f, NULL), 0);
    CHECK_EQ(f.n_rules, 0);
    CHECK_EQ(dblade_fault_init(&f, "read:3:eio,write:1+:enospc,read:2:short"), 0);
    CHECK_EQ(f.n_rules, 3);
    CHECK(f.rules[1].write && f.rules[1].onward && f.rules[1].n == 1);
    const char * bad[] = { "read", "read:0:eio", "read:x:eio", "peek:1:eio", "read:1:boom", "read:1:eio,",
                           "read:1++:eio", "read:1:eio,write:2" };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        CHECK_EQ(dblade_fault_init(&f, bad[i]), -EINVAL);
        CHECK(strstr(dblade_get_error(), "DUALBLADE_FAULT="));
    }
    // no rules: results pass through untouched
    CHECK_EQ(dblade_fault_init(&f, ""), 0);
    CHECK_EQ(dblade_fault_apply(&f, 0, 0, 0, 4096, 4096), 4096);
}

static int open_store(void) {
    const int fd = test_open_direct("fault", NULL);
    CHECK(fallocate(fd, 0, 0, 16u << 20) == 0);
    return fd;
}

// one request of `len` bytes
static int one(struct dblade_io * io, void * buf, uint64_t len, int write) {
    struct dblade_io_req r = { .buf = buf, .len = len, .off = 0, .write = write };
    return dblade_io_run(io, &r, 1);
}

static void engine(const char * name) {
    const int fd = open_store();
    void * buf;
    CHECK(posix_memalign(&buf, 4096, 1u << 20) == 0);
    memset(buf, 7, 1u << 20);
    struct dblade_io * io = NULL;

    setenv("DUALBLADE_FAULT", "read:2:eio,write:3+:enospc", 1);
    if (!test_io_open(name, fd, &io)) {
        close(fd), free(buf);
        return;
    }
    CHECK_EQ(one(io, buf, 1u << 20, 0), 0);       // read 1
    CHECK_EQ(one(io, buf, 1u << 20, 0), -EIO);    // read 2
    CHECK_EQ(one(io, buf, 1u << 20, 0), 0);       // read 3
    CHECK_EQ(one(io, buf, 1u << 20, 1), 0);       // write 1
    CHECK_EQ(one(io, buf, 1u << 20, 1), 0);       // write 2
    CHECK_EQ(one(io, buf, 1u << 20, 1), -ENOSPC); // write 3 and every one after
    CHECK_EQ(one(io, buf, 4096, 1), -ENOSPC);
    dblade_io_close(io);

    // short: half comes back, the rest finds the end of the store
    setenv("DUALBLADE_FAULT", "read:1:short,write:1:short", 1);
    CHECK_EQ(dblade_io_open(&io, fd), 0);
    CHECK_EQ(one(io, buf, 1u << 20, 0), -EIO);
    CHECK_EQ(one(io, buf, 1u << 20, 0), 0);
    CHECK_EQ(one(io, buf, 1u << 20, 1), -ENOSPC);
    CHECK_EQ(one(io, buf, 1u << 20, 1), 0);
    dblade_io_close(io);

    setenv("DUALBLADE_FAULT", "read:1:explode", 1);
    CHECK_EQ(dblade_io_open(&io, fd), -EINVAL);
    CHECK(strstr(dblade_get_error(), "read:1:explode"));
    unsetenv("DUALBLADE_FAULT");
    close(fd), free(buf);
    printf("%s: faults injected as asked\n", name);
}

#define ROW   256
#define ROWS  1024
#define BYTES (ROW * ROWS)

// a session on the direct path: a failed read becomes the session's error, in words, until cleared
static void session_error(void) {
    unsetenv("DUALBLADE_IO_ENGINE");
    char dir[512];
    test_mkdtemp(dir, sizeof(dir), "fault-session");
    struct dblade_layout_layer lay[2] = { { 0, DBLADE_PATH_DIRECT, BYTES, BYTES }, { 1, DBLADE_PATH_DIRECT, BYTES, BYTES } };
    struct dblade_config cfg = { .policy = DBLADE_POLICY_DIRECT, .budget_bytes = 1 << 20, .kv_dir = dir };
    setenv("DUALBLADE_FAULT", "read:1+:eio", 1);
    struct dblade_kv * s;
    CHECK_EQ(dblade_kv_create(&cfg, 2, lay, &s), 0);
    unsetenv("DUALBLADE_FAULT");
    struct dblade_cache * c = test_cache_open(s, 2, ROWS, ROW);

    // rows 0..99 of both layers written (and written back when the other layer is entered)
    int64_t rows[100];
    for (int i = 0; i < 100; i++) rows[i] = i;
    for (int il = 0; il < 2; il++) {
        for (int w = 0; w < 2; w++) {
            struct dblade_tensor * t = dblade_cache_tensor(c, il, w);
            dblade_fence_write(t, rows, 100, ROW);
            memset(dblade_tensor_data(t), 0x5A, 100 * ROW);
        }
    }
    char msg[256];
    CHECK_EQ(dblade_kv_error(s, msg, sizeof(msg)), 0);
    CHECK_EQ(dblade_kv_flush(s), 0);

    // layer 0 is read back: every read fails
    struct dblade_tensor * k0 = dblade_cache_tensor(c, 0, 0);
    dblade_fence_read(k0, dblade_tensor_data(k0), 100 * ROW);
    CHECK_EQ(dblade_kv_error(s, msg, sizeof(msg)), -EIO);
    CHECK(strstr(msg, "reading layer 0 K from") && strstr(msg, "Input/output error"));
    struct dblade_stats st;
    CHECK_EQ(dblade_kv_stats(s, &st), 0);
    CHECK(st.n_io_errors >= 1);
    CHECK(st.checksum_bytes == 4 * (BYTES / DBLADE_BLOCK) * sizeof(uint32_t));

    // the caller clears the caches, then the error
    dblade_cache_clear(c);
    CHECK_EQ(dblade_kv_clear_error(s), 0);
    CHECK_EQ(dblade_kv_error(s, msg, sizeof(msg)), 0);
    CHECK_EQ(msg[0], 0);

    // wipe: the file's written blocks are given back (a hole reads zeros)
    struct dblade_store_info si;
    CHECK_EQ(dblade_kv_store(s, &si), 0);
    CHECK_EQ(dblade_kv_wipe(s, 0), 0);
    dblade_cache_close(c);
    dblade_kv_release(s);
    rmdir(dir);
    printf("session: a failed read is the session's error until cleared\n");
}

int main(void) {
    parse();
    engine("threads");
    engine("io_uring");
    session_error();
    return 0;
}
