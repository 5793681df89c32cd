/* Has no .open: the host must refuse to load it, naming the callback. */
#define NBDKIT_API_VERSION 2
#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL
#include <nbdkit-plugin.h>

static int64_t no_get_size (void *h) { return 0; }
static int no_pread (void *h, void *buf, uint32_t c, uint64_t o, uint32_t f) { return 0; }

static struct nbdkit_plugin plugin = {
  .name = "no-open",
  .get_size = no_get_size,
  .pread = no_pread,
};

NBDKIT_REGISTER_PLUGIN (plugin)
