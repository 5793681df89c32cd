/* An API version 1 RAM disk: flag-less data callbacks in the v1 slots. */
#define THREAD_MODEL NBDKIT_THREAD_MODEL_SERIALIZE_ALL_REQUESTS
#include <nbdkit-plugin.h>
#include "common.h"

static int fua_answer = NBDKIT_FUA_NATIVE;

static int
v1_config (const char *key, const char *value)
{
  int r = common_config (key, value);
  if (r != 0)
    return r == 1 ? 0 : -1;
  if (strcmp (key, "fua") == 0) {
    if (strcmp (value, "none") == 0) fua_answer = NBDKIT_FUA_NONE;
    else if (strcmp (value, "emulate") == 0) fua_answer = NBDKIT_FUA_EMULATE;
    else if (strcmp (value, "native") == 0) fua_answer = NBDKIT_FUA_NATIVE;
    else { nbdkit_error ("bad fua: %s", value); return -1; }
    return 0;
  }
  nbdkit_error ("unknown parameter '%s'", key);
  return -1;
}

static void *
v1_open (int readonly)
{
  log_call ("open readonly=%d", readonly);
  return NBDKIT_HANDLE_NOT_NEEDED;
}

static void v1_close (void *h) { log_call ("close"); }
static int64_t v1_get_size (void *h) { return disk_size; }
static int v1_can_fua (void *h) { return fua_answer; }

static int
v1_pread (void *h, void *buf, uint32_t count, uint64_t offset)
{
  log_call ("pread %u %llu", count, (unsigned long long) offset);
  memcpy (buf, disk + offset, count);
  return 0;
}

static int
v1_pwrite (void *h, const void *buf, uint32_t count, uint64_t offset)
{
  log_call ("pwrite %u %llu", count, (unsigned long long) offset);
  memcpy (disk + offset, buf, count);
  return 0;
}

static int v1_flush (void *h) { log_call ("flush"); return 0; }

static int
v1_trim (void *h, uint32_t count, uint64_t offset)
{
  log_call ("trim %u %llu", count, (unsigned long long) offset);
  memset (disk + offset, 0, count);
  return 0;
}

static int
v1_zero (void *h, uint32_t count, uint64_t offset, int may_trim)
{
  log_call ("zero %u %llu may_trim=%d", count, (unsigned long long) offset,
            may_trim);
  memset (disk + offset, 0, count);
  return 0;
}

static struct nbdkit_plugin plugin = {
  .name = "ramdisk-v1",
  .version = "1.0",
  .config = v1_config,
  .get_ready = common_get_ready,
  .unload = common_unload,
  .open = v1_open,
  .close = v1_close,
  .get_size = v1_get_size,
  .can_fua = v1_can_fua,
  .pread = v1_pread,
  .pwrite = v1_pwrite,
  .flush = v1_flush,
  .trim = v1_trim,
  .zero = v1_zero,
  .errno_is_preserved = 1,
};

NBDKIT_REGISTER_PLUGIN (plugin)
