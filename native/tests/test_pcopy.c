// The parallel copy: every byte of ranges of many sizes (below a chunk, chunks and a remainder, one byte
// off a chunk) arrives, nothing around the destination is touched, with 0, 1 and 3 helpers, and from
// several callers at once (one copy at a time, each whole).
#define _GNU_SOURCE
#include "../src/pcopy.h"
#include "check.h"

#include <pthread.h>
#include <stdint.h>

#define CHUNK (2u << 20)

static uint8_t * pattern(uint64_t len, uint32_t seed) {
    uint8_t * b = malloc(len);
    CHECK(b);
    uint32_t x = seed * 2654435761u + 1;
    for (uint64_t i = 0; i < len; i++) {
        x    = x * 1103515245u + 12345u;
        b[i] = (uint8_t) (x >> 16);
    }
    return b;
}

static void copy_and_check(struct dblade_pcopy * p, uint64_t len, uint32_t seed) {
    uint8_t * src = pattern(len, seed);
    uint8_t * dst = malloc(len + 128);
    CHECK(dst);
    memset(dst, 0xA5, len + 128);
    dblade_pcopy_run(p, dst + 64, src, len);
    CHECK(memcmp(dst + 64, src, len) == 0);
    for (int i = 0; i < 64; i++) {
        CHECK_EQ(dst[i], 0xA5);
        CHECK_EQ(dst[64 + len + i], 0xA5);
    }
    free(src);
    free(dst);
}

static struct dblade_pcopy * shared;

static void * caller(void * arg) {
    for (uint32_t r = 0; r < 6; r++) {
        copy_and_check(shared, 3 * CHUNK + 4096 * (r + 1), (uint32_t) (intptr_t) arg * 100 + r);
    }
    return NULL;
}

int main(void) {
    const uint64_t sizes[] = { 0, 1, 4095, CHUNK, CHUNK + 1, 2 * CHUNK - 1, 7 * CHUNK + 12345, 33 * CHUNK };
    for (uint32_t helpers = 0; helpers <= 3; helpers += helpers ? 2 : 1) {
        struct dblade_pcopy * p = NULL;
        CHECK_EQ(dblade_pcopy_open(&p, helpers), 0);
        for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
            copy_and_check(p, sizes[i], (uint32_t) i);
        }
        dblade_pcopy_close(p);
    }
    CHECK_EQ(dblade_pcopy_open(&shared, 3), 0);
    pthread_t th[4];
    for (intptr_t i = 0; i < 4; i++) {
        CHECK(pthread_create(&th[i], NULL, caller, (void *) i) == 0);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
    }
    dblade_pcopy_close(shared);
    dblade_pcopy_close(NULL);
    printf("pcopy: ok\n");
    return 0;
}
