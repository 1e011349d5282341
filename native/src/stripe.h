// The stripe map (stripe.c): one logical offset space laid over N members (files or devices) in stripes of one
// unit, in a repeating pattern where each member's share follows its bandwidth. Pure arithmetic: it opens,
// reads and writes nothing; the store fills it in and every path that moves bytes asks it where they are.
#ifndef DUALBLADE_STRIPE_H
#define DUALBLADE_STRIPE_H

#include <stdbool.h>
#include <stdint.h>

#define DBLADE_STRIPE_MEMBERS 8u  // members of one store at most
#define DBLADE_STRIPE_PATTERN 64u // stripes of one pattern at most
// the default unit: small enough that one layer's read (a few MiB) spans every member, as RAID's chunks are; a
// store of more than DBLADE_STRIPE_MAX stripes gets larger ones (the page-cache path maps one piece per stripe,
// and the kernel allows a process 65,530 mappings)
#define DBLADE_STRIPE_UNIT (512u << 10)
#define DBLADE_STRIPE_MAX  16384u

struct dblade_stripe {
    uint32_t n;                              // members; 1: the identity (no unit, no pattern)
    int      fd[DBLADE_STRIPE_MEMBERS];      // the member's file descriptor
    uint64_t base[DBLADE_STRIPE_MEMBERS];    // where the member's share starts in it (its data offset)
    uint64_t unit;                           // bytes of one stripe (n > 1)
    uint32_t n_pattern;                      // stripes of one pattern
    uint8_t  member[DBLADE_STRIPE_PATTERN];  // the member of each stripe of the pattern
    uint32_t rank[DBLADE_STRIPE_PATTERN];    // ... and its index among that member's stripes of the pattern
    uint32_t share[DBLADE_STRIPE_MEMBERS];   // stripes of each member per pattern
};

// one member holding everything at its own offsets (the single store)
void     dblade_stripe_single(struct dblade_stripe * s, int fd);
// n members with these shares of each pattern (each >= 1, their sum <= DBLADE_STRIPE_PATTERN), stripes of unit
// bytes; spread so that consecutive stripes go to different members wherever the shares allow. -EINVAL if not.
// One member: the identity. The caller fills in fd[] and base[] afterwards.
int      dblade_stripe_init(struct dblade_stripe * s, uint32_t n, const uint32_t * share, uint64_t unit);
// shares from measured bandwidths (bytes/s; 0: unknown): equal where they are within 15% of each other (a probe's
// noise must not unbalance equal drives), else proportional, the slowest getting at least one stripe
void     dblade_stripe_shares(uint32_t n, const double * bandwidth, uint32_t * share);
// where logical offset off lives: the member and its offset there; returns the bytes from off to the stripe's
// end (UINT64_MAX for the identity)
uint64_t dblade_stripe_at(const struct dblade_stripe * s, uint64_t off, uint32_t * member, uint64_t * phys);
// the piece of [off, off + left) that starts at off: its member and offset there; returns its length (at most left)
static inline uint64_t dblade_stripe_piece(const struct dblade_stripe * s, uint64_t off, uint64_t left, uint32_t * member,
                                           uint64_t * phys) {
    const uint64_t n = dblade_stripe_at(s, off, member, phys);
    return n < left ? n : left;
}
// the bytes member m must hold for logical offsets below end
uint64_t dblade_stripe_member_bytes(const struct dblade_stripe * s, uint32_t m, uint64_t end);

#endif
