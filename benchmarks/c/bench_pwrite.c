/* The capture overhead benchmark's program: N random 4 KiB pwrite calls on
 * an existing file (in page cache), optionally fdatasync every K writes.
 * Prints the elapsed wall seconds of the loop, then its peak RSS (VmHWM). Run captured (LD_PRELOAD)
 * and uncaptured by benchmarks/_capture_bench.py.
 * usage: bench_pwrite FILE COUNT SYNC_EVERY SEED */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: %s FILE COUNT SYNC_EVERY SEED\n", argv[0]);
        return 2;
    }
    long count = atol(argv[2]), every = atol(argv[3]);
    uint64_t s = (uint64_t)atoll(argv[4]) * 0x9E3779B97F4A7C15ull + 1;
    int fd = open(argv[1], O_RDWR);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) {
        perror(argv[1]);
        return 1;
    }
    uint64_t pages = (uint64_t)st.st_size / 4096;
    static char buf[4096];
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < count; i++) {
        s ^= s << 13; s ^= s >> 7; s ^= s << 17;
        buf[i & 4095] = (char)s;
        if (pwrite(fd, buf, sizeof buf, (off_t)((s % pages) * 4096)) != (ssize_t)sizeof buf) {
            perror("pwrite");
            return 1;
        }
        if (every && (i + 1) % every == 0 && fdatasync(fd) < 0) {
            perror("fdatasync");
            return 1;
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("%.6f\n", (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9);
    /* peak resident memory, to report what the capture library adds */
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, "VmHWM:", 6) == 0)
            printf("%s", line);
    if (f)
        fclose(f);
    return 0;
}
