// Runs the libFuzzer target without libFuzzer (gcc has none): each corpus file once, then -runs=N
// inputs from a small deterministic mutator. The flags are libFuzzer's, so one command line suits
// both builds:
//
//   fuzz_header [-runs=N] [-seed=S] [-max_len=N] CORPUS_DIR_OR_FILE...
//
// -runs defaults to $DUALBLADE_FUZZ_RUNS, else 0 (the corpus only). No coverage feedback: the mutator
// knows the header's fields and the values on the edges of their checks instead (the target
// re-seals the CRC itself). The input a run dies on is written to ./crash-<run>.

#define _DEFAULT_SOURCE // scandir, clock_gettime
#include "../src/header.h"

#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size);

// set by whichever sanitizer runtime is linked: called on its report, before it exits
void __sanitizer_set_death_callback(void (*cb)(void)) __attribute__((weak));

#define MAX_LEN  (DBLADE_SIGNATURE_SCAN + 4096) // past the farthest signature: the default -max_len
#define MAX_POOL 1024

struct input {
    uint8_t * data;
    size_t    len;
};

static struct input pool[MAX_POOL];
static size_t       n_pool;
static size_t       max_len = MAX_LEN; // of a mutated input

static uint64_t rng;
static uint64_t rnd(void) { // splitmix64: same seed, same inputs
    uint64_t z = (rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static size_t below(size_t n) { return n ? (size_t) (rnd() % n) : 0; }

// the input in flight, saved if the process dies on it
static const uint8_t * cur;
static size_t          cur_len;
static unsigned long   cur_run;

static void dump(void) {
    char   name[64];
    snprintf(name, sizeof(name), "crash-%lu", cur_run);
    FILE * f = fopen(name, "wb");
    if (f) {
        fwrite(cur, 1, cur_len, f);
        fclose(f);
        fprintf(stderr, "fuzz_header: the failing input (run %lu) is in ./%s\n", cur_run, name);
    }
}

static void on_signal(int sig) {
    dump();
    signal(sig, SIG_DFL);
    raise(sig);
}

// runs one input from a buffer of exactly its size, so that ASan sees any read past its end
static void run(const uint8_t * data, size_t len) {
    uint8_t * copy = malloc(len ? len : 1);
    memcpy(copy, data, len);
    cur = copy, cur_len = len;
    LLVMFuzzerTestOneInput(copy, len);
    free(copy);
    cur_run++;
}

static void add_to_pool(const uint8_t * data, size_t len) {
    if (n_pool == MAX_POOL) {
        return;
    }
    len = len < max_len ? len : max_len;
    pool[n_pool].data = malloc(len ? len : 1);
    memcpy(pool[n_pool].data, data, len);
    pool[n_pool++].len = len;
}

static int load_file(const char * path) {
    FILE * f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "fuzz_header: cannot read %s: %s\n", path, strerror(errno));
        return -1;
    }
    size_t    cap = 1 << 16, len = 0, got;
    uint8_t * buf = malloc(cap);
    while ((got = fread(buf + len, 1, cap - len, f)) > 0) {
        len += got;
        if (len == cap) {
            buf = realloc(buf, cap *= 2);
        }
    }
    fclose(f);
    run(buf, len);
    add_to_pool(buf, len);
    free(buf);
    return 0;
}

static int visible(const struct dirent * e) { return e->d_name[0] != '.'; }

// a directory: its files in name order (sub-directories are skipped); anything else: that file
static int load_corpus(const char * path) {
    struct stat st;
    if (stat(path, &st) != 0) {
        fprintf(stderr, "fuzz_header: corpus %s: %s\n", path, strerror(errno));
        return -1;
    }
    if (!S_ISDIR(st.st_mode)) {
        return load_file(path);
    }
    struct dirent ** names;
    const int        n = scandir(path, &names, visible, alphasort);
    if (n < 0) {
        fprintf(stderr, "fuzz_header: corpus %s: %s\n", path, strerror(errno));
        return -1;
    }
    int rc = 0;
    for (int i = 0; i < n; i++) {
        char file[4096];
        snprintf(file, sizeof(file), "%s/%s", path, names[i]->d_name);
        if (rc == 0 && stat(file, &st) == 0 && S_ISREG(st.st_mode)) {
            rc = load_file(file);
        }
        free(names[i]);
    }
    free(names);
    return rc;
}

// the header's fields (offset, width) and values that sit on the edges of its checks
static const struct {
    uint16_t off, width;
} k_fields[] = { { 16, 4 }, { 20, 4 }, { 40, 8 }, { 48, 8 }, { 56, 8 }, { 64, 4 }, { 68, 4 }, { 72, 8 }, { 80, 8 } };
static const uint64_t k_edges[] = { 0, 1, 2, 3, 4095, 4096, 4097, 1u << 20, (1u << 20) + 1, 1ull << 31, 1ull << 32,
                                    (1ull << 32) - 1, 1ull << 63, UINT64_MAX, UINT64_MAX - 4095,
                                    UINT64_MAX - (1u << 20) + 1, UINT64_MAX / 2 };

static void put(uint8_t * p, int width, uint64_t v) { memcpy(p, &v, width); } // little-endian hosts
static uint64_t get(const uint8_t * p, int width) { uint64_t v = 0; memcpy(&v, p, width); return v; }

static void mutate(uint8_t * buf, size_t * len) {
    for (int n = 1 + (int) below(4); n > 0; n--) {
        const int op = (int) below(8);
        if (op >= 2 && op <= 4 && *len < DBLADE_HEADER_BYTES) { // field edits need the whole block
            memset(buf + *len, 0, DBLADE_HEADER_BYTES - *len);
            *len = DBLADE_HEADER_BYTES;
        }
        const size_t f = below(sizeof(k_fields) / sizeof(k_fields[0]));
        uint8_t *    p = buf + k_fields[f].off;
        const int    w = k_fields[f].width;
        switch (op) {
            case 0: if (*len) buf[below(*len)] ^= (uint8_t) (1u << below(8)); break;
            case 1: if (*len) buf[below(*len)] = (uint8_t) rnd(); break;
            case 2: put(p, w, k_edges[below(sizeof(k_edges) / sizeof(k_edges[0]))]); break;
            case 3: put(p, w, get(p, w) + below(33) - 16); break;
            case 4: put(p, w, get(buf + k_fields[below(sizeof(k_fields) / sizeof(k_fields[0]))].off, w)); break;
            case 5: { // splice: a piece of another input, at the same place or anywhere
                const struct input * o = &pool[below(n_pool)];
                if (o->len && *len) {
                    const size_t from = below(o->len), to = below(2) ? from : below(*len);
                    size_t       k    = 1 + below(o->len - from);
                    k                 = k < max_len - to ? k : max_len - to;
                    memcpy(buf + to, o->data + from, k);
                    *len = to + k > *len ? to + k : *len;
                }
                break;
            }
            case 6: { // new length: short, one block, or up to past the last signature; grows with zeros
                const size_t nl = below(4) == 0 ? below(max_len + 1) : below(2) ? DBLADE_HEADER_BYTES : below(128);
                if (nl > *len) {
                    memset(buf + *len, 0, nl - *len);
                }
                *len = nl;
                break;
            }
            case 7: { // a run of one byte value
                if (*len) {
                    const size_t at = below(*len), k = 1 + below(*len - at < 64 ? *len - at : 64);
                    memset(buf + at, below(2) ? 0 : (int) rnd(), k);
                }
                break;
            }
        }
    }
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double) ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char ** argv) {
    const char *  env  = getenv("DUALBLADE_FUZZ_RUNS");
    unsigned long runs = env ? strtoul(env, NULL, 10) : 0, seed = 1;
    for (int i = 1; i < argc; i++) {
        if (argv[i][0] != '-') {
            continue;
        }
        char * end = NULL;
        if (strncmp(argv[i], "-runs=", 6) == 0) {
            runs = strtoul(argv[i] + 6, &end, 10);
        } else if (strncmp(argv[i], "-seed=", 6) == 0) {
            seed = strtoul(argv[i] + 6, &end, 10);
        } else if (strncmp(argv[i], "-max_len=", 9) == 0) {
            max_len = strtoul(argv[i] + 9, &end, 10);
            end = max_len >= DBLADE_HEADER_BYTES && max_len <= MAX_LEN ? end : NULL;
        }
        if (!end || *end) {
            fprintf(stderr, "fuzz_header: unknown or bad flag %s (this driver has -runs=N, -seed=S and -max_len=N, "
                            "4096..%u)\n", argv[i], MAX_LEN);
            return 2;
        }
    }
    if (__sanitizer_set_death_callback) {
        __sanitizer_set_death_callback(dump); // and the sanitizer keeps its own fault handlers
    } else {
        signal(SIGSEGV, on_signal);
        signal(SIGBUS, on_signal);
        signal(SIGFPE, on_signal);
    }
    signal(SIGABRT, on_signal); // a broken invariant

    const double t0 = now();
    for (int i = 1; i < argc; i++) {
        if (argv[i][0] != '-' && load_corpus(argv[i]) != 0) {
            return 1;
        }
    }
    const unsigned long n_corpus = cur_run;

    // seeds of our own, so that an empty corpus still starts from a valid header
    struct dblade_header h = { .version = DBLADE_HEADER_VERSION, .device_bytes = 1ull << 30,
                               .data_offset = DBLADE_DEVICE_DATA_OFFSET, .data_bytes = 256u << 20,
                               .align = 4096, .geometry = 0x1234567890abcdefull, .created = 1700000000 };
    static uint8_t blk[MAX_LEN];
    dblade_header_encode(&h, blk);
    add_to_pool(blk, DBLADE_HEADER_BYTES);
    memset(blk, 0, sizeof(blk));
    add_to_pool(blk, DBLADE_HEADER_BYTES);

    rng = seed;
    size_t len = 0;
    for (unsigned long r = 0; r < runs; r++) {
        if (r == 0 || below(4)) { // mostly a fresh pool entry; else mutate the last input further
            const struct input * in = &pool[below(n_pool)];
            memcpy(blk, in->data, in->len);
            len = in->len;
        }
        mutate(blk, &len);
        run(blk, len);
    }
    fprintf(stderr, "fuzz_header: ran %lu corpus inputs and %lu mutated inputs in %.2f s (seed %lu)\n", n_corpus,
            runs, now() - t0, seed);
    return 0;
}
