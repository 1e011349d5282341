// The VRAM tier (vram/) against a stand-in driver (fake_cuda.c: "device" memory is host memory a test can
// read, and copies run only when something waits for them): fixed device addresses over shared slots; at a
// layer's cut its slot holds exactly the rows written so far, whatever host path they come from (pinned RAM,
// the direct path, the page cache: read ahead into the ring, or staged when the ring has no room); the rows a
// layer stores come back to its host path at the next cut (a decode's rows into the tail page, a prefill's
// across pages, rows rewritten in the middle; the page cache's written around it); clears, flushes, a storage
// fault, a skipped cut.
#define _GNU_SOURCE
#include "../src/tensor.h"
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
#define LAYERS 6 // 0-1 pinned host copies, 2-3 on the direct path, 4-5 on the page cache
#define N_KV   48

static struct dblade_kv *    s;
static struct dblade_cache * c;
static uint8_t *             dev[LAYERS][2], * host[LAYERS][2];
static uint8_t               shadow[LAYERS][2][BYTES];
static int                   hwm; // rows written so far (every layer alike)

static uint32_t path_of(int il) {
    return il < 2 ? DBLADE_PATH_RAM : il < 4 ? DBLADE_PATH_DIRECT : DBLADE_PATH_MMAP;
}

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

static void open_all(const char * dir, uint64_t budget) {
    struct dblade_layout_layer lay[LAYERS];
    struct dblade_layer_desc   d[LAYERS];
    for (int il = 0; il < LAYERS; il++) {
        lay[il] = (struct dblade_layout_layer) { il, path_of(il), BYTES, BYTES, DBLADE_LAYOUT_STREAMED, 0 };
        d[il]   = (struct dblade_layer_desc) { il, 0, ROWS, 1, BYTES, BYTES, ROW, ROW, "CUDA0" };
    }
    struct dblade_config cfg = { .policy = DBLADE_POLICY_DIRECT, .budget_bytes = budget, .kv_dir = dir };
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
            dev[il][w]               = dblade_tensor_device_data(t);
            host[il][w]              = dblade_tensor_data(t);
            CHECK(dev[il][w] && host[il][w] && dev[il][w] != host[il][w]);
            CHECK(!dblade_tensor_fenced(t)); // the CPU never reads a streamed tensor: no fence in the graph
        }
    }
    CHECK(!dblade_cache_can_shift(c));
    memset(shadow, 0, sizeof(shadow));
    hwm = 0;
}

static void close_all(void) {
    dblade_cache_close(c);
    dblade_kv_release(s);
}

static uint8_t mark(int il, int w, int pass, int r) {
    return (uint8_t) (1 + ((pass * 7 + il * 13 + w * 29 + r * 3) % 251));
}

// One graph storing rows [lo, hi): its ubatch announced (graph_begin), then at every layer's cut its slot holds
// what was written below the high-water mark and "the GPU" stores the new rows there (graph_end). The slots'
// contents are checked before the cut returns' next copy can run (the stand-in runs copies only when waited for).
static void graph_begin(int lo, int hi) {
    int64_t rows[ROWS];
    for (int r = lo; r < hi; r++) {
        rows[r - lo] = r;
    }
    dblade_cache_ubatch(c, rows, hi - lo, N_KV);
    CHECK_EQ(dblade_kv_error(s, NULL, 0), 0);
}

static void graph_end(int pass, int lo, int hi) {
    for (int il = 0; il < LAYERS; il++) {
        cut_layer(il);
        for (int w = 0; w < 2; w++) {
            if (memcmp(dev[il][w], shadow[il][w], (size_t) hwm * ROW) != 0) {
                fprintf(stderr, "pass %d: layer %d %c in its slot differs from what was written\n", pass, il, "KV"[w]);
                exit(1);
            }
            for (int r = lo; r < hi; r++) { // the GPU's set_rows
                memset(dev[il][w] + r * ROW, mark(il, w, pass, r), ROW);
                memset(shadow[il][w] + r * ROW, mark(il, w, pass, r), ROW);
            }
        }
        CHECK_EQ(dblade_kv_graph_cut(s, "ffn_out-0", 1), 0); // not a cut
    }
    cut("result_norm", 1);
    hwm = hi > hwm ? hi : hwm;
}

static void graph(int pass, int lo, int hi) {
    graph_begin(lo, hi);
    graph_end(pass, lo, hi);
}

// every host copy staged (the direct ones from storage) and compared with what was written
static void check_rows(void) {
    dblade_cache_state_begin(c);
    for (int il = 0; il < LAYERS; il++) {
        for (int w = 0; w < 2; w++) {
            if (memcmp(host[il][w], shadow[il][w], (size_t) hwm * ROW) != 0) {
                int r0 = 0;
                while (r0 < hwm && !memcmp(host[il][w] + r0 * ROW, shadow[il][w] + r0 * ROW, ROW)) {
                    r0++;
                }
                fprintf(stderr, "layer %d %c on its host path differs from what was written from row %d (%d, not %d)\n",
                        il, "KV"[w], r0, host[il][w][r0 * ROW], shadow[il][w][r0 * ROW]);
                exit(1);
            }
        }
    }
    dblade_cache_state_end(c, 0);
}

// bytes of layer il's K and V in the page cache (or memory) now
static uint64_t layer_resident(int il) {
    struct dblade_stats       st;
    struct dblade_layer_stats ls[LAYERS];
    CHECK(dblade_kv_snapshot(s, &st, ls, LAYERS) >= 0);
    for (uint32_t i = 0; i < st.n_layers && i < LAYERS; i++) {
        if (ls[i].il == il) {
            return ls[i].resident_bytes;
        }
    }
    CHECK(0);
    return 0;
}

static void run(const char * slots_env, int slots, uint64_t budget, const char * what) {
    setenv("DUALBLADE_VRAM_SLOTS", slots_env, 1);
    char dir[512];
    test_mkdtemp(dir, sizeof(dir), "vram");
    open_all(dir, budget);

    struct dblade_stats st;
    CHECK_EQ(dblade_kv_stats(s, &st), 0);
    CHECK_EQ(st.vram_slots, slots);
    CHECK_EQ(st.vram_streamed, LAYERS);
    CHECK_EQ(st.vram_slot_bytes, 2 * (64 << 10)); // K and V, each on the 64 KiB granule

    graph(0, 0, 20);   // a prefill across pages (16 rows a page)
    graph(1, 20, 21);  // decode: a row into the tail page
    if (getenv("DUALBLADE_WRITE_AROUND")) {
        // the page-cache layers' rows went around the cache: their next reads found pages missing and read them
        // from storage, and the auto policy is not told that the cache lost them (it would demote the layers)
        for (int il = 4; il < LAYERS; il++) {
            const struct dblade_tensor * t = dblade_cache_tensor(c, il, 0);
            dblade_kv_lock(s); // (the next pass's reads may be running)
            CHECK(atomic_load(&t->bytes_read) > 0 && t->missing == 0 && t->cached == DBLADE_CACHED_UNKNOWN);
            dblade_kv_unlock(s);
        }
    }
    graph(2, 21, 22);
    check_rows();
    graph(3, 22, 40);  // more than a page, from the tail on
    graph(4, 5, 9);    // rows rewritten in the middle (a prefix reused)
    if (getenv("DUALBLADE_WRITE_AROUND")) {
        // a prompt's reads of rows written around go around the cache too (O_DIRECT; DUALBLADE_READ_AROUND=0:
        // through it). Graph 4's reads ran during graph 3 or 4, both prompts: the page-cache layers' K and V, 40
        // rows each, at least
        CHECK_EQ(dblade_kv_stats(s, &st), 0);
        if (getenv("DUALBLADE_READ_AROUND")) {
            CHECK_EQ(st.vram_ring_around_bytes, 0u);
        } else {
            CHECK(st.vram_ring_around_bytes >= (uint64_t) (LAYERS - 4) * 2 * 40 * ROW);
        }
    }
    graph(5, 40, 41);
    graph(6, 41, 42);
    if (getenv("DUALBLADE_WRITE_AROUND")) {
        // decode's reads bring them in: graph 6's for certain (graph 5's may have been read ahead during the prompt)
        for (int il = 4; il < LAYERS; il++) {
            CHECK(layer_resident(il) > 0);
        }
    }
    check_rows();
    CHECK_EQ(dblade_kv_error(s, NULL, 0), 0);
    CHECK_EQ(dblade_kv_stats(s, &st), 0);
    CHECK(st.h2d_bytes > 0 && st.d2h_bytes > 0);
    printf("%s: %u slots, ring %llu KiB (%s), h2d %llu KiB (pinned %llu), read into the ring %llu KiB, %llu layers "
           "beside another's reads\n",
           what, st.vram_slots, (unsigned long long) st.vram_ring_bytes >> 10,
           st.vram_ring_pinned ? "page-locked" : "pageable", (unsigned long long) st.h2d_bytes >> 10,
           (unsigned long long) st.h2d_pinned_bytes >> 10, (unsigned long long) st.vram_ring_read_bytes >> 10,
           (unsigned long long) st.vram_ring_overlapped);
    const char * lanes = getenv("DUALBLADE_READ_LANES");
    if (lanes && !strcmp(lanes, "1")) {
        CHECK_EQ(st.vram_ring_overlapped, 0u); // one lane: a layer's reads never start beside another's
    }

    // a flush outside a graph brings the last layer's rows back (no result_norm: embeddings graphs)
    const int64_t rows[2] = { 41, 42 };
    dblade_cache_ubatch(c, rows, 2, N_KV);
    for (int il = 0; il < LAYERS; il++) {
        cut_layer(il);
        for (int w = 0; w < 2; w++) {
            memset(dev[il][w] + 41 * ROW, mark(il, w, 6, 0), 2 * ROW);
            memset(shadow[il][w] + 41 * ROW, mark(il, w, 6, 0), 2 * ROW);
        }
    }
    CHECK_EQ(dblade_kv_flush(s), 0);
    hwm = 43;
    check_rows();

    // a clear forgets the rows a layer stored since its cut: nothing comes back
    dblade_cache_ubatch(c, rows, 2, N_KV);
    cut_layer(0);
    memset(dev[0][0] + 41 * ROW, 'Z', 2 * ROW);
    dblade_cache_clear(c);
    cut("result_norm", 0);
    CHECK(host[0][0][41 * ROW] != 'Z');

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
    rmdir(dir);
}

// Reads of the direct path that fail (storage): a cut fails with the error, sticky, and nothing runs after.
static void storage_fault(void) {
    setenv("DUALBLADE_VRAM_SLOTS", "2", 1);
    char dir[512];
    test_mkdtemp(dir, sizeof(dir), "vram-fault");
    setenv("DUALBLADE_FAULT", "read:1+:eio", 1);
    open_all(dir, 1 << 20);
    unsetenv("DUALBLADE_FAULT");
    int64_t rows[20];
    for (int r = 0; r < 20; r++) {
        rows[r] = r;
    }
    int ok = 1;
    for (int pass = 0; pass < 3 && ok; pass++) { // the second graph reads the direct layers' rows back
        dblade_cache_ubatch(c, rows, pass ? 1 : 20, N_KV);
        for (int il = 0; il < LAYERS && ok; il++) {
            char name[32];
            snprintf(name, sizeof(name), "attn_norm-%d", il);
            ok = dblade_kv_graph_cut(s, name, 1) && dblade_kv_graph_cut(s, name, 0);
        }
        ok = ok && dblade_kv_graph_cut(s, "result_norm", 0);
        rows[0] = 20 + pass;
    }
    char msg[256];
    CHECK(!ok);
    CHECK_EQ(dblade_kv_error(s, msg, sizeof(msg)), -EIO);
    CHECK(strstr(msg, "reading layer 2") || strstr(msg, "reading layer 3"));
    CHECK_EQ(dblade_kv_graph_cut(s, "attn_norm-4", 0), 0); // sticky
    close_all();
    rmdir(dir);
    printf("storage fault: \"%s\"\n", msg);
}

static uint64_t ring_read(void) {
    struct dblade_stats st;
    CHECK_EQ(dblade_kv_stats(s, &st), 0);
    return st.vram_ring_read_bytes;
}

// 2 slots, a ring, the largest ubatch that reads ahead `ahead` rows; dir gets the store's directory
static void open_ahead(char * dir, size_t cap, const char * name, const char * ahead) {
    setenv("DUALBLADE_VRAM_SLOTS", "2", 1);
    setenv("DUALBLADE_AHEAD_MAX_ROWS", ahead, 1);
    test_mkdtemp(dir, cap, name);
    open_all(dir, 1 << 20);
    unsetenv("DUALBLADE_AHEAD_MAX_ROWS");
}

// A ubatch larger than DUALBLADE_AHEAD_MAX_ROWS reads no layer ahead (each is read at its cut); a smaller one
// reads ahead while the graph starts; the rows stay exact either way.
static void held_reads(void) {
    char dir[512];
    open_ahead(dir, sizeof(dir), "vram-held", "8");
    graph(0, 0, 20);
    for (int pass = 1; pass <= 2; pass++) {
        const int      lo = pass == 1 ? 20 : 40, hi = pass == 1 ? 40 : 41; // 20 rows: held; 1 row: read ahead
        const uint64_t before = ring_read();
        graph_begin(lo, hi);
        uint64_t after = ring_read();
        for (int i = 0; i < 200 && after == before; i++) {
            usleep(10000);
            after = ring_read();
        }
        CHECK(pass == 1 ? after == before : after > before);
        graph_end(pass, lo, hi);
    }
    check_rows();
    CHECK_EQ(dblade_kv_error(s, NULL, 0), 0);
    close_all();
    rmdir(dir);
    printf("reads ahead held through a large ubatch, resumed after it\n");
}

// Reads ahead through every ubatch, large or small, many prompts over: each layer's rows in its slot at its cut,
// every time. (The ring once kept the block a layer without rows took: its FIFO then lost count, a later read
// overwrote a layer still waiting in the ring, and a slot got another layer's rows, as on the GPU in issue 21's
// runs 2 and 3 after a prompt of large ubatches.)
static void ring_stress(void) {
    char dir[512];
    open_ahead(dir, sizeof(dir), "vram-stress", "1000000");
    for (int round = 0; round < 40; round++) {
        const int big = 8 + (round * 7) % 40; // prompt ubatches of 8 to 47 rows, then decode
        int       lo  = 0;
        hwm           = 0;
        for (; lo + big < ROWS - 8; lo += big) {
            graph(round * 100 + lo, lo, lo + big);
        }
        for (int k = 0; k < 6 && lo < ROWS; k++, lo++) {
            graph(round * 100 + 90 + k, lo, lo + 1);
        }
        check_rows();
        dblade_cache_clear(c);
        memset(shadow, 0, sizeof(shadow));
    }
    CHECK_EQ(dblade_kv_error(s, NULL, 0), 0);
    close_all();
    rmdir(dir);
    printf("ring: 40 prompts of large ubatches read ahead, every slot exact\n");
}

static uint64_t h2d(void) {
    struct dblade_stats st;
    CHECK_EQ(dblade_kv_stats(s, &st), 0);
    return st.h2d_bytes;
}

// A batch of three ubatches computed layer by layer (patch 0006): each graph computes one layer for one ubatch
// (dblade_kv_graph_layers), the three graphs of a layer in a row. The layer's rows are copied into its slot for
// the first ubatch only: the next ones find them there, with the rows the ubatch before stored. Every slot exact,
// every host copy exact after; fewer bytes copied than the same batch in llama.cpp's order; a segment's graph
// is held to its own layers' cuts.
static void layer_major(void) {
    char dir[512];
    open_ahead(dir, sizeof(dir), "vram-layer-major", "1000000");
    const int ub[4] = { 16, 24, 32, 40 };
    uint64_t  copied[2];
    for (int order = 0; order < 2; order++) { // 0: llama.cpp's, 1: layer by layer
        hwm = 0;
        graph(0, 0, 16); // an earlier turn's rows
        const uint64_t h2d0 = h2d();
        if (order == 0) {
            for (int u = 0; u < 3; u++) {
                graph(1 + u, ub[u], ub[u + 1]);
            }
        } else {
            for (int il = 0; il < LAYERS; il++) {
                dblade_kv_graph_layers(s, il, il + 1);
                for (int u = 0; u < 3; u++) {
                    graph_begin(ub[u], ub[u + 1]);
                    cut_layer(il);
                    for (int w = 0; w < 2; w++) {
                        CHECK(!memcmp(dev[il][w], shadow[il][w], (size_t) ub[u] * ROW)); // the rows below the ubatch
                        memset(dev[il][w] + ub[u] * ROW, mark(il, w, 1 + u, 0), (size_t) (ub[u + 1] - ub[u]) * ROW);
                        memset(shadow[il][w] + ub[u] * ROW, mark(il, w, 1 + u, 0), (size_t) (ub[u + 1] - ub[u]) * ROW);
                    }
                    if (il == LAYERS - 1) {
                        cut("result_norm", 1);
                    }
                }
            }
            dblade_kv_graph_layers(s, 0, INT32_MAX);
            hwm = ub[3];
        }
        copied[order] = h2d() - h2d0;
        check_rows();
        CHECK_EQ(dblade_kv_error(s, NULL, 0), 0);
        dblade_cache_clear(c);
        memset(shadow, 0, sizeof(shadow));
    }
    // llama.cpp's order copies every layer's rows below each ubatch (16 + 24 + 32 rows); layer by layer those below
    // the first (16), and the stand-in's slots keep them (a pinned layer is copied from its host copy, no ring)
    CHECK(copied[1] < copied[0] / 2);

    // a segment's graph that skips its layer's cut is refused when the next one starts
    dblade_kv_graph_layers(s, 2, 3);
    graph_begin(0, 4);
    const int64_t rows[1] = { 4 };
    dblade_cache_ubatch(c, rows, 1, N_KV);
    char msg[256];
    CHECK_EQ(dblade_kv_error(s, msg, sizeof(msg)), -EPROTO);
    CHECK(strstr(msg, "before 1 of 1 streamed layers"));
    close_all();
    rmdir(dir);
    printf("layer by layer: a layer copied into its slot once per batch (%llu KiB against %llu), every slot exact\n",
           (unsigned long long) copied[1] >> 10, (unsigned long long) copied[0] >> 10);
}

// one streamed layer's cache cannot open: the error says why
static void open_fails(const char * why) {
    struct dblade_layout_layer lay = { 0, DBLADE_PATH_RAM, BYTES, BYTES, DBLADE_LAYOUT_STREAMED, 0 };
    struct dblade_layer_desc   d   = { 0, 0, ROWS, 1, BYTES, BYTES, ROW, ROW, "CUDA0" };
    struct dblade_config       cfg = { .policy = DBLADE_POLICY_RAM, .budget_bytes = DBLADE_BUDGET_UNLIMITED };
    const struct dblade_cache_desc desc = { "", 1, 1, 0, 1, &d };
    CHECK_EQ(dblade_kv_create(&cfg, 1, &lay, &s), 0);
    dblade_kv_bind(s);
    CHECK(dblade_cache_open(&desc, &c) < 0);
    CHECK(strstr(dblade_last_error(), why));
    dblade_kv_bind(NULL);
    dblade_kv_release(s);
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
    setenv("DUALBLADE_READ_LANES", "1", 1);
    run("2", 2, 1 << 20, "2 slots, a ring, one lane");
    CHECK_EQ(registered(), 0); // every page-locked buffer given back
    // two lanes: the next direct layer's reads start beside the last of the one before
    setenv("DUALBLADE_READ_LANES", "tail", 1);
    run("2", 2, 1 << 20, "2 slots, a ring, two lanes at the tail");
    // from here two lanes read direct layers whole side by side (layers 2 and 3): a direct layer's snapshot
    // may drop the lock (a retire running on the other worker), and nobody copies the layer meanwhile
    setenv("DUALBLADE_READ_LANES", "2", 1);
    run("0", LAYERS, 1 << 20, "a slot each");
    run("3", 3, 1 << 20, "3 slots");
    // the budget leaves the ring no room for a layer: the host paths stage them, copies start from there
    run("2", 2, 2 * 2 * BYTES + 2 * 2 * BYTES + 64 * 1024, "no room for a ring");
    setenv("DUALBLADE_PIN", "0", 1); // what a failing page lock leaves: pageable copies
    run("2", 2, 1 << 20, "pageable");
    unsetenv("DUALBLADE_PIN");
    // the page-cache layers' rows from VRAM written to the store with O_DIRECT, around the page cache (auto
    // under a limit does it for a prompt's ubatches): read back through the mapping, every row as written
    setenv("DUALBLADE_WRITE_AROUND", "1", 1);
    run("2", 2, 1 << 20, "written around the page cache");
    setenv("DUALBLADE_READ_AROUND", "0", 1);
    run("2", 2, 1 << 20, "written around the page cache, a prompt's reads through it");
    unsetenv("DUALBLADE_READ_AROUND");
    unsetenv("DUALBLADE_WRITE_AROUND");
    storage_fault();
    held_reads();
    ring_stress();
    layer_major();
    setenv("DUALBLADE_READ_LANES", "tail", 1); // the same with the next layer's reads started at a layer's tail
    storage_fault();
    ring_stress();
    // a lane setting that is none: a clear error that names the choices
    setenv("DUALBLADE_READ_LANES", "3", 1);
    open_fails("DUALBLADE_READ_LANES=3 is not a lane setting: use 1, tail or 2");
    unsetenv("DUALBLADE_READ_LANES");
    // without the driver: a clear error, no KV object
    setenv("DUALBLADE_CUDA_LIB", "/nonexistent/libcuda.so.1", 1);
    open_fails("cannot load the CUDA driver");
    printf("test_vram: ok\n");
    return 0;
}
