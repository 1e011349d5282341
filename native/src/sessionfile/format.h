// Session files (sessionfile/): a context's KV and metadata in one file, saved atomically (save.c),
// loaded by any number of processes without changing it (load.c).
//
// Layout (format 1, little-endian as the host):
//   0        header, 4 KiB: magic, version, flags, sizes, the section table, CRC-32C of the rest
//   1 MiB    KV extents, one per K/V tensor of every layer, each on a 4 KiB boundary: the tensor's
//            rows [0, saved) as they are in memory (pinned layers) or in the store (offloaded ones)
//   ...      sections, each with its CRC-32C in the header: LAYERS (where each tensor is), SUMS (a
//            CRC-32C per 4 KiB block of every extent), then the embedding program's (llama.cpp's
//            metadata-only state, tokens, context description)
#ifndef DUALBLADE_SESSIONFILE_FORMAT_H
#define DUALBLADE_SESSIONFILE_FORMAT_H

#include "../header.h"

#include <stdint.h>

#define SF_MAGIC        "DUALBLADE-SES-v1"
#define SF_VERSION      1u
#define SF_KV_OFFSET    (1u << 20)
#define SF_MAX_SECTIONS 32u
#define SF_CRC_AT       (DBLADE_HEADER_BYTES - 4u)

enum { SEC_LAYERS = 1, SEC_SUMS = 2 }; // the module's own; the embedding program's are >= 16

struct sf_section {
    uint32_t kind, crc;
    uint64_t off, bytes;
};

struct sf_header {
    char              magic[16];
    uint32_t          version, header_bytes, flags, n_sections;
    uint64_t          file_bytes, created, kv_offset, kv_bytes;
    struct sf_section sections[SF_MAX_SECTIONS];
};

_Static_assert(sizeof(struct sf_header) <= SF_CRC_AT, "the session header fits its block");

// one K or V tensor in the file
struct sf_layer {
    char     name[8]; // the cache's name tag ("" or "swa_")
    int32_t  il;
    uint32_t which;
    uint32_t type;
    uint32_t v_trans;
    uint64_t row_bytes;
    uint64_t bytes;     // the whole tensor
    uint64_t used;      // rows written ([0, used) bytes): the loader's high-water mark
    uint64_t saved;     // bytes in the file: used up to a whole block
    uint64_t file_off;
    uint64_t sums_at;   // its first block's index in SUMS
};

#endif
