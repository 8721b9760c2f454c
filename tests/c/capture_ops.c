/* Exercises the write paths the capture library interposes, in the current
 * directory (a protected root). Used by tests/test_capture.py; every call's
 * own result is checked, so a wrapper that changed a result fails here. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define CHECK(x) do { if (!(x)) { fprintf(stderr, "capture_ops: %s failed at line %d: %s\n", #x, __LINE__, strerror(errno)); exit(1); } } while (0)

static char buf[65536];

static void *thread_writer(void *arg)
{
    long id = (long)arg;
    int fd = open("threads.bin", O_WRONLY);
    CHECK(fd >= 0);
    char b[4096];
    unsigned s = (unsigned)id * 7919u;
    for (int i = 0; i < 400; i++) {
        s = s * 1103515245u + 12345u;
        memset(b, 'a' + (int)((id + i) % 26), sizeof b);
        off_t at = (off_t)((s >> 8) % 64) * 1024; /* overlapping, unaligned */
        CHECK(pwrite(fd, b, sizeof b, at) == (ssize_t)sizeof b);
        if (i % 50 == 0)
            CHECK(fdatasync(fd) == 0);
    }
    close(fd);
    return NULL;
}

int main(int argc, char **argv)
{
    const char *outside = argc > 1 ? argv[1] : NULL; /* a directory outside the root */
    for (size_t i = 0; i < sizeof buf; i++)
        buf[i] = (char)(i * 31 + 7);

    /* write / pwrite / writev / pwritev / pwritev2 / O_APPEND */
    int fd = open("a.bin", O_RDWR | O_CREAT | O_TRUNC, 0640);
    CHECK(fd >= 0);
    CHECK(write(fd, buf, 10000) == 10000);
    CHECK(pwrite(fd, buf + 100, 5000, 20000) == 5000);
    struct iovec iov[3] = {{buf, 100}, {buf + 1000, 200}, {buf + 3000, 300}};
    CHECK(writev(fd, iov, 3) == 600);
    CHECK(pwritev(fd, iov, 3, 30000) == 600);
    CHECK(pwritev2(fd, iov, 2, 40000, 0) == 300);
    CHECK(pwritev2(fd, iov, 1, -1, 0) == 100);
    CHECK(fsync(fd) == 0);
    close(fd);
    fd = open("log.txt", O_WRONLY | O_CREAT | O_APPEND, 0644);
    CHECK(fd >= 0);
    for (int i = 0; i < 20; i++) {
        char line[64];
        int n = snprintf(line, sizeof line, "line %d\n", i);
        CHECK(write(fd, line, (size_t)n) == n);
        CHECK(pwrite(fd, "P", 1, 0) == 1); /* O_APPEND: pwrite appends too on Linux */
    }
    close(fd);

    /* ftruncate / truncate / fallocate (grow, punch hole, zero range) / posix_fallocate */
    fd = open("sized.bin", O_RDWR | O_CREAT, 0600);
    CHECK(fd >= 0);
    CHECK(write(fd, buf, 65536) == 65536);
    CHECK(ftruncate(fd, 50000) == 0);
    CHECK(fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, 8192) == 0);
    CHECK(fallocate(fd, 0, 0, 70000) == 0);
    CHECK(posix_fallocate(fd, 0, 90000) == 0);
    close(fd);
    fd = open("grown.bin", O_RDWR | O_CREAT, 0600);
    CHECK(write(fd, buf, 3000) == 3000);
    close(fd);
    CHECK(truncate("grown.bin", 100) == 0);
    CHECK(truncate("grown.bin", 9000) == 0);

    /* copy_file_range, sendfile, splice into a file */
    int in = open("a.bin", O_RDONLY);
    int out = open("copy.bin", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    CHECK(in >= 0 && out >= 0);
    loff_t oi = 0, oo = 100;
    CHECK(copy_file_range(in, &oi, out, &oo, 20000, 0) == 20000);
    CHECK(copy_file_range(in, NULL, out, NULL, 5000, 0) == 5000);
    off_t so = 1000;
    CHECK(sendfile(out, in, &so, 3000) == 3000);
    int p[2];
    CHECK(pipe(p) == 0);
    CHECK(write(p[1], "spliced!", 8) == 8);
    loff_t spo = 50000;
    CHECK(splice(p[0], NULL, out, &spo, 8, 0) == 8);
    close(p[0]);
    close(p[1]);
    close(in);
    close(out);

    /* dup / dup2 / dup3 / fcntl(F_DUPFD) then write through the copies */
    fd = open("dup.txt", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    int d1 = dup(fd), d2 = dup2(fd, 40), d3 = dup3(fd, 41, O_CLOEXEC), d4 = fcntl(fd, F_DUPFD, 50);
    CHECK(d1 >= 0 && d2 == 40 && d3 == 41 && d4 >= 50);
    close(fd);
    CHECK(write(d1, "one ", 4) == 4);
    CHECK(write(d2, "two ", 4) == 4);
    CHECK(write(d3, "three ", 6) == 6);
    CHECK(write(d4, "four\n", 5) == 5);
    close(d1); close(d2); close(d3); close(d4);

    /* O_SYNC / O_DSYNC, sync_file_range(WAIT_AFTER), fdatasync */
    fd = open("sync.bin", O_WRONLY | O_CREAT | O_DSYNC, 0644);
    CHECK(write(fd, buf, 4096) == 4096);
    close(fd);
    fd = open("sync.bin", O_WRONLY | O_SYNC);
    CHECK(pwrite(fd, "S", 1, 10) == 1);
    CHECK(sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE |
                                         SYNC_FILE_RANGE_WAIT_AFTER) == 0);
    CHECK(fdatasync(fd) == 0);
    close(fd);

    /* namespace: mkdir, rename, renameat2 (NOREPLACE, EXCHANGE), link, symlink, unlink, rmdir */
    CHECK(mkdir("d1", 0750) == 0);
    CHECK(mkdir("d1/sub", 0700) == 0);
    fd = creat("d1/sub/f", 0600);
    CHECK(fd >= 0 && write(fd, "in sub\n", 7) == 7);
    close(fd);
    CHECK(rename("d1", "d2") == 0);
    CHECK(renameat2(AT_FDCWD, "dup.txt", AT_FDCWD, "dup2.txt", RENAME_NOREPLACE) == 0);
    fd = open("x1", O_WRONLY | O_CREAT, 0644);
    CHECK(write(fd, "x1", 2) == 2);
    close(fd);
    fd = open("x2", O_WRONLY | O_CREAT, 0644);
    CHECK(write(fd, "x2x2", 4) == 4);
    close(fd);
    CHECK(renameat2(AT_FDCWD, "x1", AT_FDCWD, "x2", RENAME_EXCHANGE) == 0);
    CHECK(link("x1", "x1.hard") == 0);
    CHECK(symlink("d2/sub/f", "lnk") == 0);
    CHECK(symlink("/nowhere/at/all", "dangling") == 0);
    fd = open("gone", O_WRONLY | O_CREAT, 0644);
    close(fd);
    CHECK(unlink("gone") == 0);
    CHECK(mkdir("empty", 0755) == 0);
    CHECK(rmdir("empty") == 0);
    int dfd = open("d2", O_RDONLY | O_DIRECTORY);
    CHECK(dfd >= 0);
    fd = openat(dfd, "at.txt", O_WRONLY | O_CREAT | O_EXCL, 0644);
    CHECK(fd >= 0 && write(fd, "openat\n", 7) == 7);
    close(fd);
    CHECK(renameat(dfd, "at.txt", dfd, "sub/at2.txt") == 0);
    CHECK(unlinkat(dfd, "sub/f", 0) == 0);
    close(dfd);

    /* chmod / fchmod / utimensat / futimens */
    CHECK(chmod("a.bin", 0604) == 0);
    fd = open("log.txt", O_WRONLY);
    CHECK(fchmod(fd, 0612) == 0);
    struct timespec ts[2] = {{1000000000, 0}, {1500000000, 123456000}};
    CHECK(futimens(fd, ts) == 0);
    close(fd);
    ts[1].tv_sec = 1600000000;
    CHECK(utimensat(AT_FDCWD, "copy.bin", ts, 0) == 0);

    /* a file moved in from outside the root, and one moved out */
    if (outside) {
        char path[4096];
        snprintf(path, sizeof path, "%s/incoming", outside);
        fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        CHECK(fd >= 0 && write(fd, buf, 7777) == 7777);
        close(fd);
        CHECK(rename(path, "incoming") == 0);
        snprintf(path, sizeof path, "%s/outgoing", outside);
        CHECK(rename("grown.bin", path) == 0);
    }

    /* stdio: fopen/fprintf/fwrite/fclose and an fflush'd stream left open */
    FILE *f = fopen("stdio.txt", "w");
    CHECK(f != NULL);
    for (int i = 0; i < 1000; i++)
        fprintf(f, "row %d\n", i);
    fwrite(buf, 1, 20000, f);
    CHECK(fclose(f) == 0);
    f = fopen("stdio.txt", "a");
    fputs("appended\n", f);
    CHECK(fclose(f) == 0);
    static FILE *left;
    left = fopen("left_open.txt", "w");
    fputs("flushed at exit only\n", left);

    /* threads writing overlapping ranges of one file */
    fd = open("threads.bin", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    close(fd);
    pthread_t th[4];
    for (long i = 0; i < 4; i++)
        CHECK(pthread_create(&th[i], NULL, thread_writer, (void *)i) == 0);
    for (int i = 0; i < 4; i++)
        pthread_join(th[i], NULL);

    /* fork: children keep capturing (same file, O_APPEND) */
    fd = open("forked.txt", O_WRONLY | O_CREAT | O_APPEND, 0644);
    for (int c = 0; c < 3; c++) {
        pid_t pid = fork();
        CHECK(pid >= 0);
        if (pid == 0) {
            for (int i = 0; i < 50; i++) {
                char line[64];
                int n = snprintf(line, sizeof line, "child %d line %d\n", c, i);
                if (write(fd, line, (size_t)n) != n)
                    _exit(1);
            }
            _exit(0);
        }
    }
    for (int c = 0; c < 3; c++) {
        int st;
        CHECK(wait(&st) > 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0);
    }
    close(fd);

    /* exec: the child program is captured too */
    pid_t pid = fork();
    if (pid == 0) {
        execl("/bin/sh", "sh", "-c", "echo from exec > exec.txt", (char *)NULL);
        _exit(127);
    }
    int st;
    CHECK(waitpid(pid, &st, 0) == pid && WIFEXITED(st) && WEXITSTATUS(st) == 0);
    /* exec with an environment of its own: capture must carry on */
    pid = fork();
    if (pid == 0) {
        char *const args[] = {"sh", "-c", "echo without env > envless.txt", NULL};
        char *const env[] = {"PATH=/usr/bin:/bin", NULL};
        execve("/bin/sh", args, env);
        _exit(127);
    }
    CHECK(waitpid(pid, &st, 0) == pid && WIFEXITED(st) && WEXITSTATUS(st) == 0);

    /* what cannot be seen: a shared writable mapping and a raw write syscall */
    fd = open("mapped.bin", O_RDWR | O_CREAT | O_TRUNC, 0644);
    CHECK(ftruncate(fd, 8192) == 0);
    char *m = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    CHECK(m != MAP_FAILED);
    memcpy(m + 100, "through the mapping", 19);
    CHECK(msync(m, 8192, MS_SYNC) == 0);
    munmap(m, 8192);
    CHECK(syscall(SYS_pwrite64, fd, "raw", 3, 5000) == 3);
    close(fd);
    return 0;
}
