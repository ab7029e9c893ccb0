/*
 * microvm.c - implementation of the microvmd guest SDK (see microvm.h and
 * ABI.md).  Compiled into every SDK guest by guest-sdk/mvcc.
 */
#include "microvm.h"

#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

_Static_assert(sizeof(struct mv_pollfd) == 8, "mv_pollfd must be 8 bytes (ABI)");
_Static_assert(offsetof(struct mv_pollfd, events) == 4, "mv_pollfd.events at offset 4 (ABI)");
_Static_assert(offsetof(struct mv_pollfd, revents) == 6, "mv_pollfd.revents at offset 6 (ABI)");
_Static_assert(sizeof(void *) == 4, "the microvmd ABI is wasm32-only");

/* ---- host imports (ABI.md) ------------------------------------------------ */

#define MV_IMPORT(mod, name) __attribute__((import_module(mod), import_name(name)))

MV_IMPORT("microvm", "sleep_ms") int32_t __mv_sleep_ms(int32_t ms);
MV_IMPORT("microvm", "yield") int32_t __mv_yield(void);

MV_IMPORT("microvm_blk", "blk_count") int32_t __mv_blk_count(void);
MV_IMPORT("microvm_blk", "blk_size") int64_t __mv_blk_size(int32_t dev);
MV_IMPORT("microvm_blk", "blk_read") int32_t __mv_blk_read(int32_t dev, int64_t off, void *buf, int32_t len);
MV_IMPORT("microvm_blk", "blk_write") int32_t __mv_blk_write(int32_t dev, int64_t off, const void *buf, int32_t len);
MV_IMPORT("microvm_blk", "blk_flush") int32_t __mv_blk_flush(int32_t dev);
MV_IMPORT("microvm_blk", "blk_flags") int32_t __mv_blk_flags(int32_t dev);

MV_IMPORT("microvm_net", "net_listen") int32_t __mv_net_listen(int32_t port, int32_t backlog);
MV_IMPORT("microvm_net", "net_accept") int32_t __mv_net_accept(int32_t sd, int32_t flags);
MV_IMPORT("microvm_net", "net_connect") int32_t __mv_net_connect(const char *host, int32_t host_len, int32_t port, int32_t flags);
MV_IMPORT("microvm_net", "net_send") int32_t __mv_net_send(int32_t sd, const void *buf, int32_t len, int32_t flags);
MV_IMPORT("microvm_net", "net_recv") int32_t __mv_net_recv(int32_t sd, void *buf, int32_t len, int32_t flags);
MV_IMPORT("microvm_net", "net_close") int32_t __mv_net_close(int32_t sd);
MV_IMPORT("microvm_net", "net_poll") int32_t __mv_net_poll(struct mv_pollfd *fds, int32_t nfds, int32_t timeout_ms);
struct mv_rx_out {
    int32_t index;  /* entry of fds the host received from, or -1 */
    int32_t result; /* what net_recv would have returned: bytes, 0 (end of stream) or -errno */
};
MV_IMPORT("microvm_net", "net_poll_recv")
int32_t __mv_net_poll_recv(struct mv_pollfd *fds, int32_t nfds, int32_t timeout_ms, void *buf, int32_t len,
                           struct mv_rx_out *out);

MV_IMPORT("microvm_fn", "fn_request") int32_t __mv_fn_request(void *buf, int32_t cap);
MV_IMPORT("microvm_fn", "fn_respond")
int32_t __mv_fn_respond(int32_t status, const char *headers, int32_t hlen, const void *body, int32_t blen);

/* ---- exports read by the daemon ------------------------------------------ */

__attribute__((export_name("microvm_abi_version"))) int32_t microvm_abi_version(void) {
    return MV_ABI_VERSION;
}

#ifndef MV_NO_ASYNCIFY
/* Asyncify data: header {i32 cur; i32 end} followed by the unwind buffer.
 * Every call resets the header, so the host calls this before starting an
 * unwind, and never between an unwind and the matching rewind. */
static _Alignas(16) unsigned char mv_asyncify_buf[MV_ASYNCIFY_BUF_SIZE];

__attribute__((export_name("microvm_asyncify_data"))) int32_t microvm_asyncify_data(void) {
    int32_t *hdr = (int32_t *)(void *)mv_asyncify_buf;
    hdr[0] = (int32_t)(uintptr_t)(mv_asyncify_buf + 8);
    hdr[1] = (int32_t)(uintptr_t)(mv_asyncify_buf + sizeof mv_asyncify_buf);
    return (int32_t)(uintptr_t)mv_asyncify_buf;
}
#endif

/* ---- error plumbing ---------------------------------------------------------- */

/* Host calls return >= 0 or -(WASI errno); wasi-libc uses the same numbers. */
static inline int32_t mv_ret32(int32_t r) {
    if (r < 0) {
        errno = -r;
        return -1;
    }
    return r;
}

static inline int32_t mv_len32(size_t len) {
    return len > INT32_MAX ? INT32_MAX : (int32_t)len;
}

int mv_abi_version(void) { return MV_ABI_VERSION; }

/* ---- scheduling ---------------------------------------------------------------- */

int mv_sleep_ms(int ms) { return mv_ret32(__mv_sleep_ms(ms < 0 ? 0 : ms)); }
int mv_yield(void) { return mv_ret32(__mv_yield()); }

/* ---- block devices --------------------------------------------------------------- */

int mv_blk_count(void) { return mv_ret32(__mv_blk_count()); }

long long mv_blk_size(int dev) {
    int64_t r = __mv_blk_size(dev);
    if (r < 0) {
        errno = (int)-r;
        return -1;
    }
    return r;
}

int mv_blk_flags(int dev) { return mv_ret32(__mv_blk_flags(dev)); }

ssize_t mv_blk_read(int dev, long long offset, void *buf, size_t len) {
    if (offset < 0) {
        errno = EINVAL;
        return -1;
    }
    return mv_ret32(__mv_blk_read(dev, offset, buf, mv_len32(len)));
}

ssize_t mv_blk_write(int dev, long long offset, const void *buf, size_t len) {
    if (offset < 0 || len > INT32_MAX) {
        errno = EINVAL;
        return -1;
    }
    return mv_ret32(__mv_blk_write(dev, offset, buf, (int32_t)len));
}

int mv_blk_flush(int dev) { return mv_ret32(__mv_blk_flush(dev)); }

/* ---- sockets ------------------------------------------------------------------------ */

int mv_listen(int port, int backlog) { return mv_ret32(__mv_net_listen(port, backlog)); }

/* What mv_poll received ahead (net_poll_recv) for one socket, until mv_recv takes it: the usual loop
 * "poll, then recv what it reported" then costs one host call per message instead of two. */
static struct {
    int sd;          /* -1: nothing held */
    int32_t result;  /* bytes held, or 0 (end of stream) / -errno, handed out once */
    uint32_t off;    /* bytes already taken */
    char *buf;       /* MV_RX_SIZE bytes, allocated by the first mv_poll after a connection */
    int connected;   /* mv_accept or mv_connect gave a connection: an idle listener never needs buf */
} mv_rx = {.sd = -1};

static int mv_rx_prepare(int sd) {
    if (sd >= 0)
        mv_rx.connected = 1;
    return sd;
}

int mv_accept_flags(int sd, int flags) { return mv_rx_prepare(mv_ret32(__mv_net_accept(sd, flags))); }
int mv_accept(int sd) { return mv_accept_flags(sd, 0); }

int mv_connect_flags(const char *host, int port, int flags) {
    if (!host) {
        errno = EINVAL;
        return -1;
    }
    return mv_rx_prepare(mv_ret32(__mv_net_connect(host, mv_len32(strlen(host)), port, flags)));
}
int mv_connect(const char *host, int port) { return mv_connect_flags(host, port, 0); }

int mv_parse_hostport(const char *hostport, char *host, size_t hostcap, int *port) {
    if (!hostport || !host || !port || hostcap == 0) {
        errno = EINVAL;
        return -1;
    }
    const char *h = hostport, *hend, *colon;
    if (*h == '[') { /* [v6]:port */
        h++;
        hend = strchr(h, ']');
        if (!hend || hend[1] != ':') {
            errno = EINVAL;
            return -1;
        }
        colon = hend + 1;
    } else {
        colon = strrchr(h, ':');
        if (!colon) {
            errno = EINVAL;
            return -1;
        }
        hend = colon;
        /* a bare IPv6 literal has more than one ':' and must be bracketed */
        if (memchr(h, ':', (size_t)(hend - h))) {
            errno = EINVAL;
            return -1;
        }
    }
    size_t hlen = (size_t)(hend - h);
    if (hlen == 0) {
        errno = EINVAL;
        return -1;
    }
    if (hlen >= hostcap) {
        errno = ENAMETOOLONG;
        return -1;
    }
    const char *p = colon + 1;
    char *endp;
    errno = 0;
    long v = strtol(p, &endp, 10);
    if (*p < '0' || *p > '9' || *endp != '\0' || errno || v < 1 || v > 65535) {
        errno = EINVAL;
        return -1;
    }
    memcpy(host, h, hlen);
    host[hlen] = '\0';
    *port = (int)v;
    return 0;
}

int mv_connect_addr(const char *hostport) {
    char host[256];
    int port;
    if (mv_parse_hostport(hostport, host, sizeof host, &port) < 0)
        return -1;
    return mv_connect(host, port);
}

ssize_t mv_send(int sd, const void *buf, size_t len, int flags) {
    return mv_ret32(__mv_net_send(sd, buf, mv_len32(len), flags));
}

ssize_t mv_recv(int sd, void *buf, size_t len, int flags) {
    if (sd == mv_rx.sd && len > 0) {
        if (mv_rx.result <= 0) { /* the end of the stream or an error, as net_recv reported it */
            mv_rx.sd = -1;
            return mv_ret32(mv_rx.result);
        }
        size_t left = (size_t)mv_rx.result - mv_rx.off;
        size_t n = len < left ? len : left;
        memcpy(buf, mv_rx.buf + mv_rx.off, n);
        mv_rx.off += (uint32_t)n;
        if (mv_rx.off == (uint32_t)mv_rx.result)
            mv_rx.sd = -1;
        return (ssize_t)n;
    }
    return mv_ret32(__mv_net_recv(sd, buf, mv_len32(len), flags));
}

int mv_close(int sd) {
    if (sd == mv_rx.sd)
        mv_rx.sd = -1;
    return mv_ret32(__mv_net_close(sd));
}

int mv_poll(struct mv_pollfd *fds, size_t nfds, int timeout_ms) {
    if (nfds > INT32_MAX / sizeof *fds) {
        errno = EINVAL;
        return -1;
    }
    if (mv_rx.sd >= 0) {
        /* bytes held for mv_rx.sd: if it is polled for input it is ready now, so do not wait */
        size_t held = nfds;
        for (size_t i = 0; i < nfds; i++)
            if (fds[i].sd == mv_rx.sd && (fds[i].events & MV_POLLIN)) {
                held = i;
                break;
            }
        int n = mv_ret32(__mv_net_poll(fds, (int32_t)nfds, held < nfds ? 0 : timeout_ms));
        if (n >= 0 && held < nfds) {
            if (!fds[held].revents)
                n++;
            fds[held].revents |= MV_POLLIN;
        }
        return n;
    }
    if (!mv_rx.buf && !(mv_rx.connected && (mv_rx.buf = malloc(MV_RX_SIZE))))
        return mv_ret32(__mv_net_poll(fds, (int32_t)nfds, timeout_ms)); /* no connection yet, or no memory */
    struct mv_rx_out out = {-1, 0};
    int n = mv_ret32(__mv_net_poll_recv(fds, (int32_t)nfds, timeout_ms, mv_rx.buf, MV_RX_SIZE, &out));
    if (n > 0 && out.index >= 0 && (size_t)out.index < nfds) {
        mv_rx.sd = fds[out.index].sd;
        mv_rx.result = out.result;
        mv_rx.off = 0;
    }
    return n;
}

/* ---- helpers --------------------------------------------------------------------------- */

ssize_t mv_send_all(int sd, const void *buf, size_t len) {
    const char *p = buf;
    size_t left = len;
    while (left > 0) {
        ssize_t n = mv_send(sd, p, left, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (n == 0) { /* a host must not do this for len > 0; avoid spinning */
            errno = EIO;
            return -1;
        }
        p += n;
        left -= (size_t)n;
    }
    return (ssize_t)len;
}

ssize_t mv_send_str(int sd, const char *s) { return mv_send_all(sd, s, strlen(s)); }

ssize_t mv_recv_line(int sd, char *buf, size_t cap) {
    if (!buf || cap < 2) {
        errno = EINVAL;
        return -1;
    }
    size_t n = 0, consumed = 0;
    for (;;) {
        char c;
        ssize_t r = mv_recv(sd, &c, 1, 0);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            buf[n] = '\0';
            return -1;
        }
        if (r == 0) /* end of stream: return what we have (0 if nothing) */
            break;
        consumed++;
        if (c == '\n')
            break;
        buf[n++] = c;
        if (n == cap - 1)
            break;
    }
    if (n > 0 && buf[n - 1] == '\r' && consumed > n) /* strip CR only of a CRLF */
        n--;
    buf[n] = '\0';
    return (ssize_t)consumed;
}

void mv_linebuf_init(struct mv_linebuf *lb) {
    lb->start = lb->end = 0;
    lb->eof = 0;
    lb->data[0] = '\0';
}

ssize_t mv_linebuf_fill(struct mv_linebuf *lb, int sd, int flags) {
    if (lb->start > 0) { /* compact */
        memmove(lb->data, lb->data + lb->start, lb->end - lb->start);
        lb->end -= lb->start;
        lb->start = 0;
    }
    if (lb->end >= MV_LINEBUF_SIZE) {
        errno = ENOBUFS;
        return -1;
    }
    ssize_t r = mv_recv(sd, lb->data + lb->end, MV_LINEBUF_SIZE - lb->end, flags);
    if (r == 0)
        lb->eof = 1;
    if (r > 0)
        lb->end += (size_t)r;
    return r;
}

char *mv_linebuf_next(struct mv_linebuf *lb) {
    char *begin = lb->data + lb->start;
    size_t avail = lb->end - lb->start;
    if (avail == 0)
        return NULL;
    char *nl = memchr(begin, '\n', avail);
    size_t len;
    if (nl) {
        len = (size_t)(nl - begin);
        lb->start += len + 1;
        if (len > 0 && begin[len - 1] == '\r')
            len--;
    } else if (lb->eof || avail >= MV_LINEBUF_SIZE) {
        /* trailing partial line at end of stream, or an over-long line piece */
        len = avail;
        lb->start += avail;
    } else {
        return NULL;
    }
    begin[len] = '\0'; /* data has one spare byte beyond MV_LINEBUF_SIZE */
    return begin;
}

static const char *mv_log_prefix;

void mv_log_set_prefix(const char *prefix) { mv_log_prefix = prefix ? prefix : ""; }

void mv_log(const char *fmt, ...) {
    if (!mv_log_prefix)
        mv_log_prefix = mv_env_str("MV_LOG_PREFIX", "[guest] ");
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    size_t len = strlen(msg);
    /* one fprintf per line so concurrent writers do not interleave mid-line */
    fprintf(stderr, "%s%s%s", mv_log_prefix, msg, (len && msg[len - 1] == '\n') ? "" : "\n");
    fflush(stderr);
}

long mv_env_int(const char *name, long def) {
    const char *s = getenv(name);
    if (!s || !*s)
        return def;
    char *end;
    int saved = errno;
    errno = 0;
    long v = strtol(s, &end, 0);
    int bad = errno != 0 || *end != '\0';
    errno = saved;
    return bad ? def : v;
}

const char *mv_env_str(const char *name, const char *def) {
    const char *s = getenv(name);
    return s ? s : def;
}

/* ---- functions -------------------------------------------------------------- */

static int mv_fn_parse(struct mv_fn_request *req);

int mv_fn_request(struct mv_fn_request *req) {
    int r = mv_fn_parse(req);
    if (r < 0) {
        errno = -r;
        return -1;
    }
    return 0;
}

static int mv_fn_parse(struct mv_fn_request *req) {
    static char small[16384];
    char *buf = small;
    int32_t cap = (int32_t)sizeof small - 1;
    int32_t n = __mv_fn_request(buf, cap);
    if (n < 0) return n;
    if (n > cap) { /* too big for the static buffer: ask again with room for it */
        buf = malloc((size_t)n + 1);
        if (!buf) return -ENOMEM;
        int32_t m = __mv_fn_request(buf, n);
        if (m != n) return m < 0 ? m : -EIO;
    }
    buf[n] = 0;
    /* METHOD\0PATH\0QUERY\0 (NAME\0VALUE\0)* \0 BODY */
    char *p = buf, *end = buf + n;
    const char **fields[3] = {&req->method, &req->path, &req->query};
    for (int i = 0; i < 3; i++) {
        *fields[i] = p;
        p += strnlen(p, (size_t)(end - p)) + 1;
        if (p > end) return -EIO;
    }
    req->nheaders = 0;
    while (p < end && *p) {
        const char *name = p;
        p += strnlen(p, (size_t)(end - p)) + 1;
        if (p > end) return -EIO;
        const char *value = p;
        p += strnlen(p, (size_t)(end - p)) + 1;
        if (p > end) return -EIO;
        if (req->nheaders < MV_FN_MAX_HEADERS) {
            req->headers[req->nheaders].name = name;
            req->headers[req->nheaders].value = value;
            req->nheaders++;
        }
    }
    p++; /* the empty name */
    if (p > end) p = end;
    req->body = p;
    req->body_len = (size_t)(end - p);
    return 0;
}

const char *mv_fn_header(const struct mv_fn_request *req, const char *name) {
    for (size_t i = 0; i < req->nheaders; i++)
        if (strcmp(req->headers[i].name, name) == 0) return req->headers[i].value;
    return NULL;
}

int mv_fn_respond(int status, const char *headers, const void *body, size_t len) {
    size_t hlen = headers ? strlen(headers) : 0;
    return mv_ret32(__mv_fn_respond(status, headers ? headers : "", (int32_t)hlen, body ? body : "", (int32_t)len));
}
