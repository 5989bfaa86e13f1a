/* cloadgen: the broker benchmark's C load generator (tools/bench.py builds and runs it).
 *
 * One process, two threads: a publisher thread and a subscriber thread, each with its own
 * epoll set over non-blocking MQTT 3.1.1 connections to 127.0.0.1:PORT (the subscribers to
 * 127.0.0.1:SUB_PORT if --sub-port is given: another node of a cluster). Modes:
 *
 *   fanin    P publishers x M messages to bench/NNNN/t (QoS 0 or 1, window W per
 *            publisher refilled by halves), 1 subscriber on bench/# (clean or persistent)
 *   fanout   1 QoS 0 publisher x M messages to bench/fanout, S subscribers on it
 *   latency  1 QoS 0 publisher at RATE msg/s (open loop) for M messages, 1 subscriber
 *   connect  N idle clients (3.1.1, keepalive 0, clean session) connecting as fast as the
 *            broker answers, at most PENDING handshakes in flight over T threads; the
 *            source addresses spread over 127.0.0.1..127.0.0.S (IP_BIND_ADDRESS_NO_PORT: the
 *            port is picked at connect, per destination) so that no address runs out of
 *            ephemeral ports. Measures go -> last CONNACK; then holds every connection
 *            until a line "close" (or EOF) on stdin, closes them and exits. A run where no
 *            CONNACK came for --stall seconds while handshakes were in flight stops there
 *            (the broker is at its fd limit): what was connected is held and reported.
 *
 * The run ends when every message has arrived (and, QoS 1, every PUBACK is in), at the
 * timeout, or when the publishers are done, nothing has arrived for 3 s and the broker
 * (--broker-pid, read from /proc) has used at most 10% of a core for 1 s: a broker that
 * dropped messages is not waited for, one still working through a backlog is.
 *
 * Protocol with the caller: connect and subscribe everything, print one line
 * {"ready": ...}, wait for a line "go" on stdin (the caller samples the broker first),
 * run, print one JSON line with the results, DISCONNECT, exit.
 *
 * Every payload is 64 bytes and starts with (publisher u16, seq u32, send time i64
 * CLOCK_MONOTONIC ns), big-endian: the layout of tools/loadgen.py, so that a
 * subscriber counts arrivals per (publisher, seq) exactly: lost = never arrived,
 * duplicated = arrived more than once, out of order = a first arrival with a lower seq
 * than one already seen from the same publisher. The streams are encoded before the
 * go line; during the run a publisher only writes the send time into each chunk of
 * packets just before writing it. C99 + POSIX threads + Linux epoll.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/ip.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <poll.h>
#include <time.h>
#include <unistd.h>

#define PAYLOAD_SIZE 64
#define RECV_SIZE (1 << 18)
#define REST_MAX 1024      /* an incomplete packet kept between reads (ours are < 128 B) */
#define SETTLE_NS 3000000000LL /* publishers done and nothing for this long: stop, */
#define IDLE_NS 1000000000LL   /* if the broker (--broker-pid) has been idle this long */
#define IDLE_TICKS_PER_100MS 1 /* idle: at most 10 ms of CPU in 100 ms */
#define SETUP_TIMEOUT_S 60
#define HANDSHAKE_BATCH 64 /* connections whose CONNECT is in flight at once at setup */
#define MAX_EVENTS 256

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

enum mode { FANIN, FANOUT, LATENCY, CONNECT };

static struct {
    enum mode mode;
    int port;
    int sub_port;        /* subscribers connect here; 0: --port */
    int publishers, subscribers;
    long messages;       /* per publisher */
    int qos, window, persistent;
    double rate;         /* latency mode, msg/s */
    double timeout_s;
    int chunk;           /* packets per write, all stamped with the same time */
    long batch_wait_us;  /* subscriber: sleep this long after a pass that read < batch_bytes */
    long batch_bytes;
    int broker_pid;      /* 0: unknown (the settle rule alone ends a lossy run) */
    /* connect mode */
    long clients;        /* connections to open */
    int pending;         /* handshakes in flight at once, over all threads */
    int sources;         /* source addresses 127.0.0.1 .. 127.0.0.SOURCES */
    int threads;
    long first_id;       /* client ids bench-idle-FIRST_ID .. (unique over processes) */
    double stall_s;      /* no CONNACK for this long with handshakes in flight: stop */
    long nofile;         /* RLIMIT_NOFILE wanted (else as high as the hard limit allows) */
} opt = {FANIN, 0, 0, 10, 1, 1000, 0, 32, 0, 1000.0, 60.0, 128, 200, 16384, 0,
         1000, 64, 4, 2, 0, 3.0, 0};

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static double cpu_s(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("cloadgen: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

static void *xcalloc(size_t n, size_t size) {
    void *p = calloc(n ? n : 1, size);
    if (!p) die("out of memory (%zu x %zu)", n, size);
    return p;
}

static void put_be16(uint8_t *p, unsigned v) { p[0] = v >> 8; p[1] = v; }
static void put_be32(uint8_t *p, uint32_t v) {
    p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}
static void put_be64(uint8_t *p, uint64_t v) {
    for (int i = 7; i >= 0; i--) { p[i] = v; v >>= 8; }
}
static uint32_t get_be32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static int64_t get_be64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = v << 8 | p[i];
    return (int64_t)v;
}

static size_t put_remlen(uint8_t *p, size_t len) {
    size_t n = 0;
    do {
        uint8_t byte = len % 128;
        len /= 128;
        p[n++] = byte | (len ? 0x80 : 0);
    } while (len);
    return n;
}

static size_t put_str(uint8_t *p, const char *s) {
    size_t len = strlen(s);
    put_be16(p, (unsigned)len);
    memcpy(p + 2, s, len);
    return len + 2;
}

/* CONNECT (3.1.1, keepalive 0) and, if filter, SUBSCRIBE (packet id 1) in buf. */
static size_t encode_handshake(uint8_t *buf, const char *client_id, int clean,
                               const char *filter, int qos) {
    uint8_t body[512];
    size_t n = put_str(body, "MQTT");
    body[n++] = 4;
    body[n++] = clean ? 0x02 : 0x00;
    body[n++] = 0; body[n++] = 0; /* keepalive 0 */
    n += put_str(body + n, client_id);
    size_t out = 0;
    buf[out++] = 0x10;
    out += put_remlen(buf + out, n);
    memcpy(buf + out, body, n);
    out += n;
    if (filter) {
        n = 0;
        put_be16(body, 1);
        n = 2;
        n += put_str(body + n, filter);
        body[n++] = (uint8_t)qos;
        buf[out++] = 0x82;
        out += put_remlen(buf + out, n);
        memcpy(buf + out, body, n);
        out += n;
    }
    return out;
}

static int tcp_connect(int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) die("socket: %s", strerror(errno));
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct timeval tv = {SETUP_TIMEOUT_S, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0)
        die("connect to 127.0.0.1:%d: %s", port, strerror(errno));
    return fd;
}

static void write_all(int fd, const uint8_t *p, size_t n) {
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) {
                struct pollfd pfd = {fd, POLLOUT, 0};
                poll(&pfd, 1, 100);
                continue;
            }
            die("write: %s", strerror(errno));
        }
        p += w;
        n -= (size_t)w;
    }
}

/* Blocking: read until CONNACK (and SUBACK if subscribed) are in. */
static void finish_handshake(int fd, int subscribed, const char *who) {
    uint8_t buf[256];
    size_t have = 0;
    int connacked = 0, want_suback = subscribed;
    while (!connacked || want_suback) {
        ssize_t r = read(fd, buf + have, sizeof buf - have);
        if (r == 0) die("%s: closed by the broker during CONNECT/SUBSCRIBE", who);
        if (r < 0) {
            if (errno == EINTR) continue;
            die("%s: handshake: %s", who, strerror(errno));
        }
        have += (size_t)r;
        size_t pos = 0;
        while (have - pos >= 2 && !(buf[pos + 1] & 0x80)) {
            size_t len = buf[pos + 1];
            if (have - pos < 2 + len) break;
            uint8_t type = buf[pos] & 0xF0;
            if (type == 0x20) {
                if (len < 2 || buf[pos + 3] != 0)
                    die("%s: CONNACK return code %d", who, len >= 2 ? buf[pos + 3] : -1);
                connacked = 1;
            } else if (type == 0x90) {
                if (len < 3 || buf[pos + 4] == 0x80) die("%s: subscription refused", who);
                want_suback = 0;
            } else {
                die("%s: unexpected packet 0x%02x before the go signal", who, buf[pos]);
            }
            pos += 2 + len;
        }
        memmove(buf, buf + pos, have - pos);
        have -= pos;
    }
}

static void set_nonblocking(int fd) {
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

/* -- publishers ------------------------------------------------------------------- */

typedef struct {
    int fd;
    uint8_t *stream;    /* count packets back to back */
    size_t size;        /* one packet */
    size_t stamp_at;    /* offset of the send time in a packet */
    long count, stamped;
    size_t sent_bytes;
    uint64_t rx_bytes;  /* only 4-byte PUBACKs come on a publisher connection */
    int writing, finished;
} pubconn;

static pubconn *pubs;
static int npubs;
static volatile int pubs_done;
static int pub_timed_out;
static char pub_error[256];
static int64_t t_go, deadline_ns, t_pub_end;
static long total_sent;

static void encode_stream(pubconn *c, const char *topic, int pub, long count, int qos) {
    uint8_t head[64];
    size_t tlen = strlen(topic);
    size_t rem = 2 + tlen + (qos ? 2 : 0) + PAYLOAD_SIZE;
    size_t h = 0;
    head[h++] = (uint8_t)(0x30 | (qos << 1));
    h += put_remlen(head + h, rem);
    h += put_str(head + h, topic);
    size_t size = h + (qos ? 2 : 0) + PAYLOAD_SIZE;
    c->stream = xcalloc((size_t)count, size);
    c->size = size;
    c->count = count;
    size_t payload_at = size - PAYLOAD_SIZE;
    c->stamp_at = payload_at + 6;
    for (long seq = 0; seq < count; seq++) {
        uint8_t *p = c->stream + (size_t)seq * size;
        memcpy(p, head, h);
        if (qos) put_be16(p + h, (unsigned)(seq % 65535 + 1));
        put_be16(p + payload_at, (unsigned)pub);
        put_be32(p + payload_at + 2, (uint32_t)seq);
    }
}

static long pub_acked(const pubconn *c) { return (long)(c->rx_bytes >> 2); }

static int pub_complete(const pubconn *c) {
    return c->sent_bytes == (size_t)c->count * c->size &&
           (!opt.qos || pub_acked(c) >= c->count);
}

/* Send what the window allows; 1 if the socket would block. */
static int pump(pubconn *c) {
    for (;;) {
        long limit = c->count;
        if (opt.qos) {
            long w = pub_acked(c) + opt.window;
            if (w < limit) limit = w;
        }
        size_t end = (size_t)c->stamped * c->size;
        if (c->sent_bytes == end) {
            if (c->stamped >= limit) return 0;
            long refill = opt.window / 2 > 0 ? opt.window / 2 : 1;
            if (opt.qos && limit < c->count && limit - c->stamped < refill) return 0;
            long upto = c->stamped + opt.chunk;
            if (upto > limit) upto = limit;
            int64_t t = now_ns();
            for (long k = c->stamped; k < upto; k++)
                put_be64(c->stream + (size_t)k * c->size + c->stamp_at, (uint64_t)t);
            c->stamped = upto;
            end = (size_t)upto * c->size;
        }
        ssize_t w = write(c->fd, c->stream + c->sent_bytes, end - c->sent_bytes);
        if (w < 0) {
            if (errno == EAGAIN || errno == EINTR) return 1;
            snprintf(pub_error, sizeof pub_error, "publisher write: %s", strerror(errno));
            c->finished = 1;
            return 0;
        }
        c->sent_bytes += (size_t)w;
    }
}

static void *publisher_thread(void *arg) {
    (void)arg;
    int ep = epoll_create1(0);
    struct epoll_event ev, events[MAX_EVENTS];
    for (int i = 0; i < npubs; i++) {
        set_nonblocking(pubs[i].fd);
        ev.events = EPOLLIN | EPOLLOUT;
        ev.data.ptr = &pubs[i];
        pubs[i].writing = 1;
        epoll_ctl(ep, EPOLL_CTL_ADD, pubs[i].fd, &ev);
    }
    int active = npubs;
    static uint8_t scratch[RECV_SIZE];
    while (active > 0 && !pub_error[0]) {
        if (now_ns() > deadline_ns) { pub_timed_out = 1; break; }
        int n = epoll_wait(ep, events, MAX_EVENTS, 200);
        for (int k = 0; k < n; k++) {
            pubconn *c = events[k].data.ptr;
            if (c->finished) continue;
            if (events[k].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
                ssize_t r = read(c->fd, scratch, sizeof scratch);
                if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
                    snprintf(pub_error, sizeof pub_error,
                             "broker closed a publisher connection");
                    break;
                }
                if (r > 0) c->rx_bytes += (uint64_t)r;
            }
            int wants_write = pump(c);
            if (pub_complete(c) || c->finished) {
                epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                c->finished = 1;
                active--;
                t_pub_end = now_ns();
            } else if (wants_write != c->writing) {
                c->writing = wants_write;
                ev.events = EPOLLIN | (wants_write ? EPOLLOUT : 0);
                ev.data.ptr = c;
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
            }
        }
    }
    close(ep);
    for (int i = 0; i < npubs; i++) total_sent += (long)(pubs[i].sent_bytes / pubs[i].size);
    if (!t_pub_end) t_pub_end = now_ns();
    __atomic_store_n(&pubs_done, 1, __ATOMIC_RELEASE);
    return NULL;
}

/* Latency mode: one publisher, message seq due at go + seq / rate (open loop). */
static void *paced_thread(void *arg) {
    (void)arg;
    pubconn *c = &pubs[0];
    set_nonblocking(c->fd);
    double period_ns = 1e9 / opt.rate;
    for (long seq = 0; seq < c->count; seq++) {
        int64_t due = t_go + (int64_t)(seq * period_ns);
        int64_t now = now_ns();
        if (now > deadline_ns) { pub_timed_out = 1; break; }
        if (due > now) {
            struct timespec ts = {due / 1000000000LL, due % 1000000000LL};
            while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {}
        }
        uint8_t *p = c->stream + (size_t)seq * c->size;
        put_be64(p + c->stamp_at, (uint64_t)now_ns());
        write_all(c->fd, p, c->size);
        c->sent_bytes += c->size;
        c->stamped = seq + 1;
    }
    total_sent = c->stamped;
    t_pub_end = now_ns();
    __atomic_store_n(&pubs_done, 1, __ATOMIC_RELEASE);
    return NULL;
}

/* -- subscribers ------------------------------------------------------------------ */

typedef struct {
    int fd;
    int index;
    int open;
    size_t rest_len;
    uint8_t rest[REST_MAX];
} subconn;

static subconn *subs;
static int nsubs;
static int sub_pubs;      /* publishers each subscriber expects */
static long per_pub;      /* messages per publisher */
static uint8_t *counts;   /* [sub][pub][seq]: arrivals, saturating at 255 */
static int64_t *highest;  /* [sub][pub]: highest seq seen + 1 */
static long unique, out_of_order, unexpected, closed_by_broker, timed_out;
static int64_t *lat;
static size_t nlat, caplat;
static int64_t t_last;

static void record_latency(int64_t v) {
    if (nlat == caplat) {
        caplat = caplat ? caplat * 2 : 1 << 16;
        lat = realloc(lat, caplat * sizeof *lat);
        if (!lat) die("out of memory (latencies)");
    }
    lat[nlat++] = v;
}

/* Count the PUBLISH packets in data[0..n); QoS 1 packet ids go to acks. Returns the
 * bytes consumed (an incomplete packet at the end is left). */
static size_t tally(subconn *c, const uint8_t *data, size_t n, int64_t now, uint8_t *acks,
                    size_t *nacks) {
    size_t pos = 0;
    size_t base = (size_t)c->index * sub_pubs;
    while (n - pos >= 2) {
        size_t len = 0, i = pos + 1;
        unsigned shift = 0;
        int complete = 0;
        while (i < n && i < pos + 5) {
            uint8_t byte = data[i++];
            len |= (size_t)(byte & 0x7F) << shift;
            shift += 7;
            if (!(byte & 0x80)) { complete = 1; break; }
        }
        if (!complete) break;
        size_t end = i + len;
        if (end > n) break;
        uint8_t first = data[pos];
        if ((first & 0xF0) == 0x30) {
            size_t j = i + 2 + ((size_t)data[i] << 8 | data[i + 1]);
            if (first & 0x06) {
                memcpy(acks + *nacks, "\x40\x02", 2);
                memcpy(acks + *nacks + 2, data + j, 2);
                *nacks += 4;
                j += 2;
            }
            if (j + 14 <= end) {
                unsigned pub = (unsigned)data[j] << 8 | data[j + 1];
                uint32_t seq = get_be32(data + j + 2);
                record_latency(now - get_be64(data + j + 6));
                if ((int)pub < sub_pubs && (long)seq < per_pub) {
                    size_t k = (base + pub) * (size_t)per_pub + seq;
                    uint8_t cnt = counts[k];
                    if (!cnt) {
                        unique++;
                        int64_t *h = &highest[base + pub];
                        if ((int64_t)seq < *h) out_of_order++;
                        else *h = (int64_t)seq + 1;
                    }
                    if (cnt < 255) counts[k] = cnt + 1;
                } else {
                    unexpected++;
                }
            } else {
                unexpected++;
            }
        }
        pos = end;
    }
    return pos;
}

/* utime + stime of the broker in clock ticks, -1 if unknown */
static long broker_ticks(void) {
    if (!opt.broker_pid) return -1;
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", opt.broker_pid);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    if (!p) return -1;
    unsigned long utime = 0, stime = 0;
    /* after ")": state ppid pgrp session tty_nr tpgid flags minflt cminflt majflt cmajflt
     * utime stime */
    if (sscanf(p + 1, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &utime,
               &stime) != 2)
        return -1;
    return (long)(utime + stime);
}

static void *subscriber_thread(void *arg) {
    (void)arg;
    int ep = epoll_create1(0);
    struct epoll_event ev, events[MAX_EVENTS];
    for (int i = 0; i < nsubs; i++) {
        set_nonblocking(subs[i].fd);
        ev.events = EPOLLIN;
        ev.data.ptr = &subs[i];
        epoll_ctl(ep, EPOLL_CTL_ADD, subs[i].fd, &ev);
    }
    long expected = (long)nsubs * sub_pubs * per_pub;
    uint8_t *buf = xcalloc(REST_MAX + RECV_SIZE, 1);
    uint8_t *acks = xcalloc(RECV_SIZE * 2 + REST_MAX, 1);
    int64_t last_data = now_ns();
    int open = nsubs;
    int batch = !opt.qos && opt.batch_wait_us > 0; /* QoS 1: ack at once */
    /* A broker still busy (reading a backlog before it routes it: amqtt does) is waited
     * for: silence ends the run only once the broker has been idle for IDLE_NS too. */
    long ticks = broker_ticks();
    int64_t ticks_at = now_ns(), busy_at = ticks_at;
    while (unique < expected && open > 0) {
        int64_t now = now_ns();
        if (now > deadline_ns) { timed_out = 1; break; }
        if (ticks >= 0 && now - ticks_at >= 100000000LL) {
            long t = broker_ticks();
            if (t < 0 || t - ticks > IDLE_TICKS_PER_100MS * (now - ticks_at) / 100000000LL)
                busy_at = now;
            ticks = t;
            ticks_at = now;
        }
        if (__atomic_load_n(&pubs_done, __ATOMIC_ACQUIRE) && now - last_data > SETTLE_NS &&
            (ticks < 0 || now - busy_at > IDLE_NS))
            break;
        long received = 0;
        int n = epoll_wait(ep, events, MAX_EVENTS, 100);
        for (int k = 0; k < n; k++) {
            subconn *c = events[k].data.ptr;
            memcpy(buf, c->rest, c->rest_len);
            ssize_t r = read(c->fd, buf + c->rest_len, RECV_SIZE);
            if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            if (r <= 0) {
                epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                c->open = 0;
                open--;
                closed_by_broker++;
                continue;
            }
            int64_t t = now_ns();
            t_last = t;
            received += r;
            size_t have = c->rest_len + (size_t)r, nacks = 0;
            size_t used = tally(c, buf, have, t, acks, &nacks);
            c->rest_len = have - used;
            if (c->rest_len > REST_MAX) die("a packet larger than %d bytes", REST_MAX);
            memcpy(c->rest, buf + used, c->rest_len);
            if (nacks) write_all(c->fd, acks, nacks);
        }
        if (received) {
            last_data = t_last;
            if (batch && received < opt.batch_bytes) {
                struct timespec ts = {0, opt.batch_wait_us * 1000};
                nanosleep(&ts, NULL);
            }
        }
    }
    close(ep);
    free(buf);
    free(acks);
    return NULL;
}

/* -- connect mode ----------------------------------------------------------------- */

enum { C_FREE, C_CONNECTING, C_WAITING, C_HELD };

typedef struct {
    int fd;
    uint8_t state;
    uint8_t got;        /* CONNACK bytes read so far */
} idleconn;

#define ERRNO_SLOTS 134 /* counts per errno; slot 0: refused by CONNACK or closed */

typedef struct {
    long first, n;      /* connections [first, first + n) of this process */
    int pending_max;
    idleconn *conns;
    long connected, failed, unanswered;
    long errors[ERRNO_SLOTS];
    int64_t t_last;
    int stalled, timed_out, fd_limited;
} connthread;

static long nofile_limit;

/* Soft RLIMIT_NOFILE to opt.nofile if allowed, else as high as the hard limit. */
static void raise_nofile(void) {
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    if (opt.nofile > 0 && rl.rlim_cur != RLIM_INFINITY && (rlim_t)opt.nofile > rl.rlim_cur) {
        struct rlimit want = {(rlim_t)opt.nofile, (rlim_t)opt.nofile};
        if (want.rlim_max < rl.rlim_max) want.rlim_max = rl.rlim_max;
        if (setrlimit(RLIMIT_NOFILE, &want) == 0) {
            nofile_limit = opt.nofile;
            return;
        }
    }
    if (rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    getrlimit(RLIMIT_NOFILE, &rl);
    nofile_limit = rl.rlim_cur == RLIM_INFINITY ? -1 : (long)rl.rlim_cur;
}

static void conn_error(connthread *t, int err) {
    t->failed++;
    t->errors[err > 0 && err < ERRNO_SLOTS ? err : 0]++;
}

static void conn_drop(connthread *t, int ep, idleconn *c, int err) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    c->state = C_FREE;
    conn_error(t, err);
}

/* Start connection k's handshake: 0 if it is in flight, else the errno. */
static int conn_open(int ep, idleconn *c, long k) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0) return errno;
    struct sockaddr_in src, dst;
    memset(&src, 0, sizeof src);
    src.sin_family = AF_INET;
    src.sin_addr.s_addr = htonl(INADDR_LOOPBACK + (uint32_t)(k % opt.sources));
    int one = 1;
    if (opt.sources > 1 &&
        (setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one) < 0 ||
         bind(fd, (struct sockaddr *)&src, sizeof src) < 0)) {
        int err = errno;
        close(fd);
        return err;
    }
    memset(&dst, 0, sizeof dst);
    dst.sin_family = AF_INET;
    dst.sin_port = htons((uint16_t)opt.port);
    dst.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&dst, sizeof dst) < 0 && errno != EINPROGRESS) {
        int err = errno;
        close(fd);
        return err;
    }
    c->fd = fd;
    c->got = 0;
    /* On loopback the TCP handshake is usually over when connect returns: the CONNECT
     * goes out at once (else once the socket is writable) */
    uint8_t pkt[64];
    char id[40];
    snprintf(id, sizeof id, "bench-idle-%ld", k);
    size_t size = encode_handshake(pkt, id, 1, NULL, 0);
    ssize_t w = write(fd, pkt, size);
    if (w > 0 && w != (ssize_t)size) {
        close(fd);
        return EIO;
    }
    c->state = w > 0 ? C_WAITING : C_CONNECTING;
    /* EPOLLIN one-shot: a held connection leaves the set's ready list by itself */
    struct epoll_event ev = {.events = w > 0 ? EPOLLIN | EPOLLONESHOT : EPOLLOUT,
                             .data.u64 = (uint64_t)k};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    return 0;
}

static void *connect_thread(void *arg) {
    connthread *t = arg;
    int ep = epoll_create1(0);
    struct epoll_event ev, events[MAX_EVENTS];
    int64_t stall_ns = (int64_t)(opt.stall_s * 1e9), progress = now_ns();
    long next = 0, pending = 0;
    while (t->connected + t->failed + t->unanswered < t->n) {
        while (pending < t->pending_max && next < t->n && !t->fd_limited) {
            int err = conn_open(ep, &t->conns[next], t->first + next);
            if (err == EMFILE || err == ENFILE) {
                t->fd_limited = 1; /* this process's own limit: the rest is not tried */
                t->unanswered += t->n - next;
                break;
            }
            if (err) conn_error(t, err);
            else pending++;
            next++;
        }
        if (pending == 0) break;
        int64_t now = now_ns();
        if (now > deadline_ns) { t->timed_out = 1; break; }
        if (now - progress > stall_ns) { t->stalled = 1; break; }
        int n = epoll_wait(ep, events, MAX_EVENTS, 50);
        for (int e = 0; e < n; e++) {
            long k = (long)events[e].data.u64 - t->first;
            idleconn *c = &t->conns[k];
            if (c->state == C_CONNECTING) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err) { conn_drop(t, ep, c, err); pending--; progress = now_ns(); continue; }
                uint8_t pkt[64];
                char id[40];
                snprintf(id, sizeof id, "bench-idle-%ld", t->first + k);
                size_t size = encode_handshake(pkt, id, 1, NULL, 0);
                ssize_t w = write(c->fd, pkt, size);
                if (w != (ssize_t)size) {
                    conn_drop(t, ep, c, w < 0 ? errno : EIO);
                    pending--;
                    continue;
                }
                c->state = C_WAITING;
                ev.events = EPOLLIN | EPOLLONESHOT;
                ev.data.u64 = events[e].data.u64;
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
            } else if (c->state == C_WAITING) {
                uint8_t buf[16];
                ssize_t r = read(c->fd, buf, sizeof buf - c->got);
                if (r < 0 && (errno == EAGAIN || errno == EINTR)) { /* nothing yet: re-arm */
                    ev.events = EPOLLIN | EPOLLONESHOT;
                    ev.data.u64 = events[e].data.u64;
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                    continue;
                }
                int ok = r > 0;
                for (ssize_t i = 0; ok && i < r; i++, c->got++) {
                    /* CONNACK: 0x20 0x02 flags 0x00 */
                    if ((c->got == 0 && buf[i] != 0x20) || (c->got == 1 && buf[i] != 0x02) ||
                        (c->got == 3 && buf[i] != 0x00) || c->got > 3)
                        ok = 0;
                }
                if (!ok) {
                    conn_drop(t, ep, c, r < 0 ? errno : 0);
                    pending--;
                    progress = now_ns();
                    continue;
                }
                if (c->got < 4) { /* part of a CONNACK: wait for the rest */
                    ev.events = EPOLLIN | EPOLLONESHOT;
                    ev.data.u64 = events[e].data.u64;
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                } else {
                    c->state = C_HELD; /* stays in the epoll set, disarmed */
                    t->connected++;
                    pending--;
                    t->t_last = progress = now_ns();
                }
            }
        }
    }
    /* what is still in flight is given up (the broker did not answer it) */
    for (long k = 0; k < next; k++) {
        idleconn *c = &t->conns[k];
        if (c->state == C_CONNECTING || c->state == C_WAITING) {
            close(c->fd);
            c->fd = -1;
            c->state = C_FREE;
            t->unanswered++;
        }
    }
    close(ep);
    return NULL;
}

static const char *errno_name(int err) {
    switch (err) {
    case 0: return "refused";
    case ECONNREFUSED: return "ECONNREFUSED";
    case ECONNRESET: return "ECONNRESET";
    case ETIMEDOUT: return "ETIMEDOUT";
    case EADDRNOTAVAIL: return "EADDRNOTAVAIL";
    case EADDRINUSE: return "EADDRINUSE";
    case EPIPE: return "EPIPE";
    case ENOBUFS: return "ENOBUFS";
    case ENOMEM: return "ENOMEM";
    case EIO: return "EIO";
    default: return NULL;
    }
}

static int connect_main(void) {
    raise_nofile();
    int nthreads = opt.threads;
    if (nthreads > opt.clients) nthreads = (int)opt.clients;
    if (nthreads > opt.pending) nthreads = opt.pending;
    connthread *threads = xcalloc((size_t)nthreads, sizeof *threads);
    idleconn *conns = xcalloc((size_t)opt.clients, sizeof *conns);
    long first = 0;
    for (int i = 0; i < nthreads; i++) {
        connthread *t = &threads[i];
        t->n = opt.clients / nthreads + (i < opt.clients % nthreads ? 1 : 0);
        t->first = opt.first_id + first;
        t->conns = conns + first;
        t->pending_max = opt.pending / nthreads + (i < opt.pending % nthreads ? 1 : 0);
        first += t->n;
    }
    printf("{\"ready\": true, \"clients\": %ld, \"threads\": %d, \"nofile_limit\": %ld}\n",
           opt.clients, nthreads, nofile_limit);
    fflush(stdout);

    char line[64];
    if (!fgets(line, sizeof line, stdin) || strncmp(line, "go", 2)) return 1;
    double cpu0 = cpu_s();
    t_go = now_ns();
    deadline_ns = t_go + (int64_t)(opt.timeout_s * 1e9);
    pthread_t *ids = xcalloc((size_t)nthreads, sizeof *ids);
    for (int i = 0; i < nthreads; i++)
        if (pthread_create(&ids[i], NULL, connect_thread, &threads[i]))
            die("pthread_create failed");
    for (int i = 0; i < nthreads; i++) pthread_join(ids[i], NULL);
    double cpu = cpu_s() - cpu0;

    long connected = 0, failed = 0, unanswered = 0, errors[ERRNO_SLOTS] = {0};
    int64_t t_last = 0;
    int stalled = 0, timed = 0, fd_limited = 0;
    for (int i = 0; i < nthreads; i++) {
        connthread *t = &threads[i];
        connected += t->connected;
        failed += t->failed;
        unanswered += t->unanswered;
        if (t->t_last > t_last) t_last = t->t_last;
        stalled |= t->stalled;
        timed |= t->timed_out;
        fd_limited |= t->fd_limited;
        for (int e = 0; e < ERRNO_SLOTS; e++) errors[e] += t->errors[e];
    }
    double elapsed = t_last ? (t_last - t_go) / 1e9 : 0.0;
    printf("{\"expected\": %ld, \"connected\": %ld, \"failed\": %ld, \"unanswered\": %ld, "
           "\"stalled\": %s, \"timed_out\": %s, \"generator_fd_limited\": %s, "
           "\"elapsed_s\": %.6f, \"connects_per_s\": %.1f, \"generator_cpu_s\": %.4f, "
           "\"generator_procs\": 1, \"generator_threads\": %d, \"nofile_limit\": %ld, "
           "\"t_go_ns\": %lld, \"t_last_ns\": %lld, \"errors\": {",
           opt.clients, connected, failed, unanswered, stalled ? "true" : "false",
           timed ? "true" : "false", fd_limited ? "true" : "false", elapsed,
           elapsed > 0 ? connected / elapsed : 0.0, cpu, nthreads, nofile_limit,
           (long long)t_go, (long long)t_last);
    const char *sep = "";
    for (int e = 0; e < ERRNO_SLOTS; e++) {
        if (!errors[e]) continue;
        const char *name = errno_name(e);
        if (name) printf("%s\"%s\": %ld", sep, name, errors[e]);
        else printf("%s\"errno %d\": %ld", sep, e, errors[e]);
        sep = ", ";
    }
    printf("}, \"error\": null}\n");
    fflush(stdout);

    /* hold the connections (the caller measures the broker) until "close" or EOF; then
     * reset them (SO_LINGER 0): no TIME_WAIT left behind for the next row's ports */
    while (fgets(line, sizeof line, stdin) && strncmp(line, "close", 5)) {}
    struct linger reset = {1, 0};
    for (long k = 0; k < opt.clients; k++) {
        if (conns[k].state != C_HELD) continue;
        setsockopt(conns[k].fd, SOL_SOCKET, SO_LINGER, &reset, sizeof reset);
        close(conns[k].fd);
    }
    return 0;
}

/* -- main ------------------------------------------------------------------------- */

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static void usage(void) {
    fputs("usage: cloadgen --mode fanin|fanout|latency|connect --port N [--sub-port N] "
          "[--publishers N] [--subscribers N] [--messages N] [--qos 0|1] [--window N] [--persistent] "
          "[--rate MSG_PER_S] [--timeout S] [--chunk N] [--batch-wait-us N] [--broker-pid PID]\n"
          "       connect mode: [--clients N] [--pending N] [--sources N] [--threads N] "
          "[--first-id N] [--stall S] [--nofile N]\n", stderr);
    exit(2);
}

static void parse_args(int argc, char **argv) {
    static struct option longopts[] = {
        {"mode", required_argument, 0, 'm'}, {"port", required_argument, 0, 'p'},
        {"sub-port", required_argument, 0, 's'},
        {"publishers", required_argument, 0, 'P'}, {"subscribers", required_argument, 0, 'S'},
        {"messages", required_argument, 0, 'n'}, {"qos", required_argument, 0, 'q'},
        {"window", required_argument, 0, 'w'}, {"persistent", no_argument, 0, 'd'},
        {"rate", required_argument, 0, 'r'}, {"timeout", required_argument, 0, 't'},
        {"chunk", required_argument, 0, 'c'}, {"batch-wait-us", required_argument, 0, 'b'},
        {"broker-pid", required_argument, 0, 'B'},
        {"clients", required_argument, 0, 'C'}, {"pending", required_argument, 0, 'K'},
        {"sources", required_argument, 0, 'A'}, {"threads", required_argument, 0, 'T'},
        {"first-id", required_argument, 0, 'F'}, {"stall", required_argument, 0, 'Z'},
        {"nofile", required_argument, 0, 'N'},
        {0, 0, 0, 0}};
    int ch;
    while ((ch = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (ch) {
        case 'm':
            if (!strcmp(optarg, "fanin")) opt.mode = FANIN;
            else if (!strcmp(optarg, "fanout")) opt.mode = FANOUT;
            else if (!strcmp(optarg, "latency")) opt.mode = LATENCY;
            else if (!strcmp(optarg, "connect")) opt.mode = CONNECT;
            else usage();
            break;
        case 'p': opt.port = atoi(optarg); break;
        case 's': opt.sub_port = atoi(optarg); break;
        case 'P': opt.publishers = atoi(optarg); break;
        case 'S': opt.subscribers = atoi(optarg); break;
        case 'n': opt.messages = atol(optarg); break;
        case 'q': opt.qos = atoi(optarg); break;
        case 'w': opt.window = atoi(optarg); break;
        case 'd': opt.persistent = 1; break;
        case 'r': opt.rate = atof(optarg); break;
        case 't': opt.timeout_s = atof(optarg); break;
        case 'c': opt.chunk = atoi(optarg); break;
        case 'b': opt.batch_wait_us = atol(optarg); break;
        case 'B': opt.broker_pid = atoi(optarg); break;
        case 'C': opt.clients = atol(optarg); break;
        case 'K': opt.pending = atoi(optarg); break;
        case 'A': opt.sources = atoi(optarg); break;
        case 'T': opt.threads = atoi(optarg); break;
        case 'F': opt.first_id = atol(optarg); break;
        case 'Z': opt.stall_s = atof(optarg); break;
        case 'N': opt.nofile = atol(optarg); break;
        default: usage();
        }
    }
    if (!opt.sub_port) opt.sub_port = opt.port;
    if (opt.port <= 0 || opt.sub_port <= 0 || opt.messages <= 0 || opt.qos < 0 || opt.qos > 1 ||
        opt.chunk <= 0 ||
        opt.window <= 0 || opt.window > 65535 || opt.rate <= 0)
        usage();
    if (opt.mode == CONNECT) {
        if (opt.clients <= 0 || opt.pending <= 0 || opt.threads <= 0 || opt.sources <= 0 ||
            opt.sources > 254 || opt.first_id < 0 || opt.stall_s <= 0)
            usage();
        return;
    }
    if (opt.mode != FANIN) { opt.publishers = 1; opt.qos = 0; opt.persistent = 0; }
    if (opt.mode != FANOUT) opt.subscribers = 1;
    if (opt.mode == LATENCY) opt.batch_wait_us = 0;
    if (opt.publishers <= 0 || opt.publishers > 65535 || opt.subscribers <= 0) usage();
}

int main(int argc, char **argv) {
    parse_args(argc, argv);
    signal(SIGPIPE, SIG_IGN);
    if (opt.mode == CONNECT) return connect_main();
    const char *filter = opt.mode == FANIN ? "bench/#"
                         : opt.mode == FANOUT ? "bench/fanout" : "bench/latency";

    /* subscribers first, so that nothing published is missed */
    nsubs = opt.subscribers;
    sub_pubs = opt.publishers;
    per_pub = opt.messages;
    subs = xcalloc((size_t)nsubs, sizeof *subs);
    counts = xcalloc((size_t)nsubs * sub_pubs * (size_t)per_pub, 1);
    highest = xcalloc((size_t)nsubs * sub_pubs, sizeof *highest);
    for (int first = 0; first < nsubs; first += HANDSHAKE_BATCH) {
        int last = first + HANDSHAKE_BATCH < nsubs ? first + HANDSHAKE_BATCH : nsubs;
        for (int i = first; i < last; i++) {
            char id[64];
            uint8_t hs[640];
            snprintf(id, sizeof id, "bench-sub-%d", i);
            subs[i].fd = tcp_connect(opt.sub_port);
            subs[i].index = i;
            subs[i].open = 1;
            write_all(subs[i].fd, hs, encode_handshake(hs, id, !opt.persistent, filter, opt.qos));
        }
        for (int i = first; i < last; i++) finish_handshake(subs[i].fd, 1, "subscriber");
    }
    npubs = opt.publishers;
    pubs = xcalloc((size_t)npubs, sizeof *pubs);
    for (int i = 0; i < npubs; i++) {
        char id[64], topic[64];
        uint8_t hs[640];
        snprintf(id, sizeof id, opt.mode == LATENCY ? "bench-pace" : "bench-pub-%d", i);
        if (opt.mode == FANIN) snprintf(topic, sizeof topic, "bench/%04d/t", i);
        else snprintf(topic, sizeof topic, "%s", filter);
        pubs[i].fd = tcp_connect(opt.port);
        write_all(pubs[i].fd, hs, encode_handshake(hs, id, 1, NULL, 0));
        finish_handshake(pubs[i].fd, 0, "publisher");
        encode_stream(&pubs[i], topic, i, opt.messages, opt.qos);
    }
    printf("{\"ready\": true, \"publishers\": %d, \"subscribers\": %d}\n", npubs, nsubs);
    fflush(stdout);

    char line[64];
    if (!fgets(line, sizeof line, stdin) || strncmp(line, "go", 2)) return 1;
    double cpu0 = cpu_s();
    t_go = now_ns();
    deadline_ns = t_go + (int64_t)(opt.timeout_s * 1e9);
    pthread_t pt, st;
    if (pthread_create(&st, NULL, subscriber_thread, NULL) ||
        pthread_create(&pt, NULL, opt.mode == LATENCY ? paced_thread : publisher_thread, NULL))
        die("pthread_create failed");
    pthread_join(pt, NULL);
    pthread_join(st, NULL);
    double cpu = cpu_s() - cpu0;

    long expected = (long)nsubs * sub_pubs * per_pub;
    long lost = 0, duplicated = 0;
    for (long k = 0; k < expected; k++) {
        if (!counts[k]) lost++;
        else duplicated += counts[k] - 1;
    }
    long acked = 0;
    if (opt.qos)
        for (int i = 0; i < npubs; i++) {
            long a = pub_acked(&pubs[i]);
            acked += a < pubs[i].count ? a : pubs[i].count;
        }
    /* over when the last message is delivered and (QoS 1) the last PUBACK is in */
    int64_t t_end = t_last ? (t_last > t_pub_end ? t_last : t_pub_end) : 0;
    double elapsed = t_end ? (t_end - t_go) / 1e9 : 0.0;
    printf("{\"expected\": %ld, \"delivered\": %ld, \"lost\": %ld, \"duplicated\": %ld, "
           "\"unexpected\": %ld, \"out_of_order\": %ld, \"in_order\": %s, "
           "\"closed_by_broker\": %ld, \"published\": %ld, \"acked\": %ld, "
           "\"timed_out\": %s, \"elapsed_s\": %.6f, \"msgs_per_s\": %.1f, "
           "\"generator_cpu_s\": %.4f, \"generator_procs\": 1, \"generator_threads\": 2, "
           "\"t_go_ns\": %lld, \"t_last_ns\": %lld, \"t_pub_end_ns\": %lld, ",
           expected, unique, lost, duplicated, unexpected, out_of_order,
           out_of_order ? "false" : "true", closed_by_broker, total_sent, acked,
           timed_out || pub_timed_out ? "true" : "false",
           elapsed, elapsed > 0 ? unique / elapsed : 0.0, cpu,
           (long long)t_go, (long long)t_last, (long long)t_pub_end);
    if (nlat) {
        qsort(lat, nlat, sizeof *lat, cmp_i64);
        size_t i50 = (size_t)(0.50 * nlat), i99 = (size_t)(0.99 * nlat);
        if (i99 >= nlat) i99 = nlat - 1;
        printf("\"latency_ms\": {\"p50\": %.6f, \"p99\": %.6f, \"max\": %.6f}, ",
               lat[i50] / 1e6, lat[i99] / 1e6, lat[nlat - 1] / 1e6);
    } else {
        printf("\"latency_ms\": null, ");
    }
    printf("\"error\": ");
    if (pub_error[0]) printf("\"%s\"}\n", pub_error);
    else printf("null}\n");
    fflush(stdout);

    for (int i = 0; i < npubs; i++) {
        if (pubs[i].finished && !pub_error[0]) (void)!write(pubs[i].fd, "\xe0\x00", 2);
        close(pubs[i].fd);
    }
    for (int i = 0; i < nsubs; i++) {
        if (subs[i].open) (void)!write(subs[i].fd, "\xe0\x00", 2);
        close(subs[i].fd);
    }
    return 0;
}
