/* An old plugin whose struct ends after the v1 zero callback and errno_is_preserved
 * (_struct_size = 192). The fields after that are set here but must be ignored by the host:
 * can_zero (would say "emulate"), magic_config_key, thread_model.
 */
#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL
#include <nbdkit-plugin.h>
#include <stdio.h>
#include <string.h>

static char disk[65536];
static char script[256];

static int
ss_config (const char *key, const char *value)
{
  if (strcmp (key, "script") != 0) {
    nbdkit_error ("expected script=, got %s", key);
    return -1;
  }
  strncpy (script, value, sizeof script - 1);
  return 0;
}

static void *ss_open (int readonly) { return NBDKIT_HANDLE_NOT_NEEDED; }
static int64_t ss_get_size (void *h) { return sizeof disk; }
static int
ss_pread (void *h, void *buf, uint32_t count, uint64_t offset)
{
  memcpy (buf, disk + offset, count);
  return 0;
}
static int
ss_pwrite (void *h, const void *buf, uint32_t count, uint64_t offset)
{
  memcpy (disk + offset, buf, count);
  return 0;
}
static int
ss_zero (void *h, uint32_t count, uint64_t offset, int may_trim)
{
  memset (disk + offset, 0, count);
  return 0;
}
static int ss_can_zero (void *h) { return 0; }
static int ss_thread_model (void) { return NBDKIT_THREAD_MODEL_SERIALIZE_CONNECTIONS; }
static void ss_dump_plugin (void) { printf ("small_script=%s\n", script); }

static struct nbdkit_plugin plugin = {
  .name = "small-struct",
  .config = ss_config,
  .open = ss_open,
  .get_size = ss_get_size,
  .pread = ss_pread,
  .pwrite = ss_pwrite,
  .zero = ss_zero,
  .errno_is_preserved = 1,
  .dump_plugin = ss_dump_plugin, /* offset 192: just outside, ignored too */
  .can_zero = ss_can_zero,
  .magic_config_key = "size",
  .thread_model = ss_thread_model,
};

NBDKIT_DLL_PUBLIC struct nbdkit_plugin *
plugin_init (void)
{
  plugin._struct_size = 192;
  plugin._api_version = 1;
  plugin._thread_model = THREAD_MODEL;
  return &plugin;
}
