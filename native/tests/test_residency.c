// The direct and page-cache paths through their fences: staging, write-back, release, clear,
// state save/restore, and the counters they keep.
#define _GNU_SOURCE
#include "../src/testing.h"
#include "dualblade-llama.h"
#include "check.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define ROW   256
#define ROWS  64
#define BYTES (ROW * ROWS)

static void fill_rows(unsigned char * p, int r0, int r1, int seed) {
    for (int r = r0; r < r1; r++) memset(p + r * ROW, (r * 13 + seed) & 0xff, ROW);
}

static int rows_ok(const unsigned char * p, int r0, int r1, int seed) {
    for (int r = r0; r < r1; r++)
        for (int i = 0; i < ROW; i++)
            if (p[r * ROW + i] != ((r * 13 + seed) & 0xff)) return 0;
    return 1;
}

static struct dblade_layer_stats layer(struct dblade_kv * s, int il) {
    struct dblade_layer_stats ls[8];
    int n = dblade_kv_layers(s, ls, 8);
    for (int i = 0; i < n; i++) if (ls[i].il == il) return ls[i];
    CHECK(!"no such layer");
    return ls[0];
}

int main(void) {
    char dir[512];
    test_mkdtemp(dir, sizeof(dir), "residency");

    struct dblade_layout_layer lay[3] = {
        { 0, DBLADE_PATH_DIRECT, BYTES, BYTES }, { 1, DBLADE_PATH_DIRECT, BYTES, BYTES }, { 2, DBLADE_PATH_MMAP, BYTES, BYTES } };
    struct dblade_config cfg = { .policy = DBLADE_POLICY_DIRECT, .budget_bytes = 1 << 20, .kv_dir = dir };
    struct dblade_kv * s;
    CHECK_EQ(dblade_kv_create(&cfg, 3, lay, &s), 0);
    struct dblade_store_info si;
    CHECK_EQ(dblade_kv_store(s, &si), 0);
    CHECK_EQ(si.kind, 1);
    CHECK(si.data_bytes >= 6 * BYTES);

    struct dblade_layer_desc d[3];
    for (int i = 0; i < 3; i++) {
        struct dblade_layer_desc x = { .il = i, .n_rows = ROWS, .n_stream = 1, .k_bytes = BYTES, .v_bytes = BYTES,
                                       .k_row_bytes = ROW, .v_row_bytes = ROW };
        d[i] = x;
    }
    struct dblade_cache_desc desc = { .name = "", .n_layers = 3, .layers = d };
    struct dblade_cache * c;
    dblade_kv_bind(s);
    desc.v_trans = 1; // offloaded layers with a transposed V: refused
    CHECK(dblade_cache_open(&desc, &c) < 0);
    desc.v_trans = 0;
    CHECK_EQ(dblade_cache_open(&desc, &c), 0);
    dblade_kv_bind(NULL);
    CHECK(!dblade_cache_can_shift(c));

    struct dblade_tensor * k0 = dblade_cache_tensor(c, 0, 0);
    struct dblade_tensor * k1 = dblade_cache_tensor(c, 1, 0);
    struct dblade_tensor * k2 = dblade_cache_tensor(c, 2, 0);
    unsigned char * p0 = dblade_tensor_data(k0);
    unsigned char * p1 = dblade_tensor_data(k1);
    unsigned char * p2 = dblade_tensor_data(k2);
    int64_t rows[16];

    // staged memory comes in chunks (from the staging pool): as large as the budget allows, no
    // larger than a tensor
    struct dblade_stats st0;
    dblade_kv_stats(s, &st0);
    const uint64_t chunk = st0.chunk_bytes;
    CHECK(chunk >= 4096 && chunk <= BYTES);

    // prefill of 10 rows into layer 0: nothing to read yet
    for (int i = 0; i < 10; i++) rows[i] = i;
    dblade_fence_write(k0, rows, 10, ROW);
    fill_rows(p0, 0, 10, 1);
    dblade_fence_read(k0, p0, 10 * ROW);
    CHECK_EQ(layer(s, 0).bytes_read, 0);
    CHECK_EQ(layer(s, 0).resident_bytes, chunk);

    // the graph moves to layer 1: layer 0 is retired by the worker; its rows fill less than a
    // page, so that page (the tail) stays in memory, dirty, and nothing is written yet
    dblade_fence_write(k1, rows, 10, ROW);
    fill_rows(p1, 0, 10, 2);
    dblade_kv_quiesce(s);
    CHECK_EQ(layer(s, 0).bytes_written, 0);
    CHECK_EQ(layer(s, 0).resident_bytes, 4096);

    // decode one row into layer 0: it lands in the tail page, nothing is read or written
    rows[0] = 10;
    dblade_fence_write(k0, rows, 1, ROW);
    CHECK_EQ(layer(s, 0).bytes_read, 0);
    CHECK(rows_ok(p0, 0, 10, 1));
    fill_rows(p0, 10, 11, 1);
    dblade_fence_read(k0, p0, 256 * ROW > BYTES ? BYTES : 256 * ROW); // attention over padded n_kv
    CHECK_EQ(layer(s, 0).bytes_read, 0);
    // layer 1 came after layer 0 last time: it is kept staged as the predicted next layer
    CHECK_EQ(layer(s, 1).resident_bytes, chunk);
    CHECK_EQ(layer(s, 1).bytes_written, 0);

    // page-cache path: writes go through the mapping; the counters follow the pages
    for (int i = 0; i < 16; i++) rows[i] = i;
    dblade_fence_write(k2, rows, 16, ROW);
    fill_rows(p2, 0, 16, 3);
    dblade_fence_read(k2, p2, 16 * ROW);
    CHECK_EQ(layer(s, 2).bytes_written, 4096);
    CHECK(rows_ok(p2, 0, 16, 3));
    dblade_kv_quiesce(s);
    CHECK_EQ(layer(s, 0).resident_bytes, 4096); // entering layer 2 released layer 0 but its tail
    CHECK_EQ(layer(s, 0).bytes_written, 0);

    // a flush makes the tails durable: everything written can be read back
    CHECK_EQ(dblade_kv_flush(s), 0);
    CHECK_EQ(layer(s, 0).bytes_written, 4096);
    CHECK_EQ(layer(s, 1).bytes_written, 4096);
    CHECK_EQ(layer(s, 0).resident_bytes, 0);
    CHECK_EQ(layer(s, 1).resident_bytes, 0);
    rows[0] = 11;
    dblade_fence_write(k0, rows, 1, ROW);
    CHECK(rows_ok(p0, 0, 11, 1));
    // entering layer 0 started the prefetch of layer 1 (its successor last pass): by the time the
    // graph reaches layer 1 its rows are there, read by the prefetcher
    CHECK_EQ(layer(s, 0).bytes_read, 4096);
    const uint64_t read1 = layer(s, 1).bytes_read;
    rows[0] = 10;
    dblade_fence_write(k1, rows, 1, ROW);
    CHECK(rows_ok(p1, 0, 10, 2));
    CHECK_EQ(layer(s, 1).bytes_read, read1 + 4096);
    fill_rows(p1, 10, 11, 2);

    // state restore: the host writes rows 0..19 of layer 1 between begin and end (llama.cpp does it
    // after end returns); nothing staged before begin is lost or released by it
    rows[0] = 11;
    dblade_fence_write(k0, rows, 1, ROW);
    fill_rows(p0, 11, 12, 1);
    CHECK(rows_ok(p1, 0, 11, 2));
    dblade_cache_state_begin(c);
    CHECK(rows_ok(p0, 0, 12, 1));
    CHECK(rows_ok(p1, 0, 10, 2));
    fill_rows(p1, 0, 20, 4);
    dblade_cache_state_end(c, 20);
    CHECK(layer(s, 1).resident_bytes > 0); // still staged: llama.cpp copies after state_end
    CHECK_EQ(dblade_kv_flush(s), 0);
    CHECK_EQ(layer(s, 1).resident_bytes, 0);
    dblade_fence_read(k1, p1, 20 * ROW);
    CHECK(rows_ok(p1, 0, 20, 4));
    dblade_fence_read(k0, p0, 12 * ROW);
    CHECK(rows_ok(p0, 0, 12, 1));

    // clear: metadata only; nothing is read back afterwards
    struct dblade_stats before, after;
    CHECK_EQ(dblade_kv_flush(s), 0); // settles the prefetcher: counters are quiet now
    dblade_kv_stats(s, &before);
    dblade_cache_clear(c);
    dblade_fence_read(k1, p1, 20 * ROW);
    dblade_kv_stats(s, &after);
    CHECK_EQ(after.bytes_read, before.bytes_read);
    CHECK_EQ(after.bytes_written, before.bytes_written);
    CHECK_EQ(p1[0], 0);
    CHECK(after.staged_peak > 0 && after.staged_peak <= 2 * 2 * BYTES);

    char msg[256];
    CHECK_EQ(dblade_kv_error(s, msg, sizeof(msg)), 0);
    dblade_kv_release(s);
    dblade_cache_close(c);
    rmdir(dir);
    puts("test_residency: ok");
    return 0;
}
