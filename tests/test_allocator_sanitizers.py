"""The allocator's C sources under ThreadSanitizer and AddressSanitizer + UBSan.

Small C drivers, compiled here together with the library's sources, run the exported pair from
three threads (TSan: no data race in the ledger, the pointer table or the thread-locals) and
with garbage arguments and 100k live blocks (ASan/UBSan: no invalid access, no undefined
behaviour). Skipped when the compiler has no sanitizer runtime.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

import torch_arbiter.allocator

SOURCES = Path(torch_arbiter.allocator.__file__).resolve().parent
CC = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")

_COMMON = """
#include "arbiter_alloc.h"
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
"""

_THREADS = _COMMON + """
static void *worker(void *arg) {
    uint64_t key = (uint64_t)(uintptr_t)arg;
    torch_arbiter_set_thread_workload(key);
    if (key == 5) torch_arbiter_ledger_set_limit(0, 5, 300000); /* threads race to attach */
    ta_exercise_result r;
    if (torch_arbiter_exercise(7, 0, 30000, 8, 1, 65536, key + 1, &r) != 0 || r.violations) abort();
    return NULL;
}
int main(int argc, char **argv) {
    (void)argc;
    torch_arbiter_set_backend(TA_BACKEND_HOST);
    torch_arbiter_ledger_set_prefix(argv[1]);
    pthread_t t[3];
    uintptr_t keys[3] = {5, 5, 6};
    for (int i = 0; i < 3; i++) pthread_create(&t[i], NULL, worker, (void *)keys[i]);
    for (int i = 0; i < 3; i++) pthread_join(t[i], NULL);
    ta_workload_info info;
    ta_stats st;
    torch_arbiter_ledger_get(0, 5, &info);
    torch_arbiter_get_stats(&st);
    printf("%llu %llu %llu\\n", (unsigned long long)info.used, (unsigned long long)info.peak,
           (unsigned long long)st.live_allocs);
    torch_arbiter_ledger_unlink(0);
    return 0;
}
"""

_GARBAGE = _COMMON + """
int main(int argc, char **argv) {
    (void)argc;
    torch_arbiter_set_backend(TA_BACKEND_HOST);
    torch_arbiter_ledger_set_prefix(argv[1]);
    char local[16];
    void *p = torch_arbiter_alloc(100, 0, NULL);
    torch_arbiter_free(p, 5, 9, NULL);
    torch_arbiter_free(p, 100, 0, NULL);
    torch_arbiter_free(local, 16, 0, NULL);
    torch_arbiter_free(NULL, 0, 0, NULL);
    if (torch_arbiter_alloc(-1, 0, NULL) || torch_arbiter_alloc(0, 0, NULL) ||
        torch_arbiter_alloc(8, 99, NULL) || torch_arbiter_alloc(8, -3, NULL) ||
        torch_arbiter_alloc((ssize_t)1 << 62, 0, NULL))
        return 1;
    enum { N = 100000 };
    void **ps = malloc(N * sizeof *ps);
    for (int i = 0; i < N; i++) ps[i] = torch_arbiter_alloc(1 + i % 300, 0, NULL);
    for (int i = N - 1; i >= 0; i -= 2) torch_arbiter_free(ps[i], 0, 0, NULL);
    for (int i = 0; i < N; i += 2) torch_arbiter_free(ps[i], 0, 0, NULL);
    free(ps);
    ta_exercise_result r;
    int bad = torch_arbiter_exercise(1, 0, 10, 0, 1, 1, 1, &r);
    ta_stats st;
    torch_arbiter_get_stats(&st);
    printf("%d %llu %llu %llu %llu\\n", bad, (unsigned long long)st.live_allocs,
           (unsigned long long)st.invalid_args, (unsigned long long)st.unknown_frees,
           (unsigned long long)st.backend_failures);
    torch_arbiter_ledger_detach_all();
    torch_arbiter_ledger_unlink(0);
    return 0;
}
"""


_LOCK_HOLDER_DIES = """
#include "ledger.c" /* the driver reaches the ledger's internal lock */
#include <stdio.h>
#include <sys/wait.h>
int main(int argc, char **argv) {
    (void)argc;
    torch_arbiter_set_backend(TA_BACKEND_HOST);
    torch_arbiter_ledger_set_prefix(argv[1]);
    if (!ta_ledger_get(0)) return 1;
    pid_t pid = fork();
    if (pid == 0) {
        ta_ledger *mine = ta_ledger_get(0);
        if (!mine || shm_lock(mine->shm) != 0) _exit(3);
        _exit(0); /* dies holding the ledger's lock */
    }
    int status;
    waitpid(pid, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) return 2;
    if (torch_arbiter_ledger_set_limit(0, 99, 1234) != 0) return 4; /* creating a slot locks */
    int64_t reaped = torch_arbiter_ledger_reap(0);
    ta_workload_info info;
    if (reaped < 0 || torch_arbiter_ledger_get(0, 99, &info) != 0 || info.limit != 1234) return 5;
    printf("recovered\\n");
    torch_arbiter_ledger_unlink(0);
    return 0;
}
"""


def _build_and_run(tmp_path: Path, source: str, sanitize: str, env: dict[str, str], *, ledger_in_driver: bool = False) -> str:
    if CC is None:
        pytest.skip("no C compiler")
    driver = tmp_path / "driver.c"
    driver.write_text(source)
    binary = tmp_path / "driver"
    build = subprocess.run(
        [CC, "-O1", "-g", "-std=c11", f"-fsanitize={sanitize}", "-fno-sanitize-recover=all", f"-I{SOURCES}",
         "-o", str(binary), str(driver), str(SOURCES / "arbiter_alloc.c"),
         *([] if ledger_in_driver else [str(SOURCES / "ledger.c")]), "-ldl", "-lrt", "-lpthread"],
        capture_output=True, text=True,
    )
    if build.returncode != 0:
        pytest.skip(f"{CC} cannot build with -fsanitize={sanitize}: {build.stderr.strip()[:200]}")
    prefix = f"ta_san_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    run = subprocess.run([str(binary), prefix], capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    leftover = [name for name in os.listdir("/dev/shm") if name.startswith(prefix)]
    for name in leftover:
        os.unlink("/dev/shm/" + name)
    assert run.returncode == 0, run.stderr[-3000:]
    for finding in ("ERROR: AddressSanitizer", "WARNING: ThreadSanitizer", "runtime error", "LeakSanitizer"):
        assert finding not in run.stderr, run.stderr[-3000:]
    assert not leftover
    return run.stdout


def test_three_threads_have_no_data_race(tmp_path):
    out = _build_and_run(tmp_path, _THREADS, "thread", {"TSAN_OPTIONS": "halt_on_error=1"})
    used, peak, live = map(int, out.split())
    assert used == 0 and 0 < peak <= 300000 and live == 0


def test_garbage_arguments_have_no_memory_error(tmp_path):
    out = _build_and_run(tmp_path, _GARBAGE, "address,undefined", {"ASAN_OPTIONS": "allocator_may_return_null=1:detect_leaks=1"})
    bad_exercise, live, invalid, unknown, backend_failures = map(int, out.split())
    assert bad_exercise == -22 and live == 0
    assert (invalid, unknown, backend_failures) == (3, 2, 1)


def test_a_process_dying_inside_the_ledger_lock_does_not_block_the_others(tmp_path):
    out = _build_and_run(tmp_path, _LOCK_HOLDER_DIES, "address,undefined", {}, ledger_in_driver=True)
    assert out.strip() == "recovered"
