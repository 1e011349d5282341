// Fault injection for the direct path's I/O, so that tests can prove what happens when storage
// fails: DUALBLADE_FAULT names transfers whose result is replaced.
//
//   DUALBLADE_FAULT=rule[,rule...]    rule = (read|write):N[+]:(eio|enospc|short)[@M]
//
// N counts the engine's transfers of that direction from 1 (each at most DBLADE_IO_CHUNK bytes);
// "N+" means the N-th and every later one. eio/enospc: the transfer reports that error. short:
// it reports half its bytes (whole blocks), and the retry of the rest finds the end of the store. @M: only
// transfers to member M (from 0) of a striped store fail, as when one of several drives does (N still
// counts every member's transfers).
// The transfer itself still happens: a write reported failed may have reached the store, as a
// real one may.
//
// It owns the rules and their counters; it calls nothing but the error text (base.c).

#include "fault.h"

#include "base.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

enum { FAULT_EIO = 1, FAULT_ENOSPC, FAULT_SHORT };

static int parse_rule(const char * s, size_t len, struct dblade_fault_rule * r) {
    char buf[64];
    if (len == 0 || len >= sizeof(buf)) {
        return -EINVAL;
    }
    memcpy(buf, s, len);
    buf[len]     = 0;
    char * dir   = buf;
    char * count = strchr(dir, ':');
    char * kind  = count ? strchr(count + 1, ':') : NULL;
    if (!count || !kind) {
        return -EINVAL;
    }
    *count++ = 0;
    *kind++  = 0;
    r->member = -1;
    char * at = strchr(kind, '@');
    if (at) {
        *at++            = 0;
        char *      mend = NULL;
        const long  m    = strtol(at, &mend, 10);
        if (mend == at || *mend || m < 0 || m > 255) {
            return -EINVAL;
        }
        r->member = (int) m;
    }
    if (!strcmp(dir, "read")) {
        r->write = 0;
    } else if (!strcmp(dir, "write")) {
        r->write = 1;
    } else {
        return -EINVAL;
    }
    char * end = NULL;
    errno      = 0;
    const unsigned long long n = strtoull(count, &end, 10);
    if (errno || end == count || n == 0 || (*end && strcmp(end, "+"))) {
        return -EINVAL;
    }
    r->n      = n;
    r->onward = *end == '+';
    if (!strcmp(kind, "eio")) {
        r->kind = FAULT_EIO;
    } else if (!strcmp(kind, "enospc")) {
        r->kind = FAULT_ENOSPC;
    } else if (!strcmp(kind, "short")) {
        r->kind = FAULT_SHORT;
    } else {
        return -EINVAL;
    }
    return 0;
}

int dblade_fault_init(struct dblade_fault * f, const char * spec) {
    memset(f, 0, sizeof(*f));
    atomic_init(&f->count[0], 0);
    atomic_init(&f->count[1], 0);
    atomic_init(&f->short_off, UINT64_MAX);
    if (!spec || !*spec) {
        return 0;
    }
    for (const char * p = spec; p;) {
        const char * comma = strchr(p, ',');
        const size_t len   = comma ? (size_t) (comma - p) : strlen(p);
        if (f->n_rules == DBLADE_FAULT_RULES || parse_rule(p, len, &f->rules[f->n_rules]) < 0) {
            dblade_set_error("DUALBLADE_FAULT=%s is not a fault list: use rules like read:3:eio, write:1+:enospc, "
                             "read:2:short or read:5+:eio@1 (member 1 only), separated by commas (at most %u)", spec, DBLADE_FAULT_RULES);
            f->n_rules = 0;
            return -EINVAL;
        }
        f->n_rules++;
        p = comma ? comma + 1 : NULL;
    }
    return 0;
}

int64_t dblade_fault_apply(struct dblade_fault * f, int write, uint32_t member, uint64_t off, uint64_t len,
                           int64_t res) {
    if (f->n_rules == 0) {
        return res;
    }
    uint64_t armed = off;
    if (atomic_compare_exchange_strong(&f->short_off, &armed, UINT64_MAX)) {
        return 0; // the rest of a short transfer: the store "ends" here
    }
    const uint64_t n = atomic_fetch_add(&f->count[write ? 1 : 0], 1) + 1;
    for (uint32_t i = 0; i < f->n_rules; i++) {
        const struct dblade_fault_rule * r = &f->rules[i];
        if (r->write != (write ? 1 : 0) || !(n == r->n || (r->onward && n > r->n)) ||
            (r->member >= 0 && (uint32_t) r->member != member)) {
            continue;
        }
        switch (r->kind) {
            case FAULT_EIO:    return -EIO;
            case FAULT_ENOSPC: return -ENOSPC;
            default: {
                const uint64_t half = dblade_align_down(len / 2, DBLADE_BLOCK);
                if (res <= 0 || half == 0) {
                    return write ? -ENOSPC : -EIO;
                }
                atomic_store(&f->short_off, off + half);
                return (int64_t) half;
            }
        }
    }
    return res;
}
