/* The shm transport's hot path in C (framework/comm/shm.py describes the segment and protocol).
 *
 * Python pays microseconds per tensor slice and per counter access; a cache line crosses
 * between two cores in a fraction of one. This module runs a whole collective (copies, sums,
 * barriers, waits) on raw pointers with the GIL released, and implements exactly the Python
 * path's protocol on the same segment: the same counters, fingerprints, rounds and wait policy,
 * and the same bits (rank-order sums; 16-bit floats summed in float32 and rounded once).
 * No torch headers: Python passes data pointers of contiguous CPU tensors.
 *
 * Errors come back as ShmNativeError(kind, phase, round) with kind "disagree", "died" or
 * "timeout"; shm.py words the message from the segment's state, as it does for its own path.
 * x86-64 only (shm.py refuses other hosts): plain aligned 8-byte loads and stores are atomic
 * and ordered (total store order), so release/acquire cost nothing beyond the compiler fence.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define LINE_WORDS 8 /* int64 words per counter line */
#define ARRIVED 0
#define REDUCED 1
#define FAST_POLLS 128          /* polls with a pause before the slow wait */
#define SPIN_S 1e-3             /* a peer on another CPU: spin this long, then sleep */
#define SLEEP_NS 50000L         /* sleep step after that */
#define WHERE_S 200e-6          /* how often to re-read where the awaited peer runs */
#define CHECK_S 5e-3            /* how often to check the clock and the peers' pids */
#define MAX_RANKS 64
#define ACC_BLOCK 512 /* float32 accumulator block for 16-bit sums */
#define SUM_BLOCK 16384 /* bytes summed, then copied out, at a time (a multiple of 8) */

enum { OK = 0, ERR_DISAGREE = 1, ERR_DIED = 2, ERR_TIMEOUT = 3 };
enum { F32 = 1, F64, F16, BF16, I8, U8, I16, I32, I64, BOOL };

static PyObject *NativeError;

typedef struct {
    char *data;                 /* p + 1 slots of cap bytes; slot p is the result */
    volatile int64_t *flags;    /* 2 x p counter lines */
    volatile int64_t *pids;
    int p, r;
    int64_t cap;
    int stat_fd[MAX_RANKS];     /* /proc/<pid>/task/<tid>/stat of each peer's thread */
    int64_t stat_tid[MAX_RANKS];
} seg_t;

typedef struct {
    seg_t *s;
    double deadline;  /* CLOCK_MONOTONIC seconds, like Python's time.monotonic() */
    int phase;        /* where a failure happened */
    int64_t g;
} op_t;

static inline double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static inline volatile int64_t *line(seg_t *s, int phase, int j) {
    return s->flags + (int64_t)(phase * s->p + j) * LINE_WORDS;
}

static inline int64_t load(volatile int64_t *a) { return __atomic_load_n(a, __ATOMIC_ACQUIRE); }
static inline void store(volatile int64_t *a, int64_t v) { __atomic_store_n(a, v, __ATOMIC_RELEASE); }
static inline char *slot(seg_t *s, int j) { return s->data + (int64_t)j * s->cap; }

/* -- waiting ---------------------------------------------------------------------------- */

static int alive(pid_t pid) {
    if (kill(pid, 0) != 0 && errno == ESRCH) return 0;
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY);
    if (fd < 0) return 1; /* no /proc (or it just exited): trust kill() */
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return 1;
    buf[n] = 0;
    char *close_paren = strrchr(buf, ')');
    if (!close_paren || close_paren[1] == 0) return 1;
    char state = close_paren[2];
    return state != 'Z' && state != 'X';
}

/* Each rank publishes the CPU its collective thread runs on beside its counter, when it
 * arrives and while it waits: a waiter learns where its peer is from one shared load instead of
 * a /proc read (a system call of several microseconds, longer than a whole exchange). */
static inline void publish_cpu(seg_t *s) { store(line(s, ARRIVED, s->r) + 3, sched_getcpu() + 1); }

/* Whether rank j's collective thread last ran on this thread's CPU: then it waits for this very
 * CPU (more ranks than free cores). Its /proc stat is read only when it published nothing. */
static int queued_behind_me(seg_t *s, int j) {
    int64_t cpu = load(line(s, ARRIVED, j) + 3); /* CPU + 1; 0: never published */
    if (cpu > 0) return cpu - 1 == sched_getcpu();
    int64_t tid = line(s, ARRIVED, j)[2];
    if (s->stat_tid[j] != tid || s->stat_fd[j] < 0) {
        if (s->stat_fd[j] >= 0) close(s->stat_fd[j]);
        char path[96];
        snprintf(path, sizeof path, "/proc/%lld/task/%lld/stat", (long long)s->pids[j],
                 (long long)tid);
        s->stat_fd[j] = open(path, O_RDONLY);
        s->stat_tid[j] = tid;
        if (s->stat_fd[j] < 0) return 0;
    }
    char buf[1024];
    ssize_t n = pread(s->stat_fd[j], buf, sizeof buf - 1, 0);
    if (n <= 0) return 0;
    buf[n] = 0;
    char *c = strrchr(buf, ')');
    if (!c) return 0;
    c += 2; /* the state field */
    char state = *c;
    for (int field = 0; field < 36; field++) { /* to field 39: the CPU it last ran on */
        c = strchr(c, ' ');
        if (!c) return 0;
        c++;
    }
    return state == 'R' && atoi(c) == sched_getcpu();
}

/* A rank we wait for died, or the deadline passed with a rank still behind. */
static int check_peers(op_t *op) {
    seg_t *s = op->s;
    int behind = 0;
    for (int j = 0; j < s->p; j++) {
        if (load(line(s, op->phase, j)) >= op->g) continue;
        behind = 1;
        if (!alive((pid_t)s->pids[j])) return ERR_DIED;
    }
    if (behind && now_s() > op->deadline) return ERR_TIMEOUT;
    return OK;
}

/* Wait until counter c reaches g: spin with a pause; if the awaited rank j is queued on this
 * CPU, yield to it at once; else spin up to SPIN_S, then sleep in SLEEP_NS steps. */
static int wait_for(op_t *op, volatile int64_t *c, int j) {
    for (int k = 0; k < FAST_POLLS; k++) {
        if (load(c) >= op->g) return OK;
        __builtin_ia32_pause();
    }
    double t0 = now_s(), last = t0, where = t0;
    publish_cpu(op->s);
    int queued = queued_behind_me(op->s, j);
    struct timespec nap = {0, SLEEP_NS};
    while (load(c) < op->g) {
        double now = now_s();
        if (now - where >= WHERE_S) {
            where = now;
            publish_cpu(op->s);
            queued = queued_behind_me(op->s, j);
        }
        if (queued)
            sched_yield();
        else if (now - t0 >= SPIN_S)
            nanosleep(&nap, NULL);
        else
            __builtin_ia32_pause();
        if (now - last >= CHECK_S) {
            last = now;
            int rc = check_peers(op);
            if (rc) return rc;
        }
    }
    return OK;
}

/* Raise my phase counter to g and wait for every rank's (or only's); with fp, publish what
 * I am about to do beside it and compare everyone's after the barrier. */
static int arrive(op_t *op, int phase, int64_t g, int only, int64_t fp) {
    seg_t *s = op->s;
    volatile int64_t *me = line(s, phase, s->r);
    op->phase = phase;
    op->g = g;
    if (fp) {
        fp |= g & 0xFF;
        store(me + 1, fp); /* before the counter: a peer that sees g sees this too */
    }
    if (phase == ARRIVED) publish_cpu(s);
    store(me, g);
    for (int j = only < 0 ? 0 : only; j < (only < 0 ? s->p : only + 1); j++) {
        int rc = wait_for(op, line(s, phase, j), j);
        if (rc) return rc;
    }
    if (fp) {
        for (int j = 0; j < s->p; j++) {
            int64_t f = load(line(s, phase, j) + 1);
            if (f != fp && (f & 0xFF) == (g & 0xFF)) return ERR_DISAGREE;
        }
    }
    return OK;
}

/* -- sums in rank order ----------------------------------------------------------------- */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, like torch */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#define SUM_SAME(NAME, T)                                                                  \
    static void NAME(void *out, char **t, int p, int64_t n) {                              \
        T *o = (T *)out;                                                                   \
        const T *a = (const T *)t[0], *b = (const T *)t[1];                                \
        for (int64_t i = 0; i < n; i++) o[i] = (T)(a[i] + b[i]);                           \
        for (int j = 2; j < p; j++) {                                                      \
            const T *c = (const T *)t[j];                                                  \
            for (int64_t i = 0; i < n; i++) o[i] = (T)(o[i] + c[i]);                       \
        }                                                                                  \
    }
SUM_SAME(sum_f32, float)
SUM_SAME(sum_f64, double)
SUM_SAME(sum_u8, uint8_t)   /* int8 too: two's complement wraps alike */
SUM_SAME(sum_u16, uint16_t) /* int16 */
SUM_SAME(sum_u32, uint32_t) /* int32 */
SUM_SAME(sum_u64, uint64_t) /* int64 */

static void sum_bool(void *out, char **t, int p, int64_t n) {
    uint8_t *o = (uint8_t *)out;
    for (int64_t i = 0; i < n; i++) {
        uint8_t v = 0;
        for (int j = 0; j < p; j++) v |= ((const uint8_t *)t[j])[i];
        o[i] = v != 0;
    }
}

#define SUM_16(NAME, T, TO_F, FROM_F)                                                      \
    static void NAME(void *out, char **t, int p, int64_t n) {                              \
        float acc[ACC_BLOCK];                                                              \
        for (int64_t lo = 0; lo < n; lo += ACC_BLOCK) {                                    \
            int64_t m = n - lo < ACC_BLOCK ? n - lo : ACC_BLOCK;                           \
            const T *a = (const T *)t[0] + lo;                                             \
            for (int64_t i = 0; i < m; i++) acc[i] = TO_F(a[i]);                           \
            for (int j = 1; j < p; j++) {                                                  \
                const T *c = (const T *)t[j] + lo;                                         \
                for (int64_t i = 0; i < m; i++) acc[i] += TO_F(c[i]);                      \
            }                                                                              \
            T *o = (T *)out + lo;                                                          \
            for (int64_t i = 0; i < m; i++) o[i] = FROM_F(acc[i]);                         \
        }                                                                                  \
    }
#define H_TO_F(h) ((float)(h))
#define F_TO_H(f) ((_Float16)(f))
SUM_16(sum_f16, _Float16, H_TO_F, F_TO_H)
SUM_16(sum_bf16, uint16_t, bf16_to_f32, f32_to_bf16)

typedef void (*sum_fn)(void *, char **, int, int64_t);

static int elsize(int dtype) {
    switch (dtype) {
        case F64: case I64: return 8;
        case F32: case I32: return 4;
        case F16: case BF16: case I16: return 2;
        case I8: case U8: case BOOL: return 1;
        default: return 0;
    }
}

static sum_fn summer(int dtype) {
    switch (dtype) {
        case F32: return sum_f32;
        case F64: return sum_f64;
        case F16: return sum_f16;
        case BF16: return sum_bf16;
        case I8: case U8: return sum_u8;
        case I16: return sum_u16;
        case I32: return sum_u32;
        case I64: return sum_u64;
        case BOOL: return sum_bool;
        default: return NULL;
    }
}

/* -- collectives ------------------------------------------------------------------------ */

/* The one-shot round the caller's last call left without its second barrier. */
static int settle(op_t *op, int64_t unsettled) {
    return unsettled > 0 ? arrive(op, REDUCED, unsettled, -1, 0) : OK;
}

/* Two-shot, in chunks of cap bytes: copy in the slices the others reduce, sum my slice in
 * rank order (my own term read from x), publish it, copy the other slices back. */
static int all_reduce(op_t *op, char *x, int64_t n, int dtype, int64_t fp, int64_t *g) {
    seg_t *s = op->s;
    int p = s->p, r = s->r, es = elsize(dtype);
    sum_fn sum = summer(dtype);
    int64_t per = s->cap / es;
    char *terms[MAX_RANKS];
    for (int64_t lo = 0; lo < n; lo += per) {
        int64_t m = n - lo < per ? n - lo : per;
        char *seg = x + lo * es, *mine = slot(s, r), *result = slot(s, p);
        int64_t a = m * r / p * es, b = m * (r + 1) / p * es, end = m * es;
        int64_t round = ++*g;
        memcpy(mine, seg, a);
        memcpy(mine + b, seg + b, end - b);
        int rc = arrive(op, ARRIVED, round, -1, fp);
        if (rc) return rc;
        /* my slice, in blocks small enough that the copy into x reads what the sum just
         * wrote from L1 rather than from memory */
        for (int64_t lo2 = a; lo2 < b; lo2 += SUM_BLOCK) {
            int64_t len = b - lo2 < SUM_BLOCK ? b - lo2 : SUM_BLOCK;
            for (int j = 0; j < p; j++) terms[j] = j == r ? seg + lo2 : slot(s, j) + lo2;
            sum(result + lo2, terms, p, len / es);
            memcpy(seg + lo2, result + lo2, len);
        }
        rc = arrive(op, REDUCED, round, -1, 0);
        if (rc) return rc;
        memcpy(seg, result, a);
        memcpy(seg + b, result + b, end - b);
    }
    return OK;
}

/* One-shot: copy in, one barrier, every rank sums every slot in rank order. Consecutive rounds
 * alternate halves of each slot, so no second barrier; the next other collective settles it. */
static int all_reduce_oneshot(op_t *op, char *x, int64_t n, int dtype, int64_t fp, int64_t *g,
                              int64_t *unsettled) {
    seg_t *s = op->s;
    int p = s->p, r = s->r, es = elsize(dtype);
    sum_fn sum = summer(dtype);
    int64_t per = s->cap / 2 / es, cap_el = s->cap / es;
    char *terms[MAX_RANKS];
    for (int64_t lo = 0; lo < n; lo += per) {
        int64_t m = n - lo < per ? n - lo : per;
        int64_t round = ++*g, off = (round % 2) * (cap_el / 2) * es;
        char *seg = x + lo * es;
        memcpy(slot(s, r) + off, seg, m * es);
        int rc = arrive(op, ARRIVED, round, -1, fp);
        if (rc) return rc;
        for (int j = 0; j < p; j++) terms[j] = slot(s, j) + off;
        sum(seg, terms, p, m);
        *unsettled = round;
    }
    return OK;
}

/* This rank's part (elements [r q, (r+1) q), q = n / p) of the sum, in rounds of cap / p
 * elements of every part. */
static int reduce_scatter(op_t *op, char *x, char *out, int64_t n, int dtype, int64_t fp,
                          int64_t *g) {
    seg_t *s = op->s;
    int p = s->p, r = s->r, es = elsize(dtype);
    sum_fn sum = summer(dtype);
    int64_t q = n / p, width = s->cap / es / p;
    if (width < 1) width = 1;
    char *terms[MAX_RANKS];
    for (int64_t lo = 0; lo < q; lo += width) {
        int64_t c = q - lo < width ? q - lo : width;
        int64_t round = ++*g;
        for (int j = 0; j < p; j++) memcpy(slot(s, r) + j * c * es, x + (j * q + lo) * es, c * es);
        int rc = arrive(op, ARRIVED, round, -1, fp);
        if (rc) return rc;
        for (int j = 0; j < p; j++) terms[j] = slot(s, j) + r * c * es;
        sum(out + lo * es, terms, p, c);
        rc = arrive(op, REDUCED, round, -1, 0);
        if (rc) return rc;
    }
    return OK;
}

/* Every rank's x into out in rank order, in rounds of cap bytes. */
static int all_gather(op_t *op, char *x, char *out, int64_t n, int dtype, int64_t fp,
                      int64_t *g) {
    seg_t *s = op->s;
    int p = s->p, r = s->r, es = elsize(dtype);
    int64_t per = s->cap / es;
    for (int64_t lo = 0; lo < n; lo += per) {
        int64_t c = n - lo < per ? n - lo : per;
        int64_t round = ++*g;
        memcpy(slot(s, r), x + lo * es, c * es);
        int rc = arrive(op, ARRIVED, round, -1, fp);
        if (rc) return rc;
        for (int j = 0; j < p; j++) memcpy(out + (j * n + lo) * es, slot(s, j), c * es);
        rc = arrive(op, REDUCED, round, -1, 0);
        if (rc) return rc;
    }
    return OK;
}

/* -- Python binding --------------------------------------------------------------------- */

static void seg_free(PyObject *capsule) {
    seg_t *s = (seg_t *)PyCapsule_GetPointer(capsule, "commlab.shm");
    if (!s) return;
    for (int j = 0; j < MAX_RANKS; j++)
        if (s->stat_fd[j] >= 0) close(s->stat_fd[j]);
    PyMem_RawFree(s);
}

/* open(data_address, flags_address, pids_address, world_size, rank, capacity) -> handle */
static PyObject *py_open(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "open() takes 6 arguments");
        return NULL;
    }
    long long v[6];
    for (int i = 0; i < 6; i++) {
        v[i] = PyLong_AsLongLong(args[i]);
        if (v[i] == -1 && PyErr_Occurred()) return NULL;
    }
    if (v[3] < 1 || v[3] > MAX_RANKS || v[4] < 0 || v[4] >= v[3] || v[5] <= 0) {
        PyErr_SetString(PyExc_ValueError, "bad segment geometry");
        return NULL;
    }
    seg_t *s = (seg_t *)PyMem_RawCalloc(1, sizeof(seg_t));
    if (!s) return PyErr_NoMemory();
    s->data = (char *)(intptr_t)v[0];
    s->flags = (volatile int64_t *)(intptr_t)v[1];
    s->pids = (volatile int64_t *)(intptr_t)v[2];
    s->p = (int)v[3];
    s->r = (int)v[4];
    s->cap = v[5];
    for (int j = 0; j < MAX_RANKS; j++) s->stat_fd[j] = -1;
    return PyCapsule_New(s, "commlab.shm", seg_free);
}

/* The segment handle in args[0] of a call that takes exactly `want` arguments (NULL with a
 * Python error set otherwise). */
static seg_t *segment_arg(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want,
                          const char *fn) {
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments", fn, want);
        return NULL;
    }
    return (seg_t *)PyCapsule_GetPointer(args[0], "commlab.shm");
}

static PyObject *fail(int rc, op_t *op) {
    const char *kind = rc == ERR_DISAGREE ? "disagree" : rc == ERR_DIED ? "died" : "timeout";
    PyObject *err = Py_BuildValue("(siL)", kind, op->phase, (long long)op->g);
    if (err) {
        PyErr_SetObject(NativeError, err);
        Py_DECREF(err);
    }
    return NULL;
}

/* run(handle, op, x, out, numel, dtype, fingerprint, round, unsettled, deadline)
 *   -> (round, unsettled)
 * op: 1 two-shot all-reduce, 5 one-shot all-reduce, 3 reduce-scatter, 4 all-gather (shm.py's
 * codes). x and out are addresses (out: reduce-scatter and all-gather only). */
static PyObject *py_run(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    seg_t *s = segment_arg(args, nargs, 10, "run");
    if (!s) return NULL;
    long long v[8];
    for (int i = 0; i < 8; i++) {
        v[i] = PyLong_AsLongLong(args[i + 1]);
        if (v[i] == -1 && PyErr_Occurred()) return NULL;
    }
    double deadline = PyFloat_AsDouble(args[9]);
    if (deadline == -1.0 && PyErr_Occurred()) return NULL;
    int kind = (int)v[0], dtype = (int)v[4];
    if (!summer(dtype)) {
        PyErr_Format(PyExc_ValueError, "unsupported dtype code %d", dtype);
        return NULL;
    }
    char *x = (char *)(intptr_t)v[1], *out = (char *)(intptr_t)v[2];
    int64_t n = v[3], fp = v[5], g = v[6], unsettled = v[7];
    op_t op = {s, deadline, ARRIVED, g};
    int rc = OK;
    Py_BEGIN_ALLOW_THREADS
    if (kind != 5) {
        rc = settle(&op, unsettled);
        unsettled = 0;
    }
    if (!rc) {
        switch (kind) {
            case 1: rc = all_reduce(&op, x, n, dtype, fp, &g); break;
            case 5: rc = all_reduce_oneshot(&op, x, n, dtype, fp, &g, &unsettled); break;
            case 3: rc = reduce_scatter(&op, x, out, n, dtype, fp, &g); break;
            case 4: rc = all_gather(&op, x, out, n, dtype, fp, &g); break;
            default: rc = -1;
        }
    }
    Py_END_ALLOW_THREADS
    if (rc == -1) {
        PyErr_Format(PyExc_ValueError, "unknown op code %d", kind);
        return NULL;
    }
    if (rc) return fail(rc, &op);
    return Py_BuildValue("(LL)", (long long)g, (long long)unsettled);
}

/* round_trip(handle, start, iterations, deadline) -> seconds per round trip between ranks 0
 * and 1: each bounces a counter (start + 1, start + 2, ...) through its own cache line in slot
 * 0 / slot 1. Counters only grow, so a repeat passes the last one's end as its start and no
 * reset can race with a peer still reading. The caller makes sure no collective is using the
 * slots. Other ranks return 0 at once. */
static PyObject *py_round_trip(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    seg_t *s = segment_arg(args, nargs, 4, "round_trip");
    if (!s) return NULL;
    long long start = PyLong_AsLongLong(args[1]);
    long long iters = PyLong_AsLongLong(args[2]);
    double deadline = PyFloat_AsDouble(args[3]);
    if (PyErr_Occurred()) return NULL;
    if (s->p < 2 || s->r > 1) return PyFloat_FromDouble(0.0);
    volatile int64_t *ping = (volatile int64_t *)slot(s, 0), *pong = (volatile int64_t *)slot(s, 1);
    volatile int64_t *mine = s->r == 0 ? ping : pong, *theirs = s->r == 0 ? pong : ping;
    double t0 = 0, t1 = 0;
    int late = 0;
    Py_BEGIN_ALLOW_THREADS
    t0 = now_s();
    for (int64_t k = start + 1; k <= start + iters && !late; k++) {
        if (s->r == 0) store(mine, k);
        for (int64_t spins = 0; load(theirs) < k; spins++) {
            __builtin_ia32_pause();
            if ((spins & 0xFFFF) == 0xFFFF && now_s() > deadline) {
                late = 1;
                break;
            }
        }
        if (s->r == 1) store(mine, k);
    }
    t1 = now_s();
    Py_END_ALLOW_THREADS
    if (late) {
        PyErr_SetString(PyExc_TimeoutError, "round_trip: the other rank did not answer in time");
        return NULL;
    }
    return PyFloat_FromDouble((t1 - t0) / (double)(iters > 0 ? iters : 1));
}

/* copy(dst, src, nbytes): one memcpy with the GIL released (the copy-bandwidth reference). */
static PyObject *py_copy(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "copy() takes 3 arguments");
        return NULL;
    }
    long long d = PyLong_AsLongLong(args[0]), src = PyLong_AsLongLong(args[1]);
    long long n = PyLong_AsLongLong(args[2]);
    if (PyErr_Occurred()) return NULL;
    Py_BEGIN_ALLOW_THREADS
    memcpy((void *)(intptr_t)d, (const void *)(intptr_t)src, (size_t)n);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"open", (PyCFunction)(void (*)(void))py_open, METH_FASTCALL, "Attach to a mapped segment."},
    {"run", (PyCFunction)(void (*)(void))py_run, METH_FASTCALL, "Run one collective."},
    {"round_trip", (PyCFunction)(void (*)(void))py_round_trip, METH_FASTCALL,
     "Cache-line ping-pong between ranks 0 and 1."},
    {"copy", (PyCFunction)(void (*)(void))py_copy, METH_FASTCALL, "memcpy without the GIL."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_shm_native",
                                    "The shm transport's hot path (see shm.py).", -1, methods};

PyMODINIT_FUNC PyInit__shm_native(void) {
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    NativeError = PyErr_NewException("framework.comm._shm_native.ShmNativeError", NULL, NULL);
    if (!NativeError || PyModule_AddObject(m, "ShmNativeError", NativeError) < 0) {
        Py_XDECREF(NativeError);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(NativeError);
    return m;
}
