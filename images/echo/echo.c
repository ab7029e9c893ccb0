/* echo: a TCP echo server serving many clients at once with mv_poll.
 *
 * Listens on guest port PORT (default 8000) and writes every byte back as it
 * arrives.  Reads go to one shared buffer and are sent back from there at once;
 * only what a client does not take is copied to that client's own queue, and
 * that client is not read from again until its queue drains, so one slow client
 * never stalls the others and an idle client costs a few bytes.
 */
#include <errno.h>
#include <microvm.h>
#include <stdlib.h>
#include <string.h>

#define BUF 262144 /* bytes moved per recv (as uvloop reads): fewer, larger calls when clients stream */

static char buf[BUF]; /* every read lands here */

struct client {
    int sd;
    size_t pending, off; /* unsent echo bytes are out[off .. off+pending) */
    char *out;           /* malloc'd only while something is queued */
};

static struct client **clients;
static size_t nclients, capclients;

static void drop(size_t i) {
    mv_close(clients[i]->sd);
    free(clients[i]->out);
    free(clients[i]);
    clients[i] = clients[--nclients];
}

/* Try to flush a client's queue without blocking; -1 if the client is gone. */
static int flush_client(struct client *c) {
    while (c->pending > 0) {
        ssize_t n = mv_send(c->sd, c->out + c->off, c->pending, MV_NONBLOCK);
        if (n < 0)
            return errno == EAGAIN ? 0 : -1;
        c->off += (size_t)n;
        c->pending -= (size_t)n;
    }
    c->off = 0;
    free(c->out);
    c->out = NULL;
    return 0;
}

/* Echo n bytes of buf to c; queue what the socket does not take now. -1 if the client is gone. */
static int echo_now(struct client *c, size_t n) {
    size_t done = 0;
    while (done < n) {
        ssize_t k = mv_send(c->sd, buf + done, n - done, MV_NONBLOCK);
        if (k < 0) {
            if (errno != EAGAIN)
                return -1;
            c->out = malloc(n - done);
            if (!c->out)
                return -1;
            memcpy(c->out, buf + done, n - done);
            c->off = 0;
            c->pending = n - done;
            return 0;
        }
        done += (size_t)k;
    }
    return 0;
}

int main(void) {
    int port = (int)mv_env_int("PORT", 8000);
    int lsd = mv_listen(port, 128);
    if (lsd < 0) {
        mv_log("echo: listen on port %d: %s", port, strerror(errno));
        return 1;
    }
    mv_log("echo: listening on port %d", port);

    struct mv_pollfd *pfds = NULL;
    for (;;) {
        pfds = realloc(pfds, (nclients + 1) * sizeof *pfds);
        if (!pfds) {
            mv_log("echo: out of memory");
            return 1;
        }
        pfds[0] = (struct mv_pollfd){.sd = lsd, .events = MV_POLLIN};
        for (size_t i = 0; i < nclients; i++)
            pfds[i + 1] = (struct mv_pollfd){
                .sd = clients[i]->sd,
                .events = clients[i]->pending ? MV_POLLOUT : MV_POLLIN,
            };
        size_t npfds = nclients + 1;
        if (mv_poll(pfds, npfds, -1) < 0) {
            mv_log("echo: poll: %s", strerror(errno));
            return 1;
        }
        /* Clients first, walking backwards so drop() (swap with last) is safe.
         * pfds[i+1] still describes clients[i] because only indices >= i move. */
        for (size_t i = npfds - 1; i >= 1; i--) {
            struct client *c = clients[i - 1];
            int re = pfds[i].revents;
            if (!re)
                continue;
            if (c->pending) {
                if (flush_client(c) < 0)
                    drop(i - 1);
                continue;
            }
            ssize_t n = mv_recv(c->sd, buf, sizeof buf, MV_NONBLOCK);
            if (n < 0 && errno == EAGAIN)
                continue;
            if (n <= 0) { /* end of stream or error */
                drop(i - 1);
                continue;
            }
            if (echo_now(c, (size_t)n) < 0)
                drop(i - 1);
        }
        if (pfds[0].revents & MV_POLLIN) {
            for (;;) { /* accept everything queued */
                int sd = mv_accept_flags(lsd, MV_NONBLOCK);
                if (sd < 0) {
                    if (errno != EAGAIN)
                        mv_log("echo: accept: %s", strerror(errno));
                    break;
                }
                if (nclients == capclients) {
                    size_t ncap = capclients ? capclients * 2 : 16;
                    struct client **nc = realloc(clients, ncap * sizeof *nc);
                    if (!nc) {
                        mv_close(sd);
                        break;
                    }
                    clients = nc;
                    capclients = ncap;
                }
                struct client *c = calloc(1, sizeof *c);
                if (!c) {
                    mv_close(sd);
                    break;
                }
                c->sd = sd;
                clients[nclients++] = c;
            }
        }
    }
}
