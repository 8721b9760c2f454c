/* libcdpcapture.so: the library that `cdpctl protect` (capture issue) will
 * LD_PRELOAD into unmodified programs. For now it links the journal writer
 * and exports its version, so that the build, packaging and loading of a
 * plain shared library beside the extension are in place and tested. */
#include "../cdp.h"

__attribute__((visibility("default"))) int cdp_preload_abi_version(void)
{
    return 1;
}

__attribute__((visibility("default"))) uint32_t cdp_preload_crc32c(const void *buf, size_t len)
{
    return cdp_crc32c(0, buf, len);
}
