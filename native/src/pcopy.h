// Copies in parallel (pcopy.c): a few threads share a large memcpy, chunk by chunk, with the caller. One
// thread copies from the page cache at about 10 GB/s; the VRAM tier's reads of page-cache layers need several.
#ifndef DUALBLADE_PCOPY_H
#define DUALBLADE_PCOPY_H

#include <stdint.h>

struct dblade_pcopy;

// n_threads helpers (0: the caller copies alone); -errno
int  dblade_pcopy_open(struct dblade_pcopy ** out, uint32_t n_threads);
void dblade_pcopy_close(struct dblade_pcopy * p);
// len bytes from src to dst, the helpers and the caller together; returns when every byte is there. One copy at
// a time (callers serialize on the pool's lock).
void dblade_pcopy_run(struct dblade_pcopy * p, void * dst, const void * src, uint64_t len);

#endif
