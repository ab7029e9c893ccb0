/* kv: a persistent key-value server on virtual disk 0.
 *
 * Protocol (one command per line, "\n" or "\r\n", replies are one line):
 *   SET <key> <value>  -> OK            (value = rest of the line, may hold spaces)
 *   GET <key>          -> <value> | NOT_FOUND
 *   DEL <key>          -> OK | NOT_FOUND
 *   PING               -> PONG
 *   QUIT               -> closes the connection
 *   anything else      -> ERR <reason>
 * Commands are case-insensitive; keys are 1..255 bytes without spaces.
 *
 * Storage: the raw block device holds an append-only log.
 *   offset 0:    header (little-endian) { char magic[8] = "MVKVLOG1";
 *                u32 version = 1; u32 header_size = 4096; u64 used; }
 *                `used` = bytes of valid records after the header
 *   offset 4096: records { u8 op (1 = SET, 2 = DEL); u32 klen; u32 vlen;
 *                key[klen]; value[vlen] }
 * A write appends the record, flushes, then rewrites the header's `used` and
 * flushes again, so a record counts only once it is fully on disk.  At start
 * the log is replayed into an in-memory hash table.  A blank (all-zero) disk
 * is formatted; KV_FORMAT=1 forces formatting.  When the log is full, SET/DEL
 * answer "ERR disk full".  A read-only disk serves GETs only.
 *
 * Env: PORT (default 8000), KV_DISK (disk index, default 0), KV_FORMAT.
 * Clients are served concurrently with mv_poll.
 */
#include <errno.h>
#include <microvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define MAGIC "MVKVLOG1"
#define HDR_SIZE 4096
#define OP_SET 1
#define OP_DEL 2
#define REC_HDR 9
#define MAX_KEY 255

struct hdr {
    char magic[8];
    uint32_t version;
    uint32_t header_size;
    uint64_t used;
};

static int disk;
static long long disk_size;
static uint64_t used;
static int readonly;

/* ---- hash table ------------------------------------------------------------ */

struct entry {
    struct entry *next;
    char *key, *val;
    size_t vlen;
};

static struct entry **table;
static size_t nbuckets = 1024, nentries;

static uint32_t hash(const char *s, size_t n) {
    uint32_t h = 2166136261u; /* FNV-1a */
    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)s[i]) * 16777619u;
    return h;
}

static struct entry **lookup(const char *key, size_t klen) {
    struct entry **pp = &table[hash(key, klen) & (nbuckets - 1)];
    for (; *pp; pp = &(*pp)->next)
        if (strlen((*pp)->key) == klen && memcmp((*pp)->key, key, klen) == 0)
            break;
    return pp;
}

static void grow_table(void) {
    size_t nb = nbuckets * 2;
    struct entry **nt = calloc(nb, sizeof *nt);
    if (!nt)
        return; /* keep the old, fuller table */
    for (size_t i = 0; i < nbuckets; i++)
        for (struct entry *e = table[i], *next; e; e = next) {
            next = e->next;
            struct entry **b = &nt[hash(e->key, strlen(e->key)) & (nb - 1)];
            e->next = *b;
            *b = e;
        }
    free(table);
    table = nt;
    nbuckets = nb;
}

static int table_set(const char *key, size_t klen, const char *val, size_t vlen) {
    struct entry **pp = lookup(key, klen);
    char *v = malloc(vlen + 1);
    if (!v)
        return -1;
    memcpy(v, val, vlen);
    v[vlen] = '\0';
    if (*pp) {
        free((*pp)->val);
        (*pp)->val = v;
        (*pp)->vlen = vlen;
        return 0;
    }
    struct entry *e = malloc(sizeof *e);
    char *k = malloc(klen + 1);
    if (!e || !k) {
        free(e);
        free(k);
        free(v);
        return -1;
    }
    memcpy(k, key, klen);
    k[klen] = '\0';
    *e = (struct entry){.next = NULL, .key = k, .val = v, .vlen = vlen};
    *pp = e;
    if (++nentries > nbuckets)
        grow_table();
    return 0;
}

static int table_del(const char *key, size_t klen) {
    struct entry **pp = lookup(key, klen);
    if (!*pp)
        return 0;
    struct entry *e = *pp;
    *pp = e->next;
    free(e->key);
    free(e->val);
    free(e);
    nentries--;
    return 1;
}

/* ---- disk ------------------------------------------------------------------------ */

static int disk_read_exact(long long off, void *buf, size_t len) {
    char *p = buf;
    while (len > 0) {
        ssize_t n = mv_blk_read(disk, off, p, len);
        if (n < 0)
            return -1;
        if (n == 0) {
            errno = EIO; /* log claims more than the disk holds */
            return -1;
        }
        p += n;
        off += n;
        len -= (size_t)n;
    }
    return 0;
}

static int disk_write_exact(long long off, const void *buf, size_t len) {
    ssize_t n = mv_blk_write(disk, off, buf, len);
    if (n < 0)
        return -1;
    if ((size_t)n != len) {
        errno = EIO;
        return -1;
    }
    return 0;
}

static int write_header(void) {
    struct hdr h = {.version = 1, .header_size = HDR_SIZE, .used = used};
    memcpy(h.magic, MAGIC, 8);
    if (disk_write_exact(0, &h, sizeof h) < 0)
        return -1;
    return mv_blk_flush(disk);
}

static int format_disk(void) {
    used = 0;
    return write_header();
}

/* Append one record and commit it (see the format comment above). */
static int log_append(int op, const char *key, size_t klen, const char *val, size_t vlen) {
    if (readonly) {
        errno = EROFS;
        return -1;
    }
    size_t reclen = REC_HDR + klen + vlen;
    if ((long long)(HDR_SIZE + used + reclen) > disk_size) {
        errno = ENOSPC;
        return -1;
    }
    char *rec = malloc(reclen);
    if (!rec)
        return -1;
    uint32_t k32 = (uint32_t)klen, v32 = (uint32_t)vlen;
    rec[0] = (char)op;
    memcpy(rec + 1, &k32, 4);
    memcpy(rec + 5, &v32, 4);
    memcpy(rec + REC_HDR, key, klen);
    if (vlen)
        memcpy(rec + REC_HDR + klen, val, vlen);
    int r = disk_write_exact(HDR_SIZE + (long long)used, rec, reclen);
    free(rec);
    if (r < 0 || mv_blk_flush(disk) < 0)
        return -1;
    used += reclen;
    if (write_header() < 0) {
        used -= reclen;
        return -1;
    }
    return 0;
}

static int replay(void) {
    uint64_t off = 0;
    size_t nrec = 0;
    char *buf = NULL;
    size_t cap = 0;
    while (off < used) {
        errno = 0;
        unsigned char rh[REC_HDR];
        uint32_t klen, vlen;
        if (off + REC_HDR > used || disk_read_exact(HDR_SIZE + (long long)off, rh, REC_HDR) < 0)
            goto corrupt;
        memcpy(&klen, rh + 1, 4);
        memcpy(&vlen, rh + 5, 4);
        if ((rh[0] != OP_SET && rh[0] != OP_DEL) || klen == 0 || klen > MAX_KEY ||
            off + REC_HDR + (uint64_t)klen + vlen > used)
            goto corrupt;
        size_t need = (size_t)klen + vlen;
        if (need > cap) {
            char *nb = realloc(buf, need);
            if (!nb)
                goto oom;
            buf = nb;
            cap = need;
        }
        if (disk_read_exact(HDR_SIZE + (long long)off + REC_HDR, buf, need) < 0)
            goto corrupt;
        if (rh[0] == OP_SET) {
            if (table_set(buf, klen, buf + klen, vlen) < 0)
                goto oom;
        } else {
            table_del(buf, klen);
        }
        off += REC_HDR + need;
        nrec++;
    }
    free(buf);
    mv_log("kv: replayed %zu records (%llu bytes), %zu keys", nrec, (unsigned long long)used, nentries);
    return 0;
corrupt:
    mv_log("kv: log corrupt at offset %llu (%s); keeping the %llu bytes before it",
           (unsigned long long)off, errno ? strerror(errno) : "bad record", (unsigned long long)off);
    used = off; /* later appends overwrite the damaged tail */
    free(buf);
    return 0;
oom:
    free(buf);
    errno = ENOMEM;
    return -1;
}

static int open_store(void) {
    disk_size = mv_blk_size(disk);
    if (disk_size < 0)
        return -1;
    if (disk_size < HDR_SIZE + 64) {
        mv_log("kv: disk %d is too small (%lld bytes)", disk, disk_size);
        errno = ENOSPC;
        return -1;
    }
    int flags = mv_blk_flags(disk);
    readonly = flags > 0 && (flags & MV_BLK_RDONLY);
    struct hdr h;
    if (disk_read_exact(0, &h, sizeof h) < 0)
        return -1;
    int blank = 1;
    for (size_t i = 0; i < sizeof h; i++)
        blank &= ((unsigned char *)&h)[i] == 0;
    if (mv_env_int("KV_FORMAT", 0) || blank) {
        if (readonly) {
            mv_log("kv: disk %d is blank and read-only", disk);
            errno = EROFS;
            return -1;
        }
        mv_log("kv: formatting disk %d (%lld bytes)", disk, disk_size);
        return format_disk();
    }
    if (memcmp(h.magic, MAGIC, 8) != 0 || h.version != 1 || h.header_size != HDR_SIZE) {
        mv_log("kv: disk %d is not a kv store (bad magic); set KV_FORMAT=1 to format it", disk);
        errno = EINVAL;
        return -1;
    }
    if (h.used > (uint64_t)(disk_size - HDR_SIZE)) {
        mv_log("kv: header claims %llu bytes of log, disk has room for %lld; truncating",
               (unsigned long long)h.used, disk_size - HDR_SIZE);
        h.used = (uint64_t)(disk_size - HDR_SIZE);
    }
    used = h.used;
    return replay();
}

/* ---- protocol ----------------------------------------------------------------------------- */

struct client {
    int sd;
    int closing;                 /* QUIT seen: close once out is drained */
    struct mv_linebuf in;
    char *out;
    size_t olen, ooff, ocap;
};

static int out_append(struct client *c, const char *s, size_t n) {
    if (c->olen + n + 1 > c->ocap) {
        size_t ncap = c->ocap ? c->ocap : 256;
        while (ncap < c->olen + n + 1)
            ncap *= 2;
        char *no = realloc(c->out, ncap);
        if (!no)
            return -1;
        c->out = no;
        c->ocap = ncap;
    }
    memcpy(c->out + c->olen, s, n);
    c->olen += n;
    return 0;
}

static int reply(struct client *c, const char *s) {
    if (out_append(c, s, strlen(s)) < 0)
        return -1;
    return out_append(c, "\n", 1);
}

static const char *err_reply(void) {
    switch (errno) {
    case ENOSPC: return "ERR disk full";
    case EROFS: return "ERR read-only disk";
    case ENOMEM: return "ERR out of memory";
    default: return "ERR storage error";
    }
}

/* Split off the next space-separated word; *rest points past it. */
static char *word(char **rest) {
    char *s = *rest;
    while (*s == ' ')
        s++;
    if (!*s)
        return NULL;
    char *e = strchr(s, ' ');
    if (e) {
        *e = '\0';
        *rest = e + 1;
    } else {
        *rest = s + strlen(s);
    }
    return s;
}

static int handle(struct client *c, char *line) {
    char *rest = line;
    char *cmd = word(&rest);
    if (!cmd)
        return reply(c, "ERR empty command");
    if (!strcasecmp(cmd, "PING"))
        return reply(c, "PONG");
    if (!strcasecmp(cmd, "QUIT")) {
        c->closing = 1;
        return 0;
    }
    int is_set = !strcasecmp(cmd, "SET"), is_get = !strcasecmp(cmd, "GET"), is_del = !strcasecmp(cmd, "DEL");
    if (!is_set && !is_get && !is_del)
        return reply(c, "ERR unknown command (use SET, GET, DEL, PING, QUIT)");
    char *key = word(&rest);
    if (!key)
        return reply(c, is_set ? "ERR usage: SET <key> <value>" : is_get ? "ERR usage: GET <key>" : "ERR usage: DEL <key>");
    size_t klen = strlen(key);
    if (klen > MAX_KEY)
        return reply(c, "ERR key too long");
    if (is_get) {
        if (*rest)
            return reply(c, "ERR usage: GET <key>");
        struct entry *e = *lookup(key, klen);
        if (!e)
            return reply(c, "NOT_FOUND");
        if (out_append(c, e->val, e->vlen) < 0)
            return -1;
        return out_append(c, "\n", 1);
    }
    if (is_del) {
        if (*rest)
            return reply(c, "ERR usage: DEL <key>");
        if (!*lookup(key, klen))
            return reply(c, "NOT_FOUND");
        if (log_append(OP_DEL, key, klen, NULL, 0) < 0)
            return reply(c, err_reply());
        table_del(key, klen);
        return reply(c, "OK");
    }
    /* SET: the value is the rest of the line after exactly one separator */
    if (rest == key + klen) /* no separator after the key; "SET k " sets "" */
        return reply(c, "ERR usage: SET <key> <value>");
    size_t vlen = strlen(rest);
    if (log_append(OP_SET, key, klen, rest, vlen) < 0)
        return reply(c, err_reply());
    if (table_set(key, klen, rest, vlen) < 0)
        return reply(c, "ERR out of memory");
    return reply(c, "OK");
}

/* Send queued replies without blocking; -1 if the client is gone. */
static int flush_out(struct client *c) {
    while (c->ooff < c->olen) {
        ssize_t n = mv_send(c->sd, c->out + c->ooff, c->olen - c->ooff, MV_NONBLOCK);
        if (n < 0)
            return errno == EAGAIN ? 0 : -1;
        c->ooff += (size_t)n;
    }
    c->ooff = c->olen = 0;
    return 0;
}

static struct client **clients;
static size_t nclients, capclients;

static void drop(size_t i) {
    mv_close(clients[i]->sd);
    free(clients[i]->out);
    free(clients[i]);
    clients[i] = clients[--nclients];
}

/* Service one client after poll; -1 = drop it. */
static int service(struct client *c, int revents) {
    if (revents & MV_POLLOUT || c->olen) {
        if (flush_out(c) < 0)
            return -1;
    }
    if (c->olen == 0 && c->closing)
        return -1;
    if (c->olen || c->closing || !(revents & (MV_POLLIN | MV_POLLHUP | MV_POLLERR)))
        return 0; /* let the client read its replies before we read more */
    ssize_t n = mv_linebuf_fill(&c->in, c->sd, MV_NONBLOCK);
    if (n < 0 && errno == EAGAIN)
        return 0;
    if (n < 0 && errno != ENOBUFS)
        return -1;
    char *line;
    while (!c->closing && (line = mv_linebuf_next(&c->in)) != NULL)
        if (handle(c, line) < 0)
            return -1;
    if (flush_out(c) < 0)
        return -1;
    if (c->in.eof || (c->closing && c->olen == 0))
        return c->olen ? (c->closing = 1, 0) : -1;
    return 0;
}

int main(void) {
    int ndisks = mv_blk_count();
    disk = (int)mv_env_int("KV_DISK", 0);
    if (ndisks <= 0 || disk < 0 || disk >= ndisks) {
        fprintf(stderr, "kv: error: no disk attached (need virtual disk %d, have %d)\n", disk,
                ndisks < 0 ? 0 : ndisks);
        return 1;
    }
    table = calloc(nbuckets, sizeof *table);
    if (!table || open_store() < 0) {
        fprintf(stderr, "kv: error: cannot open the store on disk %d: %s\n", disk, strerror(errno));
        return 1;
    }
    int port = (int)mv_env_int("PORT", 8000);
    int lsd = mv_listen(port, 128);
    if (lsd < 0) {
        fprintf(stderr, "kv: error: listen on port %d: %s\n", port, strerror(errno));
        return 1;
    }
    mv_log("kv: serving %zu keys on port %d%s", nentries, port, readonly ? " (read-only)" : "");

    struct mv_pollfd *pfds = NULL;
    for (;;) {
        struct mv_pollfd *np = realloc(pfds, (nclients + 1) * sizeof *pfds);
        if (!np) {
            fprintf(stderr, "kv: error: out of memory\n");
            return 1;
        }
        pfds = np;
        pfds[0] = (struct mv_pollfd){.sd = lsd, .events = MV_POLLIN};
        for (size_t i = 0; i < nclients; i++)
            pfds[i + 1] = (struct mv_pollfd){
                .sd = clients[i]->sd,
                .events = clients[i]->olen ? MV_POLLOUT : MV_POLLIN,
            };
        size_t npfds = nclients + 1;
        if (mv_poll(pfds, npfds, -1) < 0) {
            fprintf(stderr, "kv: error: poll: %s\n", strerror(errno));
            return 1;
        }
        for (size_t i = npfds - 1; i >= 1; i--) /* backwards: drop() swaps with the last */
            if (pfds[i].revents && service(clients[i - 1], pfds[i].revents) < 0)
                drop(i - 1);
        if (pfds[0].revents & MV_POLLIN) {
            for (;;) {
                int sd = mv_accept_flags(lsd, MV_NONBLOCK);
                if (sd < 0) {
                    if (errno != EAGAIN)
                        mv_log("kv: accept: %s", strerror(errno));
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
                mv_linebuf_init(&c->in);
                clients[nclients++] = c;
            }
        }
    }
}
