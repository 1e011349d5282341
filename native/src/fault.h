// Fault injection for tests (fault.c): DUALBLADE_FAULT names transfers whose result is replaced.
#ifndef DUALBLADE_FAULT_H
#define DUALBLADE_FAULT_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#define DBLADE_FAULT_RULES 8u

struct dblade_fault_rule {
    int      write;
    int      kind;
    uint64_t n;      // the n-th transfer of its direction, from 1
    bool     onward; // and every later one
    int      member; // only transfers to this member of a striped store (-1: any)
};

struct dblade_fault {
    uint32_t                 n_rules;
    struct dblade_fault_rule rules[DBLADE_FAULT_RULES];
    _Atomic uint64_t         count[2];  // transfers so far: reads, writes
    _Atomic uint64_t         short_off; // the rest of a short transfer ends the store here
};

// parses a fault list (NULL or "": none); -EINVAL with dblade_get_error() set
int     dblade_fault_init(struct dblade_fault * f, const char * spec);
// a transfer of len bytes at off completed with res (bytes, or -errno): what it reports instead
// (member: which member of a striped store; 0 for a single store)
int64_t dblade_fault_apply(struct dblade_fault * f, int write, uint32_t member, uint64_t off, uint64_t len,
                           int64_t res);

#endif
