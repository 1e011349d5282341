// The placement plan: what gets pinned under a budget, the staging reservation, the minimum.
#include "dualblade.h"
#include "check.h"

#include <errno.h>
#include <stdint.h>

#define MiB (1024ull * 1024ull)
#define TAILS(n) ((uint64_t) (n) * 2 * 4096) // the tail page of each offloaded K and V

int main(void) {
    uint64_t bytes[4] = { 8 * MiB, 8 * MiB, 8 * MiB, 8 * MiB };
    uint32_t paths[4];
    uint64_t staging = 123;

    // ram policy pins everything whatever the budget
    CHECK_EQ(dblade_plan(DBLADE_POLICY_RAM, 1, 4, bytes, paths, &staging), 0);
    for (int i = 0; i < 4; i++) CHECK_EQ(paths[i], DBLADE_PATH_RAM);
    CHECK_EQ(staging, 0);

    // everything fits: nothing is offloaded, no staging
    CHECK_EQ(dblade_plan(DBLADE_POLICY_DIRECT, 32 * MiB, 4, bytes, paths, &staging), 0);
    for (int i = 0; i < 4; i++) CHECK_EQ(paths[i], DBLADE_PATH_RAM);
    CHECK_EQ(staging, 0);
    CHECK_EQ(dblade_plan(DBLADE_POLICY_DIRECT, DBLADE_BUDGET_UNLIMITED, 4, bytes, paths, &staging), 0);
    for (int i = 0; i < 4; i++) CHECK_EQ(paths[i], DBLADE_PATH_RAM);

    // 24 MiB: 16 MiB of staging (2 layers) and 3 tails leave room to pin exactly one layer, the first
    CHECK_EQ(dblade_plan(DBLADE_POLICY_DIRECT, 24 * MiB + TAILS(3), 4, bytes, paths, &staging), 0);
    CHECK_EQ(paths[0], DBLADE_PATH_RAM);
    for (int i = 1; i < 4; i++) CHECK_EQ(paths[i], DBLADE_PATH_DIRECT);
    CHECK_EQ(staging, 16 * MiB + TAILS(3));
    // without room for the tails, nothing can be pinned, and 4 layers do not stream in 8 MiB
    CHECK_EQ(dblade_plan(DBLADE_POLICY_DIRECT, 24 * MiB, 4, bytes, paths, &staging), 0);
    for (int i = 0; i < 4; i++) CHECK_EQ(paths[i], DBLADE_PATH_DIRECT);

    // the page-cache path has no staging: the same budget pins three layers
    CHECK_EQ(dblade_plan(DBLADE_POLICY_MMAP, 24 * MiB, 4, bytes, paths, &staging), 0);
    CHECK_EQ(paths[0], DBLADE_PATH_RAM);
    CHECK_EQ(paths[2], DBLADE_PATH_RAM);
    CHECK_EQ(paths[3], DBLADE_PATH_MMAP);
    CHECK_EQ(staging, 0);

    // below the minimum working set: -ENOMEM and the minimum is reported
    CHECK_EQ(dblade_plan(DBLADE_POLICY_DIRECT, 15 * MiB, 4, bytes, paths, &staging), -ENOMEM);
    CHECK_EQ(staging, 16 * MiB + TAILS(4));

    // mixed sizes: the largest layers are pinned first
    uint64_t mixed[4] = { 1 * MiB, 16 * MiB, 1 * MiB, 16 * MiB };
    CHECK_EQ(dblade_plan(DBLADE_POLICY_AUTO, 33 * MiB + TAILS(4), 4, mixed, paths, &staging), 0);
    CHECK_EQ(paths[1], DBLADE_PATH_DIRECT);
    CHECK_EQ(paths[3], DBLADE_PATH_DIRECT);
    CHECK_EQ(paths[0], DBLADE_PATH_RAM);
    CHECK_EQ(paths[2], DBLADE_PATH_DIRECT);
    CHECK_EQ(staging, 32 * MiB + TAILS(4));
    // a budget that holds the big layer and the staging of small ones: pin big, stream small
    uint64_t big_small[4] = { 16 * MiB, 1 * MiB, 1 * MiB, 1 * MiB };
    CHECK_EQ(dblade_plan(DBLADE_POLICY_DIRECT, 18 * MiB + TAILS(3), 4, big_small, paths, &staging), 0);
    CHECK_EQ(paths[0], DBLADE_PATH_RAM);
    CHECK_EQ(paths[1] + paths[2] + paths[3], 3 * DBLADE_PATH_DIRECT);
    CHECK_EQ(staging, 2 * MiB + TAILS(3));
    // the minimum reported is the smallest budget that works
    CHECK_EQ(dblade_plan(DBLADE_POLICY_DIRECT, 17 * MiB, 4, big_small, paths, &staging), -ENOMEM);
    CHECK_EQ(staging, 18 * MiB + TAILS(3));
    CHECK_EQ(dblade_plan(DBLADE_POLICY_DIRECT, 18 * MiB + TAILS(3), 4, big_small, paths, &staging), 0);

    // odd sizes are staged in whole 4 KiB blocks
    uint64_t odd[2] = { 5000, 5000 };
    CHECK_EQ(dblade_plan(DBLADE_POLICY_DIRECT, 9000, 2, odd, paths, &staging), -ENOMEM);
    CHECK_EQ(staging, 5000 + 2 * 8192 + TAILS(1)); // one pinned, one streamed

    // bad arguments
    CHECK_EQ(dblade_plan(99, 1, 4, bytes, paths, &staging), -EINVAL);
    CHECK_EQ(dblade_plan(DBLADE_POLICY_RAM, 1, 4, NULL, paths, &staging), -EINVAL);
    CHECK_EQ(dblade_plan(DBLADE_POLICY_RAM, 1, 0, NULL, NULL, NULL), 0);

    CHECK(dblade_path_name(DBLADE_PATH_DIRECT)[0] == 'd');
    CHECK(dblade_policy_name(DBLADE_POLICY_AUTO)[0] == 'a');
    puts("test_plan: ok");
    return 0;
}
