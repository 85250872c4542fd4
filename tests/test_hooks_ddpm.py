"""patch() on the real digits DDPMPipeline: exact images at quality 1, PSNR per quality,
quality moving between UNet calls of a running denoising loop, arbiter-driven lowering."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

from torch_arbiter import Arbiter, ArbiterConfig, Priority, WorkloadType
from torch_arbiter.demo import models
from torch_arbiter.hooks import SAFE_POINT_HOOK, patch
from torch_arbiter.nn import HoloConv2d, HoloLinear

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference_images(digits_ddpm, sample_digits):
    return sample_digits(digits_ddpm)


@pytest.fixture(scope="module")
def managed_ddpm():
    pipeline = models.load_digits_ddpm()
    managed = patch(pipeline, register=False, progress=False)
    yield managed
    managed.unpatch()


def test_quality_one_gives_the_unpatched_images(managed_ddpm, reference_images, sample_digits):
    managed_ddpm.set_quality(1.0)
    unet = managed_ddpm.model.unet
    kinds = {type(m) for m in unet.modules()}
    assert HoloConv2d in kinds and HoloLinear in kinds
    assert unet._diffusers_hook.get_hook(SAFE_POINT_HOOK) is not None
    assert np.array_equal(sample_digits(managed_ddpm.model), reference_images)


def test_patch_self_calibrates_the_unets_convs_on_its_own_denoising_loop(managed_ddpm):
    encoded = [m for m in managed_ddpm.model.unet.modules()
               if isinstance(m, (HoloConv2d, HoloLinear)) and m.holo.scheme == "nested4x2"]
    assert sum(isinstance(m, HoloConv2d) for m in encoded) >= 10
    assert all("out_rel_error" in m.holo.level_fidelity(1) for m in encoded)


def test_psnr_and_resident_bytes_per_quality(managed_ddpm, reference_images, sample_digits, record_property):
    rows = []
    for q in (1.0, 0.7, 0.5, managed_ddpm.min_quality):
        managed_ddpm.set_quality(q)
        images = sample_digits(managed_ddpm.model)
        rows.append((q, managed_ddpm.resident_bytes, managed_ddpm.bytes_at(q), models.psnr(images, reference_images)))
    managed_ddpm.set_quality(1.0)
    for q, resident, planned, psnr in rows:
        record_property(f"q={q:.3f}", f"resident={resident} psnr={psnr:.2f}")
        print(f"quality {q:.3f}: resident {resident} bytes, PSNR {psnr:.2f} dB")
        assert resident == planned
    assert math.isinf(rows[0][3])
    assert [r[1] for r in rows] == sorted((r[1] for r in rows), reverse=True)
    assert all(psnr > 20.0 for _, _, _, psnr in rows[1:])  # same digits, slightly different strokes


def test_quality_moves_only_between_unet_calls(managed_ddpm, sample_digits):
    """A second thread flips the quality while the pipeline denoises; every UNet call sees one plan."""
    from diffusers.hooks import HookRegistry, ModelHook

    unet = managed_ddpm.model.unet
    layers = list(managed_ddpm.layers.values())
    snapshots = []

    class Recorder(ModelHook):
        def new_forward(self, module, *args, **kwargs):
            start = tuple(layer.level for layer in layers)
            output = self.fn_ref.original_forward(*args, **kwargs)
            snapshots.append((start, tuple(layer.level for layer in layers)))
            return output

    # The recorder must run inside the safe-point hook, and a registry wraps later hooks around
    # earlier ones: take the safe-point hook off, add the recorder, put the safe-point hook back.
    managed_ddpm.set_quality(1.0)
    registry = HookRegistry.check_if_exists_or_initialize(unet)
    safe_point = registry.get_hook(SAFE_POINT_HOOK)
    registry.remove_hook(SAFE_POINT_HOOK, recurse=False)
    registry.register_hook(Recorder(), "recorder")
    registry.register_hook(safe_point, SAFE_POINT_HOOK)
    stop = threading.Event()

    def flipper():
        flips = 0
        while not stop.is_set():
            managed_ddpm.set_quality((0.5, 1.0)[flips % 2])
            flips += 1
            stop.wait(0.02)

    thread = threading.Thread(target=flipper)
    thread.start()
    try:
        images = sample_digits(managed_ddpm.model, steps=20)
    finally:
        stop.set()
        thread.join(30)
        registry.remove_hook(SAFE_POINT_HOOK, recurse=False)
        registry.remove_hook("recorder", recurse=False)
        registry.register_hook(safe_point, SAFE_POINT_HOOK)
    managed_ddpm.set_quality(1.0)
    assert images.shape == (4, 16, 16, 1) and np.isfinite(images).all()
    assert len(snapshots) == 20
    assert all(start == end for start, end in snapshots), "a level changed in the middle of a UNet call"
    assert len({start for start, _ in snapshots}) >= 2, "the quality never moved during the pipeline call"


def test_the_arbiter_lowers_a_low_priority_pipeline(fresh_digits_ddpm, reference_images, sample_digits):
    pipeline = fresh_digits_ddpm
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(0.01))
    managed = patch(pipeline, arbiter, workload=WorkloadType.IMAGE_GENERATION, priority=Priority.LOW,
                    activation_bytes=0, min_quality=0.0, progress=False)
    try:
        assert managed.quality == 1.0
        squeeze = arbiter.state().capacity_bytes - int(0.6 * managed.full_bytes)
        chat = arbiter.request_allocation_blocking(WorkloadType.LLM_INFERENCE, Priority.HIGH, bytes=squeeze,
                                                   min_quality=1.0, activation_bytes=0)
        assert managed.quality < 1.0 and managed.resident_bytes <= 0.6 * managed.full_bytes
        lowered = sample_digits(pipeline)
        assert 20.0 < models.psnr(lowered, reference_images) < math.inf
        chat.release()
        assert arbiter.wait_until_settled(30)  # the idle pipeline is raised by the arbiter's applier thread
        assert managed.quality == 1.0
        assert np.array_equal(sample_digits(pipeline), reference_images)
    finally:
        managed.unpatch()
    assert pipeline.unet.conv_in.weight.numel() > 0 and type(pipeline.unet.conv_in) is torch.nn.Conv2d
    assert arbiter.state().workloads == ()
