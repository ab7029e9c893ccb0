/* wasitest: exercises the WASI calls the Asyncify rewrite touches (fd_read on stdin and on files,
 * poll_oneoff through nanosleep, clock_nanosleep and poll, clock_time_get) and a few it does not, printing
 * one fact per line, so that a run of the rewritten module can be compared with a run of the original.
 * Reads /data/in.txt and writes /data/out.txt when /data is preopened; exits with atoi(argv[1]). */
#include <dirent.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

static long ms_since(const struct timespec *a) {
    struct timespec b;
    clock_gettime(CLOCK_MONOTONIC, &b);
    return (b.tv_sec - a->tv_sec) * 1000 + (b.tv_nsec - a->tv_nsec) / 1000000;
}

int main(int argc, char **argv) {
    printf("argc %d\n", argc);
    for (int i = 1; i < argc; i++) printf("arg %s\n", argv[i]);
    const char *wt = getenv("WT");
    printf("env %s\n", wt ? wt : "-");

    char buf[512];
    size_t n = fread(buf, 1, sizeof buf, stdin);
    printf("stdin %zu eof %d\n", n, feof(stdin) ? 1 : 0);

    struct timespec t0, d = {0, 100 * 1000000L};
    clock_gettime(CLOCK_MONOTONIC, &t0);
    nanosleep(&d, NULL);
    long ms = ms_since(&t0);
    printf("nanosleep %s\n", ms >= 95 && ms < 3000 ? "ok" : "bad");

    struct timespec until;
    clock_gettime(CLOCK_MONOTONIC, &until);
    t0 = until;
    until.tv_nsec += 50 * 1000000L;
    if (until.tv_nsec >= 1000000000L) { until.tv_sec++; until.tv_nsec -= 1000000000L; }
    int rc = clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &until, NULL);
    ms = ms_since(&t0);
    printf("clock_nanosleep abs rc %d %s\n", rc, ms >= 45 && ms < 3000 ? "ok" : "bad");

    struct timespec rt;
    clock_gettime(CLOCK_REALTIME, &rt);
    printf("realtime %s\n", rt.tv_sec > 1600000000 ? "ok" : "bad");

    clock_gettime(CLOCK_MONOTONIC, &t0);
    int p = poll(NULL, 0, 30);
    ms = ms_since(&t0);
    printf("poll timeout rc %d %s\n", p, ms >= 25 && ms < 3000 ? "ok" : "bad");

    FILE *f = fopen("/data/in.txt", "r");
    if (f) {
        char line[128] = "";
        if (!fgets(line, sizeof line, f)) strcpy(line, "(empty)\n");
        printf("file %s", line);
        fseek(f, 0, SEEK_SET);
        char a[3], b[64];
        struct iovec iov[2] = {{a, sizeof a}, {b, sizeof b}};
        ssize_t got = readv(fileno(f), iov, 2);
        printf("readv %zd %.3s|%.*s", got, a, (int)(got > 3 ? got - 3 : 0), b);
        fclose(f);
        FILE *o = fopen("/data/out.txt", "w");
        if (o) {
            fputs("written by wasitest\n", o);
            fclose(o);
        }
        int entries = 0;
        DIR *dir = opendir("/data");
        for (struct dirent *e; dir && (e = readdir(dir));)
            if (e->d_name[0] != '.') entries++;
        if (dir) closedir(dir);
        printf("dir entries %d\n", entries);
    } else {
        printf("no /data\n");
    }
    fflush(stdout);
    return argc > 1 ? atoi(argv[1]) : 0;
}
