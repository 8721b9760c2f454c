/* libcdpcapture.so: preloaded (LD_PRELOAD) into an unmodified program by
 * `cdpctl protect`, it journals every change the program makes under the
 * protected root. docs/capture.md is the user's account; this is how.
 *
 * Theory of operation
 * -------------------
 * Each wrapper below resolves the real libc function with dlsym(RTLD_NEXT)
 * and, when the call can change a protected file, takes the journal's append
 * lock (cdp_writer_lock: a process mutex plus flock on JOURNAL/head, shared by
 * every captured thread and process), makes the real call, appends the
 * records that describe what it did, and releases the lock. Holding the lock
 * across the system call is what makes sequence order the kernel's order:
 * two processes writing the same page concurrently are journaled in the order
 * their writes hit the file, and a write that returned before another started
 * always has the smaller seq (the order contract, docs/architecture.md).
 *
 * Descriptors are tracked in a table indexed by fd: UNKNOWN (never seen, or
 * reused: classified lazily on its first write with fstat + F_GETFL +
 * readlink of /proc/self/fd/N, which also covers descriptors inherited
 * across exec), IGNORE, or TRACK (a regular file under the root open for
 * writing). A tracked fd is bound to a journal file id lazily, by a FILEMAP
 * naming its current path, on its first write after open or after a BASE
 * record (which unbinds every id: cdp_writer_base_gen tells).
 *
 * The program's own result never changes: the real call's return value and
 * errno are what the wrapper returns. When an append fails (ENOSPC, EIO) the
 * file ids that lost a change are remembered and a DIRTY record for each is
 * appended before the next record that does get in; one warning goes to
 * stderr. What cannot be seen (writable MAP_SHARED mappings, io_uring, raw
 * syscall() writes) is marked DIRTY with a warning; `cdpctl resync` repairs.
 *
 * stdio: glibc's fwrite/fprintf reach the kernel through internal calls that
 * no preload can interpose. A FILE opened for writing under the root (fopen,
 * fdopen, or stdout/stderr redirected to a protected file) is registered;
 * on fflush, fclose and at exit the file's whole content is journaled
 * (TRUNCATE to its size + WRITEs), which is right whatever the buffer did.
 *
 * Recursion: the writer's own system calls come back through these
 * wrappers; a thread-local flag sends them straight to libc.
 */
#define _GNU_SOURCE
#include "../cdp.h"
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/falloc.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))
#define MAX_FDS (1 << 20)
#define CHUNK (1 << 20)         /* bytes per WRITE record when we read content back */
#define WHOLE_LIMIT (64 << 20)  /* stdio files larger than this are marked dirty instead */
#define MAX_LOST 256
#define STAGE_MAX (256 << 10)   /* larger writes take the direct path */

enum { FD_UNKNOWN = 0, FD_IGNORE = 1, FD_TRACK = 2 };

struct fdent {
    uint64_t fid;      /* 0: not bound yet */
    uint64_t gen;      /* base generation the binding belongs to */
    uint8_t state;
    uint8_t append;    /* O_APPEND */
    uint8_t sync;      /* O_SYNC / O_DSYNC */
};

static cdp_writer *W;
static int active;
static char root[PATH_MAX];
static size_t rootlen;
static struct fdent *fds;
static __thread int in_cap __attribute__((tls_model("initial-exec")));
static pthread_mutex_t stdio_mu = PTHREAD_MUTEX_INITIALIZER;
static FILE *stdio_files[256];
static int warned_fail, warned_mmap, warned_uring, warned_raw;
/* file ids whose change could not be journaled; DIRTY goes in first thing */
static uint64_t lost[MAX_LOST];
static int n_lost, lost_overflow;
static char *chunk_buf;
/* the capture's variables as the program started with them (exec puts them back) */
static char saved_env[3][PATH_MAX + 64];
/* per-thread copy of the data being written, recycled (TBUF_MAX at most) */
#define TBUF_MAX (1 << 20)
static __thread uint8_t *tbuf __attribute__((tls_model("initial-exec")));
static __thread size_t tbuf_cap __attribute__((tls_model("initial-exec")));

/* ---- real functions ------------------------------------------------------ */

#define REAL(name) static __typeof__(name) *real_##name
#define R(name)                                                                    \
    ({                                                                             \
        if (!real_##name)                                                          \
            real_##name = (__typeof__(name) *)dlsym(RTLD_NEXT, #name);            \
        real_##name;                                                               \
    })
/* glibc's fortified open entry points (called by _FORTIFY_SOURCE builds) */
int __open_2(const char *, int);
int __open64_2(const char *, int);
int __openat_2(int, const char *, int);
int __openat64_2(int, const char *, int);
REAL(write); REAL(pwrite); REAL(pwrite64); REAL(writev); REAL(pwritev); REAL(pwritev64);
REAL(pwritev2); REAL(pwritev64v2); REAL(ftruncate64); 
REAL(truncate64); REAL(fallocate64); 
REAL(posix_fallocate64); REAL(copy_file_range); REAL(sendfile); REAL(sendfile64); REAL(splice);
REAL(fsync); REAL(fdatasync); REAL(sync_file_range); REAL(sync); REAL(syncfs);
REAL(open); REAL(open64); REAL(openat); REAL(openat64); REAL(creat); REAL(creat64);
REAL(__open_2); REAL(__open64_2); REAL(__openat_2); REAL(__openat64_2);
REAL(renameat); REAL(renameat2); REAL(unlinkat); 
REAL(mkdirat); REAL(symlinkat); REAL(linkat);
REAL(fchmod); REAL(fchmodat); REAL(utimensat); REAL(futimens); REAL(utimes);
REAL(dup); REAL(dup2); REAL(dup3); REAL(fcntl); REAL(fcntl64); REAL(close);
REAL(fopen); REAL(fopen64); REAL(fdopen); REAL(fflush); REAL(fclose); REAL(mmap); REAL(mmap64);
REAL(syscall); REAL(execve); REAL(execvpe);

/* ---- setup ---------------------------------------------------------------- */

static void warn(const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof msg - 1)
        n = sizeof msg - 1;
    in_cap++;
    R(write)(2, msg, (size_t)n);
    in_cap--;
}

__attribute__((constructor)) static void capture_init(void)
{
    const char *j = getenv("CDPCORE_JOURNAL"), *r = getenv("CDPCORE_ROOT");
    if (!j || !*j || !r || !*r)
        return;
    in_cap++;
    const char *pre = getenv("LD_PRELOAD");
    snprintf(saved_env[0], sizeof saved_env[0], "%s", pre ? pre : "");
    snprintf(saved_env[1], sizeof saved_env[1], "%s", j);
    snprintf(saved_env[2], sizeof saved_env[2], "%s", r);
    if (!realpath(r, root)) {
        warn("cdpcore capture: protected root %s: %s; NOT capturing\n", r, strerror(errno));
        goto out;
    }
    rootlen = strlen(root);
    fds = R(mmap)(NULL, sizeof(struct fdent) * MAX_FDS, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (fds == MAP_FAILED) {
        warn("cdpcore capture: no memory for the descriptor table; NOT capturing\n");
        goto out;
    }
    int st = cdp_writer_open(j, &W);
    if (st != CDP_OK) {
        warn("cdpcore capture: cannot open journal %s: %s; NOT capturing\n", j,
             st == CDP_EIO ? strerror(errno) : cdp_strerror(st));
        goto out;
    }
    /* the first lock maps the stage (if protect made one) and drains it */
    if (cdp_writer_lock(W) == CDP_OK)
        cdp_writer_unlock(W);
    active = 1;
out:
    in_cap--;
}

static inline int capturing(void) { return active && !in_cap; }

static inline struct fdent *ent(int fd)
{
    return fd >= 0 && fd < MAX_FDS ? &fds[fd] : NULL;
}

/* Take the append lock around a program's call; 0 when it cannot be taken
 * (then the call runs uncaptured and the file must be marked dirty). */
static int lock(void)
{
    in_cap++;
    int st = cdp_writer_lock(W);
    if (st == CDP_OK)
        return 1;
    if (!warned_fail) {
        /* taking the lock drains the stage into the journal: that failed */
        warned_fail = 1;
        warn("cdpcore capture: journal append failed (%s); affected files will be marked dirty: "
             "run `cdpctl resync`\n", st == CDP_EIO ? strerror(errno) : cdp_strerror(st));
    }
    return 0;
}

static void unlock(int held)
{
    if (held)
        cdp_writer_unlock(W);
    in_cap--;
}

/* root-relative path of absolute path p into out; 0 when p is not under root */
static int rel_of(const char *p, char *out, size_t n)
{
    if (strncmp(p, root, rootlen) != 0)
        return 0;
    if (p[rootlen] == 0)
        return 0; /* the root itself is no record's subject */
    if (p[rootlen] != '/' && rootlen > 1)
        return 0;
    const char *r = p + rootlen + (rootlen > 1);
    if (!*r || strlen(r) >= n)
        return 0;
    strcpy(out, r);
    return 1;
}

/* Absolute path of fd's file now, as the kernel names it. */
static int fd_path(int fd, char *out, size_t n)
{
    char link[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t k = readlink(link, out, n - 1);
    if (k <= 0)
        return 0;
    out[k] = 0;
    if (k > 10 && strcmp(out + k - 10, " (deleted)") == 0)
        return 0;
    return 1;
}

/* Absolute, symlink-resolved path of (dirfd, path) without following its
 * last component: realpath of the parent + the name. The parent must exist. */
static int abs_path(int dirfd, const char *path, char *out, size_t n)
{
    char full[PATH_MAX * 2], par[PATH_MAX];
    if (!path || !*path)
        return 0;
    if (path[0] == '/')
        snprintf(full, sizeof full, "%s", path);
    else {
        char dir[PATH_MAX];
        if (dirfd == AT_FDCWD) {
            if (!getcwd(dir, sizeof dir))
                return 0;
        } else if (!fd_path(dirfd, dir, sizeof dir))
            return 0;
        snprintf(full, sizeof full, "%s/%s", dir, path);
    }
    size_t L = strlen(full);
    while (L > 1 && full[L - 1] == '/')
        full[--L] = 0;
    char *slash = strrchr(full, '/');
    const char *name = slash + 1;
    if (slash == full)
        strcpy(par, "/");
    else {
        *slash = 0;
        if (!realpath(full, par))
            return 0;
    }
    if (strcmp(name, ".") == 0 || strcmp(name, "..") == 0) {
        /* "dir/.." and the like: resolve it whole */
        char t[PATH_MAX];
        snprintf(t, sizeof t, "%s/%s", par, name);
        return realpath(t, out) != NULL;
    }
    int k = snprintf(out, n, "%s%s%s", par, strcmp(par, "/") ? "/" : "", name);
    return k > 0 && (size_t)k < n;
}

static int rel_at(int dirfd, const char *path, char *out, size_t n)
{
    char a[PATH_MAX];
    return abs_path(dirfd, path, a, sizeof a) && rel_of(a, out, n);
}

/* ---- appending ------------------------------------------------------------ */

static void lost_fid(uint64_t fid)
{
    for (int i = 0; i < n_lost; i++)
        if (lost[i] == fid)
            return;
    if (n_lost < MAX_LOST)
        lost[n_lost++] = fid;
    else
        lost_overflow = 1;
}

/* Append recs; on failure remember that file fid (0: none known) lost a
 * change. Called with the lock held. */
static int append(const struct cdp_rec *recs, size_t n, uint64_t fid)
{
    static const char reason[] = "capture: journal append failed";
    if (n_lost) {
        struct cdp_rec d[MAX_LOST];
        uint8_t pay[8 + sizeof reason];
        memset(pay, 0, 8);
        memcpy(pay + 8, reason, sizeof reason - 1);
        for (int i = 0; i < n_lost; i++)
            d[i] = (struct cdp_rec){CDP_DIRTY, 0, lost[i], 0, INT64_MIN, pay, 8 + sizeof reason - 1};
        if (cdp_append(W, d, (size_t)n_lost, UINT64_MAX, NULL) == CDP_OK)
            n_lost = 0;
    }
    int st = cdp_append(W, recs, n, UINT64_MAX, NULL);
    if (st == CDP_OK)
        return 1;
    int e = errno;
    if (fid)
        lost_fid(fid);
    if (!warned_fail) {
        warned_fail = 1;
        warn("cdpcore capture: journal append failed (%s); affected files will be marked dirty: "
             "run `cdpctl resync`\n", st == CDP_EIO ? strerror(e) : cdp_strerror(st));
    }
    return 0;
}

static uint64_t new_fid(void)
{
    uint64_t id = 0;
    if (cdp_alloc_file_ids(W, 1, &id) != CDP_OK)
        return 0;
    return id;
}

/* Decide what fd is (lock not needed: reads only the fd's own state). */
static struct fdent *classify(int fd)
{
    struct fdent *e = ent(fd);
    if (!e)
        return NULL;
    if (e->state != FD_UNKNOWN)
        return e;
    struct stat st;
    char a[PATH_MAX], r[PATH_MAX];
    in_cap++;
    int fl = R(fcntl)(fd, F_GETFL);
    e->state = FD_IGNORE;
    if (fl >= 0 && (fl & O_ACCMODE) != O_RDONLY && fstat(fd, &st) == 0 && S_ISREG(st.st_mode) &&
        fd_path(fd, a, sizeof a) && rel_of(a, r, sizeof r)) {
        e->state = FD_TRACK;
        e->fid = 0;
        e->append = (fl & O_APPEND) != 0;
        e->sync = (fl & (O_SYNC | O_DSYNC)) != 0;
    }
    in_cap--;
    return e;
}

/* Bind fd's file to an id (FILEMAP of its current path) unless bound in
 * this base generation. Lock held. Returns the id, 0 when it is not (or no
 * longer) a protected file. */
static uint64_t bind_fd(int fd, struct fdent *e)
{
    uint64_t gen = cdp_writer_base_gen(W);
    if (e->fid && e->gen == gen)
        return e->fid;
    char a[PATH_MAX], r[PATH_MAX];
    if (!fd_path(fd, a, sizeof a) || !rel_of(a, r, sizeof r))
        return 0; /* unlinked, or renamed out of the root: no longer in the tree */
    uint64_t fid = new_fid();
    if (!fid)
        return 0;
    struct cdp_rec rec = {CDP_FILEMAP, 0, fid, 0, INT64_MIN, r, (uint32_t)strlen(r)};
    if (!append(&rec, 1, 0))
        return 0;
    e->fid = fid;
    e->gen = gen;
    return fid;
}

static void mark_dirty(int fd, struct fdent *e, uint64_t off, uint64_t len, const char *why)
{
    uint64_t fid = bind_fd(fd, e);
    if (!fid)
        return;
    uint8_t pay[256];
    size_t k = strlen(why);
    if (k > sizeof pay - 8)
        k = sizeof pay - 8;
    memcpy(pay, &len, 8);
    memcpy(pay + 8, why, k);
    struct cdp_rec rec = {CDP_DIRTY, 0, fid, off, INT64_MIN, pay, (uint32_t)(8 + k)};
    append(&rec, 1, fid);
}

/* Journal iov (total bytes n, already written at file offset off). */
static void rec_writev(int fd, struct fdent *e, uint64_t off, const struct iovec *iov, int cnt,
                       size_t n)
{
    uint64_t fid = bind_fd(fd, e);
    if (!fid) {
        if (e->fid == 0 && e->state == FD_TRACK) {
            char a[PATH_MAX], r[PATH_MAX];
            if (!fd_path(fd, a, sizeof a) || !rel_of(a, r, sizeof r))
                e->state = FD_IGNORE;
        }
        return;
    }
    struct cdp_rec recs[64];
    size_t k = 0;
    for (int i = 0; i < cnt && n > 0; i++) {
        size_t len = iov[i].iov_len < n ? iov[i].iov_len : n;
        const uint8_t *p = iov[i].iov_base;
        n -= len;
        while (len > 0) {
            uint32_t part = len > CDP_MAX_PAYLOAD ? CDP_MAX_PAYLOAD : (uint32_t)len;
            recs[k++] = (struct cdp_rec){CDP_WRITE, 0, fid, off, INT64_MIN, p, part};
            off += part;
            p += part;
            len -= part;
            if (k == 64) {
                append(recs, k, fid);
                k = 0;
            }
        }
    }
    if (k)
        append(recs, k, fid);
}

static void rec_write(int fd, struct fdent *e, uint64_t off, const void *buf, size_t n)
{
    struct iovec v = {(void *)buf, n};
    rec_writev(fd, e, off, &v, 1, n);
}

/* Journal [off, off+n) of fd's file as it is now, read back (for calls whose
 * data never passes through our hands: copy_file_range, sendfile, splice). */
static void rec_readback(int fd, struct fdent *e, uint64_t off, uint64_t n)
{
    if (!chunk_buf && !(chunk_buf = malloc(CHUNK))) {
        mark_dirty(fd, e, off, n, "capture: no memory to read back a copy");
        return;
    }
    int rfd = -1;
    char a[PATH_MAX];
    /* fd may be write-only: read through a fresh descriptor of the same file */
    if (fd_path(fd, a, sizeof a))
        rfd = R(open)(a, O_RDONLY | O_CLOEXEC);
    if (rfd < 0) {
        mark_dirty(fd, e, off, n, "capture: cannot read back copied range");
        return;
    }
    while (n > 0) {
        size_t want = n > CHUNK ? CHUNK : (size_t)n;
        ssize_t got = pread(rfd, chunk_buf, want, (off_t)off);
        if (got <= 0) {
            if (got < 0)
                mark_dirty(fd, e, off, n, "capture: cannot read back copied range");
            break;
        }
        rec_write(fd, e, off, chunk_buf, (size_t)got);
        off += (uint64_t)got;
        n -= (uint64_t)got;
    }
    R(close)(rfd);
}

/* Journal fd's whole file: TRUNCATE to its size, then its bytes. */
static void rec_whole(int fd, struct fdent *e)
{
    struct stat st;
    if (fstat(fd, &st) < 0)
        return;
    uint64_t fid = bind_fd(fd, e);
    if (!fid)
        return;
    if ((uint64_t)st.st_size > WHOLE_LIMIT) {
        mark_dirty(fd, e, 0, 0, "capture: stdio write to a large file");
        return;
    }
    struct cdp_rec t = {CDP_TRUNCATE, 0, fid, (uint64_t)st.st_size, INT64_MIN, NULL, 0};
    append(&t, 1, fid);
    rec_readback(fd, e, 0, (uint64_t)st.st_size);
}

static void flush_record(void)
{
    struct cdp_rec f = {CDP_FLUSH, 0, 0, 0, INT64_MIN, NULL, 0};
    append(&f, 1, 0);
}

/* Make the journal durable up to now: the program's barrier returns only
 * after this. */
static void journal_sync(void)
{
    uint64_t synced;
    in_cap++;
    int st = cdp_sync(W, &synced);
    if (st != CDP_OK && !warned_fail) {
        warned_fail = 1;
        warn("cdpcore capture: journal sync failed (%s)\n",
             st == CDP_EIO ? strerror(errno) : cdp_strerror(st));
    }
    in_cap--;
}

/* A crash-consistent point: a FLUSH record of all files, appended under the
 * lock. Returns whether the lock was held (no journal otherwise). */
static int flush_point(void)
{
    int held = lock();
    if (held)
        flush_record();
    unlock(held);
    return held;
}

/* A barrier's journal side: the FLUSH, then the journal durable up to it. */
static void flush_and_sync(void)
{
    if (flush_point())
        journal_sync();
}

/* ---- write family ----------------------------------------------------------- */

/* The fast path: copy the data into the stage (shared memory, drained into
 * the journal by whoever locks it next), hand that copy to the kernel, and
 * publish the record with the offset the call used. No system call of our
 * own unless write() must ask where it went. Returns 0 when the write must
 * take the direct path instead (no stage, file not bound in this base
 * generation, too big). */
static int staged_write(int fd, struct fdent *e, const struct iovec *iov, int cnt, size_t total,
                        off_t off, int rwf, ssize_t (*call)(int, const struct iovec *, int, off_t, int),
                        ssize_t *ret)
{
    uint8_t *pl;
    in_cap++;
    if (cdp_stage_begin(W, (uint32_t)total, &pl) != CDP_OK) {
        in_cap--;
        return 0;
    }
    if (e->gen != cdp_writer_base_gen(W)) {
        cdp_stage_abort(W);
        in_cap--;
        return 0;
    }
    size_t at0 = 0;
    for (int i = 0; i < cnt; i++) {
        memcpy(pl + at0, iov[i].iov_base, iov[i].iov_len);
        at0 += iov[i].iov_len;
    }
    struct iovec one = {pl, total};
    ssize_t r = call(fd, &one, 1, off, rwf);
    int err = errno;
    off_t at = off;
    if (r > 0) {
        if ((rwf & RWF_APPEND) || e->append) {
            struct stat st;
            at = fstat(fd, &st) == 0 ? st.st_size - r : -1;
        } else if (off < 0) {
            off_t pos = lseek(fd, 0, SEEK_CUR);
            at = pos < 0 ? -1 : pos - r;
        }
    }
    if (r > 0 && at >= 0)
        cdp_stage_commit(W, CDP_WRITE, e->fid, (uint64_t)at, (uint32_t)r);
    else
        cdp_stage_abort(W);
    in_cap--;
    if (r > 0 && at < 0) {
        int held = lock();
        if (held)
            mark_dirty(fd, e, 0, 0, "capture: cannot tell where a write went");
        unlock(held);
    }
    if (r > 0 && (e->sync || (rwf & (RWF_DSYNC | RWF_SYNC)))) {
        flush_and_sync();
    }
    errno = err;
    *ret = r;
    return 1;
}

/* The common shape: lock, real call, journal, unlock, then the barrier an
 * O_SYNC descriptor asks for. off < 0: the descriptor's position (read back
 * after the call: position - bytes written, right for O_APPEND too). */
static ssize_t cap_writev(int fd, const struct iovec *iov, int cnt, off_t off, int rwf,
                          ssize_t (*call)(int, const struct iovec *, int, off_t, int))
{
    struct fdent *e = classify(fd);
    if (!e || e->state != FD_TRACK)
        return call(fd, iov, cnt, off, rwf);
    size_t total = 0;
    for (int i = 0; i < cnt; i++)
        total += iov[i].iov_len;
    if (e->fid && total <= STAGE_MAX) {
        ssize_t r;
        if (staged_write(fd, e, iov, cnt, total, off, rwf, call, &r))
            return r;
    }
    /* The program's buffer may change while we look at it (PostgreSQL sets
     * hint bits in shared buffers that another backend is writing out): copy
     * it once, hand the copy to the kernel and to the journal, so that both
     * hold the same bytes and the record's checksum stays true. */
    uint8_t *copy = NULL, *heap = NULL;
    if (total <= TBUF_MAX) {
        if (tbuf_cap < total || !tbuf) {
            size_t want = total < 65536 ? 65536 : total;
            uint8_t *nb = realloc(tbuf, want);
            if (nb) {
                tbuf = nb;
                tbuf_cap = want;
            }
        }
        if (tbuf && tbuf_cap >= total)
            copy = tbuf;
    } else if (total <= WHOLE_LIMIT) {
        copy = heap = malloc(total);
    }
    struct iovec one;
    if (copy) {
        size_t at = 0;
        for (int i = 0; i < cnt; i++) {
            memcpy(copy + at, iov[i].iov_base, iov[i].iov_len);
            at += iov[i].iov_len;
        }
        one = (struct iovec){copy, total};
    }
    int held = lock();
    ssize_t r = copy ? call(fd, &one, 1, off, rwf) : call(fd, iov, cnt, off, rwf);
    int err = errno;
    int sync = e->sync || (rwf & (RWF_DSYNC | RWF_SYNC));
    if (r > 0 && held) {
        off_t at = off;
        /* O_APPEND (or RWF_APPEND) puts every write, pwrite included, at the
         * end: the lock keeps the size from moving under us */
        if ((rwf & RWF_APPEND) || e->append) {
            struct stat st;
            at = fstat(fd, &st) == 0 ? st.st_size - r : -1;
        } else if (off < 0) {
            off_t pos = lseek(fd, 0, SEEK_CUR);
            at = pos < 0 ? -1 : pos - r;
        }
        if (at < 0)
            mark_dirty(fd, e, 0, 0, "capture: cannot tell where a write went");
        else if (copy)
            rec_writev(fd, e, (uint64_t)at, &one, 1, (size_t)r);
        else
            rec_readback(fd, e, (uint64_t)at, (uint64_t)r); /* too big to copy: what landed */
        if (sync)
            flush_record();
    } else if (r > 0) {
        lost_fid(e->fid);
    }
    unlock(held);
    free(heap);
    if (r > 0 && sync && held)
        journal_sync();
    errno = err;
    return r;
}

static ssize_t c_write(int fd, const struct iovec *v, int c, off_t o, int f)
{ (void)c; (void)o; (void)f; return R(write)(fd, v->iov_base, v->iov_len); }
static ssize_t c_pwrite(int fd, const struct iovec *v, int c, off_t o, int f)
{ (void)c; (void)f; return R(pwrite64)(fd, v->iov_base, v->iov_len, o); }
static ssize_t c_writev(int fd, const struct iovec *v, int c, off_t o, int f)
{ (void)o; (void)f; return R(writev)(fd, v, c); }
static ssize_t c_pwritev(int fd, const struct iovec *v, int c, off_t o, int f)
{ (void)f; return R(pwritev64)(fd, v, c, o); }
static ssize_t c_pwritev2(int fd, const struct iovec *v, int c, off_t o, int f)
{ return R(pwritev64v2)(fd, v, c, o, f); }

EXPORT ssize_t write(int fd, const void *buf, size_t n)
{
    if (!capturing())
        return R(write)(fd, buf, n);
    struct iovec v = {(void *)buf, n};
    return cap_writev(fd, &v, 1, -1, 0, c_write);
}

EXPORT ssize_t pwrite(int fd, const void *buf, size_t n, off_t off)
{
    if (!capturing())
        return R(pwrite)(fd, buf, n, off);
    struct iovec v = {(void *)buf, n};
    return cap_writev(fd, &v, 1, off, 0, c_pwrite);
}

EXPORT ssize_t pwrite64(int fd, const void *buf, size_t n, off64_t off)
{
    if (!capturing())
        return R(pwrite64)(fd, buf, n, off);
    struct iovec v = {(void *)buf, n};
    return cap_writev(fd, &v, 1, off, 0, c_pwrite);
}

EXPORT ssize_t writev(int fd, const struct iovec *iov, int cnt)
{
    if (!capturing())
        return R(writev)(fd, iov, cnt);
    return cap_writev(fd, iov, cnt, -1, 0, c_writev);
}

EXPORT ssize_t pwritev(int fd, const struct iovec *iov, int cnt, off_t off)
{
    if (!capturing())
        return R(pwritev)(fd, iov, cnt, off);
    return cap_writev(fd, iov, cnt, off, 0, c_pwritev);
}

EXPORT ssize_t pwritev64(int fd, const struct iovec *iov, int cnt, off64_t off)
{
    if (!capturing())
        return R(pwritev64)(fd, iov, cnt, off);
    return cap_writev(fd, iov, cnt, off, 0, c_pwritev);
}

EXPORT ssize_t pwritev2(int fd, const struct iovec *iov, int cnt, off_t off, int flags)
{
    if (!capturing())
        return R(pwritev2)(fd, iov, cnt, off, flags);
    return cap_writev(fd, iov, cnt, off, flags, c_pwritev2);
}

EXPORT ssize_t pwritev64v2(int fd, const struct iovec *iov, int cnt, off64_t off, int flags)
{
    if (!capturing())
        return R(pwritev64v2)(fd, iov, cnt, off, flags);
    return cap_writev(fd, iov, cnt, off, flags, c_pwritev2);
}

/* ---- size changes ------------------------------------------------------------ */

static int cap_ftruncate(int fd, off64_t len, int (*call)(int, off64_t))
{
    struct fdent *e = capturing() ? classify(fd) : NULL;
    if (!e || e->state != FD_TRACK)
        return call(fd, len);
    int held = lock();
    int r = call(fd, len), err = errno;
    if (r == 0 && held) {
        uint64_t fid = bind_fd(fd, e);
        if (fid) {
            struct cdp_rec t = {CDP_TRUNCATE, 0, fid, (uint64_t)len, INT64_MIN, NULL, 0};
            append(&t, 1, fid);
        }
    }
    unlock(held);
    errno = err;
    return r;
}

static int rf_ftruncate(int fd, off64_t l) { return R(ftruncate64)(fd, l); }

EXPORT int ftruncate(int fd, off_t len) { return cap_ftruncate(fd, len, rf_ftruncate); }
EXPORT int ftruncate64(int fd, off64_t len) { return cap_ftruncate(fd, len, rf_ftruncate); }

/* A path-named operation on one protected file: open it (it must exist
 * after the call) and treat it as a descriptor. */
static void path_truncated(const char *path, off64_t len)
{
    char a[PATH_MAX], r[PATH_MAX];
    if (!realpath(path, a) || !rel_of(a, r, sizeof r))
        return;
    uint64_t fid = new_fid();
    if (!fid)
        return;
    struct cdp_rec recs[2] = {
        {CDP_FILEMAP, 0, fid, 0, INT64_MIN, r, (uint32_t)strlen(r)},
        {CDP_TRUNCATE, 0, fid, (uint64_t)len, INT64_MIN, NULL, 0},
    };
    append(recs, 2, fid);
}

static int cap_truncate(const char *path, off64_t len)
{
    if (!capturing())
        return R(truncate64)(path, len);
    int held = lock();
    int r = R(truncate64)(path, len), err = errno;
    if (r == 0 && held)
        path_truncated(path, len);
    unlock(held);
    errno = err;
    return r;
}

EXPORT int truncate(const char *path, off_t len) { return cap_truncate(path, len); }
EXPORT int truncate64(const char *path, off64_t len) { return cap_truncate(path, len); }

static const uint8_t *zero_block(void)
{
    static void *z;
    if (!z) {
        /* read-only anonymous memory: every page is the kernel's zero page */
        z = R(mmap)(NULL, CHUNK, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (z == MAP_FAILED)
            z = NULL;
    }
    return z;
}

/* fallocate: allocation without KEEP_SIZE may grow the file (zeros);
 * PUNCH_HOLE and ZERO_RANGE zero a range; COLLAPSE/INSERT shift data and
 * are marked dirty. */
static int cap_fallocate(int fd, int mode, off64_t off, off64_t len)
{
    struct fdent *e = capturing() ? classify(fd) : NULL;
    if (!e || e->state != FD_TRACK)
        return R(fallocate64)(fd, mode, off, len);
    int held = lock();
    struct stat before;
    int have = fstat(fd, &before) == 0;
    int r = R(fallocate64)(fd, mode, off, len), err = errno;
    if (r == 0 && held) {
        uint64_t fid = bind_fd(fd, e);
        struct stat after;
        if (!fid) {
        } else if (mode & (FALLOC_FL_COLLAPSE_RANGE | FALLOC_FL_INSERT_RANGE)) {
            mark_dirty(fd, e, (uint64_t)off, 0, "capture: fallocate shifted file data");
        } else {
            if (mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)) {
                const uint8_t *z = zero_block();
                uint64_t a = (uint64_t)off, end = (uint64_t)off + (uint64_t)len;
                if (have && end > (uint64_t)before.st_size && (mode & FALLOC_FL_KEEP_SIZE))
                    end = (uint64_t)before.st_size;
                if (!z || end - a > WHOLE_LIMIT)
                    mark_dirty(fd, e, a, end - a, "capture: large hole punched");
                else
                    for (; a < end;) {
                        uint32_t part = end - a > CHUNK ? CHUNK : (uint32_t)(end - a);
                        struct cdp_rec w = {CDP_WRITE, 0, fid, a, INT64_MIN, z, part};
                        append(&w, 1, fid);
                        a += part;
                    }
            }
            if (have && fstat(fd, &after) == 0 && after.st_size != before.st_size) {
                struct cdp_rec t = {CDP_TRUNCATE, 0, fid, (uint64_t)after.st_size, INT64_MIN, NULL, 0};
                append(&t, 1, fid);
            }
        }
    }
    unlock(held);
    errno = err;
    return r;
}

EXPORT int fallocate(int fd, int mode, off_t off, off_t len) { return cap_fallocate(fd, mode, off, len); }
EXPORT int fallocate64(int fd, int mode, off64_t off, off64_t len) { return cap_fallocate(fd, mode, off, len); }

static int cap_posix_fallocate(int fd, off64_t off, off64_t len)
{
    struct fdent *e = capturing() ? classify(fd) : NULL;
    if (!e || e->state != FD_TRACK)
        return R(posix_fallocate64)(fd, off, len);
    int held = lock();
    struct stat before, after;
    int have = fstat(fd, &before) == 0;
    int r = R(posix_fallocate64)(fd, off, len);
    if (r == 0 && held && have && fstat(fd, &after) == 0 && after.st_size != before.st_size) {
        uint64_t fid = bind_fd(fd, e);
        if (fid) {
            struct cdp_rec t = {CDP_TRUNCATE, 0, fid, (uint64_t)after.st_size, INT64_MIN, NULL, 0};
            append(&t, 1, fid);
        }
    }
    unlock(held);
    return r;
}

EXPORT int posix_fallocate(int fd, off_t off, off_t len) { return cap_posix_fallocate(fd, off, len); }
EXPORT int posix_fallocate64(int fd, off64_t off, off64_t len) { return cap_posix_fallocate(fd, off, len); }

/* ---- copies done by the kernel: read the result back ---------------------------- */

static ssize_t cap_copy(int out, loff_t *out_off, size_t len, ssize_t (*call)(void *), void *arg)
{
    struct fdent *e = classify(out);
    if (!e || e->state != FD_TRACK)
        return call(arg);
    int held = lock();
    off_t at = out_off ? *out_off : lseek(out, 0, SEEK_CUR);
    ssize_t r = call(arg);
    int err = errno;
    (void)len;
    if (r > 0 && held) {
        if (e->append) {
            struct stat st;
            at = fstat(out, &st) == 0 ? st.st_size - r : -1;
        }
        if (at < 0)
            mark_dirty(out, e, 0, 0, "capture: cannot tell where a copy went");
        else
            rec_readback(out, e, (uint64_t)at, (uint64_t)r);
    }
    unlock(held);
    errno = err;
    return r;
}

struct cfr_args { int in; loff_t *in_off; int out; loff_t *out_off; size_t len; unsigned flags; };
static ssize_t call_cfr(void *p)
{
    struct cfr_args *a = p;
    return R(copy_file_range)(a->in, a->in_off, a->out, a->out_off, a->len, a->flags);
}

EXPORT ssize_t copy_file_range(int in, loff_t *in_off, int out, loff_t *out_off, size_t len,
                               unsigned flags)
{
    struct cfr_args a = {in, in_off, out, out_off, len, flags};
    if (!capturing())
        return call_cfr(&a);
    return cap_copy(out, out_off, len, call_cfr, &a);
}

struct sf_args { int out, in; off_t *off; size_t count; };
static ssize_t call_sf(void *p)
{
    struct sf_args *a = p;
    return R(sendfile)(a->out, a->in, a->off, a->count);
}

EXPORT ssize_t sendfile(int out, int in, off_t *off, size_t count)
{
    struct sf_args a = {out, in, off, count};
    if (!capturing())
        return call_sf(&a);
    return cap_copy(out, NULL, count, call_sf, &a);
}

struct sf64_args { int out, in; off64_t *off; size_t count; };
static ssize_t call_sf64(void *p)
{
    struct sf64_args *a = p;
    return R(sendfile64)(a->out, a->in, a->off, a->count);
}

EXPORT ssize_t sendfile64(int out, int in, off64_t *off, size_t count)
{
    struct sf64_args a = {out, in, off, count};
    if (!capturing())
        return call_sf64(&a);
    return cap_copy(out, NULL, count, call_sf64, &a);
}

struct sp_args { int in; loff_t *in_off; int out; loff_t *out_off; size_t len; unsigned flags; };
static ssize_t call_sp(void *p)
{
    struct sp_args *a = p;
    return R(splice)(a->in, a->in_off, a->out, a->out_off, a->len, a->flags);
}

EXPORT ssize_t splice(int in, loff_t *in_off, int out, loff_t *out_off, size_t len, unsigned flags)
{
    struct sp_args a = {in, in_off, out, out_off, len, flags};
    if (!capturing())
        return call_sp(&a);
    return cap_copy(out, out_off, len, call_sp, &a);
}

/* ---- barriers --------------------------------------------------------------------- */

/* After the program's barrier succeeded: a FLUSH record (a crash-consistent
 * point: every record before it is a prefix of what the kernel saw), and
 * the journal durable up to it before the program hears back. */
static void barrier(int fd)
{
    struct fdent *e = classify(fd);
    if (!e || e->state != FD_TRACK)
        return;
    flush_and_sync();
}

/* fsync and fdatasync. When the file shares an ext4 file system with the
 * journal, the journal rides on the program's own flush: the FLUSH record
 * goes in first, the journal's records are written to the device
 * (cdp_sync_ride, no flush of its own), then the program's call, whose
 * device flush covers them. One device flush per barrier instead of two;
 * the contract holds: the call returns only once the journal is durable up
 * to it. Otherwise (another file system, no durable preallocated tail yet,
 * the program's call failed): cdp_sync after the call. */
static int flush_call(int fd, int (*call)(int))
{
    struct fdent *e = classify(fd);
    struct stat st;
    uint64_t cover = 0;
    int rode = 0;
    if (e && e->state == FD_TRACK && fstat(fd, &st) == 0) {
        /* Start the program's own writeback now (its call would, a little
         * later): the device takes its data and the journal's together.
         * WRITE alone waits for nothing and takes no writeback error: the
         * program's call still reports any. */
        R(sync_file_range)(fd, 0, 0, SYNC_FILE_RANGE_WRITE);
        int held = flush_point();
        int st_ride = CDP_ESTALE;
        if (held) {
            in_cap++;
            st_ride = cdp_sync_ride(W, (uint64_t)st.st_dev, &cover);
            in_cap--;
        }
        if (st_ride == CDP_EIO && !warned_fail) {
            warned_fail = 1;
            warn("cdpcore capture: journal sync failed (%s)\n", strerror(errno));
        }
        rode = st_ride == CDP_OK;
        if (!rode) {
            int r = call(fd), err = errno;
            if (held && st_ride != CDP_EIO)
                journal_sync(); /* the FLUSH is in: make it durable whatever the call said */
            errno = err;
            return r;
        }
    }
    int r = call(fd), err = errno;
    if (rode) {
        in_cap++;
        if (r == 0)
            cdp_sync_rode(W, cover);
        in_cap--;
        if (r != 0)
            journal_sync(); /* the program's flush failed: the journal's own */
    }
    errno = err;
    return r;
}

EXPORT int fsync(int fd)
{
    if (!capturing())
        return R(fsync)(fd);
    return flush_call(fd, R(fsync));
}

EXPORT int fdatasync(int fd)
{
    if (!capturing())
        return R(fdatasync)(fd);
    return flush_call(fd, R(fdatasync));
}

EXPORT int sync_file_range(int fd, off64_t off, off64_t n, unsigned flags)
{
    if (!capturing())
        return R(sync_file_range)(fd, off, n, flags);
    int r = R(sync_file_range)(fd, off, n, flags), err = errno;
    if (r == 0 && (flags & SYNC_FILE_RANGE_WAIT_AFTER))
        barrier(fd);
    errno = err;
    return r;
}

EXPORT void sync(void)
{
    R(sync)();
    if (capturing()) {
        flush_and_sync();
    }
}

EXPORT int syncfs(int fd)
{
    int r = R(syncfs)(fd), err = errno;
    if (r == 0 && capturing()) {
        flush_and_sync();
    }
    errno = err;
    return r;
}

/* ---- opening ------------------------------------------------------------------------ */

struct openctx {
    int held, existed, flags, writable;
};

static int wants_capture(int flags)
{
    return capturing() && ((flags & O_ACCMODE) != O_RDONLY || (flags & (O_CREAT | O_TRUNC)));
}

static void pre_open(struct openctx *c, int dirfd, const char *path, int flags)
{
    struct stat st;
    c->flags = flags;
    c->writable = (flags & O_ACCMODE) != O_RDONLY;
    c->held = lock();
    c->existed = fstatat(dirfd, path, &st, 0) == 0;
}

static void post_open(struct openctx *c, int fd)
{
    struct fdent *e = ent(fd);
    if (fd >= 0 && e) {
        struct stat st;
        char a[PATH_MAX], r[PATH_MAX];
        e->state = FD_IGNORE;
        e->fid = 0;
        if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && fd_path(fd, a, sizeof a) &&
            rel_of(a, r, sizeof r)) {
            int fl = R(fcntl)(fd, F_GETFL);
            e->state = c->writable ? FD_TRACK : FD_IGNORE;
            e->append = fl >= 0 && (fl & O_APPEND);
            e->sync = fl >= 0 && (fl & (O_SYNC | O_DSYNC));
            if (c->held && (c->flags & O_CREAT) && !c->existed) {
                uint64_t fid = new_fid();
                if (fid) {
                    struct cdp_rec rec = {CDP_CREATE, 0, fid, st.st_mode & 07777, INT64_MIN, r,
                                          (uint32_t)strlen(r)};
                    if (append(&rec, 1, fid)) {
                        e->fid = fid;
                        e->gen = cdp_writer_base_gen(W);
                    }
                }
            } else if (c->held && (c->flags & O_TRUNC) && c->writable) {
                struct fdent tmp = {0, 0, FD_TRACK, 0, 0};
                uint64_t fid = bind_fd(fd, &tmp);
                if (fid) {
                    struct cdp_rec t = {CDP_TRUNCATE, 0, fid, 0, INT64_MIN, NULL, 0};
                    append(&t, 1, fid);
                    e->fid = fid;
                    e->gen = tmp.gen;
                }
            }
        }
    }
    unlock(c->held);
}

/* An fd we did not see open (fopen's internal open, socket, pipe...) may
 * reuse a number: a read-only open still resets the slot. */
static int plain_open_result(int fd)
{
    struct fdent *e = ent(fd);
    if (e && active) {
        e->state = FD_IGNORE;
        e->fid = 0;
    }
    return fd;
}

#define OPEN_MODE(flags)                                                       \
    mode_t mode = 0;                                                           \
    if ((flags) & (O_CREAT | __O_TMPFILE)) {                                   \
        va_list ap;                                                            \
        va_start(ap, flags);                                                   \
        mode = va_arg(ap, mode_t);                                             \
        va_end(ap);                                                            \
    }

#define CAPTURED_OPEN(dirfd, path, flags, callexpr)                            \
    do {                                                                       \
        if (!wants_capture(flags)) {                                           \
            int fd_ = (callexpr);                                              \
            int e_ = errno;                                                    \
            plain_open_result(fd_);                                            \
            errno = e_;                                                        \
            return fd_;                                                        \
        }                                                                      \
        struct openctx c_;                                                     \
        pre_open(&c_, dirfd, path, flags);                                     \
        int fd_ = (callexpr);                                                  \
        int e_ = errno;                                                        \
        post_open(&c_, fd_);                                                   \
        errno = e_;                                                            \
        return fd_;                                                            \
    } while (0)

EXPORT int open(const char *path, int flags, ...)
{
    OPEN_MODE(flags);
    CAPTURED_OPEN(AT_FDCWD, path, flags, R(open)(path, flags, mode));
}

EXPORT int open64(const char *path, int flags, ...)
{
    OPEN_MODE(flags);
    CAPTURED_OPEN(AT_FDCWD, path, flags, R(open64)(path, flags, mode));
}

EXPORT int openat(int dirfd, const char *path, int flags, ...)
{
    OPEN_MODE(flags);
    CAPTURED_OPEN(dirfd, path, flags, R(openat)(dirfd, path, flags, mode));
}

EXPORT int openat64(int dirfd, const char *path, int flags, ...)
{
    OPEN_MODE(flags);
    CAPTURED_OPEN(dirfd, path, flags, R(openat64)(dirfd, path, flags, mode));
}

EXPORT int __open_2(const char *path, int flags)
{
    CAPTURED_OPEN(AT_FDCWD, path, flags, R(__open_2)(path, flags));
}

EXPORT int __open64_2(const char *path, int flags)
{
    CAPTURED_OPEN(AT_FDCWD, path, flags, R(__open64_2)(path, flags));
}

EXPORT int __openat_2(int dirfd, const char *path, int flags)
{
    CAPTURED_OPEN(dirfd, path, flags, R(__openat_2)(dirfd, path, flags));
}

EXPORT int __openat64_2(int dirfd, const char *path, int flags)
{
    CAPTURED_OPEN(dirfd, path, flags, R(__openat64_2)(dirfd, path, flags));
}

EXPORT int creat(const char *path, mode_t mode)
{
    CAPTURED_OPEN(AT_FDCWD, path, O_CREAT | O_WRONLY | O_TRUNC, R(creat)(path, mode));
}

EXPORT int creat64(const char *path, mode_t mode)
{
    CAPTURED_OPEN(AT_FDCWD, path, O_CREAT | O_WRONLY | O_TRUNC, R(creat64)(path, mode));
}

/* ---- stdio ---------------------------------------------------------------------------- */

static int mode_flags(const char *m)
{
    int f = 0;
    switch (m[0]) {
    case 'w': f = O_WRONLY | O_CREAT | O_TRUNC; break;
    case 'a': f = O_WRONLY | O_CREAT | O_APPEND; break;
    default: f = O_RDONLY; break;
    }
    for (const char *p = m + 1; *p && *p != ','; p++) {
        if (*p == '+')
            f = (f & ~O_ACCMODE) | O_RDWR;
        if (*p == 'x')
            f |= O_EXCL;
    }
    return f;
}

static void stdio_register(FILE *f)
{
    pthread_mutex_lock(&stdio_mu);
    for (size_t i = 0; i < sizeof stdio_files / sizeof *stdio_files; i++)
        if (!stdio_files[i] || stdio_files[i] == f) {
            stdio_files[i] = f;
            pthread_mutex_unlock(&stdio_mu);
            return;
        }
    pthread_mutex_unlock(&stdio_mu);
    if (!warned_raw) {
        warned_raw = 1;
        warn("cdpcore capture: too many stdio files open for writing; some are not captured\n");
    }
}

/* 1 if f was registered (and is removed when drop) */
static int stdio_find(FILE *f, int drop)
{
    int found = 0;
    pthread_mutex_lock(&stdio_mu);
    for (size_t i = 0; i < sizeof stdio_files / sizeof *stdio_files; i++)
        if (stdio_files[i] == f) {
            found = 1;
            if (drop)
                stdio_files[i] = NULL;
        }
    pthread_mutex_unlock(&stdio_mu);
    return found;
}

static FILE *cap_fopen(const char *path, const char *mode, FILE *(*call)(const char *, const char *))
{
    int flags = mode_flags(mode);
    if (!wants_capture(flags))
        return call(path, mode);
    struct openctx c;
    pre_open(&c, AT_FDCWD, path, flags);
    FILE *f = call(path, mode);
    int err = errno;
    int fd = f ? fileno(f) : -1;
    post_open(&c, fd);
    struct fdent *e = ent(fd);
    if (f && e && e->state == FD_TRACK)
        stdio_register(f);
    errno = err;
    return f;
}

EXPORT FILE *fopen(const char *path, const char *mode) { return cap_fopen(path, mode, R(fopen)); }
EXPORT FILE *fopen64(const char *path, const char *mode) { return cap_fopen(path, mode, R(fopen64)); }

EXPORT FILE *fdopen(int fd, const char *mode)
{
    FILE *f = R(fdopen)(fd, mode);
    if (f && capturing()) {
        struct fdent *e = classify(fd);
        if (e && e->state == FD_TRACK)
            stdio_register(f);
    }
    return f;
}

/* After the real flush: the file's content is what the stream wrote. */
static void stdio_capture(FILE *f)
{
    int fd = fileno(f);
    struct fdent *e = fd >= 0 ? classify(fd) : NULL;
    if (!e || e->state != FD_TRACK)
        return;
    int held = lock();
    if (held)
        rec_whole(fd, e);
    unlock(held);
}

EXPORT int fflush(FILE *f)
{
    if (!capturing())
        return R(fflush)(f);
    int r = R(fflush)(f), err = errno;
    if (f == NULL) {
        FILE *list[sizeof stdio_files / sizeof *stdio_files];
        pthread_mutex_lock(&stdio_mu);
        memcpy(list, stdio_files, sizeof list);
        pthread_mutex_unlock(&stdio_mu);
        for (size_t i = 0; i < sizeof list / sizeof *list; i++)
            if (list[i])
                stdio_capture(list[i]);
    } else if (stdio_find(f, 0)) {
        stdio_capture(f);
    }
    errno = err;
    return r;
}

EXPORT int fclose(FILE *f)
{
    if (!capturing())
        return R(fclose)(f);
    int fd = fileno(f);
    if (stdio_find(f, 1)) {
        R(fflush)(f);
        stdio_capture(f);
    }
    int r = R(fclose)(f), err = errno;
    plain_open_result(fd);
    if (ent(fd))
        ent(fd)->state = FD_UNKNOWN;
    errno = err;
    return r;
}

/* Runs in exit() before glibc flushes the streams itself: flush them now,
 * so that what they held is journaled. */
__attribute__((destructor)) static void capture_fini(void)
{
    if (!active || in_cap)
        return;
    FILE *list[sizeof stdio_files / sizeof *stdio_files];
    pthread_mutex_lock(&stdio_mu);
    memcpy(list, stdio_files, sizeof list);
    pthread_mutex_unlock(&stdio_mu);
    for (size_t i = 0; i < sizeof list / sizeof *list; i++)
        if (list[i]) {
            R(fflush)(list[i]);
            stdio_capture(list[i]);
        }
    /* stdout/stderr redirected into the root were never fopen'd */
    FILE *std[2] = {stdout, stderr};
    for (int i = 0; i < 2; i++) {
        int fd = fileno(std[i]);
        struct fdent *e = fd >= 0 ? classify(fd) : NULL;
        if (e && e->state == FD_TRACK) {
            R(fflush)(std[i]);
            stdio_capture(std[i]);
        }
    }
}

/* ---- namespace ------------------------------------------------------------------------------ */

/* Append a record whose payload is path (or a, NUL, b). Lock held. */
static void ns_record(uint8_t kind, uint64_t off, const char *a, const char *b)
{
    char pay[2 * PATH_MAX + 2];
    size_t la = strlen(a), n = la;
    memcpy(pay, a, la);
    if (b) {
        pay[la] = 0;
        size_t lb = strlen(b);
        memcpy(pay + la + 1, b, lb);
        n = la + 1 + lb;
    }
    struct cdp_rec rec = {kind, 0, 0, off, INT64_MIN, pay, (uint32_t)n};
    append(&rec, 1, 0);
}

/* A file that arrived in the root from outside it (rename or link from
 * elsewhere, or a link of an O_TMPFILE): journal it as new, with content. */
static void arrived(const char *abs, const char *rel)
{
    struct stat st;
    if (lstat(abs, &st) < 0)
        return;
    if (S_ISLNK(st.st_mode)) {
        char t[PATH_MAX];
        ssize_t k = readlink(abs, t, sizeof t - 1);
        if (k >= 0) {
            t[k] = 0;
            ns_record(CDP_UNLINK, 0, rel, NULL);
            ns_record(CDP_SYMLINK, 0, t, rel);
        }
        return;
    }
    if (S_ISDIR(st.st_mode)) {
        /* a whole directory moved in: walk it */
        ns_record(CDP_MKDIR, st.st_mode & 07777, rel, NULL);
        DIR *d = opendir(abs);
        if (!d)
            return;
        struct dirent *de;
        while ((de = readdir(d))) {
            if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
                continue;
            char a2[PATH_MAX], r2[PATH_MAX];
            snprintf(a2, sizeof a2, "%s/%s", abs, de->d_name);
            snprintf(r2, sizeof r2, "%s/%s", rel, de->d_name);
            arrived(a2, r2);
        }
        closedir(d);
        return;
    }
    if (!S_ISREG(st.st_mode))
        return;
    uint64_t fid = new_fid();
    if (!fid)
        return;
    struct cdp_rec c = {CDP_CREATE, 0, fid, st.st_mode & 07777, INT64_MIN, rel, (uint32_t)strlen(rel)};
    if (!append(&c, 1, fid))
        return;
    int fd = R(open)(abs, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    struct fdent tmp = {fid, cdp_writer_base_gen(W), FD_TRACK, 0, 0};
    if (!chunk_buf)
        chunk_buf = malloc(CHUNK);
    uint64_t off = 0;
    ssize_t got;
    while (chunk_buf && (got = pread(fd, chunk_buf, CHUNK, (off_t)off)) > 0) {
        struct cdp_rec w = {CDP_WRITE, 0, fid, off, INT64_MIN, chunk_buf, (uint32_t)got};
        append(&w, 1, fid);
        off += (uint64_t)got;
    }
    (void)tmp;
    R(close)(fd);
}

static int cap_rename(int olddir, const char *old, int newdir, const char *new, unsigned flags,
                      int (*call)(int, const char *, int, const char *, unsigned))
{
    if (!capturing())
        return call(olddir, old, newdir, new, flags);
    char ao[PATH_MAX], an[PATH_MAX], ro[PATH_MAX], rn[PATH_MAX];
    int held = lock();
    int ok_o = abs_path(olddir, old, ao, sizeof ao), ok_n = abs_path(newdir, new, an, sizeof an);
    int r = call(olddir, old, newdir, new, flags), err = errno;
    if (r == 0 && held) {
        int io = ok_o && rel_of(ao, ro, sizeof ro), in = ok_n && rel_of(an, rn, sizeof rn);
        if (flags & RENAME_EXCHANGE) {
            if (io && in) {
                char tmp[PATH_MAX];
                snprintf(tmp, sizeof tmp, "%s.cdp-exchange", rn);
                ns_record(CDP_RENAME, 0, ro, tmp);
                ns_record(CDP_RENAME, 0, rn, ro);
                ns_record(CDP_RENAME, 0, tmp, rn);
            } else if (io) {
                ns_record(CDP_UNLINK, 0, ro, NULL);
                arrived(ao, ro);
            } else if (in) {
                ns_record(CDP_UNLINK, 0, rn, NULL);
                arrived(an, rn);
            }
        } else if (io && in) {
            ns_record(CDP_RENAME, 0, ro, rn);
        } else if (io) {
            struct stat st;
            int isdir = lstat(an, &st) == 0 && S_ISDIR(st.st_mode);
            ns_record(isdir ? CDP_RMDIR : CDP_UNLINK, 0, ro, NULL);
        } else if (in) {
            struct stat st;
            if (lstat(an, &st) == 0 && S_ISDIR(st.st_mode))
                ns_record(CDP_RMDIR, 0, rn, NULL);
            else
                ns_record(CDP_UNLINK, 0, rn, NULL);
            arrived(an, rn);
        }
    }
    unlock(held);
    errno = err;
    return r;
}

static int rc_renameat2(int a, const char *b, int c, const char *d, unsigned f)
{
    return f ? R(renameat2)(a, b, c, d, f) : R(renameat)(a, b, c, d);
}

EXPORT int rename(const char *a, const char *b) { return cap_rename(AT_FDCWD, a, AT_FDCWD, b, 0, rc_renameat2); }
EXPORT int renameat(int da, const char *a, int db, const char *b) { return cap_rename(da, a, db, b, 0, rc_renameat2); }
EXPORT int renameat2(int da, const char *a, int db, const char *b, unsigned f)
{
    return cap_rename(da, a, db, b, f, rc_renameat2);
}

static int cap_unlink(int dirfd, const char *path, int flags)
{
    if (!capturing())
        return R(unlinkat)(dirfd, path, flags);
    char r[PATH_MAX];
    int held = lock();
    int in = rel_at(dirfd, path, r, sizeof r);
    int res = R(unlinkat)(dirfd, path, flags), err = errno;
    if (res == 0 && held && in)
        ns_record((flags & AT_REMOVEDIR) ? CDP_RMDIR : CDP_UNLINK, 0, r, NULL);
    unlock(held);
    errno = err;
    return res;
}

EXPORT int unlink(const char *p) { return cap_unlink(AT_FDCWD, p, 0); }
EXPORT int unlinkat(int d, const char *p, int f) { return cap_unlink(d, p, f); }
EXPORT int rmdir(const char *p) { return cap_unlink(AT_FDCWD, p, AT_REMOVEDIR); }

static int cap_mkdir(int dirfd, const char *path, mode_t mode)
{
    if (!capturing())
        return R(mkdirat)(dirfd, path, mode);
    char a[PATH_MAX], r[PATH_MAX];
    int held = lock();
    int res = R(mkdirat)(dirfd, path, mode), err = errno;
    struct stat st;
    if (res == 0 && held && abs_path(dirfd, path, a, sizeof a) && rel_of(a, r, sizeof r) &&
        lstat(a, &st) == 0)
        ns_record(CDP_MKDIR, st.st_mode & 07777, r, NULL);
    unlock(held);
    errno = err;
    return res;
}

EXPORT int mkdir(const char *p, mode_t m) { return cap_mkdir(AT_FDCWD, p, m); }
EXPORT int mkdirat(int d, const char *p, mode_t m) { return cap_mkdir(d, p, m); }

static int cap_symlink(const char *target, int dirfd, const char *path)
{
    if (!capturing())
        return R(symlinkat)(target, dirfd, path);
    char r[PATH_MAX];
    int held = lock();
    int res = R(symlinkat)(target, dirfd, path), err = errno;
    if (res == 0 && held && rel_at(dirfd, path, r, sizeof r))
        ns_record(CDP_SYMLINK, 0, target, r);
    unlock(held);
    errno = err;
    return res;
}

EXPORT int symlink(const char *t, const char *p) { return cap_symlink(t, AT_FDCWD, p); }
EXPORT int symlinkat(const char *t, int d, const char *p) { return cap_symlink(t, d, p); }

static int cap_link(int olddir, const char *old, int newdir, const char *new, int flags)
{
    if (!capturing())
        return R(linkat)(olddir, old, newdir, new, flags);
    char ao[PATH_MAX], an[PATH_MAX], ro[PATH_MAX], rn[PATH_MAX];
    int held = lock();
    int ok_o = 0;
    if ((flags & AT_EMPTY_PATH) && (!old || !*old))
        ok_o = fd_path(olddir, ao, sizeof ao);
    else if (flags & AT_SYMLINK_FOLLOW)
        ok_o = realpath(old, ao) != NULL; /* best effort: relative to cwd */
    else
        ok_o = abs_path(olddir, old, ao, sizeof ao);
    int res = R(linkat)(olddir, old, newdir, new, flags), err = errno;
    if (res == 0 && held && abs_path(newdir, new, an, sizeof an) && rel_of(an, rn, sizeof rn)) {
        if (ok_o && rel_of(ao, ro, sizeof ro))
            ns_record(CDP_LINK, 0, ro, rn);
        else
            arrived(an, rn);
    }
    unlock(held);
    errno = err;
    return res;
}

EXPORT int link(const char *a, const char *b) { return cap_link(AT_FDCWD, a, AT_FDCWD, b, 0); }
EXPORT int linkat(int da, const char *a, int db, const char *b, int f) { return cap_link(da, a, db, b, f); }

/* SETATTR of the path's mode and/or mtime as the file system now has them. */
static void setattr_abs(const char *abs, int mode, int mtime)
{
    char r[PATH_MAX], pay[8 + PATH_MAX];
    struct stat st;
    if (!rel_of(abs, r, sizeof r) || lstat(abs, &st) < 0 || S_ISLNK(st.st_mode))
        return;
    int64_t us = mtime ? (int64_t)st.st_mtim.tv_sec * 1000000 + st.st_mtim.tv_nsec / 1000 : INT64_MIN;
    uint64_t m = mode ? (uint64_t)(st.st_mode & 07777) : UINT64_MAX;
    size_t k = strlen(r);
    memcpy(pay, &us, 8);
    memcpy(pay + 8, r, k);
    struct cdp_rec rec = {CDP_SETATTR, 0, 0, m, INT64_MIN, pay, (uint32_t)(8 + k)};
    append(&rec, 1, 0);
}

static int cap_attr_at(int dirfd, const char *path, int mode, int mtime, int follow,
                       int (*call)(void *), void *arg)
{
    if (!capturing())
        return call(arg);
    int held = lock();
    int res = call(arg), err = errno;
    char a[PATH_MAX];
    if (res == 0 && held) {
        int ok;
        if (!path)
            ok = fd_path(dirfd, a, sizeof a);
        else if (follow && path[0] == '/')
            ok = realpath(path, a) != NULL;
        else
            ok = abs_path(dirfd, path, a, sizeof a);
        if (ok && follow) {
            char t[PATH_MAX];
            if (realpath(a, t))
                strcpy(a, t);
        }
        if (ok)
            setattr_abs(a, mode, mtime);
    }
    unlock(held);
    errno = err;
    return res;
}

struct chmod_args { int dirfd; const char *path; mode_t mode; int flags; };
static int call_fchmodat(void *p)
{
    struct chmod_args *a = p;
    return R(fchmodat)(a->dirfd, a->path, a->mode, a->flags);
}
static int call_fchmod(void *p)
{
    struct chmod_args *a = p;
    return R(fchmod)(a->dirfd, a->mode);
}

EXPORT int chmod(const char *path, mode_t mode)
{
    struct chmod_args a = {AT_FDCWD, path, mode, 0};
    return cap_attr_at(AT_FDCWD, path, 1, 0, 1, call_fchmodat, &a);
}

EXPORT int fchmodat(int dirfd, const char *path, mode_t mode, int flags)
{
    struct chmod_args a = {dirfd, path, mode, flags};
    return cap_attr_at(dirfd, path, 1, 0, !(flags & AT_SYMLINK_NOFOLLOW), call_fchmodat, &a);
}

EXPORT int fchmod(int fd, mode_t mode)
{
    struct chmod_args a = {fd, NULL, mode, 0};
    return cap_attr_at(fd, NULL, 1, 0, 0, call_fchmod, &a);
}

struct ut_args { int dirfd; const char *path; const struct timespec *ts; int flags; };
static int call_utimensat(void *p)
{
    struct ut_args *a = p;
    return R(utimensat)(a->dirfd, a->path, a->ts, a->flags);
}
static int call_futimens(void *p)
{
    struct ut_args *a = p;
    return R(futimens)(a->dirfd, a->ts);
}

EXPORT int utimensat(int dirfd, const char *path, const struct timespec ts[2], int flags)
{
    struct ut_args a = {dirfd, path, ts, flags};
    if (!path) /* utimensat(fd, NULL, ...) is futimens */
        return cap_attr_at(dirfd, NULL, 0, 1, 0, call_utimensat, &a);
    return cap_attr_at(dirfd, path, 0, 1, !(flags & AT_SYMLINK_NOFOLLOW), call_utimensat, &a);
}

EXPORT int futimens(int fd, const struct timespec ts[2])
{
    struct ut_args a = {fd, NULL, ts, 0};
    return cap_attr_at(fd, NULL, 0, 1, 0, call_futimens, &a);
}

struct utimes_args { const char *path; const struct timeval *tv; };
static int call_utimes(void *p)
{
    struct utimes_args *a = p;
    return R(utimes)(a->path, a->tv);
}

EXPORT int utimes(const char *path, const struct timeval tv[2])
{
    struct utimes_args a = {path, tv};
    return cap_attr_at(AT_FDCWD, path, 0, 1, 1, call_utimes, &a);
}

/* ---- descriptors ----------------------------------------------------------------------------- */

static void copy_ent(int from, int to)
{
    struct fdent *a = ent(from), *b = ent(to);
    if (b)
        *b = a ? *a : (struct fdent){0};
}

EXPORT int dup(int fd)
{
    int r = R(dup)(fd);
    if (r >= 0 && active)
        copy_ent(fd, r);
    return r;
}

EXPORT int dup2(int fd, int fd2)
{
    int r = R(dup2)(fd, fd2);
    if (r >= 0 && active)
        copy_ent(fd, r);
    return r;
}

EXPORT int dup3(int fd, int fd2, int flags)
{
    int r = R(dup3)(fd, fd2, flags);
    if (r >= 0 && active)
        copy_ent(fd, r);
    return r;
}

static int cap_fcntl(int fd, int cmd, void *arg, int (*call)(int, int, ...))
{
    int r = call(fd, cmd, arg);
    if (r < 0 || !active)
        return r;
    int err = errno;
    if (cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC)
        copy_ent(fd, r);
    else if (cmd == F_SETFL && ent(fd) && ent(fd)->state == FD_TRACK)
        ent(fd)->append = ((long)arg & O_APPEND) != 0;
    errno = err;
    return r;
}

EXPORT int fcntl(int fd, int cmd, ...)
{
    va_list ap;
    va_start(ap, cmd);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    return cap_fcntl(fd, cmd, arg, R(fcntl));
}

EXPORT int fcntl64(int fd, int cmd, ...)
{
    va_list ap;
    va_start(ap, cmd);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    return cap_fcntl(fd, cmd, arg, R(fcntl64));
}

EXPORT int close(int fd)
{
    struct fdent *e = active ? ent(fd) : NULL;
    if (e)
        *e = (struct fdent){0};
    return R(close)(fd);
}

/* ---- what cannot be seen: mark dirty ---------------------------------------------------------- */

static void *cap_mmap(void *addr, size_t len, int prot, int flags, int fd, off64_t off,
                      void *(*call)(void *, size_t, int, int, int, off64_t))
{
    void *p = call(addr, len, prot, flags, fd, off);
    if (p == MAP_FAILED || !capturing() || !(prot & PROT_WRITE) || !(flags & MAP_SHARED) || fd < 0)
        return p;
    int err = errno;
    struct fdent *e = classify(fd);
    if (e && e->state == FD_TRACK) {
        int held = lock();
        if (held)
            mark_dirty(fd, e, (uint64_t)off, len, "capture: writable shared mmap");
        unlock(held);
        if (!warned_mmap) {
            char a[PATH_MAX];
            warned_mmap = 1;
            if (!fd_path(fd, a, sizeof a))
                strcpy(a, "?");
            warn("cdpcore capture: %s is mapped shared and writable; writes through the mapping "
                 "cannot be seen: marked dirty (resync repairs it)\n", a);
        }
    }
    errno = err;
    return p;
}

static void *rm_mmap(void *a, size_t l, int p, int f, int fd, off64_t o) { return R(mmap64)(a, l, p, f, fd, o); }

EXPORT void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
    return cap_mmap(addr, len, prot, flags, fd, off, rm_mmap);
}

EXPORT void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off64_t off)
{
    return cap_mmap(addr, len, prot, flags, fd, off, rm_mmap);
}

/* syscall(2): a program that issues write-like system calls by number goes
 * around every wrapper. The call still runs; the file is marked dirty. */
EXPORT long syscall(long nr, ...)
{
    va_list ap;
    va_start(ap, nr);
    long a[6];
    for (int i = 0; i < 6; i++)
        a[i] = va_arg(ap, long);
    va_end(ap);
    long r = R(syscall)(nr, a[0], a[1], a[2], a[3], a[4], a[5]);
    if (!capturing())
        return r;
    int err = errno;
    if (nr == SYS_io_uring_setup && r >= 0 && !warned_uring) {
        warned_uring = 1;
        warn("cdpcore capture: the program set up io_uring; its writes cannot be seen: "
             "run `cdpctl resync` (protect does at exit)\n");
    }
    int fdarg = -1;
    switch (nr) {
    case SYS_write: case SYS_pwrite64: case SYS_writev: case SYS_pwritev: case SYS_pwritev2:
    case SYS_ftruncate: case SYS_fallocate:
        fdarg = (int)a[0];
        break;
    case SYS_copy_file_range: case SYS_splice:
        fdarg = (int)a[2];
        break;
    case SYS_sendfile:
        fdarg = (int)a[0];
        break;
    }
    if (fdarg >= 0 && r >= 0) {
        struct fdent *e = classify(fdarg);
        if (e && e->state == FD_TRACK) {
            int held = lock();
            if (held)
                mark_dirty(fdarg, e, 0, 0, "capture: raw system call");
            unlock(held);
            if (!warned_raw) {
                warned_raw = 1;
                warn("cdpcore capture: a raw write system call went around capture: file marked "
                     "dirty (resync repairs it)\n");
            }
        }
    }
    errno = err;
    return r;
}

/* ---- exec: capture carries on ------------------------------------------------------------------------ */

/* A program that execs with an environment of its own (env -i, a daemon
 * that sanitises it) would start its child uncaptured: put the capture's
 * variables back. Returns envp itself when nothing is missing. */
static char *const *capture_envp(char *const envp[], char **extra, char ***out_heap)
{
    static const char *names[3] = {"LD_PRELOAD=", "CDPCORE_JOURNAL=", "CDPCORE_ROOT="};
    int have[3] = {0, 0, 0}, n = 0;
    for (; envp && envp[n]; n++)
        for (int k = 0; k < 3; k++)
            if (strncmp(envp[n], names[k], strlen(names[k])) == 0)
                have[k] = 1;
    int missing = 0;
    for (int k = 0; k < 3; k++) {
        if (!have[k]) {
            char var[32];
            size_t l = strlen(names[k]) - 1;
            memcpy(var, names[k], l);
            var[l] = 0;
            const char *val = saved_env[k];
            if (!val[0])
                continue;
            size_t len = l + 1 + strlen(val) + 1;
            extra[missing] = malloc(len);
            if (!extra[missing])
                continue;
            snprintf(extra[missing], len, "%s=%s", var, val);
            missing++;
        }
    }
    if (!missing)
        return envp;
    char **e = malloc(sizeof(char *) * (size_t)(n + missing + 1));
    if (!e)
        return envp;
    for (int i = 0; i < n; i++)
        e[i] = envp[i];
    for (int i = 0; i < missing; i++)
        e[n + i] = extra[i];
    e[n + missing] = NULL;
    *out_heap = e;
    return e;
}

EXPORT int execve(const char *path, char *const argv[], char *const envp[])
{
    if (!active)
        return R(execve)(path, argv, envp);
    char *extra[3] = {0}, **heap = NULL;
    char *const *e = capture_envp(envp, extra, &heap);
    int r = R(execve)(path, argv, e);
    int err = errno;
    free(heap);
    for (int i = 0; i < 3; i++)
        free(extra[i]);
    errno = err;
    return r;
}

EXPORT int execvpe(const char *file, char *const argv[], char *const envp[])
{
    if (!active)
        return R(execvpe)(file, argv, envp);
    char *extra[3] = {0}, **heap = NULL;
    char *const *e = capture_envp(envp, extra, &heap);
    int r = R(execvpe)(file, argv, e);
    int err = errno;
    free(heap);
    for (int i = 0; i < 3; i++)
        free(extra[i]);
    errno = err;
    return r;
}

/* ---- ABI ------------------------------------------------------------------------------------------ */

EXPORT int cdp_preload_abi_version(void)
{
    return 1;
}

EXPORT uint32_t cdp_preload_crc32c(const void *buf, size_t len)
{
    return cdp_crc32c(0, buf, len);
}
