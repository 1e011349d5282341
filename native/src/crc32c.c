// CRC-32C (Castagnoli): the device header's checksum and the direct path's per-block checksums.
//
// Blocks are independent, so the SSE4.2 instruction runs on three blocks at once: its latency is
// three cycles and its throughput one, so one chain alone would use a third of it. Elsewhere (or
// without SSE4.2) slicing-by-8 tables.

#include "internal.h"

#include <pthread.h>
#include <string.h>

static uint32_t       k_table[8][256];
static pthread_once_t k_table_once = PTHREAD_ONCE_INIT;

static void table_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) {
            c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
        }
        k_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++) {
        for (int t = 1; t < 8; t++) {
            k_table[t][i] = (k_table[t - 1][i] >> 8) ^ k_table[0][k_table[t - 1][i] & 0xFF];
        }
    }
}

static uint32_t crc_soft(uint32_t crc, const uint8_t * p, size_t len) {
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        w ^= crc; // little-endian: the low bytes meet the CRC first
        crc = k_table[7][w & 0xFF] ^ k_table[6][(w >> 8) & 0xFF] ^ k_table[5][(w >> 16) & 0xFF] ^
              k_table[4][(w >> 24) & 0xFF] ^ k_table[3][(w >> 32) & 0xFF] ^ k_table[2][(w >> 40) & 0xFF] ^
              k_table[1][(w >> 48) & 0xFF] ^ k_table[0][w >> 56];
        p += 8, len -= 8;
    }
    while (len--) {
        crc = (crc >> 8) ^ k_table[0][(crc ^ *p++) & 0xFF];
    }
    return crc;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#    include <nmmintrin.h>
#    define HAVE_SSE42_PATH 1

__attribute__((target("sse4.2"))) static uint32_t crc_hw(uint32_t crc, const uint8_t * p, size_t len) {
    uint64_t c = crc;
    for (; len >= 8; p += 8, len -= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c = _mm_crc32_u64(c, w);
    }
    for (; len; p++, len--) {
        c = _mm_crc32_u8((uint32_t) c, *p);
    }
    return (uint32_t) c;
}

// three blocks of `block` bytes (a multiple of 8) side by side
__attribute__((target("sse4.2"))) static void crc_hw3(const uint8_t * p, size_t block, uint32_t out[3]) {
    uint64_t a = 0xFFFFFFFFu, b = 0xFFFFFFFFu, c = 0xFFFFFFFFu;
    const uint8_t * q = p + block, * r = p + 2 * block;
    for (size_t i = 0; i < block; i += 8) {
        uint64_t x, y, z;
        memcpy(&x, p + i, 8);
        memcpy(&y, q + i, 8);
        memcpy(&z, r + i, 8);
        a = _mm_crc32_u64(a, x);
        b = _mm_crc32_u64(b, y);
        c = _mm_crc32_u64(c, z);
    }
    out[0] = ~(uint32_t) a, out[1] = ~(uint32_t) b, out[2] = ~(uint32_t) c;
}
#endif

static bool           k_hw;
static pthread_once_t k_hw_once = PTHREAD_ONCE_INIT;

static void hw_init(void) {
#ifdef HAVE_SSE42_PATH
    __builtin_cpu_init();
    k_hw = __builtin_cpu_supports("sse4.2");
#endif
}

static bool use_hw(void) {
    pthread_once(&k_hw_once, hw_init);
    return k_hw;
}

uint32_t dblade_crc32c(const void * data, size_t len) {
#ifdef HAVE_SSE42_PATH
    if (use_hw()) {
        return ~crc_hw(0xFFFFFFFFu, data, len);
    }
#endif
    pthread_once(&k_table_once, table_init);
    return ~crc_soft(0xFFFFFFFFu, data, len);
}

void dblade_crc32c_blocks(const void * data, size_t n_blocks, uint32_t * out) {
    const uint8_t * p = data;
    size_t          i = 0;
#ifdef HAVE_SSE42_PATH
    if (use_hw()) {
        for (; i + 3 <= n_blocks; i += 3) {
            crc_hw3(p + i * DBLADE_BLOCK, DBLADE_BLOCK, out + i);
        }
    }
#endif
    for (; i < n_blocks; i++) {
        out[i] = dblade_crc32c(p + i * DBLADE_BLOCK, DBLADE_BLOCK);
    }
}
