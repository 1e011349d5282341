// Checksums: CRC-32C against known values, the block paths (VPCLMULQDQ, three blocks with SSE4.2,
// tables: DUALBLADE_CRC picks) against the bitwise definition and the one-block path, and
// the engine's per-block checksums catching a bit flipped in the store (both engines).
#define _GNU_SOURCE
#include "../src/base.h"
#include "../src/crc32c.h"
#include "../src/engine.h"
#include "check.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void known_values(void) {
    CHECK_EQ(dblade_crc32c("123456789", 9), 0xE3069283u); // the CRC-32C check value
    CHECK_EQ(dblade_crc32c("", 0), 0);
    uint8_t zeros[32] = { 0 };
    CHECK_EQ(dblade_crc32c(zeros, 32), 0x8A9136AAu); // RFC 3720 B.4
    uint8_t ones[32];
    memset(ones, 0xFF, sizeof(ones));
    CHECK_EQ(dblade_crc32c(ones, 32), 0x62A8AB43u);
    uint8_t inc[32];
    for (int i = 0; i < 32; i++) inc[i] = (uint8_t) i;
    CHECK_EQ(dblade_crc32c(inc, 32), 0x46DD794Eu);
}

// bit by bit, as the polynomial defines it: the oracle for every faster way
static uint32_t crc_bitwise(const uint8_t * p, size_t n) {
    uint32_t c = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
    }
    return ~c;
}

static void blocks_match_scalar(void) {
    enum { N = 7 }; // two groups of three and one left over
    uint8_t * p = malloc(N * DBLADE_BLOCK);
    for (size_t i = 0; i < N * DBLADE_BLOCK; i++) p[i] = (uint8_t) (i * 2654435761u >> 13);
    uint32_t got[N];
    dblade_crc32c_blocks(p, N, got);
    for (int i = 0; i < N; i++) CHECK_EQ(got[i], dblade_crc32c(p + i * DBLADE_BLOCK, DBLADE_BLOCK));
    // random blocks, zeros, ones, a single bit in each position of a block's first and last bytes
    uint32_t seed = 1;
    for (size_t i = 0; i < N * DBLADE_BLOCK; i++) p[i] = (uint8_t) ((seed = seed * 1103515245u + 12345u) >> 16);
    memset(p + DBLADE_BLOCK, 0, DBLADE_BLOCK);
    memset(p + 2 * DBLADE_BLOCK, 0xFF, DBLADE_BLOCK);
    dblade_crc32c_blocks(p, N, got);
    for (int i = 0; i < N; i++) CHECK_EQ(got[i], crc_bitwise(p + i * DBLADE_BLOCK, DBLADE_BLOCK));
    for (int bit = 0; bit < 16; bit++) {
        memset(p, 0, DBLADE_BLOCK);
        p[bit < 8 ? 0 : DBLADE_BLOCK - 1] = (uint8_t) (1u << (bit % 8));
        dblade_crc32c_blocks(p, 1, got);
        CHECK_EQ(got[0], crc_bitwise(p, DBLADE_BLOCK));
    }
    printf("blocks (%s) match the bitwise CRC\n", dblade_crc32c_impl());
    free(p);
}

static void flipped_bit(const char * engine) {
    int plain; // the "disk" that goes bad behind the engine's back
    const int fd = test_open_direct("crc", &plain);
    struct dblade_io * io = NULL;
    if (!test_io_open(engine, fd, &io)) {
        close(fd), close(plain);
        return;
    }

    const uint64_t len = 9u << 20; // three chunks, the last one short of a full chunk
    const uint64_t nb  = len / DBLADE_BLOCK;
    uint8_t * buf, * back;
    CHECK(posix_memalign((void **) &buf, 4096, len) == 0 && posix_memalign((void **) &back, 4096, len) == 0);
    for (uint64_t i = 0; i < len; i++) buf[i] = (uint8_t) (i * 31 + (i >> 12));
    uint32_t * sums = calloc(nb, sizeof(*sums));
    struct dblade_io_req w = { .buf = buf, .len = len, .off = 0, .write = 1, .sums = sums };
    CHECK_EQ(dblade_io_run(io, &w, 1), 0);
    for (uint64_t b = 0; b < nb; b++) CHECK(sums[b] != 0);

    struct dblade_io_req r = { .buf = back, .len = len, .off = 0, .sums = sums };
    CHECK_EQ(dblade_io_run(io, &r, 1), 0);
    CHECK(memcmp(buf, back, len) == 0);

    // one bit flipped in block 1500 (in the second chunk), through the page cache: O_DIRECT reads
    // see it once it is written back
    const uint64_t at = 1500 * DBLADE_BLOCK + 77;
    uint8_t byte;
    CHECK(pread(plain, &byte, 1, (off_t) at) == 1);
    byte ^= 0x10;
    CHECK(pwrite(plain, &byte, 1, (off_t) at) == 1);
    CHECK(fsync(plain) == 0);
    CHECK_EQ(dblade_io_run(io, &r, 1), -EBADMSG);
    CHECK_EQ(r.res, -EBADMSG);

    // a read of only the other blocks is fine; and unknown blocks (sum 0) are not checked
    struct dblade_io_req first = { .buf = back, .len = 1400 * DBLADE_BLOCK, .off = 0, .sums = sums };
    CHECK_EQ(dblade_io_run(io, &first, 1), 0);
    sums[1500] = 0;
    CHECK_EQ(dblade_io_run(io, &r, 1), 0);
    // no sums at all: nothing is checked
    struct dblade_io_req blind = { .buf = back, .len = len, .off = 0 };
    CHECK_EQ(dblade_io_run(io, &blind, 1), 0);

    dblade_io_close(io);
    close(fd), close(plain);
    free(buf), free(back), free(sums);
    printf("%s: a flipped bit is caught\n", engine);
}

int main(void) {
    known_values();
    blocks_match_scalar();
    flipped_bit("threads");
    flipped_bit("io_uring");
    return 0;
}
