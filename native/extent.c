/* Extents of restored files: which source bytes are visible where, once
 * every row (write, truncate, base file) has been laid over the earlier ones,
 * and the copy of those bytes into a destination file. Pure loops over
 * arrays; the model of the tree and every decision stay in Python. */
#define _GNU_SOURCE
#include "cdp.h"
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#define HOLE UINT64_MAX

/* Scratch memory of a sweep. Fresh anonymous memory costs a fault and a
 * zeroing per 4 KiB page on first touch (2-7 us on these machines: 13 MB of
 * spans for a 268,000-row restore plan was a third of cdp_cover's time), so
 * a large buffer asks for transparent huge pages: one fault per 2 MiB. A
 * small one does not (a huge page would zero 2 MiB for a few rows). */
#define HUGE_MIN (4u << 20)

static void *scratch_alloc(size_t size)
{
    if (size < HUGE_MIN)
        return malloc(size ? size : 1);
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return NULL;
#ifdef MADV_HUGEPAGE
    madvise(p, size, MADV_HUGEPAGE);  /* advice only: without it, 4 KiB pages */
#endif
    return p;
}

static void scratch_free(void *p, size_t size)
{
    if (!p)
        return;
    if (size < HUGE_MIN)
        free(p);
    else
        munmap(p, size);
}

/* A row as the sweep reads it: sorting these by value (not indices into the
 * columns) keeps every pass a sequential read; the columns are 8 MB each for
 * a million rows and random access into them cost more than the sort. */
struct span { uint64_t key, start, end, idx, file, delta; };  /* delta = src - start */

/* Spans sorted by (key, start, idx): a stable LSD radix sort, one pass per
 * byte of start and then of key, skipping the bytes in which all spans
 * agree (offsets below 4 GiB in one file take three or four passes). Spans
 * enter in index order, so stability keeps it among equal (key, start). */
static void radix_pass(const struct span *in, struct span *out, uint64_t m, int col, int shift)
{
    uint64_t count[257] = {0};
    for (uint64_t i = 0; i < m; i++)
        count[(((col ? in[i].key : in[i].start) >> shift) & 0xff) + 1]++;
    for (int b = 0; b < 256; b++)
        count[b + 1] += count[b];
    for (uint64_t i = 0; i < m; i++)
        out[count[((col ? in[i].key : in[i].start) >> shift) & 0xff]++] = in[i];
}

static struct span *sort_spans(struct span *a, struct span *b, uint64_t m)
{
    for (int col = 0; col < 2; col++) {
        uint64_t or_all = 0, and_all = UINT64_MAX;
        for (uint64_t i = 0; i < m; i++) {
            uint64_t v = col ? a[i].key : a[i].start;
            or_all |= v;
            and_all &= v;
        }
        for (int shift = 0; shift < 64; shift += 8) {
            if ((((or_all ^ and_all) >> shift) & 0xff) == 0)
                continue;  /* every span has the same byte here */
            radix_pass(a, b, m, col, shift);
            struct span *t = a;
            a = b;
            b = t;
        }
    }
    return a;
}

/* Max-heap of active rows by index: the newest row wins. The row's end and
 * source ride along, so the sweep never reads the columns at random. */
struct active { uint64_t idx, end, file, delta; };

static void heap_push(struct active *h, uint64_t *n, struct active v)
{
    uint64_t i = (*n)++;
    while (i) {
        uint64_t p = (i - 1) / 2;
        if (h[p].idx >= v.idx)
            break;
        h[i] = h[p];
        i = p;
    }
    h[i] = v;
}

static void heap_pop(struct active *h, uint64_t *n)
{
    struct active v = h[--*n];
    uint64_t i = 0;
    for (;;) {
        uint64_t c = 2 * i + 1;
        if (c >= *n)
            break;
        if (c + 1 < *n && h[c + 1].idx > h[c].idx)
            c++;
        if (v.idx >= h[c].idx)
            break;
        h[i] = h[c];
        i = c;
    }
    h[i] = v;
}

struct pieces {
    uint64_t *key, *start, *len, *file, *src, *rec;
    uint64_t n;
};

/* Append a piece, or grow the previous one when this one continues it in
 * both the destination and the source (and comes from the same record). */
static void emit(struct pieces *p, uint64_t k, uint64_t pos, uint64_t n, uint64_t file, uint64_t src,
                 uint64_t rec)
{
    uint64_t j = p->n;
    if (j && p->key[j - 1] == k && p->file[j - 1] == file && p->rec[j - 1] == rec &&
        p->start[j - 1] + p->len[j - 1] == pos && p->src[j - 1] + p->len[j - 1] == src) {
        p->len[j - 1] += n;
        return;
    }
    p->key[j] = k;
    p->start[j] = pos;
    p->len[j] = n;
    p->file[j] = file;
    p->src[j] = src;
    p->rec[j] = rec;
    p->n++;
}

int cdp_row_sizes(uint64_t n, const uint64_t *key, const uint64_t *start, const uint64_t *end,
                  const uint64_t *file, const uint64_t *seq, const int64_t *ts, uint64_t n_keys,
                  uint64_t *size, uint64_t *last_seq, int64_t *last_ts)
{
    memset(size, 0, n_keys * sizeof *size);
    memset(last_seq, 0, n_keys * sizeof *last_seq);
    memset(last_ts, 0, n_keys * sizeof *last_ts);
    /* sizes and last changes follow the rows in order */
    for (uint64_t i = 0; i < n; i++) {
        uint64_t k = key[i];
        if (k >= n_keys)
            return CDP_EINVAL;
        if (file[i] == HOLE && end[i] == UINT64_MAX)
            size[k] = start[i];
        else if (end[i] > start[i] && end[i] > size[k])
            size[k] = end[i];
        last_seq[k] = seq[i];
        last_ts[k] = ts[i];
    }
    return CDP_OK;
}

/* The first i in [lo, hi) with w_end[i] > a (w_end sorted). Of windows
 * [w_start[i], w_end[i]) (sorted, disjoint): the first that ends after a,
 * so that [a, b) meets one of them iff that one starts before b. Also the
 * end of a key's rows in a sorted key column (the first key above it). */
static uint64_t first_after(uint64_t a, const uint64_t *w_end, uint64_t lo, uint64_t hi)
{
    uint64_t l = lo, h = hi;
    while (l < h) {
        uint64_t mid = l + (h - l) / 2;
        if (w_end[mid] <= a)
            l = mid + 1;
        else
            h = mid;
    }
    return l;
}

int cdp_compact_rows(uint64_t n, uint64_t *const *cols, uint64_t n_cols, uint64_t n_rec,
                     const uint8_t *mode, uint64_t n_keys, const uint64_t *w_lo, const uint64_t *w_hi,
                     const uint64_t *w_start, const uint64_t *w_end, uint64_t *n_out, uint64_t *n_rec_out)
{
    if (n_cols < 3)
        return CDP_EINVAL;
    const uint64_t *key = cols[0], *start = cols[1], *end = cols[2];
    uint64_t out = 0, out_rec = 0, hint = 0, hint_key = UINT64_MAX, hint_at = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t k = key[i];
        if (k >= n_keys)
            return CDP_EINVAL;
        int keep = mode[k] == 1;
        if (mode[k] == 2 && end[i] > start[i] && w_lo[k] < w_hi[k]) {
            if (hint_key == k && hint_at <= start[i]) {
                /* rows in order (a checkpoint's pieces, most of them): walk
                 * on from the window found for the last row of this key
                 * that started no later, not a binary search per row; but
                 * only a few steps, then search the rest: rows in no order
                 * (the records since the checkpoint: random writes) walked
                 * a third of 2,600 windows a row, 3-4 ms for 10,000 rows */
                int steps = 0;
                while (hint < w_hi[k] && w_end[hint] <= start[i] && steps++ < 8)
                    hint++;
                if (hint < w_hi[k] && w_end[hint] <= start[i])
                    hint = first_after(start[i], w_end, hint, w_hi[k]);
            } else {
                hint = first_after(start[i], w_end, w_lo[k], w_hi[k]);
            }
            hint_key = k;
            hint_at = start[i];
            keep = hint < w_hi[k] && w_start[hint] < end[i];
        }
        if (!keep)
            continue;
        if (out != i)
            for (uint64_t c = 0; c < n_cols; c++)
                cols[c][out] = cols[c][i];
        out++;
        if (i < n_rec)
            out_rec = out;
    }
    *n_out = out;
    *n_rec_out = out_rec;
    return CDP_OK;
}

int cdp_compact_sorted(uint64_t n, uint64_t *const *cols, uint64_t n_cols, const uint8_t *mode,
                       uint64_t n_keys, const uint64_t *w_lo, const uint64_t *w_hi, const uint64_t *w_start,
                       const uint64_t *w_end, uint64_t *n_out)
{
    if (n_cols < 3)
        return CDP_EINVAL;
    const uint64_t *key = cols[0], *start = cols[1], *end = cols[2];
    uint64_t out = 0;
    for (uint64_t i = 0; i < n;) {
        uint64_t k = key[i];
        if (k >= n_keys)
            return CDP_EINVAL;
        uint64_t hi = first_after(k, key, i, n);  /* the key's rows: [i, hi) */
        uint64_t r = i;
        if (mode[k] == 1) {
            for (; r < hi; r++, out++)
                if (out != r)
                    for (uint64_t c = 0; c < n_cols; c++)
                        cols[c][out] = cols[c][r];
        } else if (mode[k] == 2) {
            for (uint64_t w = w_lo[k]; w < w_hi[k] && r < hi; w++) {
                /* rows meeting the window: from the first ending past its
                 * start (disjoint rows: their ends are sorted too) while
                 * they start before its end; each row kept once */
                r = first_after(w_start[w], end, r, hi);
                for (; r < hi && start[r] < w_end[w]; r++) {
                    if (end[r] <= start[r])
                        continue;
                    if (out != r)
                        for (uint64_t c = 0; c < n_cols; c++)
                            cols[c][out] = cols[c][r];
                    out++;
                }
            }
        }
        i = hi;
    }
    *n_out = out;
    return CDP_OK;
}

/* Long runs of rows already sorted by (key, start) (a checkpoint's pieces:
 * most of a plan's rows) are merged with the other rows, sorted on their
 * own, instead of being sorted again: one pass over them, not three or
 * four, and half the memory (fresh memory costs microseconds a page on
 * these machines). The order is the sort's: (key, start, row index). */
#define RUN_MIN 4096
#define MAX_RUNS 16

static int row_less(const uint64_t *key, const uint64_t *start, uint64_t i, uint64_t j)
{
    return key[i] < key[j] || (key[i] == key[j] && start[i] < start[j]);
}

/* The non-empty rows (empty writes cover nothing) as spans in (key, start,
 * idx) order, in buf (2 n spans); *m receives their number. */
static struct span *order_rows(uint64_t n, const uint64_t *key, const uint64_t *start, const uint64_t *end,
                               const uint64_t *file, const uint64_t *src, struct span *buf, uint64_t *m)
{
    uint64_t run_lo[MAX_RUNS + 1], run_hi[MAX_RUNS + 1];
    int n_runs = 0, too_many = 0;
    uint64_t total = 0, in_runs = 0, rs = 0, len = 0, prev = UINT64_MAX;
    for (uint64_t i = 0; i <= n; i++) {
        if (i < n && end[i] <= start[i])
            continue;
        if (i == n || (prev != UINT64_MAX && row_less(key, start, i, prev))) {
            if (len >= RUN_MIN) {  /* close the run [rs, i) */
                if (n_runs == MAX_RUNS)
                    too_many = 1;
                else {
                    run_lo[n_runs] = rs;
                    run_hi[n_runs++] = i;
                    in_runs += len;
                }
            }
            rs = i;
            len = 0;
        }
        if (i < n) {
            prev = i;
            len++;
            total++;
        }
    }
    *m = total;
    uint64_t rest = total - in_runs;
    if (too_many || n_runs == 0 || 2 * rest > total) {  /* no long runs to speak of: sort all */
        uint64_t k = 0;
        for (uint64_t i = 0; i < n; i++)
            if (end[i] > start[i])
                buf[k++] = (struct span){ key[i], start[i], end[i], i, file[i], src[i] - start[i] };
        return sort_spans(buf, buf + n, total);
    }
    /* the rows outside the runs, sorted in [0, 2 rest); the result after them */
    uint64_t k = 0;
    int r = 0;
    for (uint64_t i = 0; i < n; i++) {
        while (r < n_runs && i >= run_hi[r])
            r++;
        if (r < n_runs && i >= run_lo[r]) {
            i = run_hi[r] - 1;  /* skip the run */
            continue;
        }
        if (end[i] > start[i])
            buf[k++] = (struct span){ key[i], start[i], end[i], i, file[i], src[i] - start[i] };
    }
    struct span *sorted = sort_spans(buf, buf + rest, rest), *out = buf + 2 * rest;
    uint64_t at[MAX_RUNS], ri = 0;
    for (int q = 0; q < n_runs; q++) {
        at[q] = run_lo[q];
        while (at[q] < run_hi[q] && end[at[q]] <= start[at[q]])
            at[q]++;
    }
    for (uint64_t o = 0; o < total; o++) {
        int best = -1;  /* a run's head, or -1: the sorted rest's */
        for (int q = 0; q < n_runs; q++) {
            if (at[q] >= run_hi[q])
                continue;
            uint64_t i = at[q];
            if (best < 0 ? ri >= rest || key[i] < sorted[ri].key ||
                               (key[i] == sorted[ri].key && (start[i] < sorted[ri].start ||
                                                             (start[i] == sorted[ri].start && i < sorted[ri].idx)))
                         : (row_less(key, start, i, at[best]) ||
                            (!row_less(key, start, at[best], i) && i < at[best])))
                best = q;
        }
        if (best < 0)
            out[o] = sorted[ri++];
        else {
            uint64_t i = at[best];
            out[o] = (struct span){ key[i], start[i], end[i], i, file[i], src[i] - start[i] };
            do
                at[best]++;
            while (at[best] < run_hi[best] && end[at[best]] <= start[at[best]]);
        }
    }
    return out;
}

int cdp_cover(uint64_t n, const uint64_t *key, const uint64_t *start, const uint64_t *end,
              const uint64_t *file, const uint64_t *src, const uint64_t *seq, const int64_t *ts,
              uint64_t n_keys, uint64_t *size, uint64_t *last_seq, int64_t *last_ts,
              const uint64_t *rec, uint64_t n_rec,
              uint64_t *p_key, uint64_t *p_start, uint64_t *p_len, uint64_t *p_file,
              uint64_t *p_src, uint64_t *p_rec, uint64_t cap, uint64_t *n_pieces)
{
    if (!n_pieces || cap < 2 * n + 1)
        return CDP_EINVAL;
    *n_pieces = 0;
    int st = cdp_row_sizes(n, key, start, end, file, seq, ts, n_keys, size, last_seq, last_ts);
    if (st != CDP_OK)
        return st;
    if (n == 0)
        return CDP_OK;
    size_t buf_size = 2 * n * sizeof(struct span), heap_size = n * sizeof(struct active);
    struct span *buf = scratch_alloc(buf_size);
    struct active *heap = scratch_alloc(heap_size);
    if (!buf || !heap) {
        scratch_free(buf, buf_size);
        scratch_free(heap, heap_size);
        return CDP_ENOMEM;
    }
    uint64_t m;
    struct span *ord = order_rows(n, key, start, end, file, src, buf, &m);
    struct pieces out = { p_key, p_start, p_len, p_file, p_src, p_rec, 0 };
    uint64_t i = 0;
    while (i < m) {
        /* One key: sweep its spans by start; between two starts the newest
         * active row (the heap's top) is what the file holds. Rows that
         * ended are dropped lazily when they reach the top. */
        uint64_t k = ord[i].key, limit = size[k], hn = 0, pos = ord[i].start;
        for (;;) {
            int more = i < m && ord[i].key == k;
            if (hn == 0) {
                if (!more)
                    break;
                if (ord[i].start > pos)
                    pos = ord[i].start;
            }
            while (more && ord[i].start <= pos) {
                heap_push(heap, &hn, (struct active){ ord[i].idx, ord[i].end, ord[i].file, ord[i].delta });
                i++;
                more = i < m && ord[i].key == k;
            }
            while (hn && heap[0].end <= pos)
                heap_pop(heap, &hn);
            if (hn == 0)
                continue;
            const struct active *top = &heap[0];
            uint64_t next = more ? ord[i].start : UINT64_MAX;
            uint64_t e = top->end < next ? top->end : next;
            if (pos < limit && top->file != HOLE)
                emit(&out, k, pos, (e < limit ? e : limit) - pos, top->file, top->delta + pos,
                     top->idx < n_rec ? rec[top->idx] : src[top->idx]);
            pos = e;
        }
    }
    scratch_free(buf, buf_size);
    scratch_free(heap, heap_size);
    *n_pieces = out.n;
    return CDP_OK;
}

/* Skip the first w bytes of the iovec array at *v (*cnt entries): what a
 * short pwritev wrote, so that the next call goes on from there. */
static void iov_advance(struct iovec **v, int *cnt, size_t w)
{
    while (*cnt && w >= (*v)->iov_len) {
        w -= (*v)->iov_len;
        (*v)++;
        (*cnt)--;
    }
    if (*cnt) {
        (*v)->iov_base = (uint8_t *)(*v)->iov_base + w;
        (*v)->iov_len -= w;
    }
}

int cdp_copy_out(int fd, uint64_t n, const uint64_t *dst, const uint64_t *len,
                 const uint64_t *file, const uint64_t *src, const uint8_t *const *maps,
                 const uint64_t *map_len, uint64_t n_maps, uint64_t *written)
{
    struct iovec iov[IOV_MAX < 1024 ? IOV_MAX : 1024];
    const int max_iov = (int)(sizeof iov / sizeof iov[0]);
    uint64_t total = 0, i = 0;
    if (!written)
        return CDP_EINVAL;
    *written = 0;
    while (i < n) {
        /* gather pieces whose destinations follow each other */
        uint64_t at = dst[i], bytes = 0;
        int cnt = 0;
        while (i < n && cnt < max_iov && dst[i] == at + bytes) {
            uint64_t f = file[i];
            if (f >= n_maps || src[i] > map_len[f] || len[i] > map_len[f] - src[i])
                return CDP_EINVAL;
            iov[cnt].iov_base = (void *)(maps[f] + src[i]);
            iov[cnt].iov_len = len[i];
            bytes += len[i];
            cnt++;
            i++;
        }
        /* pwritev may write less than asked: go on from where it stopped */
        struct iovec *v = iov;
        while (cnt) {
            ssize_t w = pwritev(fd, v, cnt, (off_t)at);
            if (w < 0) {
                if (errno == EINTR)
                    continue;
                *written = total;
                return CDP_EIO;
            }
            total += (uint64_t)w;
            at += (uint64_t)w;
            iov_advance(&v, &cnt, (size_t)w);
        }
    }
    *written = total;
    return CDP_OK;
}

int cdp_check_records(const uint8_t *const *maps, const uint64_t *map_len, uint64_t n_maps,
                      const uint64_t *file, const uint64_t *payload, uint64_t n, uint64_t *bad)
{
    *bad = UINT64_MAX;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t f = file[i];
        if (f >= n_maps || !maps[f])
            continue;  /* a hole, or a source that is not a segment */
        if (i && file[i - 1] == f && payload[i - 1] == payload[i])
            continue;  /* the next piece of the same record: checked already */
        uint64_t len = map_len[f], at = payload[i] - CDP_REC_HDR_SIZE;
        if (payload[i] < CDP_REC_HDR_SIZE || at > len || len - at < CDP_REC_HDR_SIZE || (at & 7)) {
            *bad = i;
            return CDP_EINVAL;
        }
        const uint8_t *p = maps[f] + at;
        uint32_t crc, plen, reserved;
        uint16_t marker;
        memcpy(&crc, p, 4);
        memcpy(&plen, p + 4, 4);
        memcpy(&marker, p + 42, 2);
        memcpy(&reserved, p + 44, 4);
        uint64_t size = ((uint64_t)CDP_REC_HDR_SIZE + plen + 7) & ~(uint64_t)7;
        if (marker != CDP_REC_MARKER || reserved != 0 || p[40] != CDP_WRITE || plen > CDP_MAX_PAYLOAD ||
            size > len - at || cdp_crc32c(0, p + 4, CDP_REC_HDR_SIZE - 4 + (uint64_t)plen) != crc) {
            *bad = i;
            return CDP_EINVAL;
        }
        for (uint64_t z = CDP_REC_HDR_SIZE + plen; z < size; z++)
            if (p[z]) {
                *bad = i;
                return CDP_EINVAL;
            }
    }
    return CDP_OK;
}

/* pread or pwrite all of len bytes (pread: fewer at the end of the file);
 * the count, or -1 with errno. */
static int64_t io_all(int fd, uint8_t *buf, uint64_t len, uint64_t at, int write)
{
    uint64_t got = 0;
    while (got < len) {
        ssize_t r = write ? pwrite(fd, buf + got, len - got, (off_t)(at + got))
                          : pread(fd, buf + got, len - got, (off_t)(at + got));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (r == 0) {
            if (write) {
                errno = EIO;  /* no progress: do not spin */
                return -1;
            }
            break;  /* end of file */
        }
        got += (uint64_t)r;
    }
    return (int64_t)got;
}

int cdp_read_records(const int *fds, uint64_t n_fds, uint64_t n, const uint64_t *file, const uint64_t *src,
                     const uint64_t *len, const uint64_t *rec, uint8_t *buf, uint64_t cap, uint64_t buf_file,
                     uint64_t *o_file, uint64_t *o_src, uint64_t *o_rec, uint64_t *used, uint64_t *bad)
{
    uint64_t at = 0, prev = UINT64_MAX;  /* prev: the last piece read */
    *used = 0;
    *bad = UINT64_MAX;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t f = file[i];
        o_file[i] = f;
        o_src[i] = src[i];
        o_rec[i] = rec[i];
        if (f >= n_fds || fds[f] < 0)
            continue;
        if (rec[i] < CDP_REC_HDR_SIZE || src[i] < rec[i] || src[i] - rec[i] > CDP_MAX_PAYLOAD ||
            len[i] > CDP_MAX_PAYLOAD - (src[i] - rec[i])) {
            *bad = i;
            return CDP_EINVAL;
        }
        uint64_t need = src[i] - rec[i] + len[i];  /* of the payload, to the piece's end */
        if (prev == UINT64_MAX || file[prev] != f || rec[prev] != rec[i]) {
            /* one pread of the header and the payload as far as the piece
             * needs it (4 KiB at least: the usual write); a second for the
             * rest when the header says the record is longer */
            uint64_t want = CDP_REC_HDR_SIZE + (need > 4096 ? need : 4096);
            want = (want + 7) & ~(uint64_t)7;
            if (cap - at < CDP_REC_HDR_SIZE + ((need + 7) & ~(uint64_t)7))
                return CDP_ENOMEM;
            if (want > cap - at)
                want = cap - at;
            int64_t got = io_all(fds[f], buf + at, want, rec[i] - CDP_REC_HDR_SIZE, 0);
            if (got < 0)
                return CDP_EIO;
            uint32_t plen;
            if ((uint64_t)got < CDP_REC_HDR_SIZE) {
                *bad = i;
                return CDP_EINVAL;
            }
            memcpy(&plen, buf + at + 4, 4);
            uint64_t size = ((uint64_t)CDP_REC_HDR_SIZE + plen + 7) & ~(uint64_t)7;
            if (plen > CDP_MAX_PAYLOAD || need > plen) {
                *bad = i;
                return CDP_EINVAL;
            }
            if (size > (uint64_t)got) {
                if (size > cap - at)
                    return CDP_ENOMEM;
                uint64_t more = size - (uint64_t)got;
                int64_t r = io_all(fds[f], buf + at + got, more, rec[i] - CDP_REC_HDR_SIZE + (uint64_t)got, 0);
                if (r < 0)
                    return CDP_EIO;
                if ((uint64_t)r != more) {
                    *bad = i;  /* the file ends inside the record */
                    return CDP_EINVAL;
                }
            }
            prev = i;
            o_rec[i] = at + CDP_REC_HDR_SIZE;
            at += size;
        } else {
            uint32_t plen;
            memcpy(&plen, buf + o_rec[prev] - CDP_REC_HDR_SIZE + 4, 4);
            if (need > plen) {
                *bad = i;
                return CDP_EINVAL;
            }
            o_rec[i] = o_rec[prev];
        }
        o_file[i] = buf_file;
        o_src[i] = o_rec[i] + (src[i] - rec[i]);
        *used = at;
    }
    return CDP_OK;
}

/* Zeros for the holes a rollback puts back: the payload of a WRITE record
 * that says "zeros here" points into this (read-only, shared by every call)
 * instead of into a buffer of the caller's. */
#define PB_ZEROS (1u << 16)
static const uint8_t pb_zeros[PB_ZEROS];

/* One fragment of a range's wanted bytes: a piece's part inside it (a
 * pointer into its source) or a hole's (into pb_zeros, at most PB_ZEROS). */
struct pb_frag {
    const uint8_t *p;
    uint64_t at, len;  /* at: offset in the file */
};

/* The next fragment of [a, b) at or after `at`, from pieces j.. (sorted by
 * start; the caller has skipped those ending at or before a). Returns 0 at
 * b; CDP_EINVAL (as -1) for a piece outside its map. */
static int pb_next(uint64_t at, uint64_t b, uint64_t *j, uint64_t n_pieces, const uint64_t *p_start,
                   const uint64_t *p_len, const uint64_t *p_file, const uint64_t *p_src,
                   const uint8_t *const *maps, const uint64_t *map_len, uint64_t n_maps, struct pb_frag *out)
{
    if (at >= b)
        return 0;
    while (*j < n_pieces && p_start[*j] + p_len[*j] <= at)
        (*j)++;
    uint64_t k = *j;
    if (k < n_pieces && p_start[k] <= at) {
        uint64_t f = p_file[k];
        if (f >= n_maps || !maps[f] || p_src[k] > map_len[f] || p_len[k] > map_len[f] - p_src[k])
            return -1;
        uint64_t end = p_start[k] + p_len[k] < b ? p_start[k] + p_len[k] : b;
        if (end - at > CDP_MAX_PAYLOAD)
            end = at + CDP_MAX_PAYLOAD;
        *out = (struct pb_frag){ maps[f] + p_src[k] + (at - p_start[k]), at, end - at };
        return 1;
    }
    uint64_t end = k < n_pieces && p_start[k] < b ? p_start[k] : b;  /* a hole up to the next piece */
    if (end - at > PB_ZEROS)
        end = at + PB_ZEROS;
    *out = (struct pb_frag){ pb_zeros, at, end - at };
    return 1;
}

int cdp_put_back(int fd, uint64_t n, const uint64_t *r_start, const uint64_t *r_len,
                 uint64_t n_pieces, const uint64_t *p_start, const uint64_t *p_len,
                 const uint64_t *p_file, const uint64_t *p_src, const uint8_t *const *maps,
                 const uint64_t *map_len, uint64_t n_maps, uint8_t *scratch, int all,
                 uint8_t *differs, struct cdp_rec *recs, uint64_t cap, uint64_t *n_recs, uint64_t *done,
                 uint64_t kick)
{
    struct iovec iov[IOV_MAX < 1024 ? IOV_MAX : 1024];
    uint64_t kick_lo = 0, kick_hi = 0, kick_n = 0;  /* written since the last kick */
    const int max_iov = (int)(sizeof iov / sizeof iov[0]);
    if (!done || !n_recs)
        return CDP_EINVAL;
    *done = 0;
    *n_recs = 0;
    uint64_t j = 0, m = 0;  /* j: the first piece that may meet the current range */
    for (uint64_t i = 0; i < n; i++) {
        uint64_t a = r_start[i], len = r_len[i], b = a + len;
        if (b < a || (i && r_start[i - 1] + r_len[i - 1] > a))
            return CDP_EINVAL;  /* overflow, or not sorted and disjoint */
        int64_t got = io_all(fd, scratch, len, a, 0);
        if (got < 0)
            return CDP_EIO;
        /* compare with the wanted bytes where they lie: no copy of them */
        int differ = (uint64_t)got != len;
        struct pb_frag fr;
        uint64_t jj = j;
        int r;
        for (uint64_t at = a; !differ && (r = pb_next(at, b, &jj, n_pieces, p_start, p_len, p_file, p_src,
                                                       maps, map_len, n_maps, &fr)) != 0; at += fr.len) {
            if (r < 0)
                return CDP_EINVAL;
            differ = memcmp(fr.p, scratch + (fr.at - a), fr.len) != 0;
        }
        differs[i] = (uint8_t)differ;
        /* write (gathered from the sources) and describe the range */
        uint64_t at = a;
        while (at < b && (differ || all)) {
            int cnt = 0;
            uint64_t w_at = at;
            for (; cnt < max_iov && (r = pb_next(at, b, &j, n_pieces, p_start, p_len, p_file, p_src,
                                                 maps, map_len, n_maps, &fr)) != 0; at += fr.len) {
                if (r < 0)
                    return CDP_EINVAL;
                iov[cnt++] = (struct iovec){ (void *)fr.p, fr.len };
                if (m && recs[m - 1].offset + recs[m - 1].len == fr.at &&
                    (const uint8_t *)recs[m - 1].payload + recs[m - 1].len == fr.p && fr.p != pb_zeros &&
                    recs[m - 1].len + fr.len <= CDP_MAX_PAYLOAD) {
                    recs[m - 1].len += (uint32_t)fr.len;  /* contiguous in the source too: one record */
                    continue;
                }
                if (m == cap)
                    return CDP_ENOMEM;
                recs[m++] = (struct cdp_rec){ CDP_WRITE, 0, 0, fr.at, 0, fr.p, (uint32_t)fr.len };
            }
            *n_recs = m;
            struct iovec *v = iov;
            while (differ && cnt) {  /* pwritev may write less than asked */
                ssize_t w = pwritev(fd, v, cnt, (off_t)w_at);
                if (w < 0 && errno == EINTR)
                    continue;
                if (w <= 0) {
                    if (w == 0)
                        errno = EIO;
                    return CDP_EIO;
                }
                if (!kick_n)
                    kick_lo = w_at;
                kick_n += (uint64_t)w;
                w_at += (uint64_t)w;
                kick_hi = w_at;
                iov_advance(&v, &cnt, (size_t)w);
            }
        }
        *done = i + 1;
        if (kick && (kick_n >= kick || (i + 1 == n && kick_n))) {
            /* start the writeback of what was written since the last kick
             * (ranges are sorted: it lies in [kick_lo, kick_hi)); advice
             * only, the caller's fsync is what makes it durable */
            sync_file_range(fd, (off_t)kick_lo, (off_t)(kick_hi - kick_lo), SYNC_FILE_RANGE_WRITE);
            kick_n = 0;
        }
    }
    return CDP_OK;
}

int cdp_touched_ranges(uint64_t n, const uint64_t *key, const uint64_t *start, const uint64_t *end,
                       uint64_t *o_key, uint64_t *o_start, uint64_t *o_end, uint64_t *n_out)
{
    if (!n_out)
        return CDP_EINVAL;
    *n_out = 0;
    if (n == 0)
        return CDP_OK;
    struct span *buf = malloc(2 * n * sizeof *buf);
    if (!buf)
        return CDP_ENOMEM;
    for (uint64_t i = 0; i < n; i++)
        buf[i] = (struct span){ key[i], start[i], end[i] < start[i] ? start[i] : end[i], i, 0, 0 };
    struct span *ord = sort_spans(buf, buf + n, n);
    uint64_t m = 0;
    for (uint64_t i = 0; i < n; i++) {
        if (m && o_key[m - 1] == ord[i].key && ord[i].start <= o_end[m - 1]) {
            if (ord[i].end > o_end[m - 1])
                o_end[m - 1] = ord[i].end;
            continue;
        }
        o_key[m] = ord[i].key;
        o_start[m] = ord[i].start;
        o_end[m] = ord[i].end;
        m++;
    }
    free(buf);
    *n_out = m;
    return CDP_OK;
}

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22  /* Linux 5.14; older headers lack the name */
#endif

int cdp_populate_read(const uint8_t *p, uint64_t len)
{
    if (len == 0)
        return CDP_OK;
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t a = (uintptr_t)p & ~(page - 1);
    if (madvise((void *)a, (uintptr_t)p + len - a, MADV_POPULATE_READ) != 0)
        return CDP_EIO;
    return CDP_OK;
}
