// The VRAM tier's protocol (vram.c) against a stand-in driver (fake_cuda.c: "device" memory is host
// memory a test can read): fixed device addresses over shared slots, the copy into a slot at a layer's
// cut, the new rows back at the next cut, the prefetch of a pinned layer, the check that every streamed
// layer was cut, clears and flushes. Layers 0-1 keep their host copies pinned, 2-3 on the direct path.
#define _GNU_SOURCE
#include "../src/testing.h"
#include "dualblade-llama.h"
#include "check.h"

#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ROW    256
#define ROWS   64
#define BYTES  (ROW * ROWS)
#define LAYERS 4
#define N_KV   16

static struct dblade_kv * s;
static struct dblade_cache *   c;
static uint8_t * dev[LAYERS][2], * host[LAYERS][2];

static void cut(const char * name, int want_ask) {
    CHECK_EQ(dblade_kv_graph_cut(s, name, 1), want_ask);
    if (dblade_kv_graph_cut(s, name, 0) != 1) {
        char msg[256];
        dblade_kv_error(s, msg, sizeof(msg));
        fprintf(stderr, "cut %s failed: %s\n", name, msg);
        exit(1);
    }
}

static void cut_layer(int il) {
    char name[32];
    snprintf(name, sizeof(name), "attn_norm-%d", il);
    cut(name, 1);
}

static void open_all(const char * dir) {
    struct dblade_layout_layer lay[LAYERS];
    struct dblade_layer_desc   d[LAYERS];
    for (int il = 0; il < LAYERS; il++) {
        lay[il] = (struct dblade_layout_layer) { il, il < 2 ? DBLADE_PATH_RAM : DBLADE_PATH_DIRECT, BYTES, BYTES,
                                                 DBLADE_LAYOUT_STREAMED, 0 };
        d[il]   = (struct dblade_layer_desc) { il, 0, ROWS, 1, BYTES, BYTES, ROW, ROW, "CUDA0" };
    }
    struct dblade_config cfg = { .policy = DBLADE_POLICY_DIRECT, .budget_bytes = 1 << 20, .kv_dir = dir };
    CHECK_EQ(dblade_kv_create(&cfg, LAYERS, lay, &s), 0);
    CHECK(dblade_kv_streams(s));
    const struct dblade_cache_desc desc = { "", 1, 1, 0, LAYERS, d };
    dblade_kv_bind(s);
    CHECK_EQ(dblade_cache_open(&desc, &c), 0);
    dblade_kv_bind(NULL);
    CHECK(c != NULL);
    for (int il = 0; il < LAYERS; il++) {
        for (int w = 0; w < 2; w++) {
            struct dblade_tensor * t = dblade_cache_tensor(c, il, w);
            dev[il][w]  = dblade_tensor_device_data(t);
            host[il][w] = dblade_tensor_data(t);
            CHECK(dev[il][w] && host[il][w] && dev[il][w] != host[il][w]);
            CHECK(!dblade_tensor_fenced(t)); // the CPU never reads a streamed tensor: no fence in the graph
        }
    }
    CHECK(!dblade_cache_can_shift(c));
}

static void close_all(void) {
    dblade_cache_close(c);
    dblade_kv_release(s);
}

static uint8_t mark(int il, int w, int pass) {
    return (uint8_t) ('a' + 8 * pass + 2 * il + w);
}

// one graph: every layer cut, its rows [0, N_KV) in its slot when it computes, rows lo..lo+1 stored
static void graph(int pass, int lo, int slots) {
    const int64_t rows[2] = { lo, lo + 1 };
    struct dblade_stats before, after;
    CHECK_EQ(dblade_kv_stats(s, &before), 0);
    dblade_cache_ubatch(c, rows, 2, N_KV);
    CHECK_EQ(dblade_kv_error(s, NULL, 0), 0);
    // the first streamed layer (pinned) is copied in before the graph computes
    CHECK_EQ(dblade_kv_stats(s, &after), 0);
    CHECK_EQ(after.h2d_bytes - before.h2d_bytes, 2ull * N_KV * ROW);
    for (int w = 0; w < 2; w++) {
        CHECK(memcmp(dev[0][w], host[0][w], N_KV * ROW) == 0);
    }
    for (int il = 0; il < LAYERS; il++) {
        cut_layer(il);
        for (int w = 0; w < 2; w++) {
            CHECK(memcmp(dev[il][w], host[il][w], N_KV * ROW) == 0);
            memset(dev[il][w] + lo * ROW, mark(il, w, pass), 2 * ROW); // the GPU's set_rows
            if (slots == 2 && il >= 2) {
                CHECK(memcmp(dev[il - 2][w], dev[il][w], N_KV * ROW) == 0); // one slot, two addresses
            }
            if (slots == 2 && il == 0) {
                CHECK(memcmp(dev[1][w], host[1][w], N_KV * ROW) == 0); // pinned layer 1 prefetched
            }
            if (slots == LAYERS && il >= 2) {
                CHECK(dev[il - 2][w][lo * ROW] == mark(il - 2, w, pass)); // a slot each: nothing shared
            }
        }
        CHECK_EQ(dblade_kv_graph_cut(s, "ffn_out-0", 1), 0); // not a cut
    }
    cut("result_norm", 1);
}

static void check_rows(int pass, int lo) {
    dblade_cache_state_begin(c); // every host copy staged (the direct ones from storage)
    for (int il = 0; il < LAYERS; il++) {
        for (int w = 0; w < 2; w++) {
            for (int r = 0; r < 2; r++) {
                for (int b = 0; b < ROW; b++) {
                    CHECK_EQ(host[il][w][(lo + r) * ROW + b], mark(il, w, pass));
                }
            }
        }
    }
    dblade_cache_state_end(c, 0);
}

static void run(const char * slots_env, int slots) {
    setenv("DUALBLADE_VRAM_SLOTS", slots_env, 1);
    char dir[512];
    test_mkdtemp(dir, sizeof(dir), "vram");
    open_all(dir);

    struct dblade_stats st;
    CHECK_EQ(dblade_kv_stats(s, &st), 0);
    CHECK_EQ(st.vram_slots, slots);
    CHECK_EQ(st.vram_streamed, LAYERS);
    CHECK_EQ(st.vram_slot_bytes, 2 * (64 << 10)); // K and V, each on the 64 KiB granule

    graph(0, 10, slots);
    check_rows(0, 10);
    graph(1, 12, slots);
    check_rows(0, 10); // the first pass's rows kept
    check_rows(1, 12);
    CHECK_EQ(dblade_kv_error(s, NULL, 0), 0);
    CHECK_EQ(dblade_kv_stats(s, &st), 0);
    CHECK_EQ(st.d2h_bytes, 2ull * LAYERS * 2 * 2 * ROW);         // 2 graphs x 4 layers x K, V x 2 rows
    CHECK_EQ(st.h2d_pinned_bytes, 2ull * 2 * 2 * N_KV * ROW);    // 2 graphs x layers 0-1 x K, V
    CHECK_EQ(st.h2d_bytes, 2ull * LAYERS * 2 * N_KV * ROW);

    // a flush outside a graph brings the last layer's rows back (no result_norm: embeddings graphs)
    const int64_t rows[2] = { 20, 21 };
    dblade_cache_ubatch(c, rows, 2, N_KV);
    for (int il = 0; il < LAYERS; il++) {
        cut_layer(il);
        for (int w = 0; w < 2; w++) {
            memset(dev[il][w] + 20 * ROW, mark(il, w, 2), 2 * ROW);
        }
    }
    CHECK_EQ(dblade_kv_flush(s), 0);
    check_rows(2, 20);

    // a clear forgets the rows a layer stored since its cut: nothing comes back
    dblade_cache_ubatch(c, rows, 2, N_KV);
    cut_layer(0);
    memset(dev[0][0] + 20 * ROW, 'Z', 2 * ROW);
    dblade_cache_clear(c);
    cut("result_norm", 0);
    CHECK(host[0][0][20 * ROW] != 'Z');

    // a graph that skips a streamed layer's cut is refused when the next one starts
    dblade_cache_ubatch(c, rows, 2, N_KV);
    cut_layer(0);
    cut_layer(1);
    dblade_cache_ubatch(c, rows, 2, N_KV);
    char msg[256];
    CHECK_EQ(dblade_kv_error(s, msg, sizeof(msg)), -EPROTO);
    CHECK(strstr(msg, "attn_norm"));
    CHECK_EQ(dblade_kv_graph_cut(s, "attn_norm-2", 0), 0); // and nothing runs after it
    close_all();
}

int main(void) {
    const char * lib = getenv("DUALBLADE_CUDA_LIB");
    if (!lib) {
        printf("test_vram: DUALBLADE_CUDA_LIB (the stand-in driver) not set: skipped\n");
        return 77;
    }
    void * h = dlopen(lib, RTLD_NOW);
    CHECK(h);
    int (*registered)(void) = (int (*)(void)) dlsym(h, "fake_cuda_registered");
    CHECK(registered);
    run("2", 2);
    CHECK_EQ(registered(), 0); // every page-locked host copy given back
    run("0", LAYERS);
    // without the driver: a clear error, no session
    setenv("DUALBLADE_CUDA_LIB", "/nonexistent/libcuda.so.1", 1);
    struct dblade_layout_layer lay = { 0, DBLADE_PATH_RAM, BYTES, BYTES, DBLADE_LAYOUT_STREAMED, 0 };
    struct dblade_layer_desc   d   = { 0, 0, ROWS, 1, BYTES, BYTES, ROW, ROW, "CUDA0" };
    struct dblade_config cfg = { .policy = DBLADE_POLICY_RAM, .budget_bytes = DBLADE_BUDGET_UNLIMITED };
    CHECK_EQ(dblade_kv_create(&cfg, 1, &lay, &s), 0);
    const struct dblade_cache_desc desc = { "", 1, 1, 0, 1, &d };
    dblade_kv_bind(s);
    CHECK(dblade_cache_open(&desc, &c) < 0);
    CHECK(strstr(dblade_last_error(), "cannot load the CUDA driver"));
    dblade_kv_bind(NULL);
    dblade_kv_release(s);
    printf("test_vram: ok\n");
    return 0;
}
