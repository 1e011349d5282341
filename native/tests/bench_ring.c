// The VRAM tier's reads ahead on real storage: DUALBLADE_READ_LANES=1 (one lane), tail (two lanes overlapping only
// at a layer's last reads) and 2 (two lanes reading layers whole side by side) (not a test: a benchmark,
// run by hand; no GPU needed). The stand-in driver (fake_cuda.c) takes the copies into "VRAM"; the layers live
// on the direct path (O_DIRECT) of a store in DUALBLADE_TEST_DIR (default /var/tmp), or, with "mixed", every
// other layer on the page cache with its pages dropped before each pass (so that it is read buffered). Each
// decode pass reads every layer's K and V whole; the graph computes nothing (or COMPUTE_US per layer), so a
// pass takes what the reads take. Rounds alternate the three, and the ratios are of the medians. A virtio disk
// here read each new store file at either about 1.6 or about 1.2 GiB/s, whatever the setting: with
// DUALBLADE_BENCH_DEVICE (a loop device over one preallocated file: losetup -f --show --direct-io=on FILE) every
// run reads the same blocks.
//   DUALBLADE_CUDA_LIB=build/bin/libfake_cuda.so build/bin/bench_ring [direct|mixed] [ROUNDS] [COMPUTE_US]
#define _GNU_SOURCE
#include "../src/testing.h"
#include "dualblade-llama.h"
#include "check.h"

#include <dirent.h>
#include <dlfcn.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define ROW    4096
#define ROWS   4096 // 16 MiB a tensor, 32 MiB a layer
#define BYTES  ((uint64_t) ROW * ROWS)
#define LAYERS 8
#define PASSES 4
#define MAX_ROUNDS 16

static struct dblade_kv *    s;
static struct dblade_cache * c;
static uint8_t *             dev[LAYERS][2];
static char                  dir[512];
static bool                  mixed;
static int                   compute_us;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double) ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void cut(const char * name) {
    if (dblade_kv_graph_cut(s, name, 1) && dblade_kv_graph_cut(s, name, 0) != 1) {
        char msg[256];
        dblade_kv_error(s, msg, sizeof(msg));
        fprintf(stderr, "bench_ring: cut %s failed: %s\n", name, msg);
        exit(1);
    }
}

// one graph storing rows [lo, hi) of every layer
static void graph(int lo, int hi) {
    int64_t * rows = malloc(sizeof(*rows) * (size_t) (hi - lo));
    for (int r = lo; r < hi; r++) {
        rows[r - lo] = r;
    }
    dblade_cache_ubatch(c, rows, hi - lo, ROWS);
    free(rows);
    for (int il = 0; il < LAYERS; il++) {
        char name[32];
        snprintf(name, sizeof(name), "attn_norm-%d", il);
        cut(name);
        for (int w = 0; w < 2; w++) {
            memset(dev[il][w] + (size_t) lo * ROW, 1 + (il + w + lo) % 250, (size_t) (hi - lo) * ROW);
        }
        if (compute_us) {
            usleep((useconds_t) compute_us);
        }
    }
    cut("result_norm");
}

// the page-cache layers' pages leave the cache: written back, unmapped here, then dropped
static void drop_cache(void) {
    for (int il = 1; il < LAYERS; il += 2) {
        for (int w = 0; w < 2; w++) {
            uint8_t * a = dblade_tensor_data(dblade_cache_tensor(c, il, w));
            msync(a, BYTES, MS_SYNC);
            madvise(a, BYTES, MADV_DONTNEED);
        }
    }
    // the store's files, through the descriptors open on them (a store may be unlinked once open)
    DIR *           d = opendir("/proc/self/fd");
    struct dirent * e;
    while (d && (e = readdir(d))) {
        char link[64], path[1024];
        snprintf(link, sizeof(link), "/proc/self/fd/%s", e->d_name);
        const ssize_t n = readlink(link, path, sizeof(path) - 1);
        if (n > 0 && (path[n] = 0, !strncmp(path, dir, strlen(dir)))) {
            fdatasync(atoi(e->d_name));
            posix_fadvise(atoi(e->d_name), 0, 0, POSIX_FADV_DONTNEED);
        }
    }
    if (d) {
        closedir(d);
    }
}

// GiB/s of the decode passes with DUALBLADE_READ_LANES=lanes
static double run(const char * lanes) {
    setenv("DUALBLADE_READ_LANES", lanes, 1);
    setenv("DUALBLADE_VRAM_SLOTS", "2", 1);
    test_mkdtemp(dir, sizeof(dir), "bench-ring");
    struct dblade_layout_layer lay[LAYERS];
    struct dblade_layer_desc   d[LAYERS];
    for (int il = 0; il < LAYERS; il++) {
        const uint32_t path = mixed && il % 2 ? DBLADE_PATH_MMAP : DBLADE_PATH_DIRECT;
        lay[il] = (struct dblade_layout_layer) { il, path, BYTES, BYTES, DBLADE_LAYOUT_STREAMED, 0 };
        d[il]   = (struct dblade_layer_desc) { il, 0, ROWS, 1, BYTES, BYTES, ROW, ROW, "CUDA0" };
    }
    // DUALBLADE_BENCH_DEVICE: a block device (a loop device over one file) instead of a new file each run, so
    // that every setting reads the same blocks
    const char *         device = getenv("DUALBLADE_BENCH_DEVICE");
    struct dblade_config cfg    = { .policy       = DBLADE_POLICY_DIRECT,
                                    .budget_bytes = 1ull << 30,
                                    .kv_dir       = device ? NULL : dir,
                                    .kv_device    = device,
                                    .flags        = device ? DBLADE_CONFIG_FORCE : 0 };
    CHECK_EQ(dblade_kv_create(&cfg, LAYERS, lay, &s), 0);
    const struct dblade_cache_desc desc = { "", 1, 1, 0, LAYERS, d };
    dblade_kv_bind(s);
    CHECK_EQ(dblade_cache_open(&desc, &c), 0);
    dblade_kv_bind(NULL);
    for (int il = 0; il < LAYERS; il++) {
        for (int w = 0; w < 2; w++) {
            dev[il][w] = dblade_tensor_device_data(dblade_cache_tensor(c, il, w));
        }
    }
    for (int lo = 0; lo < ROWS; lo += 512) {
        graph(lo, lo + 512); // the prompt
    }
    double busy = 0;
    for (int p = 0; p < PASSES; p++) {
        if (mixed) {
            drop_cache();
        }
        const double t0 = now_s();
        graph(ROWS - 1, ROWS); // decode: the last row rewritten, every layer read whole
        busy += now_s() - t0;
    }
    struct dblade_stats st;
    CHECK_EQ(dblade_kv_stats(s, &st), 0);
    CHECK_EQ(dblade_kv_error(s, NULL, 0), 0);
    dblade_cache_close(c);
    dblade_kv_release(s);
    char cmd[600];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    CHECK_EQ(system(cmd), 0);
    return (double) PASSES * LAYERS * 2 * BYTES / busy / (1 << 30);
}

static int by_value(const void * a, const void * b) {
    const double x = *(const double *) a, y = *(const double *) b;
    return (x > y) - (x < y);
}

int main(int argc, char ** argv) {
    if (!getenv("DUALBLADE_CUDA_LIB")) {
        fprintf(stderr, "bench_ring: set DUALBLADE_CUDA_LIB to the stand-in driver (build/bin/libfake_cuda.so)\n");
        return 2;
    }
    mixed            = argc > 1 && !strcmp(argv[1], "mixed");
    const int rounds = argc > 2 && atoi(argv[2]) > 0 ? (atoi(argv[2]) < MAX_ROUNDS ? atoi(argv[2]) : MAX_ROUNDS) : 5;
    compute_us       = argc > 3 ? atoi(argv[3]) : 0;
    double one[MAX_ROUNDS], tail[MAX_ROUNDS], two[MAX_ROUNDS];
    for (int r = 0; r < rounds; r++) {
        one[r]  = run("1");
        tail[r] = run("tail");
        two[r]  = run("2");
        printf("round %d: one lane %.2f GiB/s, two overlapping at the tail %.2f GiB/s, two side by side %.2f GiB/s\n",
               r, one[r], tail[r], two[r]);
        fflush(stdout);
    }
    qsort(one, (size_t) rounds, sizeof(double), by_value);
    qsort(tail, (size_t) rounds, sizeof(double), by_value);
    qsort(two, (size_t) rounds, sizeof(double), by_value);
    printf("%s layers, %d rounds of %d decode passes over %d layers of %llu MiB, %d us of compute a layer: "
           "median one lane %.2f GiB/s, two at the tail %.2f GiB/s: %.2fx, two side by side %.2f GiB/s: "
           "%.2fx\n",
           mixed ? "mixed (every other one on the page cache, dropped)" : "direct", rounds, PASSES, LAYERS,
           (unsigned long long) (2 * BYTES >> 20), compute_us, one[rounds / 2], tail[rounds / 2],
           tail[rounds / 2] / one[rounds / 2], two[rounds / 2], two[rounds / 2] / one[rounds / 2]);
    return 0;
}
