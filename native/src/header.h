// The ownership header of a raw KV device (header.c), and the signatures of what a device may hold.
#ifndef DUALBLADE_HEADER_H
#define DUALBLADE_HEADER_H

#include <stddef.h>
#include <stdint.h>

#define DBLADE_HEADER_BYTES       4096u
#define DBLADE_HEADER_VERSION     1u
#define DBLADE_DEVICE_DATA_OFFSET (1u << 20) // data starts 1 MiB in: header, then room to grow
#define DBLADE_SIGNATURE_SCAN     (68u * 1024u) // bytes to read for dblade_detect_signature

struct dblade_header {
    uint32_t version;
    uint8_t  uuid[16];
    uint64_t device_bytes;
    uint64_t data_offset;
    uint64_t data_bytes;
    uint32_t align;
    uint64_t geometry; // hash of the KV layout the data was written with
    uint64_t created;  // unix seconds
};

void dblade_header_encode(const struct dblade_header * h, uint8_t out[DBLADE_HEADER_BYTES]);
int  dblade_header_decode(const uint8_t in[DBLADE_HEADER_BYTES], struct dblade_header * h);
// what the first bytes of a device hold: a name, "data of another program", or NULL when blank
const char * dblade_detect_signature(const uint8_t * buf, size_t len);

#endif
