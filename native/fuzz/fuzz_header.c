// Fuzz target: the device header decoder and the signature scan, which read block 0 of whatever
// device the user names. libFuzzer calls it (clang -fsanitize=fuzzer); gcc builds link
// fuzz_driver.c instead. Any broken invariant aborts, so either runner reports the input.

#include "../src/crc32c.h"
#include "../src/header.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define REQUIRE(c) do { if (!(c)) { \
    fprintf(stderr, "fuzz_header: %s:%d: invariant broken: %s\n", __FILE__, __LINE__, #c); abort(); } } while (0)

// what the decodes did (two per input), printed at exit: proof that they get past magic and CRC
static unsigned long n_inputs, n_rc[4]; // ok, -ENOENT, -EBADMSG, -EPROTO

static int same(const struct dblade_header * a, const struct dblade_header * b) {
    return a->version == b->version && memcmp(a->uuid, b->uuid, 16) == 0 && a->device_bytes == b->device_bytes &&
           a->data_offset == b->data_offset && a->data_bytes == b->data_bytes && a->align == b->align &&
           a->geometry == b->geometry && a->created == b->created;
}

static void decode(const uint8_t blk[DBLADE_HEADER_BYTES]) {
    struct dblade_header h;
    const int            rc = dblade_header_decode(blk, &h);
    REQUIRE(rc == 0 || rc == -ENOENT || rc == -EBADMSG || rc == -EPROTO);
    n_rc[rc == 0 ? 0 : rc == -ENOENT ? 1 : rc == -EBADMSG ? 2 : 3]++;
    if (rc != 0) {
        return;
    }
    // what an accepted header promises: its data area lies inside the device
    REQUIRE(h.version == DBLADE_HEADER_VERSION);
    REQUIRE(h.align != 0 && (h.align & (h.align - 1)) == 0);
    REQUIRE(h.data_offset >= DBLADE_HEADER_BYTES);
    REQUIRE(h.data_offset <= h.device_bytes && h.data_bytes <= h.device_bytes - h.data_offset); // no wrap
    // encoding what was decoded gives back the same fields at the same places
    uint8_t              again[DBLADE_HEADER_BYTES];
    struct dblade_header h2;
    dblade_header_encode(&h, again);
    REQUIRE(dblade_header_decode(again, &h2) == 0 && same(&h, &h2));
    REQUIRE(memcmp(again, blk, 68) == 0 && memcmp(again + 72, blk + 72, 16) == 0);
}

int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    n_inputs++;
    // a device is never shorter than a block; a short input stands for a block that ends in zeros
    uint8_t blk[DBLADE_HEADER_BYTES] = { 0 };
    memcpy(blk, data, size < sizeof(blk) ? size : sizeof(blk));
    decode(blk);
    // and once more with the checksum made right: a mutated field seldom gets past the CRC alone
    const uint32_t crc = dblade_crc32c(blk, DBLADE_HEADER_BYTES - 4);
    memcpy(blk + DBLADE_HEADER_BYTES - 4, &crc, 4);
    decode(blk);

    // the scan reads only what it is given (ASan sees data's exact size), and "blank" means zeros
    const char * what = dblade_detect_signature(data, size);
    if (what == NULL) {
        for (size_t i = 0; i < size; i++) {
            REQUIRE(data[i] == 0);
        }
    } else {
        REQUIRE(what[0] != 0);
    }
    return 0;
}

__attribute__((destructor)) static void report(void) {
    fprintf(stderr, "fuzz_header: %lu inputs, decoded as is and re-sealed: %lu ours, %lu not ours, %lu damaged, "
                    "%lu another version\n", n_inputs, n_rc[0], n_rc[1], n_rc[2], n_rc[3]);
}
