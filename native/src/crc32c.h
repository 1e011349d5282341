// CRC-32C (Castagnoli), the checksum of every block the module writes to a store or a session file.
#ifndef DUALBLADE_CRC32C_H
#define DUALBLADE_CRC32C_H

#include <stddef.h>
#include <stdint.h>

uint32_t dblade_crc32c(const void * data, size_t len);
// the CRC of each DBLADE_BLOCK-sized block of data
void     dblade_crc32c_blocks(const void * data, size_t n_blocks, uint32_t * out);
// which implementation runs: "vpclmul", "sse42" or "soft" (DUALBLADE_CRC picks a slower one)
const char * dblade_crc32c_impl(void);

// A block's recorded sum: its CRC, never 0, which means "not known" (never checked).
static inline uint32_t dblade_block_sum(uint32_t crc) {
    return crc ? crc : 1;
}

#endif
