/* pull-reader: the pull-mode backup client of bench/job-bench.py, in C on libnbd.
 *
 * Usage: pull-reader URI CONTEXT
 *
 * Connects to URI asking for meta context CONTEXT (qemu:dirty-bitmap:NAME), collects
 * the dirty extents from block status, then reads them with aio_pread, 8 requests in
 * flight and at most 4 MiB each, and checks every byte read is 0x77.  Prints one JSON
 * line: {"extents": N, "bytes": N, "bad": N, "secs": S, "status_secs": S}, secs from
 * connect to the last read, status_secs from connect to the end of block status.  It does what job-bench's Python reader does, with a client cheap enough that
 * the row measures the servers rather than the interpreter (the Python reader spends
 * as much CPU as the whole read takes).  Built by job-bench.py with `cc -O2 -lnbd`
 * (libnbd-dev); without it the bench falls back to the Python reader.
 */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libnbd.h>

#define QD 8
#define MAX_REQ (4u << 20)

struct extent { uint64_t off, len; };

static struct extent *dirty;
static size_t ndirty, capdirty;
static uint64_t pos;
static const char *context;

static void die(const char *what)
{
  fprintf(stderr, "pull-reader: %s: %s\n", what, nbd_get_error());
  exit(1);
}

static int extent_cb(void *user_data, const char *metacontext, uint64_t offset,
                     uint32_t *entries, size_t nr_entries, int *error)
{
  (void)user_data; (void)error;
  if (strcmp(metacontext, context) != 0)
    return 0;
  uint64_t o = offset;
  for (size_t i = 0; i + 1 < nr_entries; i += 2) {
    if (entries[i + 1] & 1) {
      if (ndirty && dirty[ndirty - 1].off + dirty[ndirty - 1].len == o)
        dirty[ndirty - 1].len += entries[i];
      else {
        if (ndirty == capdirty) {
          capdirty = capdirty ? 2 * capdirty : 1024;
          dirty = realloc(dirty, capdirty * sizeof *dirty);
          if (!dirty) { perror("realloc"); exit(1); }
        }
        dirty[ndirty++] = (struct extent){ o, entries[i] };
      }
    }
    o += entries[i];
  }
  if (o > pos)
    pos = o;
  return 0;
}

struct slot { int64_t cookie; char *buf; uint64_t len; };

static uint64_t bad;

/* Counts the bytes that are not 0x77: memcmp against a block of them (fast), byte by
 * byte only where a block differs. */
static char pattern[64 << 10];

static void check(struct slot *s)
{
  for (uint64_t o = 0; o < s->len; o += sizeof pattern) {
    uint64_t n = s->len - o < sizeof pattern ? s->len - o : sizeof pattern;
    if (memcmp(s->buf + o, pattern, n) == 0)
      continue;
    for (uint64_t i = 0; i < n; i++)
      bad += s->buf[o + i] != 0x77;
  }
}

static double now(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
  if (argc != 3) {
    fprintf(stderr, "usage: pull-reader URI CONTEXT\n");
    return 2;
  }
  context = argv[2];
  memset(pattern, 0x77, sizeof pattern);
  double t0 = now();
  struct nbd_handle *h = nbd_create();
  if (!h) die("nbd_create");
  if (nbd_add_meta_context(h, context) == -1) die("add_meta_context");
  if (nbd_connect_uri(h, argv[1]) == -1) die("connect_uri");
  int64_t size = nbd_get_size(h);
  if (size < 0) die("get_size");
  while ((int64_t)pos < size) {
    uint64_t start = pos;
    uint64_t n = (uint64_t)size - start;
    if (n > (1u << 30)) n = 1u << 30;
    if (nbd_block_status(h, n, start,
                         (nbd_extent_callback){ .callback = extent_cb }, 0) == -1)
      die("block_status");
    if (pos <= start) {
      fprintf(stderr, "pull-reader: block status made no progress\n");
      return 1;
    }
  }

  double t_status = now() - t0;
  struct slot slots[QD];
  for (int i = 0; i < QD; i++) {
    slots[i].buf = malloc(MAX_REQ);
    slots[i].cookie = 0;
    if (!slots[i].buf) { perror("malloc"); return 1; }
  }
  uint64_t total = 0;
  size_t next = 0;
  uint64_t noff = ndirty ? dirty[0].off : 0, nleft = ndirty ? dirty[0].len : 0;
  int inflight = 0;
  for (;;) {
    /* Fill every free slot. */
    for (int i = 0; i < QD && next < ndirty; i++) {
      if (slots[i].cookie)
        continue;
      uint64_t k = nleft < MAX_REQ ? nleft : MAX_REQ;
      slots[i].len = k;
      slots[i].cookie = nbd_aio_pread(h, slots[i].buf, k, noff,
                                      (nbd_completion_callback){ 0 }, 0);
      if (slots[i].cookie == -1) die("aio_pread");
      inflight++;
      total += k;
      noff += k;
      nleft -= k;
      if (nleft == 0 && ++next < ndirty) {
        noff = dirty[next].off;
        nleft = dirty[next].len;
      }
    }
    if (inflight == 0)
      break;
    if (nbd_poll(h, -1) == -1) die("poll");
    for (int i = 0; i < QD; i++) {
      if (!slots[i].cookie)
        continue;
      int r = nbd_aio_command_completed(h, slots[i].cookie);
      if (r == -1) die("aio_pread completion");
      if (r) {
        check(&slots[i]);
        slots[i].cookie = 0;
        inflight--;
      }
    }
  }
  double secs = now() - t0;
  if (nbd_shutdown(h, 0) == -1) die("shutdown");
  nbd_close(h);
  printf("{\"extents\": %zu, \"bytes\": %" PRIu64 ", \"bad\": %" PRIu64
         ", \"secs\": %.6f, \"status_secs\": %.6f}\n", ndirty, total, bad, secs, t_status);
  return 0;
}
