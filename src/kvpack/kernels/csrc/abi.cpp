// The library's ABI version (see kvpack.h): checked by kvpack/kernels/native.py after loading.
#include "kvpack.h"

extern "C" int kvpack_abi_version() { return KVPACK_ABI_VERSION; }
