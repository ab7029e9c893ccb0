/* memtouch: a guest with a known amount of touched memory, for snapshot benchmarks.
 *
 * At start it mallocs MB MiB, fills every page of it with a non-zero pattern
 * derived from (SEED, page index, word index), prints "ready <MB>" (flushed),
 * then loops forever:
 *     mv_sleep_ms(INTERVAL_MS);            -- the suspension point
 *     if DIRTY_PCT > 0: rewrite DIRTY_PCT % of the pages, spread evenly, with
 *                       the pattern of the next round, print "dirtied <n> pages"
 *
 * A "page" is a WebAssembly page, 64 KiB: the buffer is aligned to 64 KiB so
 * that one page is exactly one snapshot chunk (microvmd/snapshot/store.py).
 *
 * Env: MB (64)          MiB to allocate and touch (1..4000)
 *      INTERVAL_MS (1000) sleep between rounds
 *      DIRTY_PCT (0)    percentage (0..100) of pages rewritten after each sleep;
 *                       n = max(1, pages * DIRTY_PCT / 100), pages i * pages / n
 *      SEED (0)         mixed into every pattern, so that VMs with different
 *                       seeds share no memory contents (content-addressed
 *                       snapshot chunks then never deduplicate between them)
 *      INIT_ROUNDS (1)  mixing rounds per 64-bit word when filling at start:
 *                       > 1 makes start-up CPU-heavy ("expensive init"), with
 *                       the same memory size (cold-start benchmarks)
 * Deterministic: the same env gives the same memory and output.
 * Exits 1 with "memtouch: cannot allocate <MB> MiB" on stderr if malloc fails.
 */
#include <microvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define PAGE 65536u

static uint64_t mix(uint64_t x) { /* splitmix64 finaliser; never maps our inputs to 0 in practice */
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static void fill_page(unsigned char *page, uint64_t seed, uint64_t round, uint64_t index, long rounds) {
    uint64_t *w = (uint64_t *)page;
    uint64_t base = mix(seed ^ mix(round ^ mix(index)));
    for (unsigned i = 0; i < PAGE / 8; i++) {
        uint64_t v = base + i;
        for (long r = 0; r < rounds; r++)
            v = mix(v);
        w[i] = v | 1; /* never zero */
    }
}

int main(void) {
    long mb = mv_env_int("MB", 64);
    long interval = mv_env_int("INTERVAL_MS", 1000);
    long pct = mv_env_int("DIRTY_PCT", 0);
    long seed = mv_env_int("SEED", 0);
    long rounds = mv_env_int("INIT_ROUNDS", 1);
    if (mb < 1) mb = 1;
    if (mb > 4000) mb = 4000;
    if (interval < 0) interval = 0;
    if (pct < 0) pct = 0;
    if (pct > 100) pct = 100;
    if (rounds < 1) rounds = 1;

    size_t bytes = (size_t)mb << 20;
    unsigned char *raw = malloc(bytes + PAGE);
    if (raw == NULL) {
        fprintf(stderr, "memtouch: cannot allocate %ld MiB\n", mb);
        return 1;
    }
    unsigned char *mem = (unsigned char *)(((uintptr_t)raw + PAGE - 1) & ~(uintptr_t)(PAGE - 1));
    size_t pages = bytes / PAGE;
    for (size_t p = 0; p < pages; p++)
        fill_page(mem + p * PAGE, (uint64_t)seed, 0, p, rounds);
    printf("ready %ld\n", mb);
    fflush(stdout);

    size_t n = pct > 0 ? pages * (size_t)pct / 100 : 0;
    if (pct > 0 && n == 0)
        n = 1;
    for (uint64_t round = 1;; round++) {
        mv_sleep_ms((int)interval);
        if (n == 0)
            continue;
        for (size_t i = 0; i < n; i++)
            fill_page(mem + (i * pages / n) * PAGE, (uint64_t)seed, round, i * pages / n, 1);
        printf("dirtied %zu pages\n", n);
        fflush(stdout);
    }
}
