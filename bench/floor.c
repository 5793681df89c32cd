/* The machine's own round trip, for nbd-bench.py's Floor section: two processes on a Unix
 * socket pair play one NBD-sized exchange per iteration (a 32-byte request one way, a 16-byte
 * reply header and 4 KiB of data back), blocking reads, one request in flight: what QD1 4 KiB
 * randread costs with no server work at all. Prints the mean round trip in microseconds.
 *
 * usage: floor SECONDS */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int full(int fd, char *buf, size_t n, int writing) {
    size_t done = 0;
    while (done < n) {
        ssize_t r = writing ? write(fd, buf + done, n - done) : read(fd, buf + done, n - done);
        if (r <= 0) return -1;
        done += (size_t)r;
    }
    return 0;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    double secs = argc > 1 ? atof(argv[1]) : 2.0;
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0) { perror("socketpair"); return 1; }
    static char req[32], rep[16 + 4096];
    pid_t pid = fork();
    if (pid < 0) { perror("fork"); return 1; }
    if (pid == 0) { /* the "server": answer every request */
        close(sv[0]);
        while (full(sv[1], req, sizeof req, 0) == 0)
            if (full(sv[1], rep, sizeof rep, 1) < 0) break;
        _exit(0);
    }
    close(sv[1]);
    for (int i = 0; i < 1000; i++) { /* warm-up */
        full(sv[0], req, sizeof req, 1);
        full(sv[0], rep, sizeof rep, 0);
    }
    long n = 0;
    double t0 = now(), t;
    do {
        for (int i = 0; i < 100; i++) {
            if (full(sv[0], req, sizeof req, 1) < 0 || full(sv[0], rep, sizeof rep, 0) < 0) {
                fprintf(stderr, "floor: peer gone\n");
                return 1;
            }
        }
        n += 100;
        t = now();
    } while (t - t0 < secs);
    close(sv[0]);
    waitpid(pid, NULL, 0);
    printf("%.3f %ld\n", (t - t0) / n * 1e6, n);
    return 0;
}
