/* Direct instances run natively: a function's request as one wasmtime store and instance, made, run and
 * dropped on a native worker thread that never takes Python's GIL (microvmd/functions/native.py).
 *
 * The Python version of the same run (functions/direct.py, DirectRunner._run) costs about 140 us of
 * Python per request and holds the GIL for most of it, so the event loop and the run take turns on one
 * core. Here the loop only hands a job over (mvd_submit) and collects finished ones (mvd_drain, woken by
 * an eventfd); the run itself, its WASI context and its host calls are C against wasmtime's C API, the
 * same library (and the same engine and pre-linked modules) that wasmtime-py loaded.
 *
 * What a run does, and the host calls' meaning, are those of direct.py (its docstrings are the
 * reference): stdin is the request body served by microvm_wasi.fd_read, poll_oneoff answers what is ready
 * now (a wait ends the run: the request goes to a VM), clocks count from the instance's start, and an SDK
 * function's fn_request / fn_respond exchange the request and response. One difference: stdout and stderr
 * are buffers of the run, not files (fd_write is served here; wasmtime's file streams cost a thread hop per
 * write), stdout kept up to its cap and stderr's last bytes.
 *
 * Built by scripts/build-native (the package build runs it); plain C, no Python headers. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <semaphore.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MVD_ABI 2 /* functions/native.py checks it: a stale build is not used */

/* ---------------------------------------------------------------- wasmtime's C API, by dlsym */
/* Layouts, checked against wasmtime-py's own at mvd_init: a value and an extern are a kind byte, padding
 * and a union at offset 8; an instance is 16 bytes. */
#define VAL_SIZE 32
#define VAL_OF 8
#define EXTERN_SIZE 32
#define EXTERN_OF 8
#define INSTANCE_SIZE 16
#define KIND_I32 0
#define KIND_I64 1
#define EXTERN_FUNC 0
#define EXTERN_GLOBAL 1
#define EXTERN_MEMORY 3

typedef struct { size_t size; char *data; } byte_vec;
typedef struct { bool (*callback)(void *); void *env; void (*finalizer)(void *); } continuation;
typedef struct { _Alignas(8) unsigned char b[VAL_SIZE]; } val_t;
typedef struct { _Alignas(8) unsigned char b[EXTERN_SIZE]; } extern_t;

static void *(*store_new)(void *, void *, void (*)(void *));
static void *(*store_context)(void *);
static void (*store_delete)(void *);
static void (*store_limiter)(void *, int64_t, int64_t, int64_t, int64_t, int64_t);
static void *(*set_fuel)(void *, uint64_t);
static void (*set_epoch_deadline)(void *, uint64_t);
static void *(*wasi_config_new)(void);
static bool (*wasi_set_argv)(void *, size_t, const char **);
static bool (*wasi_set_env)(void *, size_t, const char **, const char **);
static bool (*wasi_set_stdout_file)(void *, const char *);
static bool (*wasi_set_stderr_file)(void *, const char *);
static void (*wasi_config_delete)(void *);
static void *(*set_wasi)(void *, void *);
static void *(*pre_instantiate_async)(void *, void *, void *, void **, void **);
static bool (*instance_export_get)(void *, const void *, const char *, size_t, void *);
static void *(*func_call_async)(void *, const void *, const void *, size_t, void *, size_t, void **, void **);
static bool (*future_poll)(void *);
static void (*future_delete)(void *);
static size_t (*memory_data_size)(const void *, const void *);
static uint8_t *(*memory_data)(const void *, const void *);
static bool (*caller_export_get)(void *, const char *, size_t, void *);
static void *(*caller_context)(void *);
static void *(*global_set)(void *, const void *, const void *);
static void *(*trap_new)(const char *, size_t);
static bool (*trap_code)(const void *, uint8_t *);
static void (*trap_message)(const void *, byte_vec *);
static void (*trap_delete)(void *);
static bool (*error_exit_status)(const void *, int *);
static void (*error_message)(const void *, byte_vec *);
static void (*error_delete)(void *);
static void (*byte_vec_delete)(byte_vec *);

/* ---------------------------------------------------------------- a job (functions/native.py: _Job) */
enum outcome {
    OUT_EXIT = 0,       /* the entry returned or called proc_exit: code */
    OUT_TRAP = 1,       /* trapped: code (a wasmtime trap code, -1 for none), message */
    OUT_FAILED = 2,     /* an error that is not a trap: message */
    OUT_NEEDS_VM = 3,   /* the guest waited, or asked for what only a VM gives */
    OUT_INST_TRAP = 4,  /* instantiation trapped (code, message) */
    OUT_INST_ERROR = 5, /* instantiation failed otherwise (limits, no slot): message */
    OUT_SETUP = 6,      /* the run could not be set up (outputs, WASI context): message */
};

struct job {
    /* the queue (the worker's) */
    struct job *next;
    uint64_t id;
    /* inputs */
    void *engine, *pre;
    const char *names; /* boot calls then the entry, each NUL-terminated */
    const uint8_t *nresults; /* results of each name */
    int32_t nnames;
    const char *argv; int32_t argc; /* NUL-terminated strings, one after the other */
    const char *env; int32_t envc; /* name, value, name, value... */
    const uint8_t *stdin_data; uint64_t stdin_len;
    int32_t has_request; const uint8_t *request; uint64_t request_len;
    const char *rewind; /* the Asyncify state global to set back to normal at fn_request, or NULL */
    int64_t mono_ns; /* where the monotonic clock starts */
    uint64_t fuel, deadline_ticks;
    int64_t memory, table_elements, instances, tables, memories;
    uint64_t stdout_cap, stderr_keep;
    /* outputs */
    int32_t outcome, code;
    char message[1024];
    uint8_t *out; uint64_t out_len; int32_t out_truncated;
    uint8_t *err; uint64_t err_len;
    int64_t instance_ns;
    int32_t resp_status; uint8_t *resp_headers; uint64_t resp_headers_len; uint8_t *resp_body; uint64_t resp_body_len;
    /* the run's own state */
    uint64_t stdin_pos;
    int64_t mono0;
    int32_t needs_vm;
    uint64_t out_room, err_total; /* bytes allocated at ``out``; bytes written to stderr in all */
};

/* ---------------------------------------------------------------- a pool of workers */
/* The event loop's thread never waits for a lock here: a worker holding one may be preempted for a whole
 * time slice (on a small host the loop, the workers and the clients share two CPUs), and a loop stuck behind
 * it stalls every request. So the loop pushes jobs onto a lock-free stack and posts a semaphore (a system
 * call only when a worker sleeps on it); workers share the jobs under a lock of their own; a finished job is
 * pushed onto another lock-free stack, and the eventfd is written when that stack was empty (the loop takes
 * the whole stack at each wake-up). */
struct pool {
    struct job *incoming; /* pushed by the loop (newest first) */
    pthread_mutex_t mu; /* the workers': ``ready`` */
    struct job *ready; /* taken from ``incoming``, oldest first */
    sem_t jobs; /* counts jobs pushed and not yet taken (and, at the end, one wake-up per worker) */
    struct job *done; /* pushed by the workers */
    int efd, stopping, nthreads, nice;
    pthread_t threads[64];
};
static __thread struct job *current;

static int64_t now_ns(clockid_t c) {
    struct timespec ts;
    clock_gettime(c, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void copy_message(struct job *j, const char *prefix, byte_vec *v) {
    size_t n = v->size;
    while (n && v->data[n - 1] == '\0') n--;
    snprintf(j->message, sizeof j->message, "%s%.*s", prefix, (int)n, v->data);
}

/* a trap or error of a call: sets the outcome; true when there was one */
static bool failure(struct job *j, void *trap, void *err, bool instantiating) {
    byte_vec v = {0, NULL};
    if (trap) {
        uint8_t code;
        j->code = trap_code(trap, &code) ? code : -1;
        trap_message(trap, &v);
        copy_message(j, "", &v);
        byte_vec_delete(&v);
        trap_delete(trap);
        j->outcome = instantiating ? (j->code >= 0 ? OUT_INST_TRAP : OUT_INST_ERROR) : OUT_TRAP;
        return true;
    }
    if (err) {
        int status;
        if (!instantiating && error_exit_status(err, &status)) {
            j->outcome = OUT_EXIT;
            j->code = status;
        } else {
            error_message(err, &v);
            copy_message(j, "", &v);
            byte_vec_delete(&v);
            j->outcome = instantiating ? OUT_INST_ERROR : OUT_FAILED;
            j->code = -1;
        }
        error_delete(err);
        return true;
    }
    return false;
}

/* stdout: kept up to ``stdout_cap`` bytes (beyond, only counted as truncated); stderr: its last
 * ``stderr_keep`` bytes, in a ring put in order at the end (``order_stderr``). */
static bool to_stdout(struct job *j, const uint8_t *data, uint32_t len) {
    uint64_t room = j->stdout_cap - j->out_len;
    uint32_t take = len < room ? len : (uint32_t)room;
    if (take < len) j->out_truncated = 1;
    if (!take) return true;
    if (j->out_len + take > j->out_room) {
        uint64_t want = j->out_room ? j->out_room : 4096;
        while (want < j->out_len + take) want *= 2;
        if (want > j->stdout_cap) want = j->stdout_cap;
        uint8_t *grown = realloc(j->out, want);
        if (!grown) return false;
        j->out = grown;
        j->out_room = want;
    }
    memcpy(j->out + j->out_len, data, take);
    j->out_len += take;
    return true;
}

static bool to_stderr(struct job *j, const uint8_t *data, uint32_t len) {
    uint64_t keep = j->stderr_keep;
    if (!keep) return true;
    if (!j->err && !(j->err = malloc(keep))) return false;
    if (len > keep) { /* only its last bytes can stay */
        data += len - keep;
        j->err_total += len - keep;
        len = (uint32_t)keep;
    }
    uint64_t at = j->err_total % keep, first = keep - at < len ? keep - at : len;
    memcpy(j->err + at, data, first);
    memcpy(j->err, data + first, len - first);
    j->err_total += len;
    return true;
}

static void order_stderr(struct job *j) {
    uint64_t keep = j->stderr_keep;
    if (!j->err) return;
    if (j->err_total <= keep) { j->err_len = j->err_total; return; }
    uint64_t at = j->err_total % keep; /* the oldest kept byte */
    uint8_t *ordered = malloc(keep);
    if (ordered) {
        memcpy(ordered, j->err + at, keep - at);
        memcpy(ordered + keep - at, j->err, at);
        free(j->err);
        j->err = ordered;
    }
    j->err_len = keep;
}

/* The run in its store (the caller deletes the store): sets the job's outcome. */
static void run_in(struct job *j, void *store, void *ctx) {
    void *e = set_fuel(ctx, j->fuel);
    if (e) { failure(j, NULL, e, true); j->outcome = OUT_SETUP; return; }
    set_epoch_deadline(ctx, j->deadline_ticks);
    store_limiter(store, j->memory, j->table_elements, j->instances, j->tables, j->memories);

    int argc = j->argc > 0 ? j->argc : 0, envc = j->envc > 0 ? j->envc : 0;
    const char **argv = calloc((size_t)argc + 1, sizeof *argv), **names = calloc((size_t)envc + 1, sizeof *names),
               **values = calloc((size_t)envc + 1, sizeof *values);
    bool ok = argv && names && values;
    if (ok) {
        const char *p = j->argv;
        for (int i = 0; i < argc; i++) { argv[i] = p; p += strlen(p) + 1; }
        p = j->env;
        for (int i = 0; i < envc; i++) { names[i] = p; p += strlen(p) + 1; values[i] = p; p += strlen(p) + 1; }
    }
    void *cfg = ok ? wasi_config_new() : NULL;
    ok = cfg && wasi_set_argv(cfg, (size_t)argc, argv) && wasi_set_env(cfg, (size_t)envc, names, values);
    free(argv);
    free(names);
    free(values);
    if (!ok) {
        if (cfg) wasi_config_delete(cfg);
        j->outcome = OUT_SETUP;
        snprintf(j->message, sizeof j->message, "cannot set up the WASI context (out of memory)");
        return;
    }
    e = set_wasi(ctx, cfg); /* (takes the configuration) */
    if (e) { failure(j, NULL, e, true); j->outcome = OUT_SETUP; return; }

    _Alignas(8) unsigned char instance[INSTANCE_SIZE];
    void *trap = NULL, *err = NULL;
    void *fut = pre_instantiate_async(j->pre, ctx, instance, &trap, &err);
    while (!future_poll(fut)) {}
    future_delete(fut);
    j->instance_ns = now_ns(CLOCK_MONOTONIC) - (j->mono0 + j->mono_ns);
    if (failure(j, trap, err, true)) return;

    const char *name = j->names;
    for (int i = 0; i < j->nnames; i++, name += strlen(name) + 1) {
        extern_t ext;
        if (!instance_export_get(ctx, instance, name, strlen(name), &ext) || ext.b[0] != EXTERN_FUNC) {
            j->outcome = OUT_FAILED;
            snprintf(j->message, sizeof j->message, "the module exports no function '%s'", name);
            return;
        }
        size_t nres = j->nresults[i];
        val_t results[16];
        if (nres > 16) {
            j->outcome = OUT_FAILED;
            snprintf(j->message, sizeof j->message, "'%s' returns more than 16 values", name);
            return;
        }
        trap = err = NULL;
        fut = func_call_async(ctx, ext.b + EXTERN_OF, NULL, 0, results, nres, &trap, &err);
        while (!future_poll(fut)) {}
        future_delete(fut);
        if (j->needs_vm) {
            if (trap) trap_delete(trap);
            if (err) error_delete(err);
            j->outcome = OUT_NEEDS_VM;
            return;
        }
        if (failure(j, trap, err, false)) return;
    }
}

static void run(struct job *j) {
    j->outcome = OUT_EXIT;
    j->code = 0;
    j->message[0] = '\0';
    j->mono0 = now_ns(CLOCK_MONOTONIC) - j->mono_ns;
    void *store = store_new(j->engine, NULL, NULL);
    current = j;
    run_in(j, store, store_context(store));
    current = NULL;
    store_delete(store);
    order_stderr(j);
}

#define SPIN_NS 30000 /* ns a worker looks for a job before it sleeps (see worker) */

static struct job *take(struct pool *p) {
    pthread_mutex_lock(&p->mu);
    if (!p->ready) { /* the loop's newest-first stack, reversed */
        struct job *j = __atomic_exchange_n(&p->incoming, NULL, __ATOMIC_ACQUIRE), *rev = NULL;
        while (j) { struct job *next = j->next; j->next = rev; rev = j; j = next; }
        p->ready = rev;
    }
    struct job *j = p->ready;
    if (j) p->ready = j->next;
    pthread_mutex_unlock(&p->mu);
    return j;
}

static void *worker(void *arg) {
    struct pool *p = arg;
    /* guests yield the CPU to the control plane, as on the vCPU workers (vmm/scheduler.py, VCPU_NICE) */
    if (setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), p->nice)) { /* (best effort) */ }
    for (;;) {
        /* a job is looked for a little before sleeping: under load the next comes within microseconds, and
         * waking a sleeping worker is a system call and an inter-processor interrupt on the loop's thread.
         * The look yields the CPU between tries: on a small host a pure spin took it from the event loop
         * and the clients (p99 at 6,000 req/s on 2 CPUs: 25 ms spinning, 5 ms yielding). */
        bool got = false;
        int64_t until = now_ns(CLOCK_MONOTONIC) + SPIN_NS;
        do {
            if (!sem_trywait(&p->jobs)) { got = true; break; }
            sched_yield(); /* (another thread that wants this CPU, the event loop say, gets it) */
        } while (now_ns(CLOCK_MONOTONIC) < until);
        if (!got)
            while (sem_wait(&p->jobs) && errno == EINTR) {}
        struct job *j = take(p);
        if (!j) {
            if (__atomic_load_n(&p->stopping, __ATOMIC_ACQUIRE)) break; /* and nothing left to run */
            continue;
        }
        run(j);
        struct job *head = __atomic_load_n(&p->done, __ATOMIC_RELAXED);
        do j->next = head;
        while (!__atomic_compare_exchange_n(&p->done, &head, j, true, __ATOMIC_RELEASE, __ATOMIC_RELAXED));
        if (!head) { /* (the loop takes all that is done at each wake-up) */
            uint64_t one = 1;
            if (write(p->efd, &one, sizeof one) < 0) {}
        }
    }
    return NULL;
}

/* ---------------------------------------------------------------- host calls */
static bool always_ready(void *env) { (void)env; return true; }

static inline int32_t arg32(const void *args, int i) {
    int32_t v;
    memcpy(&v, (const unsigned char *)args + (size_t)i * VAL_SIZE + VAL_OF, 4);
    return v;
}
static inline int64_t arg64(const void *args, int i) {
    int64_t v;
    memcpy(&v, (const unsigned char *)args + (size_t)i * VAL_SIZE + VAL_OF, 8);
    return v;
}
static inline void result32(void *results, int32_t v) {
    unsigned char *r = results;
    memset(r, 0, VAL_SIZE);
    r[0] = KIND_I32;
    memcpy(r + VAL_OF, &v, 4);
}

typedef struct { uint8_t *base; size_t size; } mem_t;

static mem_t memory_of(void *caller) {
    extern_t ext;
    mem_t m = {NULL, 0};
    if (caller_export_get(caller, "memory", 6, &ext) && ext.b[0] == EXTERN_MEMORY) {
        void *ctx = caller_context(caller);
        m.base = memory_data(ctx, ext.b + EXTERN_OF);
        m.size = memory_data_size(ctx, ext.b + EXTERN_OF);
    }
    return m;
}
static inline bool in_bounds(mem_t m, uint32_t ptr, uint64_t len) {
    return m.base && (uint64_t)ptr + len <= m.size;
}

#define HOST(name) static void name(void *env, void *caller, const void *args, size_t nargs, void *results, \
                                    size_t nresults, void **trap_ret, continuation *cont)
#define READY() do { cont->callback = always_ready; cont->env = NULL; cont->finalizer = NULL; } while (0)

enum { W_ESUCCESS = 0, W_EBADF = 8, W_EFAULT = 21, W_EINVAL = 28, W_EIO = 29, W_ENOSYS_FN = 52 }; /* WASI's */

HOST(host_fd_read) {
    (void)env; (void)nargs; (void)nresults; (void)trap_ret;
    READY();
    struct job *j = current;
    int32_t fd = arg32(args, 0), iovs_len = arg32(args, 2);
    uint32_t iovs = (uint32_t)arg32(args, 1), nread_ptr = (uint32_t)arg32(args, 3);
    if (fd != 0) { result32(results, W_EBADF); return; }
    mem_t m = memory_of(caller);
    if (iovs_len < 0 || !in_bounds(m, nread_ptr, 4)) { result32(results, W_EFAULT); return; }
    uint32_t n = iovs_len < 1024 ? (uint32_t)iovs_len : 1024;
    if (!in_bounds(m, iovs, 8ull * n)) { result32(results, W_EFAULT); return; }
    uint32_t done = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t ptr, len;
        memcpy(&ptr, m.base + iovs + 8 * i, 4);
        memcpy(&len, m.base + iovs + 8 * i + 4, 4);
        if (!in_bounds(m, ptr, len)) { result32(results, W_EFAULT); return; }
        uint64_t left = j->stdin_len - j->stdin_pos;
        uint32_t take = left < len ? (uint32_t)left : len;
        memcpy(m.base + ptr, j->stdin_data + j->stdin_pos, take);
        j->stdin_pos += take;
        done += take;
        if (take < len) break;
    }
    memcpy(m.base + nread_ptr, &done, 4);
    result32(results, W_ESUCCESS);
}

HOST(host_fd_write) {
    (void)env; (void)nargs; (void)nresults;
    READY();
    struct job *j = current;
    int32_t fd = arg32(args, 0), iovs_len = arg32(args, 2);
    uint32_t iovs = (uint32_t)arg32(args, 1), nwritten_ptr = (uint32_t)arg32(args, 3);
    if (fd != 1 && fd != 2) { result32(results, W_EBADF); return; }
    /* a pointer out of bounds traps the guest, as wasmtime's own fd_write does (a VM's) */
    static const char oob[] = "pointer out of bounds (fd_write)";
    mem_t m = memory_of(caller);
    uint32_t n = (uint32_t)iovs_len;
    if (!in_bounds(m, nwritten_ptr, 4) || !in_bounds(m, iovs, 8ull * n)) {
        *trap_ret = trap_new(oob, sizeof oob - 1);
        return;
    }
    if (n > 1024) n = 1024; /* (IOV_MAX: what a guest asks beyond it is a short write) */
    uint32_t done = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t ptr, len;
        memcpy(&ptr, m.base + iovs + 8 * i, 4);
        memcpy(&len, m.base + iovs + 8 * i + 4, 4);
        if (!in_bounds(m, ptr, len)) { *trap_ret = trap_new(oob, sizeof oob - 1); return; }
        if (!(fd == 1 ? to_stdout(j, m.base + ptr, len) : to_stderr(j, m.base + ptr, len))) {
            result32(results, W_EIO);
            return;
        }
        done += len;
    }
    memcpy(m.base + nwritten_ptr, &done, 4);
    result32(results, W_ESUCCESS);
}

static void poll(void *caller, const void *args, void *results, void **trap_ret, bool body) {
    struct job *j = current;
    uint32_t in = (uint32_t)arg32(args, 0), out = (uint32_t)arg32(args, 1), nev_ptr = (uint32_t)arg32(args, 3);
    int32_t nsubs = arg32(args, 2);
    if (nsubs <= 0 || nsubs > 4096) { result32(results, W_EINVAL); return; }
    mem_t m = memory_of(caller);
    if (!in_bounds(m, in, 48ull * nsubs) || !in_bounds(m, out, 32ull * nsubs) || !in_bounds(m, nev_ptr, 4)) {
        result32(results, W_EFAULT);
        return;
    }
    int64_t mono = now_ns(CLOCK_MONOTONIC), real = now_ns(CLOCK_REALTIME);
    unsigned char events[32 * 64];
    uint32_t nev = 0;
    const uint8_t *subs = m.base + in;
    unsigned char *ev_out = m.base + out;
    /* events are gathered in place: the output area may overlap the subscriptions, so each subscription is
     * read whole before its event is written, and an event goes out only after all are read (in chunks
     * of 64 into a local buffer, then copied: in the rare case of more ready events, the rest follow) */
    unsigned char *all = nsubs > 64 ? malloc(32ull * nsubs) : events;
    if (!all) { result32(results, W_EFAULT); return; }
    for (int32_t i = 0; i < nsubs; i++) {
        const uint8_t *s = subs + 48ull * i;
        uint64_t userdata, timeout;
        uint32_t which;
        uint16_t flags;
        uint8_t tag = s[8];
        memcpy(&userdata, s, 8);
        memcpy(&which, s + 16, 4);
        memcpy(&timeout, s + 24, 8);
        memcpy(&flags, s + 40, 2);
        unsigned char *e = all + 32ull * nev;
        uint16_t errno_ = 0, eflags = 0;
        uint64_t nbytes = 0;
        if (tag == 0) { /* a clock: fired when its (unsigned) deadline is not after now */
            uint64_t now = which == 0 ? (uint64_t)real : (uint64_t)(mono - j->mono0);
            if (!(flags & 1) ? timeout != 0 : timeout > now) continue;
        } else if (tag == 1 && which == 0) {
            nbytes = body ? j->stdin_len - j->stdin_pos : 0;
            if (!nbytes) eflags = 1; /* hang-up: the body is all there */
        } else if (tag == 1 || tag == 2) {
            if (which != 1 && which != 2) errno_ = W_EBADF;
        } else {
            if (all != events) free(all);
            result32(results, W_EINVAL);
            return;
        }
        memset(e, 0, 32);
        memcpy(e, &userdata, 8);
        memcpy(e + 8, &errno_, 2);
        e[10] = tag;
        memcpy(e + 16, &nbytes, 8);
        memcpy(e + 24, &eflags, 2);
        nev++;
    }
    if (!nev) {
        if (all != events) free(all);
        j->needs_vm = 1;
        static const char why[] = "direct instance: poll_oneoff waits";
        *trap_ret = trap_new(why, sizeof why - 1);
        return;
    }
    memcpy(ev_out, all, 32ull * nev);
    memcpy(m.base + nev_ptr, &nev, 4);
    if (all != events) free(all);
    result32(results, W_ESUCCESS);
}

HOST(host_poll_oneoff) {
    (void)env; (void)nargs; (void)nresults;
    READY();
    poll(caller, args, results, trap_ret, true);
}

HOST(host_poll_oneoff_no_stdin) {
    (void)env; (void)nargs; (void)nresults;
    READY();
    poll(caller, args, results, trap_ret, false);
}

HOST(host_clock_time_get) {
    (void)env; (void)nargs; (void)nresults; (void)trap_ret;
    READY();
    struct job *j = current;
    int32_t clock = arg32(args, 0);
    uint32_t out = (uint32_t)arg32(args, 2);
    (void)arg64;
    if (clock < 0 || clock > 3) { result32(results, W_EINVAL); return; }
    uint64_t now = clock == 0 ? (uint64_t)now_ns(CLOCK_REALTIME) : (uint64_t)(now_ns(CLOCK_MONOTONIC) - j->mono0);
    mem_t m = memory_of(caller);
    if (!in_bounds(m, out, 8)) { result32(results, W_EFAULT); return; }
    memcpy(m.base + out, &now, 8);
    result32(results, W_ESUCCESS);
}

HOST(host_fn_request) {
    (void)env; (void)nargs; (void)nresults; (void)trap_ret;
    READY();
    struct job *j = current;
    if (j->rewind) { /* the first call of a resumed guest: its rewind ends here */
        extern_t ext;
        if (caller_export_get(caller, j->rewind, strlen(j->rewind), &ext) && ext.b[0] == EXTERN_GLOBAL) {
            val_t v;
            memset(&v, 0, sizeof v);
            v.b[0] = KIND_I32;
            void *e = global_set(caller_context(caller), ext.b + EXTERN_OF, &v);
            if (e) error_delete(e);
        }
        j->rewind = NULL;
    }
    int32_t cap = arg32(args, 1);
    uint32_t buf = (uint32_t)arg32(args, 0);
    if (cap < 0) { result32(results, -W_EINVAL); return; }
    if (!j->has_request) { result32(results, -W_ENOSYS_FN); return; }
    if (j->request_len <= (uint64_t)cap) {
        mem_t m = memory_of(caller);
        if (!in_bounds(m, buf, j->request_len)) { result32(results, -W_EFAULT); return; }
        memcpy(m.base + buf, j->request, j->request_len);
    }
    result32(results, (int32_t)j->request_len);
}

#define MAX_RESPONSE (4 << 20)

HOST(host_fn_respond) {
    (void)env; (void)nargs; (void)nresults; (void)trap_ret;
    READY();
    struct job *j = current;
    if (!j->has_request) { result32(results, -W_ENOSYS_FN); return; }
    int32_t status = arg32(args, 0), hlen = arg32(args, 2), blen = arg32(args, 4);
    uint32_t hptr = (uint32_t)arg32(args, 1), bptr = (uint32_t)arg32(args, 3);
    if (status < 100 || status > 599 || hlen < 0 || blen < 0 || (int64_t)hlen + blen > MAX_RESPONSE) {
        result32(results, -W_EINVAL);
        return;
    }
    mem_t m = memory_of(caller);
    if ((hlen && !in_bounds(m, hptr, (uint64_t)hlen)) || (blen && !in_bounds(m, bptr, (uint64_t)blen))) {
        result32(results, -W_EFAULT);
        return;
    }
    uint8_t *h = hlen ? malloc((size_t)hlen) : NULL, *b = blen ? malloc((size_t)blen) : NULL;
    if ((hlen && !h) || (blen && !b)) {
        free(h);
        free(b);
        result32(results, -W_EFAULT);
        return;
    }
    if (hlen) memcpy(h, m.base + hptr, (size_t)hlen);
    if (blen) memcpy(b, m.base + bptr, (size_t)blen);
    free(j->resp_headers);
    free(j->resp_body);
    j->resp_headers = h; j->resp_headers_len = (uint64_t)hlen;
    j->resp_body = b; j->resp_body_len = (uint64_t)blen;
    j->resp_status = status;
    result32(results, 0);
}

/* ---------------------------------------------------------------- the interface (native.py) */
int mvd_abi(void) { return MVD_ABI; }

#ifndef MVD_SOURCE
#define MVD_SOURCE ""
#endif
/* The sha256 of the source this was built from (scripts/build-native): native.py uses no stale build. */
const char *mvd_source(void) { return MVD_SOURCE; }

void *mvd_host(int which) {
    switch (which) {
    case 0: return (void *)host_fd_read;
    case 1: return (void *)host_poll_oneoff;
    case 2: return (void *)host_poll_oneoff_no_stdin;
    case 3: return (void *)host_clock_time_get;
    case 4: return (void *)host_fn_request;
    case 5: return (void *)host_fn_respond;
    case 6: return (void *)host_fd_write;
    }
    return NULL;
}

size_t mvd_job_size(void) { return sizeof(struct job); }

static bool resolved;

/* Resolve the C API in ``libpath`` (wasmtime-py's library, already loaded) and check the layouts: true, or
 * false with ``why`` filled in. */
bool mvd_init(const char *libpath, size_t val_size, size_t val_of, size_t extern_size, size_t extern_of,
              size_t instance_size, char *why, size_t why_len) {
    if (val_size != VAL_SIZE || val_of != VAL_OF || extern_size != EXTERN_SIZE || extern_of != EXTERN_OF ||
        instance_size != INSTANCE_SIZE) {
        snprintf(why, why_len, "wasmtime's value layout is not the one this build expects");
        return false;
    }
    if (resolved) return true;
    void *lib = dlopen(libpath, RTLD_NOW | RTLD_NOLOAD);
    if (!lib) { snprintf(why, why_len, "%s", dlerror()); return false; }
#define SYM(var, name) do { *(void **)&var = dlsym(lib, name); \
        if (!var) { snprintf(why, why_len, "wasmtime has no %s", name); return false; } } while (0)
    SYM(store_new, "wasmtime_store_new");
    SYM(store_context, "wasmtime_store_context");
    SYM(store_delete, "wasmtime_store_delete");
    SYM(store_limiter, "wasmtime_store_limiter");
    SYM(set_fuel, "wasmtime_context_set_fuel");
    SYM(set_epoch_deadline, "wasmtime_context_set_epoch_deadline");
    SYM(wasi_config_new, "wasi_config_new");
    SYM(wasi_set_argv, "wasi_config_set_argv");
    SYM(wasi_set_env, "wasi_config_set_env");
    SYM(wasi_set_stdout_file, "wasi_config_set_stdout_file");
    SYM(wasi_set_stderr_file, "wasi_config_set_stderr_file");
    SYM(wasi_config_delete, "wasi_config_delete");
    SYM(set_wasi, "wasmtime_context_set_wasi");
    SYM(pre_instantiate_async, "wasmtime_instance_pre_instantiate_async");
    SYM(instance_export_get, "wasmtime_instance_export_get");
    SYM(func_call_async, "wasmtime_func_call_async");
    SYM(future_poll, "wasmtime_call_future_poll");
    SYM(future_delete, "wasmtime_call_future_delete");
    SYM(memory_data_size, "wasmtime_memory_data_size");
    SYM(memory_data, "wasmtime_memory_data");
    SYM(caller_export_get, "wasmtime_caller_export_get");
    SYM(caller_context, "wasmtime_caller_context");
    SYM(global_set, "wasmtime_global_set");
    SYM(trap_new, "wasmtime_trap_new");
    SYM(trap_code, "wasmtime_trap_code");
    SYM(trap_message, "wasm_trap_message");
    SYM(trap_delete, "wasm_trap_delete");
    SYM(error_exit_status, "wasmtime_error_exit_status");
    SYM(error_message, "wasmtime_error_message");
    SYM(error_delete, "wasmtime_error_delete");
    SYM(byte_vec_delete, "wasm_byte_vec_delete");
#undef SYM
    resolved = true;
    return true;
}

/* A pool of ``workers`` threads at nice value ``nice`` (after mvd_init), or NULL with ``why`` filled in. */
struct pool *mvd_pool_new(int workers, int nice, char *why, size_t why_len) {
    if (!resolved) { snprintf(why, why_len, "mvd_init was not called"); return NULL; }
    struct pool *p = calloc(1, sizeof *p);
    if (!p) { snprintf(why, why_len, "out of memory"); return NULL; }
    p->nice = nice;
    pthread_mutex_init(&p->mu, NULL);
    sem_init(&p->jobs, 0, 0);
    p->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (p->efd < 0) { snprintf(why, why_len, "eventfd: %s", strerror(errno)); free(p); return NULL; }
    if (workers < 1) workers = 1;
    if (workers > 64) workers = 64;
    for (p->nthreads = 0; p->nthreads < workers; p->nthreads++) {
        int rc = pthread_create(&p->threads[p->nthreads], NULL, worker, p);
        if (rc) { snprintf(why, why_len, "pthread_create: %s", strerror(rc)); break; }
    }
    if (!p->nthreads) {
        close(p->efd);
        sem_destroy(&p->jobs);
        pthread_mutex_destroy(&p->mu);
        free(p);
        return NULL;
    }
    return p;
}

/* The eventfd that is readable when jobs are done. */
int mvd_pool_fd(struct pool *p) { return p->efd; }

/* Queue a job (its memory is the caller's; it is not touched after mvd_drain gives its id back). One thread
 * submits (the event loop's). */
void mvd_submit(struct pool *p, struct job *j) {
    j->needs_vm = 0;
    j->stdin_pos = 0;
    j->out_len = j->err_len = j->out_room = j->err_total = 0;
    j->out_truncated = 0;
    struct job *head = __atomic_load_n(&p->incoming, __ATOMIC_RELAXED);
    do j->next = head;
    while (!__atomic_compare_exchange_n(&p->incoming, &head, j, true, __ATOMIC_RELEASE, __ATOMIC_RELAXED));
    sem_post(&p->jobs);
}

/* The ids of up to ``n`` finished jobs; more are left for the next call (the eventfd stays readable). */
int mvd_drain(struct pool *p, uint64_t *ids, int n) {
    uint64_t v;
    if (read(p->efd, &v, sizeof v) < 0) {} /* (EAGAIN: nothing was signalled, which is fine) */
    struct job *j = __atomic_exchange_n(&p->done, NULL, __ATOMIC_ACQUIRE);
    int k = 0;
    while (j && k < n) {
        ids[k++] = j->id;
        j = j->next;
    }
    if (j) { /* more than ``n``: back onto the stack, for the next call */
        struct job *last = j;
        while (last->next) last = last->next;
        struct job *head = __atomic_load_n(&p->done, __ATOMIC_RELAXED);
        do last->next = head;
        while (!__atomic_compare_exchange_n(&p->done, &head, j, true, __ATOMIC_RELEASE, __ATOMIC_RELAXED));
        uint64_t one = 1;
        if (write(p->efd, &one, sizeof one) < 0) {}
    }
    return k;
}

/* Free what a finished job's run allocated (its outputs and response). */
void mvd_release(struct job *j) {
    free(j->out); free(j->err); free(j->resp_headers); free(j->resp_body);
    j->out = j->err = j->resp_headers = j->resp_body = NULL;
    j->out_len = j->err_len = j->resp_headers_len = j->resp_body_len = j->out_room = j->err_total = 0;
}

/* Stop a pool: its workers finish what is queued, then end; the eventfd is closed and the pool freed. */
void mvd_pool_stop(struct pool *p) {
    __atomic_store_n(&p->stopping, 1, __ATOMIC_RELEASE);
    for (int i = 0; i < p->nthreads; i++) sem_post(&p->jobs);
    for (int i = 0; i < p->nthreads; i++) pthread_join(p->threads[i], NULL);
    close(p->efd);
    pthread_mutex_destroy(&p->mu);
    sem_destroy(&p->jobs);
    free(p);
}
