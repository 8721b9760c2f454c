/* fill_journal: append N FLUSH records with increasing explicit timestamps
 * to an existing journal, in cdp_append batches, as fast as the writer goes.
 * Used by the resolve benchmark to build a 10-million-record journal in
 * seconds (a Python loop would take minutes).
 *
 * Usage: fill_journal JOURNAL_DIR N_RECORDS FIRST_TS_US
 * Timestamps advance by a pseudo-random 1..16 us per record (fixed seed,
 * so every run builds the same journal). Prints one JSON object: records,
 * first_ts, last_ts, seconds.
 */
#define _GNU_SOURCE
#include "cdp.h"
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define BATCH 4096

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s JOURNAL_DIR N_RECORDS FIRST_TS_US\n", argv[0]);
        return 2;
    }
    uint64_t n = strtoull(argv[2], NULL, 10);
    int64_t ts = strtoll(argv[3], NULL, 10), first_ts = ts;
    if (n == 0) {
        fprintf(stderr, "fill_journal: N_RECORDS must be positive\n");
        return 2;
    }
    cdp_writer *w;
    int r = cdp_writer_open(argv[1], &w);
    if (r != CDP_OK) {
        fprintf(stderr, "fill_journal: open %s: %s\n", argv[1], cdp_strerror(r));
        return 1;
    }
    static struct cdp_rec recs[BATCH];
    uint64_t lcg = 0x9E3779B97F4A7C15u;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (uint64_t done = 0; done < n;) {
        size_t k = n - done < BATCH ? (size_t)(n - done) : BATCH;
        for (size_t i = 0; i < k; i++) {
            recs[i] = (struct cdp_rec){.kind = CDP_FLUSH, .ts = ts};
            lcg = lcg * 6364136223846793005u + 1442695040888963407u;
            ts += 1 + (int64_t)(lcg >> 60);
        }
        struct cdp_append_result res;
        r = cdp_append(w, recs, k, UINT64_MAX, &res);
        if (r != CDP_OK) {
            fprintf(stderr, "fill_journal: cdp_append: %s\n", cdp_strerror(r));
            if (r == CDP_EIO)
                perror("errno");
            return 1;
        }
        done += k;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    cdp_writer_close(w);
    /* ts was advanced once past the last record written */
    int64_t last_ts = recs[(n - 1) % BATCH].ts;
    printf("{\"records\": %llu, \"first_ts\": %lld, \"last_ts\": %lld, \"seconds\": %.3f}\n",
           (unsigned long long)n, (long long)first_ts, (long long)last_ts,
           (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9);
    return 0;
}
