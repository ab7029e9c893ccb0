/* fetch: a minimal TCP client - the egress test guest.
 *
 * Connects to TARGET ("HOST:PORT" or "[V6ADDR]:PORT", from the environment,
 * or argv[1]), sends "ping\n", prints the first reply line to stdout and
 * exits 0.  Any failure (egress denied -> ECONNREFUSED, no reply, ...) is
 * printed to stderr with strerror() and the guest exits 1.
 */
#include <errno.h>
#include <microvm.h>
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv) {
    const char *target = mv_env_str("TARGET", argc > 1 ? argv[1] : NULL);
    if (!target || !*target) {
        fprintf(stderr, "fetch: TARGET is not set (want HOST:PORT)\n");
        return 1;
    }
    int sd = mv_connect_addr(target);
    if (sd < 0) {
        fprintf(stderr, "fetch: connect %s: %s\n", target, strerror(errno));
        return 1;
    }
    if (mv_send_str(sd, "ping\n") < 0) {
        fprintf(stderr, "fetch: send to %s: %s\n", target, strerror(errno));
        return 1;
    }
    char line[4096];
    ssize_t n = mv_recv_line(sd, line, sizeof line);
    if (n < 0) {
        fprintf(stderr, "fetch: recv from %s: %s\n", target, strerror(errno));
        return 1;
    }
    if (n == 0) {
        fprintf(stderr, "fetch: %s closed the connection without replying\n", target);
        return 1;
    }
    printf("%s\n", line);
    mv_close(sd);
    return 0;
}
