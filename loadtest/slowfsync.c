/* Emulates a slower disk flush: sleeps SLOW_FSYNC_US microseconds (default 500) before the real
 * fsync and fdatasync. Loaded into a PostgreSQL server with LD_PRELOAD by loadtest/slowpg.py.
 * PostgreSQL's default wal_sync_method on Linux is fdatasync. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <time.h>

static long pause_ns = -1;

static void slow_down(void) {
    if (pause_ns < 0) {
        const char *configured = getenv("SLOW_FSYNC_US");
        pause_ns = (configured ? atol(configured) : 500) * 1000L;
    }
    struct timespec pause = {pause_ns / 1000000000L, pause_ns % 1000000000L};
    nanosleep(&pause, NULL);
}

int fsync(int fd) {
    static int (*real)(int) = NULL;
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    slow_down();
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int) = NULL;
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    slow_down();
    return real(fd);
}
