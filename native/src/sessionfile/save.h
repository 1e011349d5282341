// One save of a session file in progress (save.c), shared by its parts: a save written whole into a new
// file (save.c), one appended to the commit the KV last matched (append.c), and what both write (commit.c).
#ifndef DUALBLADE_SESSIONFILE_SAVE_H
#define DUALBLADE_SESSIONFILE_SAVE_H

#include "../fault.h"
#include "file.h"

#include "dualblade.h"

#include <stdbool.h>
#include <stdint.h>

struct dblade_kv;
struct dblade_tensor;

struct save {
    struct dblade_kv *              kv;
    const char *                    path;
    char                            dir[512];
    const char *                    name; // in dir
    bool                            in_dir; // path names a directory part
    int                             dirfd, fd;
    char                            tmpname[600]; // the temporary name, while it exists
    struct dblade_fault             fault_rules;
    struct dblade_fault *           fault;
    struct sf_header                h;
    struct sf_layer *               layers;
    uint32_t                        n_layers;
    uint32_t *                      sums;   // every home block's checksum slot, as this commit has them
    uint64_t                        n_sums; // slots (the tensors' capacities)
    struct sf_patch *               patches;
    uint32_t                        n_patches, cap_patches;
    struct dblade_section           secs[SF_MAX_SECTIONS]; // in the tail, in the header's order
    uint32_t                        n_secs;
    const struct dblade_section *   in; // the caller's sections
    uint32_t                        n_in;
    int                             how;   // DBLADE_COPY_*
    uint64_t                        moved; // KV bytes the copy engine moved from the store
    struct dblade_sessionfile_stats st;
    // an append: the commit it follows (its fd is the file written), else NULL
    struct dblade_sessionfile *     old;
    char                            why_whole[96];
};

// a tensor's entry as this save takes it: its rows [0, used), saved up to a whole block (lock held)
void sf_plan_layer(const struct dblade_tensor * t, struct sf_layer * l);
// blocks [b0, b0 + n) of the tensor to file offset at, their checksums into out (lock held)
int  sf_put_blocks(struct save * sv, const struct dblade_tensor * t, uint64_t b0, uint64_t n, uint64_t at,
                   uint32_t * out);
// the checksum slots of blocks [b0, b1) of layer li, at home
int  sf_put_sums(struct save * sv, uint32_t li, uint64_t b0, uint64_t b1);
// sections from the tail's offset at: LAYERS, PATCHES and the caller's without a home (secs), each
// with its checksum in the header; returns the tail's end
int  sf_put_tail(struct save * sv, uint64_t at, uint64_t * end);
// the header into slot, durable after everything before it
int  sf_commit(struct save * sv, uint32_t slot);
// a section's home copy written from data at its offset (all, or from `from`)
int  sf_put(struct save * sv, const void * data, uint64_t bytes, uint64_t off);

// DUALBLADE_TEST_PAUSE=save:<phase>: the saver stops itself there (SIGSTOP), for crash tests
void sf_test_pause(const char * phase);

// append.c: 0 appended and committed; 1 not appendable (sv->why_whole says why; nothing written, sv as it
// was); < 0 failed (the last commit still whole)
int  sf_append(struct save * sv);
// the tail bytes (patches not counted) LAYERS, PATCHES and these sections take
uint64_t sf_tail_meta_bytes(const struct save * sv);

#endif
