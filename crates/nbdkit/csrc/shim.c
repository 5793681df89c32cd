/* sluice-nbdkit: the variadic part of nbdkit's server API.
 *
 * Stable Rust cannot define C-variadic functions, so the six printf-like entry points that
 * nbdkit plugins import live here.  Each formats its message with vsnprintf into a malloc'd
 * buffer and hands the finished string to a Rust function (see src/api/log.rs), which owns
 * every policy decision: logging through tracing, remembering the last error of the thread
 * for the request that is failing, interning.
 *
 * errno: nbdkit_error and nbdkit_debug must leave errno as they found it (plugins call
 * nbdkit_error ("...: %m") and then return -1, and the host reads errno afterwards), and %m
 * must expand to the errno at the time of the call.  glibc's vsnprintf implements %m itself;
 * we save errno on entry, make sure it still holds that value while formatting, and restore
 * it before returning.
 */

#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>

/* Implemented in Rust (src/api/log.rs and src/api/conn.rs). */
extern void sluice_nbdkit_emit_error (const char *msg);
extern void sluice_nbdkit_emit_debug (const char *msg);
extern int sluice_nbdkit_debug_enabled (void);
extern const char *nbdkit_strdup_intern (const char *str);

#define VISIBLE __attribute__((__visibility__("default")))

/* Formats into a malloc'd string, or returns NULL on allocation or format failure.  errno
 * must hold the caller's errno on entry, for %m.
 */
static char *
format_message (const char *fmt, va_list args)
{
  va_list copy;
  int saved = errno;
  char small[256];
  int n;
  char *buf;

  va_copy (copy, args);
  n = vsnprintf (small, sizeof small, fmt, copy);
  va_end (copy);
  if (n < 0)
    return NULL;
  buf = malloc ((size_t) n + 1);
  if (buf == NULL)
    return NULL;
  if ((size_t) n < sizeof small) {
    for (int i = 0; i <= n; ++i)
      buf[i] = small[i];
    return buf;
  }
  errno = saved;
  vsnprintf (buf, (size_t) n + 1, fmt, args);
  return buf;
}

VISIBLE void
nbdkit_verror (const char *fmt, va_list args)
{
  int saved = errno;
  char *msg = format_message (fmt, args);

  sluice_nbdkit_emit_error (msg ? msg : fmt);
  free (msg);
  errno = saved;
}

VISIBLE void
nbdkit_error (const char *fmt, ...)
{
  va_list args;

  va_start (args, fmt);
  nbdkit_verror (fmt, args);
  va_end (args);
}

VISIBLE void
nbdkit_vdebug (const char *fmt, va_list args)
{
  int saved = errno;
  char *msg;

  if (!sluice_nbdkit_debug_enabled ()) {
    errno = saved;
    return;
  }
  errno = saved;
  msg = format_message (fmt, args);
  sluice_nbdkit_emit_debug (msg ? msg : fmt);
  free (msg);
  errno = saved;
}

VISIBLE void
nbdkit_debug (const char *fmt, ...)
{
  va_list args;

  va_start (args, fmt);
  nbdkit_vdebug (fmt, args);
  va_end (args);
}

VISIBLE const char *
nbdkit_vprintf_intern (const char *fmt, va_list args)
{
  char *msg = format_message (fmt, args);
  const char *r;

  if (msg == NULL) {
    nbdkit_error ("nbdkit_printf_intern: %m");
    return NULL;
  }
  r = nbdkit_strdup_intern (msg);
  free (msg);
  return r;
}

VISIBLE const char *
nbdkit_printf_intern (const char *fmt, ...)
{
  va_list args;
  const char *r;

  va_start (args, fmt);
  r = nbdkit_vprintf_intern (fmt, args);
  va_end (args);
  return r;
}
