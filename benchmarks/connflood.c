/*
 * connflood HOST PORT CONCURRENCY SECONDS
 *
 * Keeps CONCURRENCY TCP connects in flight to HOST:PORT for SECONDS.  The
 * server is expected to close each connection at once; a connection counts
 * when the server's close arrives (EOF or reset), and is replaced by a new
 * connect immediately.  Prints one line:
 *
 *     completed=N errors=E seconds=S rate=R
 *
 * Built by benchmarks/run.py with `gcc -O2`; run.py falls back to a Python
 * client with the same output when no C compiler is available.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static struct sockaddr_in target;
static int ep;
static long errors;

static int open_one(void) {
    for (int attempt = 0; attempt < 1000; attempt++) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) { errors++; continue; }
        int r = connect(fd, (struct sockaddr *)&target, sizeof target);
        if (r < 0 && errno != EINPROGRESS) {
            errors++;
            close(fd);
            continue;
        }
        struct epoll_event ev = { .events = EPOLLIN | EPOLLRDHUP, .data.fd = fd };
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) { errors++; close(fd); continue; }
        return fd;
    }
    return -1;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s HOST PORT CONCURRENCY SECONDS\n", argv[0]);
        return 2;
    }
    memset(&target, 0, sizeof target);
    target.sin_family = AF_INET;
    target.sin_port = htons((unsigned short)atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &target.sin_addr) != 1) {
        fprintf(stderr, "bad address %s\n", argv[1]);
        return 2;
    }
    int concurrency = atoi(argv[3]);
    double seconds = atof(argv[4]);
    ep = epoll_create1(EPOLL_CLOEXEC);
    for (int i = 0; i < concurrency; i++) {
        if (open_one() < 0) { fprintf(stderr, "cannot connect\n"); return 1; }
    }
    long completed = 0;
    double start = now(), end = start + seconds, t = start;
    struct epoll_event events[256];
    char buf[512];
    while ((t = now()) < end) {
        int n = epoll_wait(ep, events, 256, 50);
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            int done = 0;
            if (events[i].events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err && err != ECONNRESET && err != EPIPE) errors++;
                else completed++;
                done = 1;
            } else {
                ssize_t r = recv(fd, buf, sizeof buf, 0);
                if (r == 0) { completed++; done = 1; }
                else if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
                    if (errno == ECONNRESET) completed++; else errors++;
                    done = 1;
                }
            }
            if (done) {
                close(fd); /* also removes it from the epoll set */
                if (open_one() < 0) { fprintf(stderr, "cannot connect\n"); return 1; }
            }
        }
    }
    double elapsed = now() - start;
    printf("completed=%ld errors=%ld seconds=%.3f rate=%.1f\n",
           completed, errors, elapsed, completed / elapsed);
    return 0;
}
