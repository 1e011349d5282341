// The stripe map: logical offset -> (member, offset there). A logical stripe k = off / unit falls in pattern
// p = k / n_pattern at position j = (k + rot(p)) % n_pattern; the member of position j holds share[m] stripes of
// every pattern, so its stripe is p * share[m] + rank[j], placed consecutively after its base. Reading a range in
// logical order therefore visits every member once per pattern: one layer's read keeps them all busy.
//
// rot(p) turns each pattern by a pseudo-random amount (still a bijection within it): the KV's tensors start on
// huge-page boundaries and are often a whole number of patterns long, so without it every tensor would begin on
// the same member, and the first rows of every layer (a short conversation's whole KV) would be read from it alone.
//
// It owns only this arithmetic; the store (store.c) fills the map, the engine and the paths ask it.
#include "stripe.h"

#include <errno.h>
#include <string.h>

void dblade_stripe_single(struct dblade_stripe * s, int fd) {
    memset(s, 0, sizeof(*s));
    s->n         = 1;
    s->fd[0]     = fd;
    s->n_pattern = 1;
    s->share[0]  = 1;
}

int dblade_stripe_init(struct dblade_stripe * s, uint32_t n, const uint32_t * share, uint64_t unit) {
    uint32_t total = 0;
    if (n == 0 || n > DBLADE_STRIPE_MEMBERS || unit == 0) {
        return -EINVAL;
    }
    for (uint32_t m = 0; m < n; m++) {
        if (share[m] == 0) {
            return -EINVAL;
        }
        total += share[m];
    }
    if (total > DBLADE_STRIPE_PATTERN) {
        return -EINVAL;
    }
    memset(s, 0, sizeof(*s));
    s->n         = n;
    s->unit      = unit;
    s->n_pattern = total;
    // smooth weighted round robin (as nginx balances upstreams): each position goes to the member furthest
    // behind its share, so a member's stripes are spread evenly over the pattern
    int64_t credit[DBLADE_STRIPE_MEMBERS] = { 0 };
    for (uint32_t j = 0; j < total; j++) {
        uint32_t best = 0;
        for (uint32_t m = 0; m < n; m++) {
            credit[m] += share[m];
            if (credit[m] > credit[best]) {
                best = m;
            }
        }
        credit[best] -= total;
        s->member[j] = (uint8_t) best;
        s->rank[j]   = s->share[best]++;
    }
    return 0;
}

void dblade_stripe_shares(uint32_t n, const double * bandwidth, uint32_t * share) {
    double lo = 0, hi = 0;
    for (uint32_t m = 0; m < n; m++) {
        const double b = bandwidth[m];
        lo = m == 0 || b < lo ? b : lo;
        hi = b > hi ? b : hi;
    }
    if (lo <= 0 || lo >= 0.85 * hi) {
        for (uint32_t m = 0; m < n; m++) {
            share[m] = 1;
        }
        return;
    }
    // eighths of the fastest: 8 members at 8 each still fit one pattern
    for (uint32_t m = 0; m < n; m++) {
        const uint32_t s = (uint32_t) (bandwidth[m] / hi * 8.0 + 0.5);
        share[m]         = s ? s : 1;
    }
}

uint64_t dblade_stripe_at(const struct dblade_stripe * s, uint64_t off, uint32_t * member, uint64_t * phys) {
    if (s->n == 1) {
        *member = 0;
        *phys   = s->base[0] + off;
        return UINT64_MAX;
    }
    const uint64_t k = off / s->unit, within = off % s->unit, p = k / s->n_pattern;
    const uint32_t rot = (uint32_t) (((p + 1) * 0x9E3779B97F4A7C15ull) >> 40) % s->n_pattern; // Fibonacci hashing
    const uint32_t j   = (uint32_t) ((k % s->n_pattern + rot) % s->n_pattern);
    const uint32_t m = s->member[j];
    *member          = m;
    *phys            = s->base[m] + (p * s->share[m] + s->rank[j]) * s->unit + within;
    return s->unit - within;
}

uint64_t dblade_stripe_member_bytes(const struct dblade_stripe * s, uint32_t m, uint64_t end) {
    if (s->n == 1) {
        return end;
    }
    const uint64_t stripes  = (end + s->unit - 1) / s->unit;
    const uint64_t patterns = (stripes + s->n_pattern - 1) / s->n_pattern;
    return patterns * s->share[m] * s->unit;
}
