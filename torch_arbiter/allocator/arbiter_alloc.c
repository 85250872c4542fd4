/* placeholder replaced by the allocator implementation */
int torch_arbiter_alloc_version(void) { return 0; }
