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

#include <fcntl.h>
#include <unistd.h>

#ifdef O_DIRECT // (_GNU_SOURCE)
// A scratch file under DUALBLADE_TEST_DIR (else /var/tmp), opened with O_DIRECT and unlinked at once;
// *plain, when given, gets a second, buffered descriptor of it (to change it behind the engine's back).
static inline int test_open_direct(const char * name, int * plain) {
    const char * dir = getenv("DUALBLADE_TEST_DIR");
    char         path[512];
    snprintf(path, sizeof(path), "%s/%s-XXXXXX", dir ? dir : "/var/tmp", name);
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
#endif
