/* Claims _api_version 3, which no nbdkit has: the host must refuse it. */
#define NBDKIT_API_VERSION 2
#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL
#include <nbdkit-plugin.h>

static void *a3_open (int readonly) { return NBDKIT_HANDLE_NOT_NEEDED; }
static int64_t a3_get_size (void *h) { return 0; }
static int a3_pread (void *h, void *buf, uint32_t c, uint64_t o, uint32_t f) { return 0; }

static struct nbdkit_plugin plugin = {
  .name = "api3",
  .open = a3_open,
  .get_size = a3_get_size,
  .pread = a3_pread,
};

NBDKIT_DLL_PUBLIC struct nbdkit_plugin *
plugin_init (void)
{
  plugin._struct_size = sizeof plugin;
  plugin._api_version = 3;
  plugin._thread_model = THREAD_MODEL;
  return &plugin;
}
