// CRC-32C (Castagnoli): the device header's checksum and the direct path's per-block checksums.
//
// The direct path checks every 4 KiB block it reads back, so this runs over every byte the disk
// delivers: its speed is CPU time per token. Three ways, the fastest the CPU has:
//  - AVX-512 with VPCLMULQDQ: each block folded 256 bytes at a time by carry-less multiplication
//    (16 lanes of 128 bits in four registers), the last 16 bytes through the CRC instruction. The
//    block is read front to back, so the hardware prefetcher streams it (the CRC instruction, with
//    its three-cycle latency, needs several blocks side by side, and each new 4 KiB page stalls it);
//  - SSE4.2: the CRC instruction on three blocks at once (latency three cycles, throughput one);
//  - elsewhere slicing-by-8 tables.
// DUALBLADE_CRC=vpclmul|sse42|soft picks one (tests compare them).

#include "crc32c.h"

#include "base.h"

#include <pthread.h>
#include <stdlib.h>
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

#ifdef HAVE_SSE42_PATH
#    include <immintrin.h>

// Folding constants for CRC-32C, bit-reflected: for a distance of D bits, x^(64+D-1) and x^(D-1)
// modulo the polynomial, each as a 64-bit reflected value (the -1: a carry-less product of two
// reflected values comes out multiplied by x once more).
#    define K_2048 0xe9a5d8be00000000ull, 0x1426a81500000000ull
#    define K_1536 0x7ccbbbf200000000ull, 0x31c9460800000000ull
#    define K_1024 0x6577b24500000000ull, 0x7417153f00000000ull
#    define K_512  0x1c19243b00000000ull, 0x75bba45b00000000ull
#    define K_384  0xa46ef4aa00000000ull, 0x6051243f00000000ull
#    define K_256  0x33ccbbbc00000000ull, 0xa2158b3400000000ull
#    define K_128  0x3743f7bd00000000ull, 0x3171d43000000000ull
#    define LANES_(a, b) _mm512_set_epi64(b, a, b, a, b, a, b, a) // each 128-bit lane: low a, high b
#    define LANES(k)     LANES_(k)
#    define SET_LANES_(a2, b2, a1, b1, a0, b0) _mm512_set_epi64(0, 0, b2, a2, b1, a1, b0, a0) // lane 3: none
#    define SET_LANES(k2, k1, k0) SET_LANES_(k2, k1, k0)
#    define TARGET_VPCLMUL __attribute__((target("avx512f,avx512vl,vpclmulqdq,sse4.2")))

// x (each lane: the higher-degree 64 bits low, the rest high) moved D bits further, xor y
TARGET_VPCLMUL static inline __m512i fold512(__m512i x, __m512i k, __m512i y) {
    return _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128(x, k, 0x00), _mm512_clmulepi64_epi128(x, k, 0x11), y,
                                     0x96);
}

TARGET_VPCLMUL static uint32_t crc_block_vpclmul(const uint8_t * p) {
    _Static_assert(DBLADE_BLOCK % 256 == 0, "a block is folded 256 bytes at a time");
    const __m512i k2048 = LANES(K_2048);
    // the initial 0xFFFFFFFF is the same as the first 32 bits of the message inverted
    __m512i a0 = _mm512_xor_si512(_mm512_loadu_si512(p), _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                                                          0, -1));
    __m512i a1 = _mm512_loadu_si512(p + 64), a2 = _mm512_loadu_si512(p + 128), a3 = _mm512_loadu_si512(p + 192);
    for (size_t i = 256; i < DBLADE_BLOCK; i += 256) {
        a0 = fold512(a0, k2048, _mm512_loadu_si512(p + i));
        a1 = fold512(a1, k2048, _mm512_loadu_si512(p + i + 64));
        a2 = fold512(a2, k2048, _mm512_loadu_si512(p + i + 128));
        a3 = fold512(a3, k2048, _mm512_loadu_si512(p + i + 192));
    }
    // the four registers into the last one (lane by lane, 192, 128 and 64 bytes apart), then its
    // four lanes into the last lane (48, 32 and 16 bytes apart; the last lane as it is)
    a3 = fold512(a0, LANES(K_1536), a3);
    a3 = fold512(a1, LANES(K_1024), a3);
    a3 = fold512(a2, LANES(K_512), a3);
    const __m512i k_lanes = SET_LANES(K_128, K_256, K_384);
    const __m512i f = _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128(a3, k_lanes, 0x00),
                                                _mm512_clmulepi64_epi128(a3, k_lanes, 0x11),
                                                _mm512_maskz_mov_epi64(0xC0, a3), 0x96);
    const __m256i h = _mm256_xor_si256(_mm512_castsi512_si256(f), _mm512_extracti64x4_epi64(f, 1));
    const __m128i x = _mm_xor_si128(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    // what is left, 128 bits at the end of the block: the CRC instruction multiplies by x^32 and reduces
    const uint64_t c = _mm_crc32_u64(0, (uint64_t) _mm_cvtsi128_si64(x));
    return ~(uint32_t) _mm_crc32_u64(c, (uint64_t) _mm_extract_epi64(x, 1));
}
#endif

enum { CRC_SOFT = 0, CRC_SSE42 = 1, CRC_VPCLMUL = 2 };
static int            k_impl;
static pthread_once_t k_impl_once = PTHREAD_ONCE_INIT;

static void impl_init(void) {
    k_impl = CRC_SOFT;
#ifdef HAVE_SSE42_PATH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("sse4.2")) {
        k_impl = CRC_SSE42;
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
            __builtin_cpu_supports("vpclmulqdq")) {
            k_impl = CRC_VPCLMUL;
        }
    }
#endif
    const char * want = getenv("DUALBLADE_CRC");
    const int    asked = !want ? -1 : !strcmp(want, "soft") ? CRC_SOFT : !strcmp(want, "sse42") ? CRC_SSE42
                                 : !strcmp(want, "vpclmul")                                ? CRC_VPCLMUL
                                                                                            : -1;
    if (asked >= 0 && asked < k_impl) {
        k_impl = asked; // only ever a slower one: the CPU must have what is asked for
    }
}

static int impl(void) {
    pthread_once(&k_impl_once, impl_init);
    return k_impl;
}

static bool use_hw(void) {
    return impl() >= CRC_SSE42;
}

const char * dblade_crc32c_impl(void) {
    static const char * names[] = { "soft", "sse42", "vpclmul" };
    return names[impl()];
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
    if (impl() == CRC_VPCLMUL) {
        for (; i < n_blocks; i++) {
            out[i] = crc_block_vpclmul(p + i * DBLADE_BLOCK);
        }
        return;
    }
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
