/* What every ISA variant shares (included first by avx512.c, avx2.c, neon.c): the thread
 * pool, the packing of weights into the layouts of levante.h (plain C: it runs once, at load),
 * bfloat16 scalar helpers, and the variant's identity. */
#ifndef LEVANTE_RUNTIME_H
#define LEVANTE_RUNTIME_H

#include <limits.h>
#include <linux/futex.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "levante.h"

#define QB 32        /* activation block: values per float scale */
#define Q5_BLOCK 352 /* q5t16 bytes per tile of 16 rows and block of 32 columns */

#ifndef LV_BUILD_ID
#define LV_BUILD_ID "unknown"
#endif
LV_API const char *lv_build_id(void) { return LV_BUILD_ID; }

#if defined(__x86_64__) || defined(__i386__)
static inline void cpu_relax(void) { __builtin_ia32_pause(); }
#elif defined(__aarch64__)
static inline void cpu_relax(void) { __asm__ __volatile__("yield"); }
#else
static inline void cpu_relax(void) {}
#endif

/* -- threads ----------------------------------------------------------------------------------
 * A job is split into chunks that the calling thread and up to nthreads - 1 helpers claim
 * one at a time. The caller never waits for a helper to show up, only for chunks a helper
 * has claimed: on a shared machine a helper that is not scheduled for a while costs a
 * chunk's delay at most, not a whole job's (an OpenMP team would wait at its barrier).
 * Helpers spin for a short while after a job (the next one usually follows within
 * microseconds during decoding), then sleep on a futex. */

#define MAX_HELPERS 63
/* How long helpers spin after a job before sleeping: long after a decode step's kernel (the
 * next follows within ~100 us, and PyTorch runs on one thread then), none after a prefill's
 * dequantisation (PyTorch's own threads want the cores for the matmul that follows). */
#ifndef SPIN_NS
#define SPIN_NS 500000
#endif

typedef void (*ChunkFn)(const void *ctx, int64_t chunk);
typedef struct { ChunkFn fn; const void *ctx; int64_t chunks; int nthreads; } Job;

static Job jobs[2];                       /* by generation parity */
static _Atomic uint64_t state;            /* generation << 32 | next chunk */
static _Atomic int64_t done;              /* chunks finished in this generation */
static _Atomic uint32_t wake_word;        /* generation, for the futex */
static _Atomic int sleepers;
static _Atomic int64_t spin_ns;           /* for the current job */
static _Atomic int64_t kernel_spin_ns;    /* for matrix-vector jobs: lv_set_spin */
static int helpers_started;
static pthread_mutex_t start_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t job_lock = PTHREAD_MUTEX_INITIALIZER; /* one job at a time (callers of any thread) */

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Claim and run chunks of the current job while there are any; `helper` < 0 is the caller. */
static void work(int helper) {
    for (;;) {
        uint64_t s = atomic_load(&state);
        uint32_t gen = (uint32_t)(s >> 32);
        Job job = jobs[gen & 1];
        int64_t chunk = (int64_t)(uint32_t)s;
        if (chunk >= job.chunks || helper + 1 >= job.nthreads) return;
        if (!atomic_compare_exchange_weak(&state, &s, s + 1)) continue;
        job.fn(job.ctx, chunk);
        atomic_fetch_add(&done, 1);
    }
}

static void *helper_main(void *arg) {
    int id = (int)(intptr_t)arg;
    uint32_t seen = atomic_load(&wake_word);
    for (;;) {
        int64_t until = now_ns() + atomic_load(&spin_ns);
        while (atomic_load(&wake_word) == seen) {
            for (int i = 0; i < 32; i++) cpu_relax();
            if (now_ns() > until) {
                atomic_fetch_add(&sleepers, 1);
                if (atomic_load(&wake_word) == seen)
                    syscall(SYS_futex, &wake_word, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
                atomic_fetch_sub(&sleepers, 1);
                until = now_ns() + atomic_load(&spin_ns);
            }
        }
        seen = atomic_load(&wake_word);
        work(id);
    }
    return NULL;
}

static void start_helpers(int count) {
    pthread_mutex_lock(&start_lock);
    for (; helpers_started < count && helpers_started < MAX_HELPERS; helpers_started++) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setstacksize(&attr, 1 << 20);
        if (pthread_create(&thread, &attr, helper_main, (void *)(intptr_t)helpers_started)) {
            pthread_attr_destroy(&attr);
            break;
        }
        pthread_attr_destroy(&attr);
        pthread_detach(thread);
    }
    pthread_mutex_unlock(&start_lock);
}

static void parallel(ChunkFn fn, const void *ctx, int64_t chunks, int nthreads, int64_t spin) {
    if (nthreads <= 1 || chunks <= 1) {
        for (int64_t c = 0; c < chunks; c++) fn(ctx, c);
        return;
    }
    if (helpers_started < nthreads - 1) start_helpers(nthreads - 1);
    pthread_mutex_lock(&job_lock);
    uint32_t gen = (uint32_t)(atomic_load(&state) >> 32) + 1;
    jobs[gen & 1] = (Job){fn, ctx, chunks, nthreads};
    atomic_store(&done, 0);
    atomic_store(&spin_ns, spin);
    atomic_store(&state, (uint64_t)gen << 32);
    atomic_store(&wake_word, gen);
    if (atomic_load(&sleepers)) syscall(SYS_futex, &wake_word, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
    work(-1);
    while (atomic_load(&done) < chunks) cpu_relax();
    pthread_mutex_unlock(&job_lock);
}

/* Helpers spin `ns` after each matrix-vector job (0: sleep at once): kernels/native.py sets
 * SPIN_NS for decode steps, where PyTorch runs on one thread, and 0 around everything else. */
LV_API void lv_set_spin(int on) { atomic_store(&kernel_spin_ns, on ? SPIN_NS : 0); }

typedef struct { const uint64_t *words; int64_t count, per_chunk; uint64_t *sums; } Read;

static void read_chunk(const void *ctx, int64_t chunk) {
    const Read *r = ctx;
    const int64_t first = chunk * r->per_chunk, last = first + r->per_chunk < r->count ? first + r->per_chunk : r->count;
    uint64_t sum = 0;
    for (int64_t i = first; i < last; i++) sum += r->words[i]; /* vectorised by the variant's flags */
    r->sums[chunk * 8] = sum; /* 64 bytes apart: no false sharing */
}

LV_API uint64_t lv_read(const void *buf, int64_t bytes, int nthreads) {
    const int64_t per_chunk = 1 << 17; /* 1 MiB */
    Read r = {buf, bytes / 8, per_chunk, NULL};
    const int64_t chunks = (r.count + per_chunk - 1) / per_chunk;
    r.sums = calloc((size_t)chunks * 8, sizeof(uint64_t));
    if (!r.sums) return 0;
    parallel(read_chunk, &r, chunks, nthreads, 0);
    uint64_t total = 0;
    for (int64_t c = 0; c < chunks; c++) total += r.sums[c * 8];
    free(r.sums);
    return total;
}

static inline float bf16_value(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t bf16_round(float f) { /* to the nearest even bfloat16 (as the vector stores round) */
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

static inline float value_at(const void *x, int bf16, int64_t i) {
    return bf16 ? bf16_value(((const uint16_t *)x)[i]) : ((const float *)x)[i];
}

static inline void value_put(void *x, int bf16, int64_t i, float v) {
    if (bf16) ((uint16_t *)x)[i] = bf16_round(v);
    else ((float *)x)[i] = v;
}

/* -- packing (at load) ------------------------------------------------------------------------ */

typedef struct { const int8_t *codes; int64_t N, K, Kp; uint8_t *out; } W8Pack;

static void w8_pack_tile(const void *ctx, int64_t tile) {
    const W8Pack *p = ctx;
    uint8_t *out = p->out + tile * 16 * p->Kp;
    for (int lane = 0; lane < 16; lane++) {
        int64_t row = tile * 16 + lane;
        const int8_t *src = p->codes + row * p->K;
        for (int64_t k = 0; k < p->Kp; k++) {
            uint8_t v = row < p->N && k < p->K ? (uint8_t)src[k] ^ 0x80 : 0x80;
            out[(k / 4) * 64 + lane * 4 + (k % 4)] = v;
        }
    }
}

/* int8 codes [N][K] -> layout t16 [N16][Kp] (see the top of this file). */
int lv_w8_pack(const int8_t *codes, int64_t N, int64_t K, int64_t Kp, uint8_t *out, int nthreads) {
    if (Kp % QB || K > Kp) return -1;
    W8Pack p = {codes, N, K, Kp, out};
    parallel(w8_pack_tile, &p, (N + 15) / 16, nthreads, 0);
    return 0;
}

typedef struct { const uint8_t *raw; int64_t N, K, row_bytes; uint8_t *out; } Q5Pack;

static void q5_pack_tile(const void *ctx, int64_t tile) {
    const Q5Pack *p = ctx;
    int64_t nb = p->K / QB;
    for (int64_t b = 0; b < nb; b++) {
        uint8_t *blk = p->out + (tile * nb + b) * Q5_BLOCK;
        memset(blk, 0, Q5_BLOCK);
        uint64_t masks[8] = {0};
        for (int lane = 0; lane < 16; lane++) {
            int64_t row = tile * 16 + lane;
            uint8_t q[32];
            uint16_t d = 0;
            if (row < p->N) { /* GGUF Q5_0 block: d (f16), qh (32 fifth bits), qs (16 bytes of nibble pairs) */
                const uint8_t *src = p->raw + row * p->row_bytes + b * 22;
                uint32_t qh;
                memcpy(&d, src, 2);
                memcpy(&qh, src + 2, 4);
                for (int i = 0; i < 16; i++) {
                    q[i] = (uint8_t)((src[6 + i] & 0x0F) | (((qh >> i) & 1) << 4));
                    q[i + 16] = (uint8_t)((src[6 + i] >> 4) | (((qh >> (i + 16)) & 1) << 4));
                }
            } else {
                memset(q, 16, 32); /* value 0 */
            }
            memcpy(blk + 320 + lane * 2, &d, 2);
            for (int g = 0; g < 4; g++)
                for (int c = 0; c < 4; c++) {
                    uint8_t lo = q[g * 8 + c], hi = q[g * 8 + 4 + c];
                    blk[g * 64 + lane * 4 + c] = (uint8_t)((lo & 0x0F) | ((hi & 0x0F) << 4));
                    masks[2 * g] |= (uint64_t)(lo >> 4) << (lane * 4 + c);
                    masks[2 * g + 1] |= (uint64_t)(hi >> 4) << (lane * 4 + c);
                }
        }
        memcpy(blk + 256, masks, 64);
    }
}

/* GGUF Q5_0 rows (N rows of K / 32 blocks of 22 bytes, `row_bytes` apart) -> layout q5t16. */
int lv_q5_pack_gguf(const uint8_t *raw, int64_t N, int64_t K, int64_t row_bytes, uint8_t *out, int nthreads) {
    if (K % QB) return -1;
    Q5Pack p = {raw, N, K, row_bytes, out};
    parallel(q5_pack_tile, &p, (N + 15) / 16, nthreads, 0);
    return 0;
}

#endif
