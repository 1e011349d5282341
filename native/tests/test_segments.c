// A prompt computed layer by layer (patch 0006): where dblade_kv_prefill_segments starts the segments of a
// batch's layers (at the direct path's layers: one per segment), and when it keeps llama.cpp's order (a
// single ubatch, DUALBLADE_LAYER_MAJOR=0, nothing on the direct path).
#define _GNU_SOURCE
#include "../src/testing.h"
#include "dualblade-llama.h"
#include "check.h"

#include <stdlib.h>
#include <unistd.h>

#define ROW   256
#define ROWS  64
#define BYTES (ROW * ROWS)
#define N     5

static struct dblade_kv *    s;
static struct dblade_cache * c;

static void open_with(const char * dir, const uint32_t paths[N]) {
    struct dblade_layout_layer lay[N];
    struct dblade_layer_desc   d[N];
    for (int il = 0; il < N; il++) {
        lay[il] = (struct dblade_layout_layer) { il, paths[il], BYTES, BYTES, 0, 0 };
        d[il]   = (struct dblade_layer_desc) { .il = il, .n_rows = ROWS, .n_stream = 1, .k_bytes = BYTES,
                                               .v_bytes = BYTES, .k_row_bytes = ROW, .v_row_bytes = ROW };
    }
    struct dblade_config cfg = { .policy = DBLADE_POLICY_DIRECT, .budget_bytes = 1 << 20, .kv_dir = dir };
    CHECK_EQ(dblade_kv_create(&cfg, N, lay, &s), 0);
    struct dblade_cache_desc desc = { .name = "", .n_layers = N, .layers = d };
    dblade_kv_bind(s);
    CHECK_EQ(dblade_cache_open(&desc, &c), 0);
    dblade_kv_bind(NULL);
    CHECK(c != NULL);
}

static void close_all(void) {
    dblade_cache_close(c);
    dblade_kv_release(s);
}

int main(void) {
    char dir[512];
    test_mkdtemp(dir, sizeof(dir), "segments");
    int32_t starts[N];
    unsetenv("DUALBLADE_LAYER_MAJOR");

    // pinned, direct, page cache, direct, pinned: a segment from each direct layer to the next
    const uint32_t mixed[N] = { DBLADE_PATH_RAM, DBLADE_PATH_DIRECT, DBLADE_PATH_MMAP, DBLADE_PATH_DIRECT,
                                DBLADE_PATH_RAM };
    open_with(dir, mixed);
    CHECK_EQ(dblade_kv_prefill_segments(s, 3, N, starts, N), 3u);
    CHECK(starts[0] == 0 && starts[1] == 1 && starts[2] == 3);
    CHECK_EQ(dblade_kv_prefill_segments(s, 3, N, starts, 2), 2u); // no more than the caller has room for
    CHECK(starts[0] == 0 && starts[1] == 1);
    CHECK_EQ(dblade_kv_prefill_segments(s, 1, N, starts, N), 0u); // one ubatch: nothing to gain
    setenv("DUALBLADE_LAYER_MAJOR", "0", 1);
    CHECK_EQ(dblade_kv_prefill_segments(s, 3, N, starts, N), 0u);
    unsetenv("DUALBLADE_LAYER_MAJOR");
    dblade_kv_graph_layers(s, 1, 3); // no layer streamed into VRAM: nothing to check the cuts against
    dblade_kv_graph_layers(s, 0, INT32_MAX);
    CHECK_EQ(dblade_kv_error(s, NULL, 0), 0);
    close_all();

    // the first layer alone on the direct path: it, then the rest
    const uint32_t first[N] = { DBLADE_PATH_DIRECT, DBLADE_PATH_MMAP, DBLADE_PATH_MMAP, DBLADE_PATH_RAM,
                                DBLADE_PATH_RAM };
    open_with(dir, first);
    CHECK_EQ(dblade_kv_prefill_segments(s, 2, N, starts, N), 2u);
    CHECK(starts[0] == 0 && starts[1] == 1);
    close_all();

    // nothing on the direct path (the page cache keeps what one ubatch's graph read for the next): one segment
    const uint32_t cached[N] = { DBLADE_PATH_MMAP, DBLADE_PATH_MMAP, DBLADE_PATH_RAM, DBLADE_PATH_MMAP,
                                 DBLADE_PATH_RAM };
    open_with(dir, cached);
    CHECK(dblade_kv_prefill_segments(s, 4, N, starts, N) < 2);
    close_all();

    CHECK_EQ(dblade_kv_prefill_segments(NULL, 3, N, starts, N), 0u);

    // the rule Python sizes its batches by: layer by layer unless layers are streamed into VRAM
    CHECK(dblade_prefill_layer_major(0) && !dblade_prefill_layer_major(1));
    setenv("DUALBLADE_LAYER_MAJOR", "1", 1);
    CHECK(dblade_prefill_layer_major(0) && dblade_prefill_layer_major(1));
    setenv("DUALBLADE_LAYER_MAJOR", "0", 1);
    CHECK(!dblade_prefill_layer_major(0) && !dblade_prefill_layer_major(1));
    unsetenv("DUALBLADE_LAYER_MAJOR");
    rmdir(dir);
    printf("test_segments: ok\n");
    return 0;
}
