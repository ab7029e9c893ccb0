/* diskbench: a disk workload on virtual disk 0, timed by the guest itself.
 *
 * Env:
 *   MODE   seqwrite | seqread | randwrite | randread      (default seqwrite)
 *   BS     block size in bytes, 1 .. 16 MiB               (default 1048576)
 *   TOTAL  bytes to move; 0 = the whole disk              (default 0)
 *   SEED   seed of the random offsets and of the data     (default 1)
 *
 * Sequential modes walk the disk from offset 0 in BS steps, wrapping around at
 * the end (the last block is short when the size is not a multiple of BS).
 * Random modes pick offsets uniformly among the BS-aligned blocks that fit
 * entirely inside the disk (xorshift64* from SEED, so a run is reproducible).
 * Writes fill the buffer with a SEED-dependent pattern once, stamp the first
 * 8 bytes of each block with its offset (little-endian), call mv_blk_write per
 * block and mv_blk_flush once at the end (inside the timing).
 *
 * Timing uses clock_gettime(CLOCK_MONOTONIC) around the I/O loop only (buffer
 * allocation and pattern fill are outside).  On success the last stdout line is
 *   result mode=M bs=N bytes=N ops=N seconds=S mbps=X checksum=H
 * (mbps = bytes / seconds / 10^6; checksum = FNV-1a over the first 64 bytes of
 * every block read, 0 for writes) and the exit code is 0.  Errors go to stderr
 * as "diskbench: error: ..." with exit code 1 (usage) or 2 (I/O).
 */
#include <errno.h>
#include <microvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_BS (16LL << 20) /* the host moves at most 16 MiB per call (blk.py MAX_IO) */

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint64_t rng;

static uint64_t next_rand(void) { /* xorshift64* */
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return rng * 2685821657736338717ULL;
}

static long long env_ll(const char *name, long long def) {
    const char *s = mv_env_str(name, NULL);
    if (!s || !*s)
        return def;
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 0);
    if (errno || *end || v < 0) {
        fprintf(stderr, "diskbench: error: %s=%s is not a non-negative integer\n", name, s);
        exit(1);
    }
    return v;
}

int main(void) {
    const char *mode = mv_env_str("MODE", "seqwrite");
    long long bs = env_ll("BS", 1048576);
    long long total = env_ll("TOTAL", 0);
    uint64_t seed = (uint64_t)env_ll("SEED", 1);

    int is_write, is_random;
    if (!strcmp(mode, "seqwrite"))
        is_write = 1, is_random = 0;
    else if (!strcmp(mode, "seqread"))
        is_write = 0, is_random = 0;
    else if (!strcmp(mode, "randwrite"))
        is_write = 1, is_random = 1;
    else if (!strcmp(mode, "randread"))
        is_write = 0, is_random = 1;
    else {
        fprintf(stderr, "diskbench: error: MODE=%s: expected seqwrite, seqread, randwrite or randread\n", mode);
        return 1;
    }
    if (bs < 1 || bs > MAX_BS) {
        fprintf(stderr, "diskbench: error: BS=%lld: must be 1 .. %lld\n", bs, MAX_BS);
        return 1;
    }
    if (mv_blk_count() < 1) {
        fprintf(stderr, "diskbench: error: no disk attached (run with --disk NAME)\n");
        return 1;
    }
    long long size = mv_blk_size(0);
    if (size < 0) {
        fprintf(stderr, "diskbench: error: disk 0: %s\n", strerror(errno));
        return 2;
    }
    if (size < bs) {
        fprintf(stderr, "diskbench: error: disk 0 (%lld bytes) is smaller than BS=%lld\n", size, bs);
        return 1;
    }
    if (is_write && (mv_blk_flags(0) & MV_BLK_RDONLY)) {
        fprintf(stderr, "diskbench: error: disk 0 is read-only\n");
        return 1;
    }
    if (total == 0)
        total = size;

    unsigned char *buf = malloc((size_t)bs);
    if (!buf) {
        fprintf(stderr, "diskbench: error: cannot allocate %lld bytes\n", bs);
        return 1;
    }
    rng = seed * 0x9E3779B97F4A7C15ULL + 1; /* never 0 */
    for (long long i = 0; i < bs; i += 8) {
        uint64_t r = next_rand();
        memcpy(buf + i, &r, (size_t)(bs - i < 8 ? bs - i : 8));
    }
    rng = seed * 0x9E3779B97F4A7C15ULL + 1;
    long long nblocks = size / bs; /* random offsets: whole blocks only */

    uint32_t sum = 2166136261u;
    long long done = 0, ops = 0, pos = 0;
    double t0 = now();
    while (done < total) {
        long long off, len = bs;
        if (is_random) {
            off = (long long)(next_rand() % (uint64_t)nblocks) * bs;
        } else {
            if (pos >= size)
                pos = 0;
            off = pos;
            if (size - off < len)
                len = size - off;
        }
        if (total - done < len)
            len = total - done;
        if (is_write && len >= 8)
            memcpy(buf, &off, 8); /* stamp each block with its offset, so reads can tell blocks apart */
        ssize_t n = is_write ? mv_blk_write(0, off, buf, (size_t)len) : mv_blk_read(0, off, buf, (size_t)len);
        if (n <= 0) {
            fprintf(stderr, "diskbench: error: %s of %lld bytes at %lld: %s\n", is_write ? "write" : "read", len,
                    off, n < 0 ? strerror(errno) : "end of disk");
            return 2;
        }
        if (!is_write)
            for (int i = 0; i < 64 && i < n; i++)
                sum = (sum ^ buf[i]) * 16777619u;
        done += n;
        pos = off + n;
        ops++;
    }
    if (is_write && mv_blk_flush(0) < 0) {
        fprintf(stderr, "diskbench: error: flush: %s\n", strerror(errno));
        return 2;
    }
    double secs = now() - t0;
    printf("result mode=%s bs=%lld bytes=%lld ops=%lld seconds=%.6f mbps=%.2f checksum=%08x\n", mode, bs, done,
           ops, secs, secs > 0 ? (double)done / secs / 1e6 : 0.0, is_write ? 0u : sum);
    fflush(stdout);
    free(buf);
    return 0;
}
