/* An API version 2 RAM disk that misbehaves on request, for sluice's end-to-end tests of
 * what a client sees when a plugin fails or breaks the rules. Built with the RAM disk and
 * call log of sluice-nbdkit's test plugins (crates/nbdkit/tests/plugins/common.h).
 *
 * Parameters: log=PATH, size=SIZE (common.h),
 *   extents=good|none|gap   good: one data extent per request;
 *                           none: returns success without adding any extent;
 *                           gap: adds only an extent that starts after the requested
 *                                offset, ignores nbdkit_add_extent's refusal, returns 0;
 *   fail_pread=1            pread calls nbdkit_error and returns -1 without setting an
 *                           errno (the plugin does not preserve errno: the host uses EIO).
 * It advertises fast zero; its zero logs the flags it gets and fails fast zeroes with
 * ENOTSUP. -D quirks.tag=N shows up as the export description "tag=N".
 */
#define NBDKIT_API_VERSION 2
#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL
#include <nbdkit-plugin.h>
#include "common.h"

/* -D quirks.tag=N */
NBDKIT_DLL_PUBLIC int quirks_debug_tag = 0;

enum extents_mode { EXTENTS_GOOD, EXTENTS_NONE, EXTENTS_GAP };
static enum extents_mode extents_mode = EXTENTS_GOOD;
static int fail_pread;

static int
q_config (const char *key, const char *value)
{
  int r = common_config (key, value);
  if (r != 0)
    return r == 1 ? 0 : -1;
  if (strcmp (key, "extents") == 0) {
    if (strcmp (value, "good") == 0) extents_mode = EXTENTS_GOOD;
    else if (strcmp (value, "none") == 0) extents_mode = EXTENTS_NONE;
    else if (strcmp (value, "gap") == 0) extents_mode = EXTENTS_GAP;
    else { nbdkit_error ("bad extents: %s", value); return -1; }
    return 0;
  }
  if (strcmp (key, "fail_pread") == 0) {
    fail_pread = nbdkit_parse_bool (value);
    return fail_pread == -1 ? -1 : 0;
  }
  nbdkit_error ("unknown parameter '%s'", key);
  return -1;
}

static void *q_open (int readonly) { return NBDKIT_HANDLE_NOT_NEEDED; }
static int64_t q_get_size (void *h) { return disk_size; }
static int q_can_fua (void *h) { return NBDKIT_FUA_NATIVE; }
static int q_can_fast_zero (void *h) { return 1; }

static const char *
q_export_description (void *h)
{
  return nbdkit_printf_intern ("tag=%d", quirks_debug_tag);
}

static int
q_pread (void *h, void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
  log_call ("pread %u %llu flags=0x%x", count, (unsigned long long) offset, flags);
  if (fail_pread) {
    nbdkit_error ("pread refused at %llu", (unsigned long long) offset);
    return -1;
  }
  memcpy (buf, disk + offset, count);
  return 0;
}

static int
q_pwrite (void *h, const void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
  log_call ("pwrite %u %llu flags=0x%x", count, (unsigned long long) offset, flags);
  memcpy (disk + offset, buf, count);
  return 0;
}

static int
q_flush (void *h, uint32_t flags)
{
  log_call ("flush flags=0x%x", flags);
  return 0;
}

static int
q_zero (void *h, uint32_t count, uint64_t offset, uint32_t flags)
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
q_extents (void *h, uint32_t count, uint64_t offset, uint32_t flags,
           struct nbdkit_extents *extents)
{
  log_call ("extents %u %llu flags=0x%x", count, (unsigned long long) offset, flags);
  switch (extents_mode) {
  case EXTENTS_GOOD:
    return nbdkit_add_extent (extents, offset, count, 0);
  case EXTENTS_NONE:
    return 0;
  case EXTENTS_GAP:
    /* Refused by nbdkit_add_extent: the first extent must cover the offset. */
    nbdkit_add_extent (extents, offset + 512, count, 0);
    return 0;
  }
  return 0;
}

static struct nbdkit_plugin plugin = {
  .name = "quirks",
  .version = "1.0",
  .config = q_config,
  .config_help = "log=PATH size=SIZE extents=good|none|gap fail_pread=BOOL",
  .get_ready = common_get_ready,
  .unload = common_unload,
  .open = q_open,
  .get_size = q_get_size,
  .export_description = q_export_description,
  .can_fua = q_can_fua,
  .can_fast_zero = q_can_fast_zero,
  .pread = q_pread,
  .pwrite = q_pwrite,
  .flush = q_flush,
  .zero = q_zero,
  .extents = q_extents,
};

NBDKIT_REGISTER_PLUGIN (plugin)
