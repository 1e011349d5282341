// The pipeline against a model: a random run of prefills, decode steps, prefix reuse, clears,
// flushes and switches of path (page cache <-> direct) over layers whose rows straddle pages.
// Before every read by "attention", each offloaded tensor must hold exactly what was written.
// Run with both I/O engines.
#define _GNU_SOURCE
#include "../src/testing.h"
#include "dualblade-llama.h"
#include "check.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define ROW    96 // does not divide a page: rows straddle page and block boundaries
#define ROWS   700
#define BYTES  (ROW * ROWS)
#define LAYERS 4

static unsigned char shadow[LAYERS][2][BYTES];

static uint32_t rng = 12345;
static uint32_t next(void) {
    rng = rng * 1103515245u + 12345u;
    return rng >> 8;
}

static void run(const char * engine, uint64_t budget) {
    setenv("DUALBLADE_IO_ENGINE", engine, 1);
    char dir[512];
    test_mkdtemp(dir, sizeof(dir), "pipeline");

    struct dblade_layout_layer lay[LAYERS] = {
        { 0, DBLADE_PATH_RAM, BYTES, BYTES },
        { 1, DBLADE_PATH_DIRECT, BYTES, BYTES },
        { 2, DBLADE_PATH_MMAP, BYTES, BYTES },
        { 3, DBLADE_PATH_DIRECT, BYTES, BYTES },
    };
    // budget: the pinned layer plus room for a deep pipeline
    struct dblade_config cfg = { .policy = DBLADE_POLICY_DIRECT, .budget_bytes = budget, .kv_dir = dir };
    struct dblade_kv * s;
    int rc = dblade_kv_create(&cfg, LAYERS, lay, &s);
    if (rc == -ENOSYS) {
        printf("%s: not available, skipped\n", engine);
        rmdir(dir);
        return;
    }
    CHECK_EQ(rc, 0);
    struct dblade_cache * c = test_cache_open(s, LAYERS, ROWS, ROW);
    memset(shadow, 0, sizeof(shadow));

    int64_t rows[64];
    int n = 0, switches = 0, flushes = 0, trims = 0, clears = 0, reuses = 0;
    for (int step = 0; step < 1500; step++) {
        const uint32_t act = next() % 1000;
        if (act < 25) {
            const int il = 1 + (int) (next() % 3);
            CHECK_EQ(dblade_kv_set_path(s, il, next() % 2 ? DBLADE_PATH_MMAP : DBLADE_PATH_DIRECT), 0);
            switches++;
        } else if (act < 30) {
            CHECK_EQ(dblade_kv_flush(s), 0);
            flushes++;
        } else if (act < 35) {
            // as an idle server does: the pool's pages go, the next layers staged fault fresh ones in
            struct dblade_stats before;
            dblade_kv_stats(s, &before);
            CHECK_EQ(dblade_kv_trim(s), (int64_t) before.pool_bytes);
            struct dblade_stats after;
            dblade_kv_stats(s, &after);
            CHECK_EQ(after.pool_bytes, 0);
            CHECK_EQ(after.staged_bytes, 0);
            trims++;
        } else if (act < 40) {
            dblade_cache_clear(c);
            memset(shadow, 0, sizeof(shadow));
            n = 0;
            clears++;
        } else if (act < 50 && n > 0) {
            n = (int) (next() % (uint32_t) n); // keep a prefix, the rest is overwritten from there
            reuses++;
        }
        int batch = n == 0 || act % 7 == 0 ? 1 + (int) (next() % 64) : 1;
        if (n + batch > ROWS) {
            dblade_cache_clear(c);
            memset(shadow, 0, sizeof(shadow));
            n = 0;
        }
        for (int i = 0; i < batch; i++) {
            rows[i] = n + i;
        }
        for (int il = 0; il < LAYERS; il++) {
            for (int w = 0; w < 2; w++) {
                struct dblade_tensor * t = dblade_cache_tensor(c, il, (uint32_t) w);
                unsigned char *        p = dblade_tensor_data(t);
                dblade_fence_write(t, rows, batch, ROW);
                for (int i = 0; i < batch; i++) {
                    const unsigned char v = (unsigned char) (next() | 1);
                    memset(p + (size_t) (n + i) * ROW, v, ROW);
                    memset(&shadow[il][w][(size_t) (n + i) * ROW], v, ROW);
                }
            }
            for (int w = 0; w < 2; w++) {
                struct dblade_tensor * t = dblade_cache_tensor(c, il, (uint32_t) w);
                unsigned char *        p = dblade_tensor_data(t);
                const size_t           len = (size_t) (n + batch) * ROW;
                dblade_fence_read(t, p, len);
                if (memcmp(p, shadow[il][w], len) != 0) {
                    size_t at = 0;
                    while (p[at] == shadow[il][w][at]) at++;
                    fprintf(stderr, "%s: step %d layer %d %c: byte %zu (row %zu) differs, rows %d\n", engine, step,
                            il, "KV"[w], at, at / ROW, n + batch);
                    CHECK(!"tensor content differs from what was written");
                }
            }
        }
        n += batch;
    }
    char msg[256];
    CHECK_EQ(dblade_kv_error(s, msg, sizeof(msg)), 0);
    struct dblade_switch log[64];
    const int ns = dblade_kv_switches(s, log, 64);
    struct dblade_stats st;
    dblade_kv_stats(s, &st);
    printf("%s: %d requested switches, %d applied, %d flushes, %d trims, %d clears, %d prefix reuses; "
           "read %llu, written %llu, depth %u\n",
           engine, switches, ns, flushes, trims, clears, reuses, (unsigned long long) st.bytes_read,
           (unsigned long long) st.bytes_written, st.depth);
    CHECK(ns > 10);
    CHECK(trims > 0);
    // staging moves in chunks as large as the budget allows, up to the largest tensor (67,200 bytes:
    // 128 KiB) when it has room; the pool reuses them (moved with mremap, not faulted in again)
    CHECK_EQ(st.chunk_bytes, budget > (16u << 20) ? 131072 : 16384);
    CHECK_EQ(st.huge_page_bytes, 0);
    CHECK(st.pool_bytes > 0 && st.pool_bytes <= cfg.budget_bytes - 2 * BYTES);
    CHECK(log[0].from != log[0].to);
    CHECK(strcmp(log[0].reason, "requested") == 0);
    CHECK(st.staged_peak <= cfg.budget_bytes - 2 * BYTES); // the pinned layer takes the rest
    dblade_cache_close(c);
    dblade_kv_release(s);
    rmdir(dir);
}

int main(void) {
    // budget: the pinned layer plus room for a deep pipeline
    run("threads", 8 * BYTES);
    run("io_uring", 8 * BYTES);
    // room to spare: larger chunks
    run("io_uring", 2 * BYTES + (24u << 20));
    puts("test_pipeline: ok");
    return 0;
}
