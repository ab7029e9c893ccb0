/* allocstress: a plain WASI program (no SDK) that allocates heavily between short sleeps and checks every
 * block it holds, for the unwind-buffer tests of rewritten guests. It first sleeps PAUSE_MS (default 0)
 * before its first malloc, then each round (INTERVAL_MS, default 20) allocates ~ROUND_KB (512) KiB in blocks
 * of 1..64 KiB (some with calloc), frees about a third of what it holds once it holds more than MAX_MB
 * (24) MiB, and verifies every live block's pattern. It prints "<round> <blocks> <KiB held> ok" per round,
 * or "CORRUPT round <r> block <id> at <i>" and exits 3. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct blk {
    struct blk *next;
    unsigned id, size, zero;
    unsigned char data[];
};

static unsigned seed = 12345;
static unsigned rnd(void) { seed = seed * 1103515245u + 12345u; return seed >> 8; }
static unsigned char pat(unsigned id, unsigned i) { return (unsigned char)(id * 131u + i * 7u + 1u); }

static void nap(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

int main(void) {
    nap(0);  /* a suspension point before anything else */
    const char *p = getenv("PAUSE_MS");
    long pause = p ? atol(p) : 0;
    if (pause > 0) nap(pause);
    const char *iv = getenv("INTERVAL_MS"), *rk = getenv("ROUND_KB"), *mm = getenv("MAX_MB");
    long ms = iv ? atol(iv) : 20, round_kb = rk ? atol(rk) : 512, max_kb = (mm ? atol(mm) : 24) * 1024;
    struct blk *head = NULL;
    unsigned next_id = 1, blocks = 0;
    long held_kb = 0;
    for (unsigned long r = 1;; r++) {
        for (long got = 0; got < round_kb;) {
            unsigned size = 1024 + rnd() % (64 * 1024);
            int zero = rnd() % 4 == 0;
            struct blk *b = zero ? calloc(1, sizeof *b + size) : malloc(sizeof *b + size);
            if (!b) { printf("malloc failed at round %lu\n", r); return 2; }
            b->id = next_id++;
            b->size = size;
            b->zero = zero;
            if (!zero)
                for (unsigned i = 0; i < size; i++) b->data[i] = pat(b->id, i);
            b->next = head;
            head = b;
            blocks++;
            got += size / 1024;
            held_kb += size / 1024;
        }
        if (held_kb > max_kb) {  /* free about a third, spread over the list */
            struct blk **pp = &head;
            while (*pp) {
                if (rnd() % 3 == 0) {
                    struct blk *dead = *pp;
                    *pp = dead->next;
                    held_kb -= dead->size / 1024;
                    blocks--;
                    free(dead);
                } else {
                    pp = &(*pp)->next;
                }
            }
        }
        for (struct blk *b = head; b; b = b->next)
            for (unsigned i = 0; i < b->size; i++)
                if (b->data[i] != (b->zero ? 0 : pat(b->id, i))) {
                    printf("CORRUPT round %lu block %u at %u\n", r, b->id, i);
                    fflush(stdout);
                    return 3;
                }
        printf("%lu %u %ld ok\n", r, blocks, held_kb);
        fflush(stdout);
        nap(ms);
    }
}
