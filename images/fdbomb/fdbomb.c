/* fdbomb: opens files in the preopened directory /d until the host refuses (issue 13 row 1), prints
 * "opened N (<strerror>)", closes them all, opens as many again and prints "reopened M" (the count is
 * given back on close), then holds what it has for HOLD_MS (default 0) milliseconds and exits 0. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MAX 1000000

static int fds[MAX];

static long open_all(void) {
    char path[64];
    long n = 0;
    for (; n < MAX; n++) {
        snprintf(path, sizeof path, "/d/f%ld", n % 64);
        int fd = open(path, O_CREAT | O_RDONLY, 0644);
        if (fd < 0) break;
        fds[n] = fd;
    }
    return n;
}

int main(void) {
    const char *h = getenv("HOLD_MS");
    long ms = h ? atol(h) : 0;
    long n = open_all();
    printf("opened %ld (%s)\n", n, strerror(errno));
    for (long i = 0; i < n; i++) close(fds[i]);
    long m = open_all();
    printf("reopened %ld\n", m);
    fflush(stdout);
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
    return 0;
}
