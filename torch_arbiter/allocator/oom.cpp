// Global mode's out-of-memory signal: PyTorch's CUDAPluggableAllocator::allocate does not check
// the pointer the allocator returns, so a refused or failed allocation would reach kernels as a
// null pointer. In global mode the alloc shim calls this instead of returning null: it throws the
// c10::OutOfMemoryError that PyTorch's own allocator throws, which Python sees as
// torch.OutOfMemoryError. Built against the running torch's headers by install() (see scope.py).
#include <c10/util/Exception.h>

#include <string>

extern "C" __attribute__((visibility("default"))) void torch_arbiter_throw_oom(const char *message) {
    TORCH_CHECK_WITH(OutOfMemoryError, false, std::string("torch_arbiter: ") + message);
}
