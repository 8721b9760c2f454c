/* bench_append: the cost of one journal append from C, next to a plain
 * pwrite(2) of the same bytes, measured in the same process.
 *
 * Usage: bench_append SCRATCH_DIR JOURNAL_DIR...
 *
 * Each JOURNAL_DIR is an existing, empty journal (cdpcore.Journal.create
 * made it; the segment size is large enough that no rotation happens). One
 * journal is used per round, so every round appends to fresh files; the
 * baseline writes into a fresh file in SCRATCH_DIR for each case.
 *
 * Cases, each a (journal, baseline) pair:
 *   flush1   cdp_append of one 0-byte FLUSH record   | pwrite of its 48 bytes
 *   write4k  cdp_append of one 4 KiB WRITE record     | pwrite of its 4144 bytes
 *   batch64  cdp_append of 64 x 4 KiB WRITE records   | one pwrite of the 64 records' bytes
 *   enc64    cdp_append_encoded of 64 x 4 KiB records | memcpy + pwrite of the same buffer
 *            (both sides restore the 64 records from a template before each
 *            call: cdp_append_encoded fills seq and crc in place)
 *   flush64  cdp_append of 64 x 0-byte FLUSH records  | one pwrite of their 64 x 48 bytes
 * reported in ns per record. Last, cdp_crc32c alone over the checksummed
 * span of a 4 KiB and of a 64 KiB record (44 + payload bytes), in GB/s. Within a round the journal and baseline runs
 * alternate, and the order flips every round (ABBA), so slow drift of a
 * shared machine hits both sides alike. Output: one JSON object on stdout
 * with per-round figures; the Python runner takes the medians.
 *
 * Built at benchmark time by benchmarks/c/build_c.py (gcc -O2 with the
 * writer sources, native/ *.c).
 */
#define _GNU_SOURCE
#include "cdp.h"
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define PAYLOAD 4096
#define REC4K (CDP_REC_HDR_SIZE + PAYLOAD) /* 4144, already 8-aligned */

static int64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void die(const char *what, int status)
{
    fprintf(stderr, "bench_append: %s: %s\n", what, cdp_strerror(status));
    if (status == CDP_EIO)
        perror("errno");
    exit(1);
}

static uint8_t payload[BATCH][PAYLOAD];
static struct cdp_rec recs[BATCH];
static uint8_t encoded[BATCH * REC4K];  /* cdp_append_encoded input */
static uint8_t template_enc[BATCH * REC4K];
static uint8_t image[BATCH * REC4K];    /* the bytes the journal writes, for pwrite */

/* A record header laid out as on disk (what cdp_append writes). */
static void header(uint8_t *h, uint8_t kind, uint32_t len, uint64_t seq, uint64_t fid,
                   uint64_t off, int64_t ts)
{
    memset(h, 0, CDP_REC_HDR_SIZE);
    memcpy(h + 4, &len, 4);
    memcpy(h + 8, &seq, 8);
    memcpy(h + 16, &ts, 8);
    memcpy(h + 24, &fid, 8);
    memcpy(h + 32, &off, 8);
    h[40] = kind;
    h[42] = CDP_REC_MARKER & 0xff;
    h[43] = CDP_REC_MARKER >> 8;
}

struct baseline {
    int fd;
    uint64_t off;
};

static void base_open(struct baseline *b, const char *dir)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/baseline.dat", dir);
    b->fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (b->fd < 0) {
        perror(path);
        exit(1);
    }
    unlink(path);
    b->off = 0;
}

static void base_close(struct baseline *b) { close(b->fd); }

static void base_write(struct baseline *b, const void *buf, size_t n)
{
    if (pwrite(b->fd, buf, n, (off_t)b->off) != (ssize_t)n) {
        perror("pwrite");
        exit(1);
    }
    b->off += n;
}

/* ---- journal sides ---- */

static void j_append(cdp_writer *w, size_t n, int iters)
{
    struct cdp_append_result res;
    for (int i = 0; i < iters; i++) {
        int r = cdp_append(w, recs, n, UINT64_MAX, &res);
        if (r != CDP_OK)
            die("cdp_append", r);
    }
}

static void j_encoded(cdp_writer *w, int iters)
{
    struct cdp_append_result res;
    for (int i = 0; i < iters; i++) {
        /* cdp_append_encoded fills seq/crc in place; the Python Batch builds
         * a fresh buffer per commit, so restore the template each time
         * (a memcpy that the Python path also pays, as its encode). */
        memcpy(encoded, template_enc, sizeof encoded);
        int r = cdp_append_encoded(w, encoded, sizeof encoded, UINT64_MAX, &res);
        if (r != CDP_OK)
            die("cdp_append_encoded", r);
    }
}

struct casedef {
    const char *name;
    int kind;      /* 0 = cdp_append, 1 = cdp_append_encoded */
    uint8_t rkind; /* record kind */
    uint32_t len;  /* payload bytes per record */
    size_t n;      /* records per append */
    int iters;     /* appends per run */
};

static const struct casedef cases[] = {
    {"flush1", 0, CDP_FLUSH, 0, 1, 20000},
    {"write4k", 0, CDP_WRITE, PAYLOAD, 1, 8000},
    {"batch64", 0, CDP_WRITE, PAYLOAD, BATCH, 200},
    {"enc64", 1, CDP_WRITE, PAYLOAD, BATCH, 200},
    {"flush64", 0, CDP_FLUSH, 0, BATCH, 1000},
};
#define NCASES (sizeof cases / sizeof cases[0])

static void setup_case(const struct casedef *c)
{
    size_t rec = (CDP_REC_HDR_SIZE + c->len + 7) & ~(size_t)7;
    for (size_t i = 0; i < c->n; i++) {
        recs[i] = (struct cdp_rec){.kind = c->rkind, .flags = 0,
                                   .file_id = c->rkind == CDP_WRITE ? 1 : 0,
                                   .offset = (uint64_t)i * c->len, .ts = INT64_MIN,
                                   .payload = c->len ? payload[i] : NULL, .len = c->len};
        uint8_t *h = image + i * rec;
        header(h, c->rkind, c->len, i + 1, recs[i].file_id, recs[i].offset, cdp_now_us());
        if (c->len)
            memcpy(h + CDP_REC_HDR_SIZE, payload[i], c->len);
        uint32_t crc = cdp_crc32c(0, h + 4, CDP_REC_HDR_SIZE - 4 + c->len);
        memcpy(h, &crc, 4);
        /* the pending form: ts = INT64_MIN, no seq, no crc */
        uint8_t *e = template_enc + i * rec;
        header(e, c->rkind, c->len, 0, recs[i].file_id, recs[i].offset, INT64_MIN);
        if (c->len)
            memcpy(e + CDP_REC_HDR_SIZE, payload[i], c->len);
    }
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s SCRATCH_DIR JOURNAL_DIR...\n", argv[0]);
        return 2;
    }
    for (size_t i = 0; i < BATCH; i++)
        for (size_t k = 0; k < PAYLOAD; k++)
            payload[i][k] = (uint8_t)(i * 131 + k * 7 + (k >> 8));
    const char *scratch = argv[1];
    int rounds = argc - 2;
    printf("{\"crc32c_hw\": %d, \"rounds\": %d, \"cases\": {", cdp_crc32c_hw(), rounds);
    /* results[case][round] */
    static double jns[NCASES][64], bns[NCASES][64];
    if (rounds > 64)
        rounds = 64;
    for (int r = 0; r < rounds; r++) {
        cdp_writer *w;
        int st = cdp_writer_open(argv[2 + r], &w);
        if (st != CDP_OK)
            die(argv[2 + r], st);
        for (size_t ci = 0; ci < NCASES; ci++) {
            const struct casedef *c = &cases[ci];
            setup_case(c);
            size_t bytes = c->n * ((CDP_REC_HDR_SIZE + c->len + 7) & ~(size_t)7);
            double recs_total = (double)c->n * c->iters;
            for (int side = 0; side < 2; side++) {
                int journal_side = (side == 0) == (r % 2 == 0);
                int64_t t0, t1;
                if (journal_side) {
                    t0 = now_ns();
                    if (c->kind == 0)
                        j_append(w, c->n, c->iters);
                    else
                        j_encoded(w, c->iters);
                    t1 = now_ns();
                    jns[ci][r] = (double)(t1 - t0) / recs_total;
                } else {
                    struct baseline b;
                    base_open(&b, scratch);
                    t0 = now_ns();
                    for (int i = 0; i < c->iters; i++) {
                        if (c->kind == 1) {
                            /* the same copy, then the same (just written) buffer */
                            memcpy(encoded, image, sizeof encoded);
                            base_write(&b, encoded, bytes);
                        } else {
                            base_write(&b, image, bytes);
                        }
                    }
                    t1 = now_ns();
                    base_close(&b);
                    bns[ci][r] = (double)(t1 - t0) / recs_total;
                }
            }
        }
        cdp_writer_close(w);
    }
    /* cdp_crc32c alone, per round: GB/s over the span a record's crc covers */
    static const size_t crc_sizes[2] = {CDP_REC_HDR_SIZE - 4 + PAYLOAD, CDP_REC_HDR_SIZE - 4 + 65536};
    static uint8_t crcbuf[65536 + 64];
    double crc_gbs[2][64];
    for (size_t i = 0; i < sizeof crcbuf; i++)
        crcbuf[i] = (uint8_t)(i * 2654435761u >> 13);
    volatile uint32_t sink = 0;
    for (int r = 0; r < rounds; r++)
        for (int k = 0; k < 2; k++) {
            size_t sz = crc_sizes[k];
            int reps = (int)((256u << 20) / sz);
            int64_t t0 = now_ns();
            for (int i = 0; i < reps; i++)
                sink ^= cdp_crc32c((uint32_t)i, crcbuf + 4, sz);
            crc_gbs[k][r] = (double)reps * (double)sz / (double)(now_ns() - t0);
        }
    (void)sink;
    for (size_t ci = 0; ci < NCASES; ci++) {
        const struct casedef *c = &cases[ci];
        printf("%s\"%s\": {\"records_per_append\": %zu, \"payload\": %u, \"appends_per_round\": %d, "
               "\"api\": \"%s\", \"journal_ns\": [",
               ci ? ", " : "", c->name, c->n, c->len, c->iters,
               c->kind ? "cdp_append_encoded" : "cdp_append");
        for (int r = 0; r < rounds; r++)
            printf("%s%.1f", r ? ", " : "", jns[ci][r]);
        printf("], \"pwrite_ns\": [");
        for (int r = 0; r < rounds; r++)
            printf("%s%.1f", r ? ", " : "", bns[ci][r]);
        printf("]}");
    }
    printf("}, \"crc32c_gbs\": {");
    for (int k = 0; k < 2; k++) {
        printf("%s\"%zu\": [", k ? ", " : "", crc_sizes[k]);
        for (int r = 0; r < rounds; r++)
            printf("%s%.2f", r ? ", " : "", crc_gbs[k][r]);
        printf("]");
    }
    printf("}}\n");
    return 0;
}
