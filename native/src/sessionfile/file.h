// An open session file as load.c reads it (format.h has the layout), for the parts of sessionfile/
// that read a commit: restore and verify (load.c) and a save that appends to it (save.c).
#ifndef DUALBLADE_SESSIONFILE_FILE_H
#define DUALBLADE_SESSIONFILE_FILE_H

#include "format.h"

#include <stdbool.h>
#include <stdint.h>

struct dblade_sessionfile {
    int               fd;  // O_RDONLY (O_RDWR when a save appends through it)
    int               dfd; // the same file, O_DIRECT (or fd where the file system has none)
    bool              own_fd; // fd is closed with the file
    char              path[512];
    struct sf_header  h;
    uint32_t          slot; // the header slot h came from
    uint64_t          dev, ino;
    uint8_t *         sec_data[SF_MAX_SECTIONS];
    struct sf_layer * layers; // n_layers entries (format 1's widened)
    uint32_t          n_layers;
    uint32_t *        sums; // every block's checksum as the commit has it (patches applied), by sums_at
    uint64_t          n_sums;
    struct sf_patch * patches;
    uint32_t          n_patches;
};

// reads and checks the commit of the session file open at fd (path names it in errors); takes fd
int dblade_sessionfile_read(int fd, const char * path, struct dblade_sessionfile ** out);
// where block b of layer l is in the file: home, or its patch
uint64_t dblade_sessionfile_block_at(const struct dblade_sessionfile * f, uint32_t l, uint64_t b);

// the KV matches commit gen of the file (dev, ino), lock held: the changed bits start over (dev and ino
// 0: matches nothing yet)
struct dblade_kv;
void dblade_sessionfile_matched(struct dblade_kv * kv, uint64_t dev, uint64_t ino, uint64_t gen, uint64_t lineage);

#endif
