/* The journal writer: appends records from any number of threads and
 * processes into one journal.
 *
 * Theory of operation
 * -------------------
 * Shared state (next sequence number, active segment and its committed end,
 * ...) lives in the journal's `head` file, mapped MAP_SHARED by every writer.
 * An append takes a process-local mutex (threads) and then flock(LOCK_EX) on
 * the head file (processes), assigns sequence numbers, writes the records
 * into the active segment with pwritev(2), and only then publishes the new
 * end offset. Bytes handed to pwritev live in the kernel's page cache, so a
 * SIGKILL of the writer after cdp_append returned loses nothing.
 *
 * A writer killed while holding the lock leaves `pending` set in the head.
 * The kernel drops its flock, and the next locker cuts whatever it wrote past
 * the committed end (and any segment it created), so an append that never
 * returned leaves no trace and its sequence numbers are reused. Nothing is
 * ever written before the committed end, so readers that stop at the
 * committed end never see a half-written record.
 *
 * flock locks belong to an open file description, which fork() shares; a
 * child that inherited a writer therefore reopens the head file before it
 * locks (detected with a pthread_atfork generation counter).
 */
#define _GNU_SOURCE
#include "cdp.h"
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

/* head file layout (docs/journal-format.md, "Head file") */
enum {
    H_MAGIC = 0, H_VERSION = 8, H_CRC = 12, H_NEXT_SEQ = 16, H_SEG_NO = 24,
    H_SEG_OFF = 32, H_PENDING = 40, H_NEXT_FILE_ID = 48, H_NS_GEN = 56,
    H_SYNCED_SEQ = 64, H_LAST_TS = 72, H_SEG_SIZE = 80, H_UUID = 88, H_BASE_GEN = 104,
    H_CRC_START = 16, H_CRC_END = 128
};
#define GROUP 128 /* records per pwritev: 3 iovecs each stays under IOV_MAX */

struct cdp_writer {
    char *dir;
    int head_fd;
    uint8_t *head;
    int segdir_fd;
    int seg_fd;
    uint64_t seg_no;           /* the segment seg_fd refers to */
    pthread_mutex_t mu;        /* threads of this process */
    pthread_mutex_t sync_mu;   /* group commit within this process */
    unsigned fork_gen;
    /* The lock is reentrant for the thread that holds it: the capture
     * library holds it around a program's system call and the appends that
     * journal it, so that sequence order is the order the kernel saw. */
    pthread_t owner;
    int depth;
};

static volatile unsigned fork_generation;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static void on_fork_child(void) { fork_generation++; }
static void install_atfork(void) { pthread_atfork(NULL, NULL, on_fork_child); }

static const uint8_t zeros[8];

static inline uint64_t hget(const cdp_writer *w, int off) { uint64_t v; memcpy(&v, w->head + off, 8); return v; }
static inline void hset(cdp_writer *w, int off, uint64_t v) { memcpy(w->head + off, &v, 8); }
static inline void wr32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void wr64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static inline uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint16_t rd16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }

static void head_seal(cdp_writer *w)
{
    wr32(w->head + H_CRC, cdp_crc32c(0, w->head + H_CRC_START, H_CRC_END - H_CRC_START));
}

static int head_valid(const cdp_writer *w)
{
    return memcmp(w->head, "CDPHEAD\0", 8) == 0 && rd32(w->head + H_VERSION) == 1 &&
           rd32(w->head + H_CRC) ==
               cdp_crc32c(0, w->head + H_CRC_START, H_CRC_END - H_CRC_START);
}

static void seg_name(char *buf, size_t n, uint64_t seg_no, const char *suffix)
{
    snprintf(buf, n, "%016llx.seg%s", (unsigned long long)seg_no, suffix);
}

static int is_ns_kind(uint8_t k)
{
    return k == CDP_CREATE || k == CDP_RENAME || k == CDP_UNLINK || k == CDP_RMDIR ||
           k == CDP_LINK || k == CDP_SYMLINK || k == CDP_BASE;
}

int cdp_writer_open(const char *dir, cdp_writer **out)
{
    pthread_once(&atfork_once, install_atfork);
    cdp_writer *w = calloc(1, sizeof *w);
    char path[4096];
    if (!w)
        return CDP_ENOMEM;
    w->head_fd = w->segdir_fd = w->seg_fd = -1;
    w->head = MAP_FAILED;
    w->dir = strdup(dir);
    if (!w->dir)
        goto nomem;
    snprintf(path, sizeof path, "%s/head", dir);
    w->head_fd = open(path, O_RDWR | O_CLOEXEC);
    if (w->head_fd < 0)
        goto fail;
    struct stat st;
    if (fstat(w->head_fd, &st) < 0)
        goto fail;
    if (st.st_size < CDP_HEAD_SIZE) {
        errno = EINVAL;
        goto fail;
    }
    w->head = mmap(NULL, CDP_HEAD_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, w->head_fd, 0);
    if (w->head == MAP_FAILED)
        goto fail;
    snprintf(path, sizeof path, "%s/segments", dir);
    w->segdir_fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (w->segdir_fd < 0)
        goto fail;
    pthread_mutex_init(&w->mu, NULL);
    pthread_mutex_init(&w->sync_mu, NULL);
    w->fork_gen = fork_generation;
    *out = w;
    return CDP_OK;
fail:;
    int e = errno;
    cdp_writer_close(w);
    errno = e;
    return CDP_EIO;
nomem:
    cdp_writer_close(w);
    return CDP_ENOMEM;
}

void cdp_writer_close(cdp_writer *w)
{
    if (!w)
        return;
    if (w->head != MAP_FAILED && w->head)
        munmap(w->head, CDP_HEAD_SIZE);
    if (w->head_fd >= 0)
        close(w->head_fd);
    if (w->segdir_fd >= 0)
        close(w->segdir_fd);
    if (w->seg_fd >= 0)
        close(w->seg_fd);
    free(w->dir);
    free(w);
}

/* A forked child shares the parent's flock (same open file description) and
 * may have inherited a locked mutex: give it its own of both. */
static int after_fork(cdp_writer *w)
{
    char path[4096];
    pthread_mutex_init(&w->mu, NULL);
    pthread_mutex_init(&w->sync_mu, NULL);
    __atomic_store_n(&w->depth, 0, __ATOMIC_RELAXED);
    snprintf(path, sizeof path, "%s/head", w->dir);
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return CDP_EIO;
    close(w->head_fd);
    w->head_fd = fd;
    w->fork_gen = fork_generation;
    return CDP_OK;
}

/* Remove what a writer that died holding the lock left past the committed
 * end: bytes in the active segment and segments it had started. */
static int cut_pending(cdp_writer *w)
{
    char name[64];
    uint64_t seg_no = hget(w, H_SEG_NO);
    seg_name(name, sizeof name, seg_no, "");
    int fd = openat(w->segdir_fd, name, O_WRONLY | O_CLOEXEC);
    if (fd >= 0) {
        int r = ftruncate(fd, (off_t)hget(w, H_SEG_OFF));
        close(fd);
        if (r < 0)
            return CDP_EIO;
    }
    for (uint64_t k = seg_no + 1;; k++) {
        seg_name(name, sizeof name, k, "");
        if (unlinkat(w->segdir_fd, name, 0) < 0)
            break;
    }
    seg_name(name, sizeof name, seg_no + 1, ".tmp");
    unlinkat(w->segdir_fd, name, 0);
    hset(w, H_PENDING, 0);
    head_seal(w);
    return CDP_OK;
}

int cdp_writer_lock(cdp_writer *w)
{
    if (w->fork_gen != fork_generation && after_fork(w) != CDP_OK)
        return CDP_EIO;
    /* Only the holder itself can see depth > 0 with owner == itself. */
    if (__atomic_load_n(&w->depth, __ATOMIC_ACQUIRE) > 0 && pthread_equal(w->owner, pthread_self())) {
        w->depth++;
        return CDP_OK;
    }
    pthread_mutex_lock(&w->mu);
    while (flock(w->head_fd, LOCK_EX) < 0) {
        if (errno != EINTR) {
            int e = errno;
            pthread_mutex_unlock(&w->mu);
            errno = e;
            return CDP_EIO;
        }
    }
    w->owner = pthread_self();
    __atomic_store_n(&w->depth, 1, __ATOMIC_RELEASE);
    if (head_valid(w) && hget(w, H_PENDING)) {
        int r = cut_pending(w);
        if (r != CDP_OK) {
            int e = errno;
            cdp_writer_unlock(w);
            errno = e;
            return r;
        }
    }
    return CDP_OK;
}

int cdp_writer_unlock(cdp_writer *w)
{
    if (w->depth > 1) {
        w->depth--;
        return CDP_OK;
    }
    __atomic_store_n(&w->depth, 0, __ATOMIC_RELAXED);
    flock(w->head_fd, LOCK_UN);
    pthread_mutex_unlock(&w->mu);
    return CDP_OK;
}

int cdp_writer_get_state(cdp_writer *w, struct cdp_state *st)
{
    if (!head_valid(w))
        return CDP_ECORRUPT;
    st->next_seq = hget(w, H_NEXT_SEQ);
    st->seg_no = hget(w, H_SEG_NO);
    st->seg_off = hget(w, H_SEG_OFF);
    st->pending = (int)hget(w, H_PENDING);
    st->next_file_id = hget(w, H_NEXT_FILE_ID);
    st->ns_gen = hget(w, H_NS_GEN);
    st->synced_seq = hget(w, H_SYNCED_SEQ);
    st->last_ts = (int64_t)hget(w, H_LAST_TS);
    st->seg_size = hget(w, H_SEG_SIZE);
    memcpy(st->uuid, w->head + H_UUID, 16);
    return CDP_OK;
}

int cdp_writer_set_state(cdp_writer *w, const struct cdp_state *st)
{
    memset(w->head, 0, CDP_HEAD_SIZE);
    memcpy(w->head, "CDPHEAD\0", 8);
    wr32(w->head + H_VERSION, 1);
    hset(w, H_NEXT_SEQ, st->next_seq);
    hset(w, H_SEG_NO, st->seg_no);
    hset(w, H_SEG_OFF, st->seg_off);
    hset(w, H_PENDING, 0);
    hset(w, H_NEXT_FILE_ID, st->next_file_id);
    hset(w, H_NS_GEN, st->ns_gen);
    hset(w, H_SYNCED_SEQ, st->synced_seq);
    hset(w, H_LAST_TS, (uint64_t)st->last_ts);
    hset(w, H_SEG_SIZE, st->seg_size);
    memcpy(w->head + H_UUID, st->uuid, 16);
    head_seal(w);
    return CDP_OK;
}

/* Make w->seg_fd refer to segment seg_no (another process may have rotated). */
static int open_segment(cdp_writer *w, uint64_t seg_no)
{
    if (w->seg_fd >= 0 && w->seg_no == seg_no)
        return CDP_OK;
    char name[64];
    seg_name(name, sizeof name, seg_no, "");
    int fd = openat(w->segdir_fd, name, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return CDP_EIO;
    if (w->seg_fd >= 0)
        close(w->seg_fd);
    w->seg_fd = fd;
    w->seg_no = seg_no;
    return CDP_OK;
}

/* Seal the active segment (make it durable) and start segment seg_no + 1
 * holding records from first_seq on. The head is not touched: the caller
 * publishes the new segment only when its whole append succeeded. */
static int rotate(cdp_writer *w, uint64_t first_seq)
{
    char tmp[64], name[64];
    uint8_t hdr[CDP_SEG_HDR_SIZE];
    uint64_t next = w->seg_no + 1;
    if (fdatasync(w->seg_fd) < 0)
        return CDP_EIO;
    seg_name(tmp, sizeof tmp, next, ".tmp");
    seg_name(name, sizeof name, next, "");
    int fd = openat(w->segdir_fd, tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return CDP_EIO;
    cdp_segment_header(hdr, w->head + H_UUID, next, first_seq, cdp_now_us());
    if (pwrite(fd, hdr, sizeof hdr, 0) != (ssize_t)sizeof hdr || fdatasync(fd) < 0 ||
        renameat(w->segdir_fd, tmp, w->segdir_fd, name) < 0 || fsync(w->segdir_fd) < 0) {
        int e = errno;
        close(fd);
        unlinkat(w->segdir_fd, tmp, 0);
        errno = e ? e : EIO;
        return CDP_EIO;
    }
    close(w->seg_fd);
    w->seg_fd = fd;
    w->seg_no = next;
    return CDP_OK;
}

static int write_all(int fd, struct iovec *iov, int cnt, uint64_t off)
{
    while (cnt > 0) {
        ssize_t n = pwritev(fd, iov, cnt, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return CDP_EIO;
        }
        if (n == 0) {
            errno = EIO;
            return CDP_EIO;
        }
        off += (uint64_t)n;
        while (cnt > 0 && (size_t)n >= iov->iov_len) {
            n -= (ssize_t)iov->iov_len;
            iov++;
            cnt--;
        }
        if (cnt > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + n;
            iov->iov_len -= (size_t)n;
        }
    }
    return CDP_OK;
}

/* Undo a failed append (the head still describes the state before it),
 * release the lock and return status r with the failing call's errno. */
static int abandon_append(cdp_writer *w, int r)
{
    int e = errno;
    cut_pending(w);
    if (w->seg_no != hget(w, H_SEG_NO)) {
        close(w->seg_fd);
        w->seg_fd = -1;
    }
    cdp_writer_unlock(w);
    errno = e;
    return r;
}

/* Shared front half of both append paths: lock, check the namespace
 * generation, mark the append pending, and open the active segment. */
static int begin_append(cdp_writer *w, uint64_t expect_ns_gen)
{
    int r = cdp_writer_lock(w);
    if (r != CDP_OK)
        return r;
    if (!head_valid(w)) {
        cdp_writer_unlock(w);
        return CDP_ECORRUPT;
    }
    if (expect_ns_gen != UINT64_MAX && hget(w, H_NS_GEN) != expect_ns_gen) {
        cdp_writer_unlock(w);
        return CDP_ESTALE;
    }
    r = open_segment(w, hget(w, H_SEG_NO));
    if (r != CDP_OK) {
        int e = errno;
        cdp_writer_unlock(w);
        errno = e;
        return r;
    }
    hset(w, H_PENDING, 1);
    head_seal(w);
    return CDP_OK;
}

static void end_append(cdp_writer *w, uint64_t off, uint64_t next_seq, int64_t last_ts,
                       uint64_t ns_bumps, uint64_t base_bumps, struct cdp_append_result *res, uint64_t first_seq)
{
    hset(w, H_SEG_NO, w->seg_no);
    hset(w, H_SEG_OFF, off);
    hset(w, H_NEXT_SEQ, next_seq);
    if (last_ts > (int64_t)hget(w, H_LAST_TS))
        hset(w, H_LAST_TS, (uint64_t)last_ts);
    hset(w, H_NS_GEN, hget(w, H_NS_GEN) + ns_bumps);
    hset(w, H_BASE_GEN, hget(w, H_BASE_GEN) + base_bumps);
    hset(w, H_PENDING, 0);
    head_seal(w);
    if (res) {
        res->first_seq = first_seq;
        res->last_seq = next_seq - 1;
        res->ns_gen = hget(w, H_NS_GEN);
    }
    cdp_writer_unlock(w);
}

static inline uint64_t rec_total(uint32_t len)
{
    return ((uint64_t)CDP_REC_HDR_SIZE + len + 7) & ~(uint64_t)7;
}

int cdp_append(cdp_writer *w, const struct cdp_rec *recs, size_t n,
               uint64_t expect_ns_gen, struct cdp_append_result *res)
{
    uint8_t hdrs[GROUP][CDP_REC_HDR_SIZE];
    struct iovec iov[GROUP * 3];
    for (size_t i = 0; i < n; i++) {
        if (recs[i].len > CDP_MAX_PAYLOAD)
            return CDP_ETOOBIG;
        if (recs[i].kind == 0 || recs[i].kind > CDP_MAX_KIND || (recs[i].len && !recs[i].payload))
            return CDP_EINVAL;
    }
    int r = begin_append(w, expect_ns_gen);
    if (r != CDP_OK)
        return r;
    uint64_t seq = hget(w, H_NEXT_SEQ), first_seq = seq;
    uint64_t off = hget(w, H_SEG_OFF), seg_size = hget(w, H_SEG_SIZE), bumps = 0, base_bumps = 0;
    int64_t now = cdp_now_us(), last_ts = INT64_MIN;
    size_t i = 0;
    while (i < n) {
        int cnt = 0, g = 0;
        uint64_t run = 0;
        for (; i < n && g < GROUP; i++, g++) {
            const struct cdp_rec *rc = &recs[i];
            uint64_t total = rec_total(rc->len);
            if (off + run > CDP_SEG_HDR_SIZE && off + run + total > seg_size) {
                if (run)
                    break; /* write what we have, then rotate */
                if ((r = rotate(w, seq)) != CDP_OK)
                    goto fail;
                off = CDP_SEG_HDR_SIZE;
            }
            uint8_t *h = hdrs[g];
            int64_t ts = rc->ts == INT64_MIN ? now : rc->ts;
            wr32(h + 4, rc->len);
            wr64(h + 8, seq++);
            wr64(h + 16, (uint64_t)ts);
            wr64(h + 24, rc->file_id);
            wr64(h + 32, rc->offset);
            h[40] = rc->kind;
            h[41] = rc->flags;
            h[42] = CDP_REC_MARKER & 0xff;
            h[43] = CDP_REC_MARKER >> 8;
            wr32(h + 44, 0);
            uint32_t c = cdp_crc32c(0, h + 4, CDP_REC_HDR_SIZE - 4);
            wr32(h, cdp_crc32c(c, rc->payload, rc->len));
            iov[cnt].iov_base = h;
            iov[cnt++].iov_len = CDP_REC_HDR_SIZE;
            if (rc->len) {
                iov[cnt].iov_base = (void *)rc->payload;
                iov[cnt++].iov_len = rc->len;
            }
            if (total > CDP_REC_HDR_SIZE + (uint64_t)rc->len) {
                iov[cnt].iov_base = (void *)zeros;
                iov[cnt++].iov_len = total - CDP_REC_HDR_SIZE - rc->len;
            }
            run += total;
            if (ts > last_ts)
                last_ts = ts;
            bumps += is_ns_kind(rc->kind);
            base_bumps += rc->kind == CDP_BASE;
        }
        if (cnt && (r = write_all(w->seg_fd, iov, cnt, off)) != CDP_OK)
            goto fail;
        off += run;
    }
    end_append(w, off, seq, last_ts, bumps, base_bumps, res, first_seq);
    return CDP_OK;
fail:
    return abandon_append(w, r);
}

int cdp_append_encoded(cdp_writer *w, uint8_t *buf, size_t len,
                       uint64_t expect_ns_gen, struct cdp_append_result *res)
{
    /* Validate the layout before taking the lock: every record's bounds. */
    for (size_t p = 0; p < len;) {
        if (len - p < CDP_REC_HDR_SIZE)
            return CDP_EINVAL;
        uint32_t plen = rd32(buf + p + 4);
        if (plen > CDP_MAX_PAYLOAD)
            return CDP_ETOOBIG;
        if (rd16(buf + p + 42) != CDP_REC_MARKER || buf[p + 40] == 0 ||
            buf[p + 40] > CDP_MAX_KIND || rec_total(plen) > len - p)
            return CDP_EINVAL;
        p += rec_total(plen);
    }
    int r = begin_append(w, expect_ns_gen);
    if (r != CDP_OK)
        return r;
    uint64_t seq = hget(w, H_NEXT_SEQ), first_seq = seq;
    uint64_t off = hget(w, H_SEG_OFF), seg_size = hget(w, H_SEG_SIZE), bumps = 0, base_bumps = 0;
    int64_t now = cdp_now_us(), last_ts = INT64_MIN;
    size_t p = 0, run_start = 0;
    while (p < len) {
        uint8_t *h = buf + p;
        uint32_t plen = rd32(h + 4);
        uint64_t total = rec_total(plen);
        uint64_t run = p - run_start;
        if (off + run > CDP_SEG_HDR_SIZE && off + run + total > seg_size) {
            if (run) {
                struct iovec v = {buf + run_start, run};
                if ((r = write_all(w->seg_fd, &v, 1, off)) != CDP_OK)
                    goto fail;
            }
            if ((r = rotate(w, seq)) != CDP_OK)
                goto fail;
            off = CDP_SEG_HDR_SIZE;
            run_start = p;
        }
        int64_t ts;
        memcpy(&ts, h + 16, 8);
        if (ts == INT64_MIN) {
            ts = now;
            wr64(h + 16, (uint64_t)ts);
        }
        wr64(h + 8, seq++);
        wr32(h + 44, 0);
        memset(h + CDP_REC_HDR_SIZE + plen, 0, total - CDP_REC_HDR_SIZE - plen);
        wr32(h, cdp_crc32c(0, h + 4, CDP_REC_HDR_SIZE - 4 + plen));
        if (ts > last_ts)
            last_ts = ts;
        bumps += is_ns_kind(h[40]);
        base_bumps += h[40] == CDP_BASE;
        p += total;
    }
    if (p > run_start) {
        struct iovec v = {buf + run_start, p - run_start};
        if ((r = write_all(w->seg_fd, &v, 1, off)) != CDP_OK)
            goto fail;
        off += p - run_start;
    }
    end_append(w, off, seq, last_ts, bumps, base_bumps, res, first_seq);
    return CDP_OK;
fail:
    return abandon_append(w, r);
}

uint64_t cdp_writer_base_gen(cdp_writer *w)
{
    return hget(w, H_BASE_GEN);
}

int cdp_alloc_file_ids(cdp_writer *w, uint64_t n, uint64_t *first)
{
    int r = cdp_writer_lock(w);
    if (r != CDP_OK)
        return r;
    if (!head_valid(w)) {
        cdp_writer_unlock(w);
        return CDP_ECORRUPT;
    }
    *first = hget(w, H_NEXT_FILE_ID);
    hset(w, H_NEXT_FILE_ID, *first + n);
    head_seal(w);
    cdp_writer_unlock(w);
    return CDP_OK;
}

int cdp_sync(cdp_writer *w, uint64_t *synced)
{
    int r = cdp_writer_lock(w);
    if (r != CDP_OK)
        return r;
    if (!head_valid(w)) {
        cdp_writer_unlock(w);
        return CDP_ECORRUPT;
    }
    uint64_t target = hget(w, H_NEXT_SEQ) - 1;
    if (hget(w, H_SYNCED_SEQ) >= target) {
        *synced = hget(w, H_SYNCED_SEQ);
        cdp_writer_unlock(w);
        return CDP_OK;
    }
    /* Earlier segments were made durable when they were sealed; only the
     * active one can hold unsynced records. */
    r = open_segment(w, hget(w, H_SEG_NO));
    int fd = r == CDP_OK ? dup(w->seg_fd) : -1;
    int e = errno;
    cdp_writer_unlock(w);
    if (fd < 0) {
        errno = e;
        return CDP_EIO;
    }
    /* Threads queue here; whoever finds its target already covered by the
     * sync that ran while it waited returns without a system call. */
    pthread_mutex_lock(&w->sync_mu);
    if (*(volatile uint64_t *)(w->head + H_SYNCED_SEQ) < target) {
        if (fdatasync(fd) < 0) {
            e = errno;
            pthread_mutex_unlock(&w->sync_mu);
            close(fd);
            errno = e;
            return CDP_EIO;
        }
        if ((r = cdp_writer_lock(w)) == CDP_OK) {
            if (hget(w, H_SYNCED_SEQ) < target) {
                hset(w, H_SYNCED_SEQ, target);
                head_seal(w);
                /* The head must be on disk before anyone is told these
                 * records are: after a power cut the head on disk could
                 * otherwise be an older snapshot, perhaps marked pending,
                 * and recovery would cut synced records back to its
                 * committed end. Under the lock, so that a writer that sees
                 * synced_seq cover its target knows it is durable. */
                if (msync(w->head, CDP_HEAD_SIZE, MS_SYNC) < 0) {
                    e = errno;
                    r = CDP_EIO;
                }
            }
            cdp_writer_unlock(w);
            if (r == CDP_EIO)
                errno = e;
        }
    } else if ((r = cdp_writer_lock(w)) == CDP_OK) {
        /* covered by another writer's sync: wait until its head is on disk */
        cdp_writer_unlock(w);
    }
    pthread_mutex_unlock(&w->sync_mu);
    close(fd);
    *synced = hget(w, H_SYNCED_SEQ);
    return r;
}
