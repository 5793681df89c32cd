/* Shared by sluice-nbdkit's C test plugins: a RAM disk and a call log.
 *
 * Each plugin records the calls the host makes into the file named by its log=PATH
 * parameter, one line per call ("pwrite 4096 0 flags=0x2"), so the Rust tests can assert
 * exactly what reached the C side.
 */
#ifndef SLUICE_TEST_COMMON_H
#define SLUICE_TEST_COMMON_H

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <stdint.h>

static FILE *log_fp;
static char *disk;
static int64_t disk_size = 1024 * 1024;

static void
log_call (const char *fmt, ...)
{
  va_list args;

  if (!log_fp)
    return;
  va_start (args, fmt);
  vfprintf (log_fp, fmt, args);
  va_end (args);
  fputc ('\n', log_fp);
  fflush (log_fp);
}

/* Handles common parameters; returns 1 if handled, 0 if not, -1 on error. */
static int
common_config (const char *key, const char *value)
{
  if (strcmp (key, "log") == 0) {
    log_fp = fopen (value, "w");
    if (!log_fp) {
      nbdkit_error ("open %s: %m", value);
      return -1;
    }
    return 1;
  }
  if (strcmp (key, "size") == 0) {
    disk_size = nbdkit_parse_size (value);
    if (disk_size == -1)
      return -1;
    return 1;
  }
  return 0;
}

static int
common_get_ready (void)
{
  disk = calloc (1, disk_size);
  if (!disk) {
    nbdkit_error ("calloc: %m");
    return -1;
  }
  log_call ("get_ready");
  return 0;
}

static void
common_unload (void)
{
  log_call ("unload");
  free (disk);
  if (log_fp)
    fclose (log_fp);
}

#endif
