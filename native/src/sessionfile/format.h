// Session files (sessionfile/): a context's KV and metadata in one file, saved whole and atomically or
// grown by appending (save.c), loaded by any number of processes without changing it (load.c).
//
// Format 2 (little-endian as the host) is a sequence of commits in one file:
//   0, 4 KiB  two header slots: magic, version, generation, the section table, CRC-32C of the rest.
//             The valid slot with the higher generation is the file's content; a save commits by
//             writing the other slot, after everything it names is durable.
//   1 MiB     home: every K/V tensor's extent at its full size (rows [0, saved) as in memory or in the
//             store; the rest a hole), then every extent's block checksums (a CRC-32C per 4 KiB), then
//             the growable sections (those saved with room: the token history).
//   tail      what one commit wrote elsewhere: blocks it changed that the commit before named at home
//             (a patch each), then its sections (LAYERS, PATCHES, the embedding program's).
// Only bytes no valid commit names are ever overwritten: rows appended go home beyond the last commit's,
// a changed block it still names goes to the tail (and home at the next save), so a crash at any
// instant leaves the last commit whole. Format 1 (one header, the extents back to back, SUMS a
// section) is still read; a save to it writes format 2.
#ifndef DUALBLADE_SESSIONFILE_FORMAT_H
#define DUALBLADE_SESSIONFILE_FORMAT_H

#include "../header.h"

#include <stddef.h>
#include <stdint.h>

#define SF_MAGIC        "DUALBLADE-SES-v1"
#define SF_VERSION      2u
#define SF_SLOTS        2u // header slots (format 2), at 0 and DBLADE_HEADER_BYTES
#define SF_KV_OFFSET    (1u << 20)
#define SF_MAX_SECTIONS 32u
#define SF_CRC_AT       (DBLADE_HEADER_BYTES - 4u)

enum { SEC_LAYERS = 1, SEC_SUMS = 2, SEC_PATCHES = 3 }; // the module's own; the embedding program's are >= 16

struct sf_section {
    uint32_t kind, crc;
    uint64_t off, bytes;
};

// format 2: a growable section's home (kind 0: unused)
struct sf_room {
    uint32_t kind, pad;
    uint64_t off, bytes;
};

#define SF_MAX_ROOMS 8u

struct sf_header {
    char              magic[16];
    uint32_t          version, header_bytes, flags, n_sections;
    uint64_t          file_bytes, created, kv_offset, kv_bytes;
    struct sf_section sections[SF_MAX_SECTIONS];
    // format 2. SUMS names the home checksums (its crc unused: each layer checks its own); a section
    // saved with room has a home of that many bytes to grow into (it is there when its offset is)
    uint64_t          gen, lineage;    // commits since the file was written whole; that save's random id
    uint64_t          home_end;        // where the tails may start
    uint64_t          tail_off, tail_bytes; // what this commit wrote outside home
    struct sf_room    rooms[SF_MAX_ROOMS];
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
    // format 2
    uint64_t capacity;  // bytes of home at file_off (the extent's whole size)
    uint32_t sums_crc;  // CRC-32C of its blocks' checksums as this commit has them (patches applied)
    uint32_t n_patches; // its blocks in PATCHES
};

#define SF_LAYER_V1_BYTES 72u // a format 1 LAYERS entry (the fields above "format 2")
_Static_assert(offsetof(struct sf_layer, capacity) == SF_LAYER_V1_BYTES, "format 1 entries are a prefix");

// format 2: a block of a tensor that this commit holds in the tail, not at home
struct sf_patch {
    uint32_t layer; // index in LAYERS
    uint32_t sum;
    uint64_t block; // index in the tensor
    uint64_t file_off;
};

#endif
