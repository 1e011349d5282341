// The clock and the calling thread's error text: the two services every file of the module uses.

#define _GNU_SOURCE
#include "base.h"

#include "dualblade.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static _Thread_local char tls_error[512];

void dblade_set_error(const char * fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(tls_error, sizeof(tls_error), fmt, ap);
    va_end(ap);
}

const char * dblade_get_error(void) {
    return tls_error;
}

const char * dblade_last_error(void) {
    return tls_error;
}

uint64_t dblade_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t) ts.tv_sec * 1000000000ull + (uint64_t) ts.tv_nsec;
}

bool dblade_env_off(const char * name) {
    const char * e = getenv(name);
    return e && !strcmp(e, "0");
}
