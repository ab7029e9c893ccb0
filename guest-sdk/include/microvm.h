/*
 * microvm.h - the microvmd guest SDK (C API over the guest ABI, version 1).
 *
 * Build guests with guest-sdk/mvcc, which compiles this SDK in and applies
 * Asyncify so that blocking calls suspend the guest instead of a host thread.
 * The raw host interface is specified in guest-sdk/ABI.md; this header is a
 * thin, BSD-socket-flavoured layer over it.
 *
 * Conventions (as in POSIX):
 *   - Functions returning int/ssize_t/long long return -1 on error and set
 *     errno.  The host reports WASI errno values, which are wasi-libc's own
 *     numbering, so errno, perror() and strerror() work as usual
 *     (EAGAIN, ECONNREFUSED, EROFS, ...).
 *   - "Blocking" calls suspend this guest (not the host) until they can
 *     complete; while suspended the guest may be paused, stopped or
 *     snapshotted by the daemon.  Pass MV_NONBLOCK to get EAGAIN instead.
 *   - Socket descriptors ("sd") are the host's, not WASI file descriptors:
 *     use mv_send/mv_recv/mv_close on them, not write()/read()/close().
 */
#ifndef MICROVM_H
#define MICROVM_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- versions ----------------------------------------------------------- */

/* ABI version this SDK speaks; exported to the host as microvm_abi_version(). */
#define MV_ABI_VERSION 1
/* SDK release (source-level API), independent of the ABI version. */
#define MV_SDK_VERSION_MAJOR 1
#define MV_SDK_VERSION_MINOR 2
#define MV_SDK_VERSION_PATCH 0
#define MV_SDK_VERSION "1.2.0"

/* Size of the Asyncify unwind buffer (see microvm_asyncify_data in ABI.md). */
#define MV_ASYNCIFY_BUF_SIZE (64 * 1024)

/* ---- flags and poll events (values fixed by the ABI) -------------------- */

#define MV_NONBLOCK 1  /* return -1/EAGAIN instead of suspending */

#define MV_POLLIN   1  /* readable: data, end of stream, or (listener) a connection */
#define MV_POLLOUT  4  /* writable */
#define MV_POLLERR  8  /* error (output only) */
#define MV_POLLHUP 16  /* peer hung up (output only) */

#define MV_BLK_RDONLY 1 /* mv_blk_flags(): the disk is read-only */

/* One entry of mv_poll(); layout is part of the ABI (8 bytes). */
struct mv_pollfd {
    int32_t sd;      /* socket descriptor; negative entries are ignored */
    int16_t events;  /* requested MV_POLLIN / MV_POLLOUT */
    int16_t revents; /* returned events, set by mv_poll */
};

/* ---- scheduling ---------------------------------------------------------- */

/* Suspend this guest for ms milliseconds (0 = just yield).  Returns 0. */
int mv_sleep_ms(int ms);

/* A suspension point: lets the host pause or snapshot the guest here, e.g.
 * inside a long computation.  Returns 0. */
int mv_yield(void);

/* ---- block devices (disk index = order of the VM's disks, from 0) ------- */

/* Number of attached disks (0 if none). */
int mv_blk_count(void);

/* Size of disk dev in bytes, or -1 (errno ENODEV for a bad index). */
long long mv_blk_size(int dev);

/* MV_BLK_RDONLY if the disk is read-only, 0 otherwise; -1 on error. */
int mv_blk_flags(int dev);

/* Read up to len bytes at offset into buf.  Returns the bytes read: short
 * only at the end of the disk, 0 at or past it.  -1 on error. */
ssize_t mv_blk_read(int dev, long long offset, void *buf, size_t len);

/* Write len bytes from buf at offset.  Returns len, or -1 with errno EROFS
 * (read-only disk), ENOSPC (beyond the end of the disk), EIO, ... */
ssize_t mv_blk_write(int dev, long long offset, const void *buf, size_t len);

/* Make previous writes durable (fsync).  0 or -1. */
int mv_blk_flush(int dev);

/* ---- TCP sockets ---------------------------------------------------------- */

/* Listen on guest port `port` (the daemon maps published host ports to it).
 * Returns a listening socket descriptor, or -1 (EADDRINUSE, EMFILE, ...). */
int mv_listen(int port, int backlog);

/* Accept the next inbound connection (blocking).  Returns its descriptor. */
int mv_accept(int sd);
/* As mv_accept; with flags = MV_NONBLOCK fails with EAGAIN if none is queued. */
int mv_accept_flags(int sd, int flags);

/* Open an outbound TCP connection to host:port (blocking).  host is an IPv4
 * or IPv6 literal or a name.  Only destinations allowed by the VM's egress
 * rules are reachable; others fail with ECONNREFUSED. */
int mv_connect(const char *host, int port);
/* As mv_connect, with flags (MV_NONBLOCK: fail with EAGAIN rather than wait;
 * the host decides whether a connect can complete immediately). */
int mv_connect_flags(const char *host, int port, int flags);

/* Parse "HOST:PORT", "[V6ADDR]:PORT" (brackets removed) into host (a buffer
 * of hostcap bytes, NUL-terminated) and *port.  0, or -1 with errno EINVAL
 * (malformed / port out of 1..65535) or ENAMETOOLONG (host does not fit). */
int mv_parse_hostport(const char *hostport, char *host, size_t hostcap, int *port);

/* mv_parse_hostport + mv_connect. */
int mv_connect_addr(const char *hostport);

/* Send up to len bytes; returns the number accepted (>= 1 unless len == 0).
 * Blocks while the send buffer is full unless flags has MV_NONBLOCK. */
ssize_t mv_send(int sd, const void *buf, size_t len, int flags);

/* Receive up to len bytes; returns the number received, 0 at end of stream.
 * Blocks until data arrives unless flags has MV_NONBLOCK (then EAGAIN). */
ssize_t mv_recv(int sd, void *buf, size_t len, int flags);

/* Close a socket descriptor.  0 or -1 (EBADF). */
int mv_close(int sd);

/* Wait for events on nfds descriptors (see struct mv_pollfd).  timeout_ms < 0
 * waits forever, 0 does not wait.  Returns the number of entries whose
 * revents != 0 (0 on timeout), or -1.
 *
 * Since SDK 1.1 (import net_poll_recv; a daemon without it refuses the guest
 * with "unknown import"): in the same host call, mv_poll also receives up to
 * MV_RX_SIZE bytes from the first connection it reports readable and holds
 * them for the next mv_recv on that socket, which then copies them without a
 * host call.  This is invisible to the program: that socket stays readable
 * (POLLIN) until the bytes are taken, mv_recv may return fewer bytes than are
 * in the kernel (as recv(2) may), and mv_close drops what is held.  It needs
 * one MV_RX_SIZE buffer, allocated by the first mv_poll after a connection
 * (mv_accept or mv_connect); until then, and without memory, it only polls. */
#define MV_RX_SIZE 65536
int mv_poll(struct mv_pollfd *fds, size_t nfds, int timeout_ms);

/* ---- helpers ---------------------------------------------------------------- */

/* Send all len bytes (looping over short sends).  Returns len, or -1; on
 * error some prefix of buf may already have been sent. */
ssize_t mv_send_all(int sd, const void *buf, size_t len);

/* Send a NUL-terminated string with mv_send_all. */
ssize_t mv_send_str(int sd, const char *s);

/* Read one line (blocking) into buf (cap bytes, cap >= 2), NUL-terminated,
 * with the '\n' and a preceding '\r' stripped.  Returns the number of bytes
 * consumed from the stream (terminator included; the line itself is
 * strlen(buf) long), 0 at end of stream with nothing read, -1 on error.
 * A line longer than cap-1 bytes is returned in pieces; a final line without
 * '\n' before end of stream is returned as a line.
 * Unbuffered (one byte per host call), so it can be freely mixed with
 * mv_recv and mv_poll on the same socket.  For event-driven servers use
 * struct mv_linebuf below. */
ssize_t mv_recv_line(int sd, char *buf, size_t cap);

/* A buffered line splitter for event-driven (mv_poll) servers.
 *
 *     struct mv_linebuf lb; mv_linebuf_init(&lb);
 *     ...when mv_poll says sd is readable:
 *     ssize_t n = mv_linebuf_fill(&lb, sd, MV_NONBLOCK);   // one mv_recv
 *     char *line;
 *     while ((line = mv_linebuf_next(&lb)) != NULL) handle(line);
 *     if (n == 0 || (n < 0 && errno != EAGAIN)) close the connection;
 *
 * Lines longer than MV_LINEBUF_SIZE-1 bytes are returned in pieces. */
#define MV_LINEBUF_SIZE 4096
struct mv_linebuf {
    size_t start, end;            /* unread bytes are data[start..end) */
    int eof;                      /* end of stream seen */
    char data[MV_LINEBUF_SIZE + 1];
};
void mv_linebuf_init(struct mv_linebuf *lb);
/* Receive once into the buffer (flags as mv_recv).  Returns bytes received,
 * 0 at end of stream (lb->eof is set), -1 on error (EAGAIN with MV_NONBLOCK
 * when nothing is available, ENOBUFS if the buffer is full - call
 * mv_linebuf_next first). */
ssize_t mv_linebuf_fill(struct mv_linebuf *lb, int sd, int flags);
/* Next complete line (without "\r\n"/"\n", NUL-terminated, valid until the
 * next fill), or NULL if none.  After end of stream, a trailing partial line
 * is returned too. */
char *mv_linebuf_next(struct mv_linebuf *lb);

/* printf-style log line to stderr: "<prefix>message\n" (a newline is added
 * unless the message ends with one).  The default prefix is "[guest] ";
 * the MV_LOG_PREFIX environment variable or mv_log_set_prefix() change it. */
void mv_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void mv_log_set_prefix(const char *prefix);

/* Integer value of environment variable name, or def if it is unset, empty
 * or not entirely a (decimal, 0x-hex or 0-octal) integer. */
long mv_env_int(const char *name, long def);

/* Value of environment variable name, or def if it is unset. */
const char *mv_env_str(const char *name, const char *def);

/* ABI version compiled in (MV_ABI_VERSION); same as the exported
 * microvm_abi_version(). */
int mv_abi_version(void);

/* ---- functions (microvm fn deploy NAME IMAGE --executor sdk; docs/functions.md) ----
 * Each request runs in a fresh instance restored from a snapshot taken while the guest waited in
 * mv_fn_request(): module state set up before that call is there for every request, and nothing a
 * request changes reaches the next.  The request lives in linear memory until the instance ends. */
#define MV_FN_MAX_HEADERS 64
struct mv_fn_header {
    const char *name;  /* lower-case */
    const char *value;
};
struct mv_fn_request {
    const char *method;  /* "GET", "POST", ... */
    const char *path;    /* "/hello/x" */
    const char *query;   /* the raw query string, without '?' ("" if none) */
    size_t nheaders;     /* at most MV_FN_MAX_HEADERS (more are dropped) */
    struct mv_fn_header headers[MV_FN_MAX_HEADERS];
    const char *body;    /* body_len bytes, NUL-terminated for convenience */
    size_t body_len;
};

/* Wait for this instance's request and parse it into *req.  0, or -1 with errno set (ENOSYS: not
 * running as a function; ENOMEM). */
int mv_fn_request(struct mv_fn_request *req);

/* The value of header name (lower-case), or NULL. */
const char *mv_fn_header(const struct mv_fn_request *req, const char *name);

/* Answer the request: status (100-599), headers as "Name: value" lines separated by '\n' (NULL for
 * none), and the body.  Call it once; the instance then returns from main.  0, or -1 with errno set. */
int mv_fn_respond(int status, const char *headers, const void *body, size_t len);

/* main() for a function: waits for the request, then returns handler(&req) (which calls
 * mv_fn_respond).  Usage: static int handle(const struct mv_fn_request *req) { ... }  MV_FUNCTION(handle) */
#define MV_FUNCTION(handler)                                          \
    int main(void) {                                                  \
        static struct mv_fn_request mv_fn_req_;                       \
        if (mv_fn_request(&mv_fn_req_) < 0) return 1;                 \
        return handler(&mv_fn_req_);                                  \
    }

#ifdef __cplusplus
}
#endif

#endif /* MICROVM_H */
