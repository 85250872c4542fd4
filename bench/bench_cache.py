"""Fragment cache cost against the plain operation it wraps, measured in the same run.

    .venv/bin/python bench/bench_cache.py

Cases (each a median over repeated rounds; files are in the page cache, so DISK figures are
memory-speed reads through the filesystem, not NVMe):

* ``hit``: ``get`` of a fragment already at DEVICE, against a plain ``dict`` lookup (the
  bookkeeping cost: lock, LRU touch, stats).
* ``spill_read``: ``get(key, HOST)`` of a fragment whose only copy is in the spill directory
  (then the HOST copy is evicted again), against ``safetensors.torch.load_file`` of the same file
  with its bytes read (``.numpy().tobytes()``; ``load_file`` alone only maps the file). The difference is the
  sha256 check and bookkeeping.
* ``spill_write``: ``demote(key, DISK)`` of a HOST-only fragment (atomic write: temp file, fsync,
  rename), against ``safetensors.torch.save_file`` to a path (no checksum, no fsync).
* ``remote_range``: ``get(fid, HOST)`` from a holo checkpoint on a local HTTP server, against a
  bare ``urllib`` Range request of the same bytes (the cost of decode and checksum).
* ``remote_many``: ``get_many`` of all fragments of a checkpoint with 8 workers, against the same
  fragments fetched by one ``get`` after another, with ``LATENCY_S`` of latency injected per
  request by the server (a stand-in for a CDN round trip; localhost has none).
"""

from __future__ import annotations

import os
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import torch  # noqa: E402
from _common import time_call, write_results  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from torch_arbiter.cache import CacheConfig, CacheTier, FragmentCache  # noqa: E402

SIZES = {"64KiB": 64 << 10, "1MiB": 1 << 20, "16MiB": 16 << 20}
LATENCY_S = 0.02


def _fragment(nbytes: int) -> torch.Tensor:
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(nbytes))


def _hit_case(cache: FragmentCache, nbytes: int) -> tuple[dict, dict]:
    cache.put("hit", _fragment(nbytes), CacheTier.DEVICE)
    plain = {"hit": cache.get("hit")}
    measured = time_call(lambda: cache.get("hit"), repeat=31, number=200)
    baseline = time_call(lambda: plain["hit"], repeat=31, number=200)
    return measured, baseline


def _spill_read_case(cache: FragmentCache, nbytes: int, scratch: Path) -> tuple[dict, dict]:
    tensor = _fragment(nbytes)
    cache.put("spilled", tensor, CacheTier.DISK)
    plain = scratch / f"plain-{nbytes}.safetensors"
    save_file({"fragment": tensor}, str(plain))

    def through_cache() -> None:
        cache.get("spilled", CacheTier.HOST)
        cache.evict("spilled", CacheTier.HOST)

    # load_file maps the file lazily; tobytes() makes it read the bytes, as the cache's checksum does
    # (not clone(): on a busy 2-core machine torch's threaded copy waits a scheduler tick)
    return time_call(through_cache, repeat=15), time_call(lambda: load_file(str(plain))["fragment"].numpy().tobytes(), repeat=15)


def _spill_write_case(cache: FragmentCache, nbytes: int, scratch: Path) -> tuple[dict, dict]:
    tensor = _fragment(nbytes)
    plain = scratch / f"write-{nbytes}.safetensors"

    def through_cache() -> None:
        cache.put("written", tensor, CacheTier.HOST)  # drops the DISK copy: the demote must write
        cache.demote("written", CacheTier.DISK)

    return time_call(through_cache, repeat=15), time_call(lambda: save_file({"fragment": tensor}, str(plain)), repeat=15)


def _rows(name: str, size: str, measured: dict, baseline: dict) -> dict:
    return {
        "case": name,
        "size": size,
        "cache_median_us": measured["median_s"] * 1e6,
        "baseline_median_us": baseline["median_s"] * 1e6,
        "ratio": measured["median_s"] / baseline["median_s"],
    }


def _remote_cases(scratch: Path) -> list[dict]:
    from test_cache_holo import _serve  # the same range-capable server the tests use

    from torch_arbiter.holo import HoloTensor
    from torch_arbiter.holo.format import HoloCheckpoint, save_holo

    holo_dir = scratch / "holo"
    generator = torch.Generator().manual_seed(0)
    weights = {f"layer{i}.weight": torch.randn(256, 256, generator=generator) for i in range(8)}
    weights["w"] = torch.randn(1024, 1024, generator=generator)
    save_holo(holo_dir, {name: HoloTensor.encode(weight) for name, weight in weights.items()})
    checkpoint = HoloCheckpoint.open(holo_dir)
    server, url = _serve(holo_dir)
    rows = []
    try:
        config = CacheConfig(device="cpu", remote_url=url, spill_dir=scratch / "remote-spill", stage_remote_on_disk=False)
        with FragmentCache(config) as cache:
            for fid in checkpoint.fragment_ids("w"):
                entry = checkpoint.fragment_entry(fid)
                start, end = entry["offset"], entry["offset"] + entry["length"] - 1
                request = urllib.request.Request(url + entry["file"], headers={"Range": f"bytes={start}-{end}"})

                def through_cache(fid=fid) -> None:
                    cache.get(fid, CacheTier.HOST)
                    cache.evict(fid, CacheTier.HOST)

                def bare_range(request=request) -> bytes:
                    with urllib.request.urlopen(request, timeout=10) as response:
                        return response.read()

                rows.append(
                    _rows("remote_range", f"{fid} ({entry['length']} B)", time_call(through_cache, repeat=11), time_call(bare_range, repeat=11))
                )
            fids = checkpoint.fragment_ids()
            server.delay = LATENCY_S

            def forget_host_copies() -> None:
                for fid in fids:
                    cache.evict(fid, CacheTier.HOST)

            def parallel() -> None:
                cache.get_many(fids, CacheTier.HOST, max_workers=8)
                forget_host_copies()

            def sequential() -> None:
                for fid in fids:
                    cache.get(fid, CacheTier.HOST)
                forget_host_copies()

            label = f"{len(fids)} fragments, {LATENCY_S * 1e3:.0f} ms latency"
            rows.append(_rows("remote_many", label, time_call(parallel, repeat=7, warmup=1), time_call(sequential, repeat=7, warmup=1)))
    finally:
        server.shutdown()
        server.server_close()
    return rows


def main() -> None:
    cases = []
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as scratch_name:
        scratch = Path(scratch_name)
        with FragmentCache(CacheConfig(device="cpu", spill_dir=scratch / "spill")) as cache:
            for size, nbytes in SIZES.items():
                cases.append(_rows("hit", size, *_hit_case(cache, nbytes)))
                cases.append(_rows("spill_read", size, *_spill_read_case(cache, nbytes, scratch)))
                cases.append(_rows("spill_write", size, *_spill_write_case(cache, nbytes, scratch)))
        cases += _remote_cases(scratch)
    table = ["| case | size | cache median (µs) | baseline median (µs) | ratio |", "| --- | --- | ---: | ---: | ---: |"]
    table += [
        f"| {c['case']} | {c['size']} | {c['cache_median_us']:.1f} | {c['baseline_median_us']:.1f} | {c['ratio']:.2f} |"
        for c in cases
    ]
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    notes = (
        f"Load average at the end of the run: {load} (on 2 cores). "
        "Baselines: `hit` = dict lookup; `spill_read` = safetensors load_file + tobytes (bytes read); `spill_write` = safetensors "
        "save_file (no checksum, no fsync, not atomic); `remote_range` = bare urllib Range GET of the same "
        "bytes; `remote_many` = the same fragments by sequential get(). Files sit in the page cache. The machine "
        "is shared with other jobs (2 cores): medians in the 4-8 ms range snap to the scheduler tick."
    )
    path = write_results("cache", "Fragment cache: cost against the plain operation", "\n".join(table), {"cases": cases}, notes)
    print(path.read_text())


if __name__ == "__main__":
    main()
