// What every file of the module may use: block and page sizes, alignment, the clock, the calling
// thread's error text, and the environment's off switches. It calls nothing of the module.
#ifndef DUALBLADE_BASE_H
#define DUALBLADE_BASE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define DBLADE_BLOCK     4096u      // every extent, offset and length is a multiple of this
#define DBLADE_HUGE_PAGE (2u << 20) // a transparent huge page (x86-64, arm64 with 4 KiB pages)

static inline uint64_t dblade_align_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }
static inline uint64_t dblade_align_down(uint64_t x, uint64_t a) { return x / a * a; }

// CLOCK_MONOTONIC in nanoseconds
uint64_t dblade_now_ns(void);

// Whether the environment variable is set to "0" (a switch for bisections, read once by each caller)
bool dblade_env_off(const char * name);

// The last failure of this thread, in words (functions return -errno; this says why).
void         dblade_set_error(const char * fmt, ...) __attribute__((format(printf, 1, 2)));
const char * dblade_get_error(void);

#endif
