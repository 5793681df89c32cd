/* Sleeps and shuts down on request, for the shutdown tests.
 *
 * pread sleeps 60 s with nbdkit_nanosleep and fails if the sleep is cut short;
 * pwrite calls nbdkit_shutdown().
 */
#define NBDKIT_API_VERSION 2
#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL
#include <nbdkit-plugin.h>
#include <string.h>

static void *sl_open (int readonly) { return NBDKIT_HANDLE_NOT_NEEDED; }
static int64_t sl_get_size (void *h) { return 1024 * 1024; }

static int
sl_pread (void *h, void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
  if (nbdkit_nanosleep (60, 0) == -1)
    return -1;
  memset (buf, 0, count);
  return 0;
}

static int
sl_pwrite (void *h, const void *buf, uint32_t count, uint64_t offset,
           uint32_t flags)
{
  nbdkit_shutdown ();
  return 0;
}

static struct nbdkit_plugin plugin = {
  .name = "sleeper",
  .open = sl_open,
  .get_size = sl_get_size,
  .pread = sl_pread,
  .pwrite = sl_pwrite,
  .errno_is_preserved = 1,
};

NBDKIT_REGISTER_PLUGIN (plugin)
