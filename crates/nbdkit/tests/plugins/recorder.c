/* An API version 2 RAM disk that records every call and its flags.
 *
 * Parameters: log=PATH, size=SIZE, fua=none|emulate|native (the can_fua answer),
 * fail=ERRNO (pwrite fails with nbdkit_set_error(ERRNO)), errno_fail=ERRNO (pread fails
 * by setting errno only; the plugin declares errno_is_preserved), block=MIN (block_size
 * answers MIN/4096/-1).
 */
#define NBDKIT_API_VERSION 2
#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL
#include <nbdkit-plugin.h>
#include "common.h"

/* -D recorder.verbose=N */
NBDKIT_DLL_PUBLIC int recorder_debug_verbose = 0;

static int fua_answer = NBDKIT_FUA_EMULATE;
static int fail_errno;
static int errno_fail;
static unsigned block_min;

static int
rec_config (const char *key, const char *value)
{
  int r = common_config (key, value);
  if (r != 0)
    return r == 1 ? 0 : -1;
  log_call ("config %s=%s", key, value);
  if (strcmp (key, "fua") == 0) {
    if (strcmp (value, "none") == 0) fua_answer = NBDKIT_FUA_NONE;
    else if (strcmp (value, "emulate") == 0) fua_answer = NBDKIT_FUA_EMULATE;
    else if (strcmp (value, "native") == 0) fua_answer = NBDKIT_FUA_NATIVE;
    else { nbdkit_error ("bad fua: %s", value); return -1; }
    return 0;
  }
  if (strcmp (key, "fail") == 0)
    return nbdkit_parse_int ("fail", value, &fail_errno);
  if (strcmp (key, "errno_fail") == 0)
    return nbdkit_parse_int ("errno_fail", value, &errno_fail);
  if (strcmp (key, "block") == 0)
    return nbdkit_parse_unsigned ("block", value, &block_min);
  nbdkit_error ("unknown parameter '%s'", key);
  return -1;
}

static int
rec_config_complete (void)
{
  log_call ("config_complete");
  return 0;
}

static int
rec_thread_model (void)
{
  log_call ("thread_model");
  return NBDKIT_THREAD_MODEL_SERIALIZE_REQUESTS;
}

static int rec_after_fork (void) { log_call ("after_fork"); return 0; }
static void rec_cleanup (void) { log_call ("cleanup"); }

static int
rec_preconnect (int readonly)
{
  log_call ("preconnect readonly=%d", readonly);
  return 0;
}

static int
rec_list_exports (int readonly, int is_tls, struct nbdkit_exports *exports)
{
  log_call ("list_exports readonly=%d is_tls=%d", readonly, is_tls);
  if (nbdkit_add_export (exports, "a", NULL) == -1 ||
      nbdkit_add_export (exports, "b", "bee") == -1)
    return -1;
  return nbdkit_use_default_export (exports);
}

static const char *
rec_default_export (int readonly, int is_tls)
{
  log_call ("default_export");
  return nbdkit_strdup_intern ("def");
}

static void *
rec_open (int readonly)
{
  const char *name = nbdkit_export_name ();
  log_call ("open readonly=%d export=%s tls=%d", readonly, name ? name : "(null)",
            nbdkit_is_tls ());
  if (name && strcmp (name, "refuse") == 0) {
    nbdkit_error ("export %s is refused", name);
    return NULL;
  }
  return NBDKIT_HANDLE_NOT_NEEDED;
}

static void rec_close (void *h) { log_call ("close export=%s", nbdkit_export_name ()); }

static const char *
rec_export_description (void *h)
{
  return nbdkit_printf_intern ("export %s tls=%d pid=%lld", nbdkit_export_name (),
                               nbdkit_is_tls (), (long long) nbdkit_peer_pid ());
}

static int64_t rec_get_size (void *h) { return disk_size; }
static int rec_can_multi_conn (void *h) { return 1; }

static int
rec_can_fua (void *h)
{
  return fua_answer;
}

static int
rec_block_size (void *h, uint32_t *min, uint32_t *pref, uint32_t *max)
{
  *min = block_min;
  *pref = block_min ? 4096 : 0;
  *max = block_min ? (uint32_t) -1 : 0;
  return 0;
}

static int
rec_pread (void *h, void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
  log_call ("pread %u %llu flags=0x%x", count, (unsigned long long) offset, flags);
  if (errno_fail) {
    errno = errno_fail;
    return -1;
  }
  memcpy (buf, disk + offset, count);
  return 0;
}

static int
rec_pwrite (void *h, const void *buf, uint32_t count, uint64_t offset,
            uint32_t flags)
{
  log_call ("pwrite %u %llu flags=0x%x", count, (unsigned long long) offset, flags);
  if (fail_errno) {
    nbdkit_error ("injected pwrite failure at %llu", (unsigned long long) offset);
    nbdkit_set_error (fail_errno);
    errno = EBADF; /* must lose to nbdkit_set_error */
    return -1;
  }
  memcpy (disk + offset, buf, count);
  return 0;
}

static int
rec_flush (void *h, uint32_t flags)
{
  log_call ("flush flags=0x%x", flags);
  return 0;
}

static int
rec_trim (void *h, uint32_t count, uint64_t offset, uint32_t flags)
{
  log_call ("trim %u %llu flags=0x%x", count, (unsigned long long) offset, flags);
  memset (disk + offset, 0, count);
  return 0;
}

static int
rec_zero (void *h, uint32_t count, uint64_t offset, uint32_t flags)
{
  log_call ("zero %u %llu flags=0x%x", count, (unsigned long long) offset, flags);
  if (flags & NBDKIT_FLAG_FAST_ZERO) {
    nbdkit_set_error (ENOTSUP);
    return -1;
  }
  memset (disk + offset, 0, count);
  return 0;
}

static int
rec_cache (void *h, uint32_t count, uint64_t offset, uint32_t flags)
{
  log_call ("cache %u %llu flags=0x%x", count, (unsigned long long) offset, flags);
  return 0;
}

/* One extent per 4K block: data, or hole+zero if the block is all zero. The host must
 * coalesce neighbours of the same type.
 */
static int
rec_extents (void *h, uint32_t count, uint64_t offset, uint32_t flags,
             struct nbdkit_extents *extents)
{
  uint64_t blk = offset & ~(uint64_t) 4095;
  uint64_t end = offset + count;

  log_call ("extents %u %llu flags=0x%x", count, (unsigned long long) offset, flags);
  if (end > (uint64_t) disk_size)
    end = disk_size;
  for (; blk < end; blk += 4096) {
    int zero = 1;
    for (int i = 0; i < 4096; ++i)
      if (disk[blk + i]) { zero = 0; break; }
    if (nbdkit_add_extent (extents, blk, 4096,
                           zero ? NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO : 0) == -1)
      return -1;
  }
  return 0;
}

static void
rec_dump_plugin (void)
{
  printf ("recorder_verbose=%d\n", recorder_debug_verbose);
}

static struct nbdkit_plugin plugin = {
  .name = "recorder",
  .longname = "sluice test recorder",
  .version = "2.0",
  .description = "Records every call.",
  .config = rec_config,
  .config_complete = rec_config_complete,
  .config_help = "log=PATH size=SIZE fua=none|emulate|native",
  .magic_config_key = "size",
  .thread_model = rec_thread_model,
  .get_ready = common_get_ready,
  .after_fork = rec_after_fork,
  .cleanup = rec_cleanup,
  .unload = common_unload,
  .dump_plugin = rec_dump_plugin,
  .preconnect = rec_preconnect,
  .list_exports = rec_list_exports,
  .default_export = rec_default_export,
  .open = rec_open,
  .close = rec_close,
  .export_description = rec_export_description,
  .get_size = rec_get_size,
  .block_size = rec_block_size,
  .can_multi_conn = rec_can_multi_conn,
  .can_fua = rec_can_fua,
  .pread = rec_pread,
  .pwrite = rec_pwrite,
  .flush = rec_flush,
  .trim = rec_trim,
  .zero = rec_zero,
  .cache = rec_cache,
  .extents = rec_extents,
  .errno_is_preserved = 1,
};

NBDKIT_REGISTER_PLUGIN (plugin)
