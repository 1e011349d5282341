// The KV striped over several members: the map's arithmetic against a reference, a striped store of three
// files whose bytes land where the map says (engine, mapping, session copy), a failing member, refusals.
#define _GNU_SOURCE
#include "../src/base.h"
#include "../src/engine.h"
#include "../src/io.h"
#include "../src/sessionfile/copy.h"
#include "../src/store.h"
#include "../src/stripe.h"
#include "check.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

// every logical stripe below end maps to a distinct stripe of its member, the members' stripes are dense from
// their base, each pattern gives member m share[m] stripes, and equal shares never put two neighbours together
static void check_map(uint32_t n, const uint32_t * share, uint64_t unit, uint64_t end) {
    struct dblade_stripe s;
    CHECK_EQ(dblade_stripe_init(&s, n, share, unit), 0);
    for (uint32_t m = 0; m < n; m++) {
        s.base[m] = (m + 1) * 1000 * unit;
    }
    const uint64_t stripes = end / unit;
    uint8_t *      seen[DBLADE_STRIPE_MEMBERS];
    for (uint32_t m = 0; m < n; m++) {
        seen[m] = calloc(dblade_stripe_member_bytes(&s, m, end) / unit + 1, 1);
    }
    uint32_t per[DBLADE_STRIPE_MEMBERS] = { 0 };
    uint32_t last                       = UINT32_MAX;
    bool     equal                      = true;
    for (uint32_t m = 1; m < n; m++) {
        equal &= share[m] == share[0];
    }
    for (uint64_t k = 0; k < stripes; k++) {
        uint32_t m, m2;
        uint64_t phys, phys2;
        CHECK_EQ(dblade_stripe_at(&s, k * unit, &m, &phys), unit);
        CHECK_EQ(dblade_stripe_at(&s, k * unit + unit - 4096, &m2, &phys2), 4096); // inside: same stripe
        CHECK(m2 == m && phys2 == phys + unit - 4096);
        CHECK(m < n && phys >= s.base[m] && (phys - s.base[m]) % unit == 0);
        const uint64_t i = (phys - s.base[m]) / unit;
        CHECK(i * unit < dblade_stripe_member_bytes(&s, m, end));
        CHECK(!seen[m][i]);
        seen[m][i] = 1;
        per[m]++;
        if (equal && n > 1 && k % s.n_pattern != 0) {
            CHECK(m != last); // within a pattern (each pattern is turned: its first may meet the last's member)
        }
        last = m;
        if ((k + 1) % s.n_pattern == 0) {
            for (uint32_t j = 0; j < n; j++) {
                CHECK_EQ(per[j], share[j] * ((k + 1) / s.n_pattern));
            }
        }
    }
    for (uint32_t m = 0; m < n; m++) {
        for (uint64_t i = 0; i < share[m] * (stripes / s.n_pattern); i++) {
            CHECK(seen[m][i]); // dense over whole patterns: no member skips a stripe of its own
        }
        free(seen[m]);
    }
}

static void test_map(void) {
    const uint32_t one[1] = { 1 }, two[2] = { 1, 1 }, uneven[3] = { 2, 5, 1 }, four[4] = { 1, 1, 1, 1 };
    check_map(2, two, 65536, 64 << 20);
    check_map(3, uneven, 4096, 16 << 20);
    check_map(4, four, 2 << 20, 1ull << 30);
    srand(7);
    for (int r = 0; r < 200; r++) {
        uint32_t n = 2 + (uint32_t) rand() % (DBLADE_STRIPE_MEMBERS - 1), sh[DBLADE_STRIPE_MEMBERS];
        for (uint32_t m = 0; m < n; m++) {
            sh[m] = 1 + (uint32_t) rand() % 8;
        }
        check_map(n, sh, 4096u << (rand() % 6), (uint64_t) (1 + rand() % 300) * 65536);
    }
    // tensors on huge-page boundaries, each a whole number of patterns long (the KV's layout): their first stripes
    // fall on every member, not all on one
    {
        struct dblade_stripe t;
        CHECK_EQ(dblade_stripe_init(&t, 4, four, 512 << 10), 0);
        uint32_t first[4] = { 0 };
        for (uint64_t i = 0; i < 64; i++) {
            uint32_t m;
            uint64_t phys;
            dblade_stripe_at(&t, i * (8 << 20), &m, &phys);
            first[m]++;
        }
        for (int m = 0; m < 4; m++) {
            CHECK(first[m] >= 8); // 16 expected of each
        }
    }
    // the identity
    struct dblade_stripe s;
    dblade_stripe_single(&s, 5);
    uint32_t m;
    uint64_t phys;
    CHECK(dblade_stripe_at(&s, 12345 * 4096, &m, &phys) == UINT64_MAX && m == 0 && phys == 12345 * 4096);
    CHECK_EQ(dblade_stripe_init(&s, 1, one, 65536), 0); // one member: the identity, whatever the unit
    CHECK(dblade_stripe_at(&s, 3 * 65536 + 4096, &m, &phys) == UINT64_MAX && phys == 3 * 65536 + 4096);
    // refusals
    const uint32_t zero[2] = { 1, 0 }, big[2] = { 40, 40 };
    CHECK_EQ(dblade_stripe_init(&s, 2, zero, 4096), -EINVAL);
    CHECK_EQ(dblade_stripe_init(&s, 2, big, 4096), -EINVAL);
    CHECK_EQ(dblade_stripe_init(&s, 9, four, 4096), -EINVAL);
    // shares from bandwidths: equal within 15%, else eighths of the fastest
    uint32_t     sh[3];
    const double close_bw[3] = { 1000, 900, 950 }, far_bw[3] = { 1000, 500, 100 }, unknown[3] = { 1000, 0, 500 };
    dblade_stripe_shares(3, close_bw, sh);
    CHECK(sh[0] == 1 && sh[1] == 1 && sh[2] == 1);
    dblade_stripe_shares(3, far_bw, sh);
    CHECK(sh[0] == 8 && sh[1] == 4 && sh[2] == 1);
    dblade_stripe_shares(3, unknown, sh);
    CHECK(sh[0] == 1 && sh[1] == 1 && sh[2] == 1);
}

static void fill(uint8_t * p, uint64_t n, uint32_t seed) {
    for (uint64_t i = 0; i < n; i++) {
        p[i] = (uint8_t) ((i * 2654435761u + seed) >> 7);
    }
}

// every byte of [off, off + len) read back from its member, at the place the map gives
static void check_on_members(const struct dblade_store * st, const uint8_t * want, uint64_t off, uint64_t len) {
    uint8_t * piece = NULL;
    CHECK(posix_memalign((void **) &piece, 4096, 1 << 20) == 0);
    for (uint64_t done = 0; done < len;) {
        uint32_t m;
        uint64_t phys;
        uint64_t n = dblade_stripe_at(&st->map, off + done, &m, &phys);
        n          = n < len - done ? n : len - done;
        n          = n < (1 << 20) ? n : (1 << 20);
        CHECK_EQ(dblade_io_read(st->members[m].fd, piece, n, phys), 0);
        CHECK(memcmp(piece, want + done, n) == 0);
        done += n;
    }
    free(piece);
}

static void test_store(const char * root) {
    char dirs[3][512], list[1600];
    for (int i = 0; i < 3; i++) {
        snprintf(dirs[i], sizeof(dirs[i]), "%s/m%d", root, i);
        CHECK(mkdir(dirs[i], 0700) == 0);
    }
    snprintf(list, sizeof(list), "%s\n%s\n%s", dirs[0], dirs[1], dirs[2]);
    setenv("DUALBLADE_STRIPE_UNIT", "65536", 1);
    setenv("DUALBLADE_STRIPE_SHARES", "1,2,1", 1);
    struct dblade_config cfg = { .policy = DBLADE_POLICY_DIRECT, .budget_bytes = 1 << 20, .kv_dir = list };
    struct dblade_store  st;
    const uint64_t       data = 24 << 20;
    CHECK_EQ(dblade_store_open(&st, &cfg, data, 1, false), 0);
    CHECK(st.n == 3 && st.map.n == 3 && st.map.unit == 65536 && st.map.n_pattern == 4);
    CHECK(st.map.share[0] == 1 && st.map.share[1] == 2 && st.map.share[2] == 1);
    CHECK(st.data_offset == 0 && st.data_bytes == data);
    CHECK(strstr(st.path, dirs[0]) && strstr(st.path, dirs[2]));
    // each member holds its share: member 1 half of it, the others a quarter
    CHECK(st.members[1].data_bytes >= data / 2 && st.members[1].data_bytes >= dblade_stripe_member_bytes(&st.map, 1, data));
    CHECK(st.members[0].data_bytes >= data / 4);
    struct stat sb;
    CHECK(fstat(st.members[1].fd, &sb) == 0 && (uint64_t) sb.st_size >= data / 2);

    // the engine: a range over many stripes, unaligned to them, each engine
    const uint64_t off = 3 * 65536 + 8192, len = 5 << 20;
    uint8_t *      a = NULL, * b = NULL;
    CHECK(posix_memalign((void **) &a, 4096, len) == 0 && posix_memalign((void **) &b, 4096, len) == 0);
    const char * engines[2] = { "io_uring", "threads" };
    for (int e = 0; e < 2; e++) {
        setenv("DUALBLADE_IO_ENGINE", engines[e], 1);
        struct dblade_io * io = NULL;
        const int          rc = dblade_io_open_map(&io, &st.map);
        if (rc == -ENOSYS) {
            continue;
        }
        CHECK_EQ(rc, 0);
        fill(a, len, (uint32_t) e + 1);
        struct dblade_io_req w = { .buf = a, .len = len, .off = off, .write = 1 };
        CHECK_EQ(dblade_io_run(io, &w, 1), 0);
        memset(b, 0, len);
        struct dblade_io_req r = { .buf = b, .len = len, .off = off };
        CHECK_EQ(dblade_io_run(io, &r, 1), 0);
        CHECK(memcmp(a, b, len) == 0);
        check_on_members(&st, a, off, len);
        dblade_io_close(io);
    }
    unsetenv("DUALBLADE_IO_ENGINE");

    // the page-cache path's view: one mapping per stripe piece at consecutive addresses
    const uint64_t moff = 2 * 65536, mlen = 4 << 20;
    uint8_t *      addr = mmap(NULL, mlen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(addr != MAP_FAILED);
    CHECK_EQ(dblade_store_mmap(&st, addr, moff, mlen), 0);
    CHECK(memcmp(addr + (off - moff), a, mlen - (off - moff)) == 0);
    fill(addr, 65536, 99); // written through the mapping: lands on the members after msync
    CHECK_EQ(msync(addr, mlen, MS_SYNC), 0);
    uint8_t * want = malloc(mlen);
    memcpy(want, addr, mlen);
    check_on_members(&st, want, moff, mlen);
    munmap(addr, mlen);
    dblade_store_dontneed(&st, moff, mlen);

    // a session file's copy: out of the striped store and back in elsewhere
    char  sess[600];
    snprintf(sess, sizeof(sess), "%s/session", root);
    int   sf  = open(sess, O_CREAT | O_RDWR | O_DIRECT, 0600);
    int   how = 0;
    CHECK(sf >= 0);
    CHECK_EQ(dblade_copy_store(&st.map, moff, sf, 4096, mlen, false, NULL, &how), 0);
    CHECK(how != 0);
    CHECK_EQ(dblade_copy_store(&st.map, 12 << 20, sf, 4096, mlen, true, NULL, &how), 0);
    check_on_members(&st, want, 12 << 20, mlen);
    close(sf);
    unlink(sess);

    // one member failing: a read over every member fails, one within the others does not
    setenv("DUALBLADE_FAULT", "read:1+:eio@1", 1);
    setenv("DUALBLADE_IO_ENGINE", "threads", 1);
    struct dblade_io * io = NULL;
    CHECK_EQ(dblade_io_open_map(&io, &st.map), 0);
    struct dblade_io_req r = { .buf = b, .len = len, .off = off };
    CHECK_EQ(dblade_io_run(io, &r, 1), -EIO);
    CHECK_EQ(r.member, 1); // which member failed, for the message
    char where[600];
    CHECK(strstr(dblade_store_where(&st, r.member, where, sizeof(where)), "(member 2 of 3)"));
    CHECK(strstr(where, dirs[1]));
    uint32_t m;
    uint64_t phys;
    uint64_t k = 0;
    while (dblade_stripe_at(&st.map, k * 65536, &m, &phys) && m == 1) {
        k++;
    }
    struct dblade_io_req r0 = { .buf = b, .len = 65536, .off = k * 65536 };
    CHECK_EQ(dblade_io_run(io, &r0, 1), 0);
    CHECK_EQ(r0.member, -1);
    dblade_io_close(io);
    unsetenv("DUALBLADE_FAULT");
    unsetenv("DUALBLADE_IO_ENGINE");

    // a wipe with zeros reaches every member's share
    dblade_store_touch(&st, data);
    CHECK_EQ(dblade_store_wipe(&st, true), 0);
    memset(a, 0, len);
    check_on_members(&st, a, off, len);
    dblade_store_close(&st);
    CHECK_EQ(st.n, 0);
    free(a);
    free(b);
    free(want);

    // refusals, each naming the fix
    snprintf(list, sizeof(list), "%s\n%s", dirs[0], dirs[0]);
    CHECK_EQ(dblade_store_open(&st, &cfg, data, 1, false), -EINVAL);
    CHECK(strstr(dblade_get_error(), "given twice"));
    snprintf(list, sizeof(list), "%s\n/nonexistent/dualblade", dirs[0]);
    CHECK(dblade_store_open(&st, &cfg, data, 1, false) < 0);
    CHECK(strstr(dblade_get_error(), "/nonexistent/dualblade"));
    snprintf(list, sizeof(list), "%s\n%s", dirs[0], dirs[1]);
    setenv("DUALBLADE_STRIPE_SHARES", "1,x", 1);
    CHECK_EQ(dblade_store_open(&st, &cfg, data, 1, false), -EINVAL);
    CHECK(strstr(dblade_get_error(), "DUALBLADE_STRIPE_SHARES"));
    setenv("DUALBLADE_STRIPE_SHARES", "1,2,3", 1); // three shares for two members
    CHECK_EQ(dblade_store_open(&st, &cfg, data, 1, false), -EINVAL);
    unsetenv("DUALBLADE_STRIPE_SHARES");
    char many[9 * 520] = "";
    for (int i = 0; i < 9; i++) {
        char one[600];
        snprintf(one, sizeof(one), "%s/d%d%s", root, i, i < 8 ? "\n" : "");
        strcat(many, one); // counted before anything is opened
    }
    cfg.kv_dir = many;
    CHECK_EQ(dblade_store_open(&st, &cfg, data, 1, false), -E2BIG);
    CHECK(strstr(dblade_get_error(), "at most 8"));
    cfg.kv_dir = list;

    // probed shares: both members measured; a dry open measures nothing and writes nothing
    unsetenv("DUALBLADE_STRIPE_UNIT");
    CHECK_EQ(dblade_store_open(&st, &cfg, 64 << 20, 1, false), 0);
    CHECK(st.members[0].read_bps > 0 && st.members[1].read_bps > 0);
    CHECK(st.map.unit == DBLADE_STRIPE_UNIT && st.map.share[0] >= 1 && st.map.share[1] >= 1);
    dblade_store_close(&st);
    // a large store gets larger stripes: at most DBLADE_STRIPE_MAX of them (a dry open: nothing reserved)
    CHECK_EQ(dblade_store_open(&st, &cfg, 16ull << 30, 1, true), 0);
    CHECK_EQ(st.map.unit, 1u << 20);
    CHECK_EQ(dblade_store_open(&st, &cfg, 64 << 20, 1, true), 0);
    for (int i = 0; i < 3; i++) {
        rmdir(dirs[i]);
    }
}

int main(void) {
    test_map();
    char root[512];
    test_mkdtemp(root, sizeof(root), "stripe");
    test_store(root);
    rmdir(root);
    puts("test_stripe: ok");
    return 0;
}
