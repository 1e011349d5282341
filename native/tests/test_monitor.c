// The memory monitor reads this machine; the auto decision demotes the largest layers when the
// page cache cannot hold them (or tasks stall), and promotes back only with room, calm and time.
#define _GNU_SOURCE // memfd_create
#include "../src/base.h"
#include "../src/monitor.h"
#include "../src/policy.h"
#include "dualblade.h"
#include "check.h"

#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define MiB (1ull << 20)

static struct dblade_mem_sample sample(uint64_t t_s, uint64_t limit, uint64_t held, uint64_t psi_us) {
    struct dblade_mem_sample m = { .t_ns = t_s * 1000000000ull, .cg_limit = limit, .cg_held = held,
                                   .mem_total = 64ull << 30, .mem_available = 60ull << 30, .psi_us = psi_us };
    return m;
}

int main(void) {
    // this machine: something sane comes back
    struct dblade_monitor mon;
    dblade_monitor_init(&mon);
    struct dblade_mem_sample now;
    dblade_monitor_sample(&mon, &now);
    printf("cgroup v%d %s: limit %llu, held %llu; MemAvailable %llu of %llu; psi %llu us\n",
           mon.cg_version, mon.cg_dir, (unsigned long long) now.cg_limit, (unsigned long long) now.cg_held, (unsigned long long) now.mem_available,
           (unsigned long long) now.mem_total, (unsigned long long) now.psi_us);
    CHECK(now.mem_total > 0 && now.mem_total != UINT64_MAX);
    CHECK(now.mem_available > 0 && now.mem_available <= now.mem_total);
    if (mon.cg_version) {
        CHECK(now.cg_held > 0 && now.cg_held != UINT64_MAX); // this very process has some
        // shmem is held too (the GPU driver's page-locked host buffers are shmem): 64 MiB of it, touched, count
        // (anonymous memory alone did not: auto then overcommitted the group by as much)
        const size_t bytes = 64 * MiB;
        const int    fd    = memfd_create("test_monitor", 0);
        CHECK(fd >= 0 && ftruncate(fd, (off_t) bytes) == 0);
        char * p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        CHECK(p != MAP_FAILED);
        memset(p, 1, bytes);
        struct dblade_mem_sample with;
        dblade_monitor_sample(&mon, &with);
        printf("with 64 MiB of shmem: held %llu (+%lld MiB)\n", (unsigned long long) with.cg_held,
               ((long long) with.cg_held - (long long) now.cg_held) / (long long) MiB);
        CHECK(with.cg_held >= now.cg_held + 48 * MiB);
        munmap(p, bytes);
        close(fd);
    } else {
        printf("no memory cgroup: the group's held memory is not tested here\n");
    }

    // the initial placement: a resident set that fits 7/8 of the room with the context full, in layer order
    {
        const uint64_t full[5] = { 64 * MiB, 64 * MiB, 64 * MiB, 64 * MiB, 64 * MiB };
        uint32_t       paths[5];
        CHECK_EQ(dblade_auto_place(200 * MiB, full, 5, paths), 128 * MiB); // 175 MiB of room: two layers
        CHECK(paths[0] == DBLADE_PATH_MMAP && paths[1] == DBLADE_PATH_MMAP && paths[2] == DBLADE_PATH_DIRECT &&
              paths[4] == DBLADE_PATH_DIRECT);
        CHECK_EQ(dblade_auto_place(UINT64_MAX, full, 5, paths), 320 * MiB); // no limit known: all of them
        CHECK(paths[4] == DBLADE_PATH_MMAP);
        CHECK_EQ(dblade_auto_place(0, full, 5, paths), 0); // no room: none
        CHECK(paths[0] == DBLADE_PATH_DIRECT);
        const uint64_t mixed[3] = { 150 * MiB, 10 * MiB, 10 * MiB }; // a smaller layer after one that does not fit
        CHECK_EQ(dblade_auto_place(100 * MiB, mixed, 3, paths), 20 * MiB);
        CHECK(paths[0] == DBLADE_PATH_DIRECT && paths[1] == DBLADE_PATH_MMAP && paths[2] == DBLADE_PATH_MMAP);
    }

    // capacity: the cgroup's limit less what it holds, weights and a margin
    struct dblade_mem_sample m = sample(1, 1024 * MiB, 200 * MiB, 0);
    const uint64_t cap = dblade_auto_capacity(&m, 300 * MiB, 0);
    CHECK_EQ(cap, (1024 - 200 - 300 - 64) * MiB); // margin: limit/16
    m.cg_limit = UINT64_MAX; // no limit: the system's MemAvailable rules
    CHECK(dblade_auto_capacity(&m, 300 * MiB, 0) > 50ull << 30);

    // 4 page-cache layers: 100, 200, 150, 50 MiB; the room is 460 MiB
    // (want, need, full, resident): the layers are full already
    struct dblade_auto_layer L[4] = {
        { DBLADE_PATH_MMAP, 100 * MiB, 100 * MiB, 100 * MiB }, { DBLADE_PATH_MMAP, 200 * MiB, 200 * MiB, 200 * MiB },
        { DBLADE_PATH_MMAP, 150 * MiB, 150 * MiB, 150 * MiB }, { DBLADE_PATH_MMAP, 50 * MiB, 50 * MiB, 50 * MiB },
    };
    struct dblade_auto_state st = { .last_psi_us = UINT64_MAX };
    char why[100];
    m = sample(10, 1024 * MiB, 200 * MiB, 0);
    // 500 MiB needed > 460: the largest goes direct, and the one after it (down to 7/8 of the room)
    CHECK_EQ(dblade_auto_decide(&st, &m, 300 * MiB, L, 4, why, sizeof(why)), 1);
    CHECK_EQ(L[1].want, DBLADE_PATH_DIRECT);
    CHECK_EQ(L[0].want, DBLADE_PATH_MMAP);
    CHECK(strstr(why, "page cache short") != NULL);
    printf("demote: %s\n", why);

    // the same sample again: nothing flaps
    m.t_ns += 100000000ull;
    CHECK_EQ(dblade_auto_decide(&st, &m, 300 * MiB, L, 4, why, sizeof(why)), 0);

    // memory frees up (the limit is raised) but within the hold time: stays
    m = sample(11, 1200 * MiB, 0, 0);
    CHECK_EQ(dblade_auto_decide(&st, &m, 300 * MiB, L, 4, why, sizeof(why)), 0);
    // a small room after the hold time is not enough (the layer must fit in 70% of it)
    m = sample(12, 1024 * MiB, 0, 0); // 12 s: past the hold
    CHECK_EQ(dblade_auto_decide(&st, &m, 300 * MiB, L, 4, why, sizeof(why)), 0);
    // after the hold time with a wide margin: back to the page cache
    m = sample(13, 1200 * MiB, 0, 0);
    CHECK_EQ(dblade_auto_decide(&st, &m, 300 * MiB, L, 4, why, sizeof(why)), 1);
    CHECK_EQ(L[1].want, DBLADE_PATH_MMAP);
    printf("promote: %s\n", why);

    // stalls on memory (30% of the last second) demote even when the numbers look fine
    m = sample(15, 1024 * MiB, 0, 0);
    dblade_auto_decide(&st, &m, 300 * MiB, L, 4, why, sizeof(why));
    m = sample(16, 1024 * MiB, 0, 300000);
    CHECK(dblade_auto_decide(&st, &m, 300 * MiB, L, 4, why, sizeof(why)) >= 1);
    CHECK(strstr(why, "pressure") != NULL);
    printf("pressure: %s\n", why);

    // that demotion came 3 s after the promotion at 13 s (within 4 holds): the hold doubled, so
    // memory coming back 3 s later does not bring the layers back yet; 5 s later it does
    CHECK_EQ(st.hold_ns, 2 * DBLADE_AUTO_HOLD_NS);
    m = sample(19, 4096 * MiB, 0, 300000);
    CHECK_EQ(dblade_auto_decide(&st, &m, 300 * MiB, L, 4, why, sizeof(why)), 0);
    m = sample(21, 4096 * MiB, 0, 300000);
    CHECK(dblade_auto_decide(&st, &m, 300 * MiB, L, 4, why, sizeof(why)) >= 1);

    // a layer that fits now but not once the context is full stays on the direct path
    struct dblade_auto_layer G[2] = { { DBLADE_PATH_MMAP, 10 * MiB, 100 * MiB, 10 * MiB },
                                      { DBLADE_PATH_DIRECT, 10 * MiB, 600 * MiB, 0 } };
    struct dblade_auto_state gs = { .last_psi_us = UINT64_MAX };
    m = sample(100, 1200 * MiB, 0, 0); // room 825 MiB, 70%: 577
    CHECK_EQ(dblade_auto_decide(&gs, &m, 300 * MiB, G, 2, why, sizeof(why)), 0);
    G[1].full_bytes = 400 * MiB;
    m.t_ns += DBLADE_AUTO_FILL_WINDOW_NS; // (and the context is not filling)
    CHECK_EQ(dblade_auto_decide(&gs, &m, 300 * MiB, G, 2, why, sizeof(why)), 1);
    CHECK_EQ(G[1].want, DBLADE_PATH_MMAP);

    // while the context fills fast (a prefill: 100 MiB/s of new rows) nothing is promoted, with room
    // to spare; once it grows at a decoding pace, it is
    struct dblade_auto_layer F[2] = { { DBLADE_PATH_DIRECT, 0, 100 * MiB, 0 }, { DBLADE_PATH_DIRECT, 0, 100 * MiB, 0 } };
    struct dblade_auto_state fs = { .last_psi_us = UINT64_MAX };
    for (uint64_t step = 0; step <= 10; step++) { // 2 s, a sample every 200 ms (the first: rate not known)
        F[0].need_bytes = F[1].need_bytes = step * 10 * MiB;
        m = sample(200, 4096 * MiB, 0, 0);
        m.t_ns += step * 200000000ull;
        CHECK_EQ(dblade_auto_decide(&fs, &m, 300 * MiB, F, 2, why, sizeof(why)), 0);
    }
    CHECK(fs.fill_rate > 90.0 * MiB);
    m.t_ns += 200000000ull; // no new rows in the next 200 ms: decoding (or idle)
    CHECK_EQ(dblade_auto_decide(&fs, &m, 300 * MiB, F, 2, why, sizeof(why)), 2);
    CHECK(fs.fill_rate < 1.0 * MiB);

    // a spike that stays: the room shrinks and tasks stall for 2 s, sampled every 20 ms as the
    // session does. One decision demotes what the room cannot hold; the stall that goes on while
    // the kernel reclaims does not demote layer after layer (it did: 16 demotions in a real run)
    struct dblade_auto_layer P[6];
    for (int i = 0; i < 6; i++) {
        struct dblade_auto_layer x = { DBLADE_PATH_MMAP, 40 * MiB, 40 * MiB, 40 * MiB };
        P[i] = x;
    }
    struct dblade_auto_state ps = { .last_psi_us = UINT64_MAX };
    m = sample(300, 1024 * MiB, 200 * MiB, 0); // room 460 MiB: the 240 MiB of layers fit
    CHECK_EQ(dblade_auto_decide(&ps, &m, 300 * MiB, P, 6, why, sizeof(why)), 0);
    int decisions = 0, demoted = 0;
    uint64_t psi = 0;
    for (int step = 1; step <= 100; step++) { // the spike: 300 MiB more anonymous memory, held
        m = sample(301, 1024 * MiB, 500 * MiB, 0);
        m.t_ns += (uint64_t) step * DBLADE_MONITOR_PERIOD_NS;
        psi += 8000; // 40% of each 20 ms stalled, for the whole 2 s
        m.psi_us = psi;
        const int n = dblade_auto_decide(&ps, &m, 300 * MiB, P, 6, why, sizeof(why));
        decisions += n > 0;
        demoted += n > 0 ? n : 0;
    }
    CHECK_EQ(decisions, 1);
    CHECK(demoted >= 2 && demoted <= 4); // room 160 MiB: down to 7/8 of it, not every layer
    printf("held spike: %d decision, %d layers demoted\n", decisions, demoted);

    // A resident set that does not stay resident: decoding, the page-cache layers' reads found a quarter of their
    // pages missing while the capacity looks ample (it misjudged the memory). The largest go direct until what the
    // cache held covers the rest with a margin, and none comes back while the capacity stays; once it grows by more
    // than a quarter, they do.
    {
        struct dblade_auto_layer T[4];
        for (int i = 0; i < 4; i++) {
            struct dblade_auto_layer x = { DBLADE_PATH_MMAP, 100 * MiB, 100 * MiB, 75 * MiB, 25 * MiB };
            T[i] = x;
        }
        struct dblade_auto_state ts = { .last_psi_us = UINT64_MAX };
        m = sample(400, 4096 * MiB, 0, 0);
        CHECK_EQ(dblade_auto_decide(&ts, &m, 300 * MiB, T, 4, why, sizeof(why)), 0); // the fill rate: not known yet
        // a prefill (rows growing fast) misses pages it has not written yet: not a verdict
        for (int i = 0; i < 4; i++) {
            T[i].need_bytes += 50 * MiB;
        }
        m.t_ns += DBLADE_AUTO_FILL_WINDOW_NS;
        CHECK_EQ(dblade_auto_decide(&ts, &m, 300 * MiB, T, 4, why, sizeof(why)), 0);
        for (int i = 0; i < 4; i++) {
            T[i].need_bytes = 100 * MiB;
        }
        // rows written since the last reads (a ubatch of a prompt, computing longer than the rate's window): less
        // resident than needed, nothing missed
        for (int i = 0; i < 4; i++) {
            T[i].missing_bytes = 0;
        }
        m.t_ns += DBLADE_AUTO_FILL_WINDOW_NS;
        CHECK_EQ(dblade_auto_decide(&ts, &m, 300 * MiB, T, 4, why, sizeof(why)), 0);
        // decoding: a sixteenth missing or less is not thrashing
        for (int i = 0; i < 4; i++) {
            T[i].missing_bytes = 5 * MiB;
        }
        m.t_ns += DBLADE_AUTO_FILL_WINDOW_NS;
        CHECK_EQ(dblade_auto_decide(&ts, &m, 300 * MiB, T, 4, why, sizeof(why)), 0);
        m.t_ns += DBLADE_AUTO_FILL_WINDOW_NS;
        for (int i = 0; i < 4; i++) {
            T[i].missing_bytes = 25 * MiB; // 100 of 400 MiB missing: 300 held, 262 kept (7/8)
        }
        CHECK_EQ(dblade_auto_decide(&ts, &m, 300 * MiB, T, 4, why, sizeof(why)), 2);
        CHECK(strstr(why, "thrashing") != NULL);
        printf("thrash: %s\n", why);
        for (int i = 0; i < 4; i++) {
            T[i].resident_bytes = T[i].want == DBLADE_PATH_MMAP ? 100 * MiB : 0; // the rest stays cached now
            T[i].missing_bytes  = 0;
        }
        m.t_ns += 10 * DBLADE_AUTO_HOLD_NS; // calm, long after: the same capacity promotes nothing
        CHECK_EQ(dblade_auto_decide(&ts, &m, 300 * MiB, T, 4, why, sizeof(why)), 0);
        m.cg_limit = 8192 * MiB; // memory grew: the capacity rules again
        m.t_ns += DBLADE_AUTO_FILL_WINDOW_NS;
        CHECK_EQ(dblade_auto_decide(&ts, &m, 300 * MiB, T, 4, why, sizeof(why)), 2);
    }

    // no room at all: every layer goes direct
    m = sample(30, 400 * MiB, 300 * MiB, 600000);
    dblade_auto_decide(&st, &m, 300 * MiB, L, 4, why, sizeof(why));
    for (int i = 0; i < 4; i++) {
        CHECK_EQ(L[i].want, DBLADE_PATH_DIRECT);
    }
    return 0;
}
