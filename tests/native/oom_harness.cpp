// Drives the allocator shim the way PyTorch's CUDAPluggableAllocator does in global mode (host
// backend) and reports what a refused allocation becomes: a c10::OutOfMemoryError thrown through
// the shim, or a null pointer. Usage: oom_harness SHIM HELPER PREFIX (HELPER "-" for none).
#include <c10/util/Exception.h>
#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <sys/types.h>

template <typename F>
static F symbol(void *lib, const char *name) {
    void *found = dlsym(lib, name);
    if (!found) {
        std::printf("missing %s\n", name);
        std::_Exit(3);
    }
    return reinterpret_cast<F>(found);
}

int main(int argc, char **argv) {
    if (argc != 4) return 2;
    void *shim = dlopen(argv[1], RTLD_NOW);
    if (!shim) return 2;
    auto set_backend = symbol<int (*)(int)>(shim, "torch_arbiter_set_backend");
    auto set_prefix = symbol<int (*)(const char *)>(shim, "torch_arbiter_ledger_set_prefix");
    auto set_limit = symbol<int (*)(int, uint64_t, uint64_t)>(shim, "torch_arbiter_ledger_set_limit");
    auto set_workload = symbol<uint64_t (*)(uint64_t)>(shim, "torch_arbiter_set_thread_workload");
    auto set_handler = symbol<void (*)(void (*)(const char *))>(shim, "torch_arbiter_set_oom_handler");
    auto alloc = symbol<void *(*)(ssize_t, int, void *)>(shim, "torch_arbiter_alloc");
    auto release = symbol<void (*)(void *, size_t, int, void *)>(shim, "torch_arbiter_free");
    auto unlink_ledger = symbol<int (*)(int)>(shim, "torch_arbiter_ledger_unlink");
    if (set_backend(0) || set_prefix(argv[3]) || set_limit(0, 7, 1 << 20)) return 2;
    if (std::strcmp(argv[2], "-") != 0) {
        void *helper = dlopen(argv[2], RTLD_NOW);
        if (!helper) return 2;
        set_handler(symbol<void (*)(const char *)>(helper, "torch_arbiter_throw_oom"));
    }
    set_workload(7);
    void *fits = alloc(1 << 19, 0, nullptr);
    int rc = 0;
    try {
        void *refused = alloc(1 << 20, 0, nullptr);
        std::printf("returned %s\n", refused ? "a pointer" : "null");
    } catch (const c10::OutOfMemoryError &e) {
        std::printf("OutOfMemoryError: %s\n", e.msg().c_str());
    } catch (...) {
        std::printf("another exception\n");
        rc = 1;
    }
    release(fits, 1 << 19, 0, nullptr);  // the shim's state is intact after the throw
    void *again = alloc(1 << 20, 0, nullptr);
    std::printf("after: %s\n", again ? "allocated" : "refused");
    release(again, 1 << 20, 0, nullptr);
    unlink_ledger(0);
    return rc;
}
