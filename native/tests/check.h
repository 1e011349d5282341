// Minimal assertions for the C unit tests: report the failing expression and exit non-zero.
#ifndef DUALBLADE_CHECK_H
#define DUALBLADE_CHECK_H
#include <stdio.h>
#include <stdlib.h>

#define CHECK(cond) do { if (!(cond)) { \
    fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); exit(1); } } while (0)
#define CHECK_EQ(a, b) do { long long _a = (long long)(a), _b = (long long)(b); if (_a != _b) { \
    fprintf(stderr, "%s:%d: CHECK_EQ failed: %s == %lld, %s == %lld\n", __FILE__, __LINE__, #a, _a, #b, _b); \
    exit(1); } } while (0)

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

// where tests put their files: DUALBLADE_TEST_DIR (ctest sets it to the build folder), else /var/tmp
static inline const char * test_dir(void) {
    const char * dir = getenv("DUALBLADE_TEST_DIR");
    return dir ? dir : "/var/tmp";
}

// a fresh directory <test_dir>/<name>-XXXXXX in dir[cap]
static inline void test_mkdtemp(char * dir, size_t cap, const char * name) {
    snprintf(dir, cap, "%s/%s-XXXXXX", test_dir(), name);
    CHECK(mkdtemp(dir));
}

#ifdef O_DIRECT // (_GNU_SOURCE)
// A scratch file under test_dir(), opened with O_DIRECT and unlinked at once; *plain, when given,
// gets a second, buffered descriptor of it (to change it behind the engine's back).
static inline int test_open_direct(const char * name, int * plain) {
    char path[512];
    snprintf(path, sizeof(path), "%s/%s-XXXXXX", test_dir(), name);
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    close(fd);
    fd = open(path, O_RDWR | O_DIRECT);
    CHECK(fd >= 0);
    if (plain) {
        *plain = open(path, O_RDWR);
        CHECK(*plain >= 0);
    }
    unlink(path);
    return fd;
}
#endif

#ifdef DUALBLADE_ENGINE_H
// the engine `engine` on fd into *io; false (and a line saying so) where this build lacks it
static inline bool test_io_open(const char * engine, int fd, struct dblade_io ** io) {
    setenv("DUALBLADE_IO_ENGINE", engine, 1);
    const int rc = dblade_io_open(io, fd);
    if (rc == -ENOSYS) {
        printf("%s: not built in, skipped\n", engine);
        return false;
    }
    CHECK_EQ(rc, 0);
    return true;
}
#endif

#ifdef DUALBLADE_LLAMA_H
// a cache of n layers (il 0..n-1) of rows x row_bytes for K and for V, opened on s
static inline struct dblade_cache * test_cache_open(struct dblade_kv * s, uint32_t n, uint32_t rows,
                                                    uint64_t row_bytes) {
    struct dblade_layer_desc d[64];
    CHECK(n <= 64);
    for (uint32_t i = 0; i < n; i++) {
        struct dblade_layer_desc x = { .il = (int32_t) i, .n_rows = rows, .n_stream = 1, .k_bytes = rows * row_bytes,
                                       .v_bytes = rows * row_bytes, .k_row_bytes = row_bytes, .v_row_bytes = row_bytes };
        d[i] = x;
    }
    struct dblade_cache_desc desc = { .name = "", .n_layers = n, .layers = d };
    struct dblade_cache *    c    = NULL;
    dblade_kv_bind(s);
    CHECK_EQ(dblade_cache_open(&desc, &c), 0);
    dblade_kv_bind(NULL);
    return c;
}
#endif
#endif
