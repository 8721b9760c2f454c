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
 *
 * Staging (the capture library's fast path)
 * -----------------------------------------
 * A journal may have a stage: a shared file in /dev/shm (head field
 * `stage`, docs/journal-format.md) holding records laid out as on disk but
 * without their seq and CRC, behind a process-shared robust mutex. A
 * captured write copies its record into the stage under that mutex (no
 * system call); whoever takes the append lock next drains the stage into
 * the journal first, assigning seqs in staging order, and keeps the stage
 * mutex until it unlocks. So every record, staged or appended directly,
 * gets its seq in the order the appends happened, and the journal's rule
 * "each seq is the previous + 1" holds. tmpfs survives a SIGKILL of any
 * process (not a power cut): barriers drain and fdatasync before they
 * return. A record is published (`used` moves past it) only once complete,
 * so a process killed while staging leaves nothing half-written; a drainer
 * killed half way is resolved from the head (`drain_target`).
 */
#define _GNU_SOURCE
#include "cdp.h"
#include "le.h"
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
#include <sys/statfs.h>
#include <sys/uio.h>
#include <unistd.h>

/* head file layout (docs/journal-format.md, "Head file") */
enum {
    H_MAGIC = 0, H_VERSION = 8, H_CRC = 12, H_NEXT_SEQ = 16, H_SEG_NO = 24,
    H_SEG_OFF = 32, H_PENDING = 40, H_NEXT_FILE_ID = 48, H_NS_GEN = 56,
    H_SYNCED_SEQ = 64, H_LAST_TS = 72, H_SEG_SIZE = 80, H_UUID = 88, H_BASE_GEN = 104,
    H_STAGE = 112, H_BOOT = 120,
    H_CRC_START = 16, H_CRC_END = 128,
    /* the preallocated tail of the active segment, with its own CRC so that
     * heads written before these fields existed read as "none" */
    H_PRE_END = 128, H_PRE_PENDING = 136, H_PRE_CRC = 144
};
#define EXT4_SUPER_MAGIC_ 0xEF53 /* linux/magic.h */
#define PRE_STEP (1 << 20) /* zeros written per lock hold (cdp_prealloc) */
#define PRE_MAX_STEPS 8    /* steps per cdp_prealloc call (one fdatasync) */
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
    uint64_t boot;             /* cdp_boot_id() at open; 0: unknown */
    struct stage *stage;       /* mapped stage, or NULL */
    uint64_t stage_len;        /* bytes mapped */
    uint64_t stage_gen;        /* head `stage` value it belongs to */
    int stage_held;            /* this lock holder holds the stage mutex */
    uint64_t fs_seg;           /* segment whose file system fs_dev/fs_ext4 describe */
    uint64_t fs_dev;
    int fs_ext4;
    uint64_t writeback;        /* cdp_writer_set_writeback: 0, off */
};

/* The stage file: this header, then `cap` bytes of records from STAGE_DATA. */
struct stage {
    char magic[8];             /* "CDPSTAGE" */
    uint64_t gen;              /* equals the head's `stage` while in use */
    uint64_t cap;
    /* a ring: records in [tail, head), wrapping at wrap_at (bytes past it
     * to the end are unused); staged/drained count records ever */
    uint64_t head, tail, fill, wrap_at, staged, drained;
    uint64_t slot;             /* offset reserved by cdp_stage_begin */
    uint64_t closed;           /* removed: stage writers go direct */
    /* the drain in progress (flock holder only): published once the head's
     * next_seq reaches drain_target, then tail = drain_end */
    uint64_t draining, drain_end, drain_count, drain_target, drain_bytes;
    pthread_mutex_t mu;        /* process-shared, robust */
};
#define STAGE_DATA 4096

static volatile unsigned fork_generation;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static void on_fork_child(void) { fork_generation++; }
static void install_atfork(void) { pthread_atfork(NULL, NULL, on_fork_child); }

static const uint8_t zeros[8];

static inline uint64_t rec_total(uint32_t len)
{
    return ((uint64_t)CDP_REC_HDR_SIZE + len + 7) & ~(uint64_t)7;
}

static inline uint64_t hget(const cdp_writer *w, int off) { uint64_t v; memcpy(&v, w->head + off, 8); return v; }
static inline void hset(cdp_writer *w, int off, uint64_t v) { memcpy(w->head + off, &v, 8); }

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

/* The preallocated tail (docs/journal-format.md, "Preallocation"): `end`:
 * the active segment holds zeros from its last record up to end, and their
 * blocks and the file size are durable (an fdatasync ran after they were
 * written); `pending`: the end of zeros written whose fdatasync is under
 * way. A CRC that does not match reads as no tail. */
static void pre_get(const cdp_writer *w, uint64_t *end, uint64_t *pending)
{
    if (rd32(w->head + H_PRE_CRC) != cdp_crc32c(0, w->head + H_PRE_END, 16)) {
        *end = *pending = 0;
        return;
    }
    *end = hget(w, H_PRE_END);
    *pending = hget(w, H_PRE_PENDING);
}

static void pre_set(cdp_writer *w, uint64_t end, uint64_t pending)
{
    hset(w, H_PRE_END, end);
    hset(w, H_PRE_PENDING, pending);
    /* no tail is all zeros, as in a head that predates the fields */
    wr32(w->head + H_PRE_CRC, end || pending ? cdp_crc32c(0, w->head + H_PRE_END, 16) : 0);
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

uint64_t cdp_boot_id(void)
{
    char buf[64];
    int fd = open("/proc/sys/kernel/random/boot_id", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, sizeof buf);
    close(fd);
    if (n < 32)
        return 0;
    uint64_t id = ((uint64_t)cdp_crc32c(0x9E3779B9u, buf, (size_t)n) << 32) | cdp_crc32c(0, buf, (size_t)n);
    return id ? id : 1;
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
    w->boot = cdp_boot_id();
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
    if (w->stage)
        munmap(w->stage, w->stage_len);
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
    /* the cut took the preallocated tail with it: regrown by appends, its
     * blocks would no longer be known durable */
    pre_set(w, 0, 0);
    return CDP_OK;
}

static void stage_path(cdp_writer *w, char *buf, size_t n, const char *suffix)
{
    const char *dir = getenv("CDPCORE_STAGE_DIR");
    char hex[33];
    for (int i = 0; i < 16; i++)
        snprintf(hex + 2 * i, 3, "%02x", w->head[H_UUID + i]);
    snprintf(buf, n, "%s/cdpcore-%s.stage%s", dir && *dir ? dir : "/dev/shm", hex, suffix);
}

static void stage_detach(cdp_writer *w)
{
    if (w->stage)
        munmap(w->stage, w->stage_len);
    w->stage = NULL;
    w->stage_gen = 0;
}

/* Map the stage the head names (lock held). */
static int stage_attach(cdp_writer *w, uint64_t gen)
{
    char path[4200];
    stage_path(w, path, sizeof path, "");
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return CDP_EIO;
    struct stat st;
    void *p = MAP_FAILED;
    if (fstat(fd, &st) == 0 && (uint64_t)st.st_size > STAGE_DATA)
        p = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED)
        return CDP_EIO;
    struct stage *sg = p;
    if (memcmp(sg->magic, "CDPSTAGE", 8) != 0 || sg->gen != gen ||
        sg->cap + STAGE_DATA > (uint64_t)st.st_size) {
        munmap(p, (size_t)st.st_size);
        errno = EINVAL;
        return CDP_ECORRUPT;
    }
    w->stage = sg;
    w->stage_len = (uint64_t)st.st_size;
    w->stage_gen = gen;
    return CDP_OK;
}

static void stage_mutex_lock(struct stage *sg)
{
    int r = pthread_mutex_lock(&sg->mu);
    if (r == EOWNERDEAD) /* `used` only ever covers complete records */
        pthread_mutex_consistent(&sg->mu);
}

int cdp_append_encoded(cdp_writer *w, uint8_t *buf, size_t len,
                       uint64_t expect_ns_gen, struct cdp_append_result *res);

/* Move the tail past a published drain (stage mutex held). */
static void stage_advance(struct stage *sg)
{
    sg->tail = sg->drain_end;
    sg->fill -= sg->drain_bytes;
    sg->drained += sg->drain_count;
    if (sg->tail == sg->wrap_at && sg->tail != sg->head) {
        sg->fill -= sg->cap - sg->wrap_at;
        sg->tail = 0;
        sg->wrap_at = sg->cap;
    }
    if (sg->fill == 0)
        sg->head = sg->tail = 0, sg->wrap_at = sg->cap;
    sg->draining = 0;
}

/* With the flock held: move staged records into the journal, one
 * contiguous piece per append. With held_mu the caller holds the stage
 * mutex throughout (nothing is staged meanwhile: the stage ends empty);
 * without, the mutex is taken only to look and to advance, so programs keep
 * staging while the bytes go to the journal. */
static int stage_drain(cdp_writer *w, int held_mu)
{
    struct stage *sg = w->stage;
    for (;;) {
        if (!held_mu)
            stage_mutex_lock(sg);
        if (sg->draining) {
            /* a drainer died: its append is either published or was cut */
            if (hget(w, H_NEXT_SEQ) >= sg->drain_target)
                stage_advance(sg);
            sg->draining = 0;
        }
        if (sg->tail == sg->wrap_at && sg->fill) {
            sg->fill -= sg->cap - sg->wrap_at;
            sg->tail = 0;
            sg->wrap_at = sg->cap;
        }
        uint64_t start = sg->tail, end = sg->tail < sg->head ? sg->head : sg->wrap_at;
        if (sg->fill == 0 || end <= start) {
            if (!held_mu)
                pthread_mutex_unlock(&sg->mu);
            return CDP_OK;
        }
        if (!held_mu)
            pthread_mutex_unlock(&sg->mu);
        uint8_t *data = (uint8_t *)sg + STAGE_DATA;
        uint64_t n = 0;
        for (uint64_t p = start; p < end; p += rec_total(rd32(data + p + 4)))
            n++;
        sg->drain_end = end;
        sg->drain_bytes = end - start;
        sg->drain_count = n;
        sg->drain_target = hget(w, H_NEXT_SEQ) + n;
        sg->draining = 1;
        int r = cdp_append_encoded(w, data + start, end - start, UINT64_MAX, NULL);
        if (!held_mu)
            stage_mutex_lock(sg);
        if (r == CDP_OK)
            stage_advance(sg);
        sg->draining = 0;
        if (!held_mu)
            pthread_mutex_unlock(&sg->mu);
        if (r != CDP_OK)
            return r;
    }
}

/* The append lock proper: the process mutex, then the flock on the head
 * (other processes); the calling thread becomes its owner, depth 1. */
static int take_append_lock(cdp_writer *w)
{
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
    if (take_append_lock(w) != CDP_OK)
        return CDP_EIO;
    if (w->boot && head_valid(w) && hget(w, H_BOOT) != w->boot) {
        /* Written before this boot: since cdp_sync does not msync the head,
         * its committed end may be older than records made durable after
         * it, so it must not be used to cut anything. Invalidate it; a
         * writable Journal.open rebuilds it from the segments (and C
         * appenders get CDP_ECORRUPT until then). */
        w->head[H_CRC] ^= 0xff;
    }
    if (head_valid(w) && hget(w, H_PENDING)) {
        int r = cut_pending(w);
        if (r != CDP_OK) {
            int e = errno;
            cdp_writer_unlock(w);
            errno = e;
            return r;
        }
    }
    uint64_t gen = head_valid(w) ? hget(w, H_STAGE) : 0;
    if (w->stage && w->stage_gen != gen)
        stage_detach(w);
    if (!w->stage && gen) {
        int r = stage_attach(w, gen);
        if (r != CDP_OK) {
            /* appending past records we cannot drain would break the order */
            int e = errno;
            cdp_writer_unlock(w);
            errno = e;
            return r;
        }
    }
    if (w->stage) {
        stage_mutex_lock(w->stage);
        w->stage_held = 1;
        int r = stage_drain(w, 1);
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
    if (w->stage_held) {
        w->stage_held = 0;
        pthread_mutex_unlock(&w->stage->mu);
    }
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
    /* a rebuilt head keeps the live stage (its records are not drained yet)
     * and the base generation (writers compare it) */
    uint64_t stage = head_valid(w) ? hget(w, H_STAGE) : w->stage_gen;
    uint64_t base_gen = head_valid(w) ? hget(w, H_BASE_GEN) : 0;
    memset(w->head, 0, CDP_HEAD_SIZE);
    hset(w, H_STAGE, stage);
    hset(w, H_BASE_GEN, base_gen);
    hset(w, H_BOOT, w->boot);
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
    pre_set(w, 0, 0); /* a rebuilt head knows of no durable tail */
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
static int rotate(cdp_writer *w, uint64_t first_seq, uint64_t end)
{
    char tmp[64], name[64];
    uint8_t hdr[CDP_SEG_HDR_SIZE];
    uint64_t next = w->seg_no + 1;
    /* A sealed segment ends at its last record: cut its preallocated tail
     * (the fdatasync below makes the new size durable). */
    struct stat sst;
    if (fstat(w->seg_fd, &sst) < 0 || ((uint64_t)sst.st_size > end && ftruncate(w->seg_fd, (off_t)end) < 0))
        return CDP_EIO;
    if (fdatasync(w->seg_fd) < 0)
        return CDP_EIO;
    seg_name(tmp, sizeof tmp, next, ".tmp");
    seg_name(name, sizeof name, next, "");
    int fd = openat(w->segdir_fd, tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return CDP_EIO;
    /* Segments belong to whoever owns the head: a root supervisor draining
     * the stage of a program that runs as another user (PostgreSQL) must
     * not leave it a segment it cannot write. */
    struct stat hs;
    if (geteuid() == 0 && fstat(w->head_fd, &hs) == 0 && hs.st_uid != 0)
        (void)!fchown(fd, hs.st_uid, hs.st_gid);
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

/* The writer's lock with the head checked: taking it drains the stage (a
 * sync's target then covers those records too); a damaged head fails with
 * the lock released. */
static int lock_checked(cdp_writer *w)
{
    int r = cdp_writer_lock(w);
    if (r != CDP_OK)
        return r;
    if (!head_valid(w)) {
        cdp_writer_unlock(w);
        return CDP_ECORRUPT;
    }
    return CDP_OK;
}

/* Shared front half of both append paths: lock, check the namespace
 * generation, mark the append pending, and open the active segment. */
static int begin_append(cdp_writer *w, uint64_t expect_ns_gen)
{
    int r = lock_checked(w);
    if (r != CDP_OK)
        return r;
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
    if (hget(w, H_SEG_NO) != w->seg_no)
        pre_set(w, 0, 0); /* rotated: the new segment has no tail yet */
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


void cdp_recs_bind(struct cdp_rec *recs, uint64_t n, uint64_t file_id, int64_t ts)
{
    for (uint64_t i = 0; i < n; i++) {
        recs[i].file_id = file_id;
        recs[i].ts = ts;
    }
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
    uint64_t kick_lo = off;  /* written since the last writeback kick, from here */
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
                if ((r = rotate(w, seq, off)) != CDP_OK)
                    goto fail;
                off = kick_lo = CDP_SEG_HDR_SIZE;  /* (sealing synced the old one) */
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
        if (w->writeback && off - kick_lo >= w->writeback) {
            /* advice only: the caller's sync is what makes it durable */
            sync_file_range(w->seg_fd, (off_t)kick_lo, (off_t)(off - kick_lo), SYNC_FILE_RANGE_WRITE);
            kick_lo = off;
        }
    }
    end_append(w, off, seq, last_ts, bumps, base_bumps, res, first_seq);
    return CDP_OK;
fail:
    return abandon_append(w, r);
}

void cdp_writer_set_writeback(cdp_writer *w, uint64_t bytes)
{
    w->writeback = bytes;
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
            if ((r = rotate(w, seq, off + run)) != CDP_OK)
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
    int r = lock_checked(w);
    if (r != CDP_OK)
        return r;
    *first = hget(w, H_NEXT_FILE_ID);
    hset(w, H_NEXT_FILE_ID, *first + n);
    head_seal(w);
    cdp_writer_unlock(w);
    return CDP_OK;
}

int cdp_sync(cdp_writer *w, uint64_t *synced)
{
    int r = lock_checked(w);
    if (r != CDP_OK)
        return r;
    uint64_t target = hget(w, H_NEXT_SEQ) - 1;
    if (hget(w, H_SYNCED_SEQ) >= target) {
        *synced = hget(w, H_SYNCED_SEQ);
        cdp_writer_unlock(w);
        return CDP_OK;
    }
    cdp_writer_unlock(w);
    /* Group commit. Threads queue on sync_mu, processes on an OFD lock on
     * the head's last byte (independent of the flock that appends take);
     * whoever finds its target covered by the sync that ran while it
     * waited returns without a system call. The one that syncs covers
     * everything appended up to the moment it starts. */
    pthread_mutex_lock(&w->sync_mu);
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = CDP_HEAD_SIZE - 1, .l_len = 1};
    int ofd = 0;
    while ((ofd = fcntl(w->head_fd, F_OFD_SETLKW, &fl)) < 0 && errno == EINTR)
        ;
    int e = 0;
    if (*(volatile uint64_t *)(w->head + H_SYNCED_SEQ) < target) {
        uint64_t cover = 0;
        int fd = -1;
        if ((r = cdp_writer_lock(w)) == CDP_OK) {
            cover = hget(w, H_NEXT_SEQ) - 1;
            /* Earlier segments were made durable when they were sealed;
             * only the active one can hold unsynced records. */
            r = open_segment(w, hget(w, H_SEG_NO));
            fd = r == CDP_OK ? dup(w->seg_fd) : -1;
            e = errno;
            cdp_writer_unlock(w);
        }
        if (r == CDP_OK && fd < 0)
            r = CDP_EIO;
        /* After a power cut the head on disk may be an older snapshot,
         * perhaps marked pending, whose committed end lies before records
         * synced here. The head records the boot it was written in, and a
         * head from an earlier boot is never trusted (cdp_writer_lock):
         * recovery then scans the segments. So only the segment is flushed
         * (one device flush per sync, not two). Without a boot id the head
         * is msync'd as well, after the data: whatever state it is caught
         * in, its committed end is at or past the covered records. */
        if (r == CDP_OK && (fdatasync(fd) < 0 || (!w->boot && msync(w->head, CDP_HEAD_SIZE, MS_SYNC) < 0))) {
            e = errno;
            r = CDP_EIO;
        }
        if (fd >= 0)
            close(fd);
        if (r == CDP_OK && (r = cdp_writer_lock(w)) == CDP_OK) {
            if (hget(w, H_SYNCED_SEQ) < cover) {
                hset(w, H_SYNCED_SEQ, cover);
                head_seal(w);
            }
            cdp_writer_unlock(w);
        }
    }
    if (ofd == 0) {
        fl.l_type = F_UNLCK;
        fcntl(w->head_fd, F_OFD_SETLK, &fl);
    }
    pthread_mutex_unlock(&w->sync_mu);
    *synced = hget(w, H_SYNCED_SEQ);
    if (r == CDP_EIO)
        errno = e;
    return r;
}

/* ---- riding on the program's flush ------------------------------------------ */

/* Whether the active segment (w->seg_fd) lives on ext4, the file system
 * whose fsync is known to flush the device after the writes that completed
 * before it (ext4_sync_file: a journal commit or an explicit flush, issued
 * after the call began); *dev: its device. Cached per segment. */
static int seg_on_ext4(cdp_writer *w, uint64_t *dev)
{
    if (w->fs_seg != w->seg_no) {
        struct stat st;
        struct statfs sf;
        if (fstat(w->seg_fd, &st) < 0 || fstatfs(w->seg_fd, &sf) < 0)
            return 0;
        w->fs_seg = w->seg_no;
        w->fs_dev = (uint64_t)st.st_dev;
        w->fs_ext4 = sf.f_type == EXT4_SUPER_MAGIC_;
    }
    *dev = w->fs_dev;
    return w->fs_ext4;
}

static int seg_rides_on(cdp_writer *w, uint64_t dev)
{
    uint64_t d;
    return seg_on_ext4(w, &d) && d == dev;
}

int cdp_sync_ride(cdp_writer *w, uint64_t dev, uint64_t *cover)
{
    *cover = 0;
    int r = lock_checked(w);
    if (r != CDP_OK)
        return r;
    uint64_t target = hget(w, H_NEXT_SEQ) - 1, end, pending;
    if (hget(w, H_SYNCED_SEQ) >= target) {
        cdp_writer_unlock(w);
        return CDP_OK; /* nothing to make durable: *cover = 0 */
    }
    /* Every record after the synced seq lies in the active segment (a
     * segment is fdatasync'd when sealed), before the committed end. They
     * may ride only if that whole range lies in the durable tail: writing
     * them then changes no metadata (no block allocation, no size), so the
     * data reaching the device plus one device flush makes them durable. */
    pre_get(w, &end, &pending);
    uint64_t off = hget(w, H_SEG_OFF);
    r = open_segment(w, hget(w, H_SEG_NO));
    if (r != CDP_OK || end < off || !seg_rides_on(w, dev)) {
        cdp_writer_unlock(w);
        return CDP_ESTALE;
    }
    int fd = dup(w->seg_fd);
    cdp_writer_unlock(w);
    if (fd < 0)
        return CDP_ESTALE;
    /* Write the dirty pages up to the committed end and wait until the
     * device has them (WAIT_BEFORE: pages another writeback has in flight). */
    int ok;
    do
        ok = sync_file_range(fd, 0, (off_t)off, SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE |
                                                    SYNC_FILE_RANGE_WAIT_AFTER);
    while (ok < 0 && errno == EINTR);
    int e = errno;
    close(fd);
    if (ok < 0) {
        /* A writeback error is reported once per open file: this call took
         * it, so a fdatasync now would say 0. It is the caller's failure. */
        errno = e;
        return CDP_EIO;
    }
    *cover = target;
    return CDP_OK;
}

int cdp_sync_rode(cdp_writer *w, uint64_t cover)
{
    if (!cover)
        return CDP_OK;
    int r = lock_checked(w);
    if (r != CDP_OK)
        return r;
    if (hget(w, H_SYNCED_SEQ) < cover) {
        hset(w, H_SYNCED_SEQ, cover);
        head_seal(w);
    }
    cdp_writer_unlock(w);
    return CDP_OK;
}

int cdp_prealloc(cdp_writer *w, uint64_t low, uint64_t ahead)
{
    static const uint8_t zero_block[64 << 10];
    if (w->fork_gen != fork_generation && after_fork(w) != CDP_OK)
        return CDP_EIO;
    /* The flock without the stage mutex, like the background drain:
     * programs keep staging while the zeros are written. */
    if (take_append_lock(w) != CDP_OK)
        return CDP_EIO;
    int r = CDP_OK;
    if (!head_valid(w)) {
        cdp_writer_unlock(w);
        return CDP_ECORRUPT;
    }
    if (hget(w, H_PENDING) && (r = cut_pending(w)) != CDP_OK) {
        int e = errno;
        cdp_writer_unlock(w);
        errno = e;
        return r;
    }
    uint64_t seg_no = hget(w, H_SEG_NO), off = hget(w, H_SEG_OFF), seg_size = hget(w, H_SEG_SIZE);
    uint64_t end, pending, size;
    pre_get(w, &end, &pending);
    uint64_t want = off + ahead < seg_size ? off + ahead : seg_size;
    struct stat st;
    if (end >= off + low || end >= want || (r = open_segment(w, seg_no)) != CDP_OK ||
        fstat(w->seg_fd, &st) < 0) {
        int e = errno;
        cdp_writer_unlock(w);
        errno = e;
        return r;
    }
    size = (uint64_t)st.st_size;
    uint64_t dev;
    if (size < off || !seg_on_ext4(w, &dev)) {
        /* the head is ahead of the file (not ours to fix here), or no ride
         * could use the tail: writing it would be a waste */
        cdp_writer_unlock(w);
        return CDP_OK;
    }
    /* Steps up to the next PRE_STEP boundary (or the segment size: readers
     * take a zero tail that ends there for this tail, any other for a torn
     * one), releasing the lock between steps: appenders wait only for one
     * step's zeros (the first touch of fresh page-cache pages, which the
     * appenders writing those pages would otherwise pay). */
    uint64_t to = size;
    struct iovec iov[PRE_STEP / sizeof zero_block];
    for (int step = 0;; step++) {
        uint64_t next = (size / PRE_STEP + 1) * PRE_STEP;
        if (next > seg_size)
            next = seg_size > size ? seg_size : size;
        int n = 0;
        for (uint64_t p = size; p < next; p += sizeof zero_block) {
            iov[n].iov_base = (void *)zero_block;
            iov[n++].iov_len = next - p < sizeof zero_block ? next - p : sizeof zero_block;
        }
        if (n && (r = write_all(w->seg_fd, iov, n, size)) != CDP_OK) {
            int e = errno;
            if (ftruncate(w->seg_fd, (off_t)size) < 0) { /* leave no partial zeros past the records */ }
            cdp_writer_unlock(w);
            errno = e;
            return r;
        }
        to = next > size ? next : size;
        pre_set(w, end, to);
        if (to >= want || step + 1 >= PRE_MAX_STEPS || !n)
            break;
        cdp_writer_unlock(w);
        if ((r = take_append_lock(w)) != CDP_OK)
            return r;
        pre_get(w, &end, &pending);
        /* a rotation, a cut or another preallocator came in between */
        if (!head_valid(w) || hget(w, H_PENDING) || hget(w, H_SEG_NO) != seg_no || pending != to ||
            fstat(w->seg_fd, &st) < 0 || (uint64_t)st.st_size != to) {
            cdp_writer_unlock(w);
            return CDP_OK;
        }
        size = to;
    }
    uint64_t cover = hget(w, H_NEXT_SEQ) - 1;
    int fd = dup(w->seg_fd);
    int e = errno;
    cdp_writer_unlock(w);
    if (fd < 0) {
        errno = e;
        return CDP_EIO;
    }
    /* Make the zeros' blocks and the size durable, out of the lock (this
     * also covers every record appended before it: a sync like cdp_sync's). */
    int ok = fdatasync(fd);
    e = errno;
    close(fd);
    if (ok < 0) {
        errno = e;
        return CDP_EIO;
    }
    if ((r = take_append_lock(w)) != CDP_OK)
        return r;
    if (head_valid(w)) {
        pre_get(w, &end, &pending);
        /* unless a rotation or a cut replaced the tail meanwhile */
        if (hget(w, H_SEG_NO) == seg_no && pending == to && !hget(w, H_PENDING)) {
            pre_set(w, to > end ? to : end, 0);
            if (hget(w, H_SYNCED_SEQ) < cover)
                hset(w, H_SYNCED_SEQ, cover);
            head_seal(w);
        }
    }
    cdp_writer_unlock(w);
    return CDP_OK;
}

/* ---- staging ---------------------------------------------------------------- */

int cdp_stage_create(cdp_writer *w, uint64_t cap)
{
    char path[4200], tmp[4300];
    int r = cdp_writer_lock(w);
    if (r != CDP_OK)
        return r;
    if (w->stage) {
        cdp_writer_unlock(w);
        return CDP_OK;
    }
    cap = (cap + 4095) & ~(uint64_t)4095;
    stage_path(w, path, sizeof path, "");
    snprintf(tmp, sizeof tmp, "%s.%d", path, (int)getpid());
    int fd = open(tmp, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    void *p = MAP_FAILED;
    struct stat hs;
    if (fd >= 0 && fstat(w->head_fd, &hs) == 0) {
        /* the stage is written by whoever may write the journal */
        if (fchown(fd, hs.st_uid, hs.st_gid) < 0 && geteuid() == 0)
            goto fail;
        fchmod(fd, hs.st_mode & 0666);
        if (ftruncate(fd, (off_t)(STAGE_DATA + cap)) == 0)
            p = mmap(NULL, STAGE_DATA + cap, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    }
    if (p == MAP_FAILED)
        goto fail;
    /* touch every page now: the first touch of fresh memory is the slow
     * part, and the stage is recycled, never grown */
    memset((uint8_t *)p + STAGE_DATA, 0, cap);
    struct stage *sg = p;
    memcpy(sg->magic, "CDPSTAGE", 8);
    sg->gen = (uint64_t)cdp_now_us();
    sg->cap = cap;
    sg->wrap_at = cap;
    pthread_mutexattr_t a;
    pthread_mutexattr_init(&a);
    pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
    pthread_mutex_init(&sg->mu, &a);
    pthread_mutexattr_destroy(&a);
    if (rename(tmp, path) < 0)
        goto fail;
    close(fd);
    uint64_t gen = sg->gen;
    munmap(p, STAGE_DATA + cap);
    hset(w, H_STAGE, gen);
    head_seal(w);
    r = stage_attach(w, gen);
    if (r == CDP_OK) {
        stage_mutex_lock(w->stage);
        w->stage_held = 1;
    }
    cdp_writer_unlock(w);
    return r;
fail:;
    int e = errno;
    if (p != MAP_FAILED)
        munmap(p, STAGE_DATA + cap);
    if (fd >= 0) {
        close(fd);
        unlink(tmp);
    }
    cdp_writer_unlock(w);
    errno = e;
    return CDP_EIO;
}

int cdp_stage_remove(cdp_writer *w)
{
    int r = cdp_writer_lock(w); /* drains */
    if (r != CDP_OK)
        return r;
    if (w->stage) {
        char path[4200];
        w->stage->closed = 1;
        hset(w, H_STAGE, 0);
        head_seal(w);
        stage_path(w, path, sizeof path, "");
        unlink(path);
    }
    cdp_writer_unlock(w);
    stage_detach(w);
    return CDP_OK;
}

int cdp_stage_begin(cdp_writer *w, uint32_t maxlen, uint8_t **payload)
{
    if (w->fork_gen != fork_generation) {
        /* a forked child: re-arm the writer (its lock is the parent's) */
        int r = cdp_writer_lock(w);
        if (r != CDP_OK)
            return r;
        cdp_writer_unlock(w);
    }
    struct stage *sg = w->stage;
    if (!sg || w->stage_gen != hget(w, H_STAGE))
        return CDP_ESTALE;
    uint64_t need = ((uint64_t)CDP_REC_HDR_SIZE + maxlen + 7) & ~(uint64_t)7;
    if (need > sg->cap / 4)
        return CDP_ETOOBIG;
    if (__atomic_load_n(&w->depth, __ATOMIC_ACQUIRE) > 0 && pthread_equal(w->owner, pthread_self()))
        return CDP_EINVAL;
    for (int tries = 0; tries < 4; tries++) {
        stage_mutex_lock(sg);
        if (sg->closed) {
            pthread_mutex_unlock(&sg->mu);
            return CDP_ESTALE;
        }
        if (sg->fill == 0 && !sg->draining)
            sg->head = sg->tail = 0, sg->wrap_at = sg->cap;
        uint64_t slot = UINT64_MAX;
        if (sg->wrap_at == sg->cap) { /* records in [tail, head) */
            if (sg->head + need <= sg->cap)
                slot = sg->head;
            else if (need <= sg->tail) {
                /* wrap: the bytes from head to the end stay unused (head
                 * moves to 0 now, so a writer killed before its commit
                 * leaves the ring consistent) */
                sg->wrap_at = sg->head;
                sg->fill += sg->cap - sg->head;
                sg->head = 0;
                slot = 0;
            }
        } else if (sg->head + need <= sg->tail) { /* wrapped: free in [head, tail) */
            slot = sg->head;
        }
        if (slot != UINT64_MAX) {
            sg->slot = slot;
            *payload = (uint8_t *)sg + STAGE_DATA + slot + CDP_REC_HDR_SIZE;
            return CDP_OK; /* stage mutex held until commit or abort */
        }
        pthread_mutex_unlock(&sg->mu);
        int r = cdp_writer_lock(w); /* drains (and settles a dead drainer) */
        if (r != CDP_OK)
            return r;
        cdp_writer_unlock(w);
        if (w->stage != sg)
            return CDP_ESTALE;
    }
    return CDP_ENOMEM;
}

void cdp_stage_commit(cdp_writer *w, uint8_t kind, uint64_t file_id, uint64_t offset, uint32_t len)
{
    struct stage *sg = w->stage;
    uint8_t *h = (uint8_t *)sg + STAGE_DATA + sg->slot;
    uint64_t total = rec_total(len);
    wr32(h + 4, len);
    wr64(h + 8, 0);
    wr64(h + 16, (uint64_t)cdp_now_us());
    wr64(h + 24, file_id);
    wr64(h + 32, offset);
    h[40] = kind;
    h[41] = 0;
    h[42] = CDP_REC_MARKER & 0xff;
    h[43] = CDP_REC_MARKER >> 8;
    wr32(h + 44, 0);
    sg->staged++;
    sg->head = sg->slot + total;
    sg->fill += total;
    pthread_mutex_unlock(&sg->mu);
}

void cdp_stage_abort(cdp_writer *w)
{
    pthread_mutex_unlock(&w->stage->mu);
}

int cdp_stage_drain(cdp_writer *w)
{
    if (w->fork_gen != fork_generation && after_fork(w) != CDP_OK)
        return CDP_EIO;
    /* the flock without the stage mutex: programs keep staging meanwhile */
    if (take_append_lock(w) != CDP_OK)
        return CDP_EIO;
    int r = CDP_OK;
    if (head_valid(w) && hget(w, H_PENDING))
        r = cut_pending(w);
    uint64_t gen = head_valid(w) ? hget(w, H_STAGE) : 0;
    if (r == CDP_OK && w->stage && w->stage_gen != gen)
        stage_detach(w);
    if (r == CDP_OK && !w->stage && gen)
        r = stage_attach(w, gen);
    if (r == CDP_OK && w->stage)
        r = stage_drain(w, 0);
    int e = errno;
    cdp_writer_unlock(w);
    errno = e;
    return r;
}
