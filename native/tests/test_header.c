// Device ownership header: round trip, damage, versions; signatures of what a device may hold.
#include "../src/crc32c.h"
#include "../src/header.h"
#include "check.h"

#include <errno.h>
#include <string.h>

static uint8_t buf[DBLADE_SIGNATURE_SCAN];

int main(void) {
    struct dblade_header h = { .version = DBLADE_HEADER_VERSION, .device_bytes = 1 << 30,
                               .data_offset = DBLADE_DEVICE_DATA_OFFSET, .data_bytes = 256 << 20, .align = 4096,
                               .geometry = 0x1234567890abcdefull, .created = 1700000000 };
    memcpy(h.uuid, "0123456789abcdef", 16);
    uint8_t blk[DBLADE_HEADER_BYTES];
    dblade_header_encode(&h, blk);

    struct dblade_header r;
    CHECK_EQ(dblade_header_decode(blk, &r), 0);
    CHECK(r.geometry == h.geometry && r.data_bytes == h.data_bytes && r.align == 4096);
    CHECK(memcmp(r.uuid, h.uuid, 16) == 0);

    // a flipped bit anywhere is detected
    blk[300] ^= 1;
    CHECK_EQ(dblade_header_decode(blk, &r), -EBADMSG);
    blk[300] ^= 1;
    // another version of ours
    h.version = 99;
    dblade_header_encode(&h, blk);
    CHECK_EQ(dblade_header_decode(blk, &r), -EPROTO);
    // nonsense geometry
    h.version = DBLADE_HEADER_VERSION;
    h.data_bytes = 2ull << 30;
    dblade_header_encode(&h, blk);
    CHECK_EQ(dblade_header_decode(blk, &r), -EBADMSG);
    // not ours at all
    memset(blk, 0, sizeof(blk));
    CHECK_EQ(dblade_header_decode(blk, &r), -ENOENT);

    // signatures
    memset(buf, 0, sizeof(buf));
    CHECK(dblade_detect_signature(buf, sizeof(buf)) == NULL); // blank
    buf[1080] = 0x53, buf[1081] = 0xEF;
    CHECK(strstr(dblade_detect_signature(buf, sizeof(buf)), "ext2/3/4"));
    memset(buf, 0, sizeof(buf));
    memcpy(buf + 512, "EFI PART", 8);
    buf[510] = 0x55, buf[511] = 0xAA;
    CHECK(strstr(dblade_detect_signature(buf, sizeof(buf)), "GPT"));
    memset(buf, 0, sizeof(buf));
    buf[510] = 0x55, buf[511] = 0xAA;
    CHECK(strstr(dblade_detect_signature(buf, sizeof(buf)), "MBR"));
    memset(buf, 0, sizeof(buf));
    memcpy(buf + 4086, "SWAPSPACE2", 10);
    CHECK(strstr(dblade_detect_signature(buf, sizeof(buf)), "swap"));
    memset(buf, 0, sizeof(buf));
    buf[40000] = 1;
    CHECK(strstr(dblade_detect_signature(buf, sizeof(buf)), "another program"));
    // a short buffer never reads past its end
    CHECK(dblade_detect_signature(buf, 100) == NULL);

    CHECK_EQ(dblade_crc32c("123456789", 9), 0xE3069283u); // the standard check value
    puts("test_header: ok");
    return 0;
}
