/* counter: prints 1, 2, 3, ... one per line, sleeping between lines.
 *
 * Env: INTERVAL_MS (default 100) - pause between lines, via mv_sleep_ms, so
 *      every pause is a suspension point where the guest can be paused,
 *      snapshotted and restored;
 *      COUNT (default 0 = forever) - stop after this many lines.
 * Tests use it to check that a restored snapshot continues the sequence
 * without gaps or repeats, and that log following works.
 */
#include <microvm.h>
#include <stdio.h>

int main(void) {
    long interval = mv_env_int("INTERVAL_MS", 100);
    long count = mv_env_int("COUNT", 0);
    if (interval < 0)
        interval = 0;
    for (unsigned long long i = 1; count <= 0 || i <= (unsigned long long)count; i++) {
        printf("%llu\n", i);
        fflush(stdout);
        if (count <= 0 || i < (unsigned long long)count)
            mv_sleep_ms((int)interval);
    }
    return 0;
}
