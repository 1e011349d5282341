// The ownership header of a raw KV device, and the signatures of what a device may already hold.
//
// A device is ours only if block 0 carries this header with a valid checksum. Anything else that
// is recognisably there (a file system, a partition table, swap, LUKS, LVM) or any non-zero data
// is somebody's, and is refused unless the user forces it.

#include "header.h"

#include "crc32c.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

static const char k_magic[16] = "DUALBLADE-KV-v1";

static void put_u32(uint8_t * p, uint32_t v) { memcpy(p, &v, 4); }
static void put_u64(uint8_t * p, uint64_t v) { memcpy(p, &v, 8); }
static uint32_t get_u32(const uint8_t * p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t get_u64(const uint8_t * p) { uint64_t v; memcpy(&v, p, 8); return v; }

// layout (little-endian, 4096 bytes):
//   0 magic[16]  16 version u32  20 header_bytes u32  24 uuid[16]  40 device_bytes u64
//  48 data_offset u64  56 data_bytes u64  64 align u32  68 reserved u32  72 geometry u64
//  80 created u64  ... zero ...  4092 crc32c of bytes [0, 4092)
void dblade_header_encode(const struct dblade_header * h, uint8_t out[DBLADE_HEADER_BYTES]) {
    memset(out, 0, DBLADE_HEADER_BYTES);
    memcpy(out, k_magic, 16);
    put_u32(out + 16, h->version);
    put_u32(out + 20, DBLADE_HEADER_BYTES);
    memcpy(out + 24, h->uuid, 16);
    put_u64(out + 40, h->device_bytes);
    put_u64(out + 48, h->data_offset);
    put_u64(out + 56, h->data_bytes);
    put_u32(out + 64, h->align);
    put_u64(out + 72, h->geometry);
    put_u64(out + 80, h->created);
    put_u32(out + DBLADE_HEADER_BYTES - 4, dblade_crc32c(out, DBLADE_HEADER_BYTES - 4));
}

int dblade_header_decode(const uint8_t in[DBLADE_HEADER_BYTES], struct dblade_header * h) {
    if (memcmp(in, k_magic, 16) != 0) {
        return -ENOENT; // not ours
    }
    if (get_u32(in + DBLADE_HEADER_BYTES - 4) != dblade_crc32c(in, DBLADE_HEADER_BYTES - 4)) {
        return -EBADMSG; // ours, damaged
    }
    h->version = get_u32(in + 16);
    if (h->version != DBLADE_HEADER_VERSION || get_u32(in + 20) != DBLADE_HEADER_BYTES) {
        return -EPROTO; // ours, another version
    }
    memcpy(h->uuid, in + 24, 16);
    h->device_bytes = get_u64(in + 40);
    h->data_offset  = get_u64(in + 48);
    h->data_bytes   = get_u64(in + 56);
    h->align        = get_u32(in + 64);
    h->geometry     = get_u64(in + 72);
    h->created      = get_u64(in + 80);
    // the data area inside the device, compared without a sum that could wrap
    if (h->data_offset < DBLADE_HEADER_BYTES || h->align == 0 || (h->align & (h->align - 1)) ||
        h->data_offset > h->device_bytes || h->data_bytes > h->device_bytes - h->data_offset) {
        return -EBADMSG;
    }
    return 0;
}

struct signature {
    const char * name;
    size_t       off;
    const char * bytes;
    size_t       len;
};

// what a device may already hold; offsets from the start of the device
static const struct signature k_signatures[] = {
    { "an ext2/3/4 file system", 1080, "\x53\xEF", 2 },
    { "an XFS file system", 0, "XFSB", 4 },
    { "a Btrfs file system", 65600, "_BHRfS_M", 8 },
    { "an F2FS file system", 1024, "\x10\x20\xF5\xF2", 4 },
    { "a SquashFS image", 0, "hsqs", 4 },
    { "an ISO 9660 image", 32769, "CD001", 5 },
    { "swap space", 4086, "SWAPSPACE2", 10 },
    { "swap space", 4086, "SWAP-SPACE", 10 },
    { "a LUKS encrypted volume", 0, "LUKS\xBA\xBE", 6 },
    { "an LVM2 physical volume", 536, "LVM2 001", 8 },
    { "a GPT partition table", 512, "EFI PART", 8 },
    { "a FAT file system", 82, "FAT32   ", 8 },
    { "a FAT file system", 54, "FAT1", 4 },
    { "an MBR partition table or boot sector", 510, "\x55\xAA", 2 },
};

const char * dblade_detect_signature(const uint8_t * buf, size_t len) {
    for (size_t i = 0; i < sizeof(k_signatures) / sizeof(k_signatures[0]); i++) {
        const struct signature * s = &k_signatures[i];
        if (s->off + s->len <= len && memcmp(buf + s->off, s->bytes, s->len) == 0) {
            return s->name;
        }
    }
    for (size_t i = 0; i < len; i++) {
        if (buf[i] != 0) {
            return "data of another program";
        }
    }
    return NULL; // blank
}
