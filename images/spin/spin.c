/* spin: a CPU-bound guest for scheduler, fuel/epoch and snapshot tests.
 *
 * Runs N iterations (argv[1], default 100000000) of an xorshift64* step mixed
 * with the loop counter; the dependency chain through `x` keeps the optimizer
 * from folding the loop.  The final line is always `checksum <decimal>`: the
 * same N always gives the same checksum, different N give different ones, so
 * a test can tell whether a paused/restored guest resumed exactly where it was.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    unsigned long long n = 100000000ULL;
    if (argc > 1)
        n = strtoull(argv[1], NULL, 10);
    printf("spinning for %llu iterations\n", n);
    fflush(stdout);
    uint64_t x = 0x9E3779B97F4A7C15ULL;
    for (unsigned long long i = 0; i < n; i++) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x = x * 0x2545F4914F6CDD1DULL + i;
    }
    printf("checksum %" PRIu64 "\n", x);
    return 0;
}
