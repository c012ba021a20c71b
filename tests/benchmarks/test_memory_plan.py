"""benchmarks/memory_plan.py on the tiny preset: the fake-tensor trace (no memory, no arithmetic) must report the
same step peak as the same step on real CPU tensors, or the GPU memory plan built on it means nothing."""

import pytest

from _load import load

pytestmark = pytest.mark.slow


def test_fake_peak_equals_real_peak_tiny():
    mp = load("memory_plan")
    # 256x256, batch 2, fp32: activations are most of the peak here (the point of the check)
    fake = mp.trace_step("tiny", 256, 256, 2, 24, "none", "fp32", real=False)
    real = mp.trace_step("tiny", 256, 256, 2, 24, "none", "fp32", real=True)
    assert fake["act"] + fake["temp"] > 0.4 * fake["peak"], fake
    # stated tolerance 1 %: the only intended difference is fake nonzero's upper bound (a few KB here)
    assert abs(fake["peak"] - real["peak"]) <= 0.01 * real["peak"], (fake, real)
    assert fake["param"] == real["param"] and fake["opt"] == real["opt"]


def test_prediction_and_fit_arithmetic():
    mp = load("memory_plan")
    n = 100_000_000
    trace = {"dtype": "bf16", "act": 10 * mp.GIB, "temp": 0, "oth": 0, "grad": 0, "buffer": 0}
    state = {"n": n, "n_root": 10_000_000, "n_unit_max": 5_000_000}
    p = mp.predict(trace, state)
    assert p["1 GPU"] == 12 * n + 10 * mp.GIB
    assert p["DDP"] == 20 * n + 10 * mp.GIB
    assert p["ZeRO-2"] == 4 * n + 16 * n / 8 + 8e8 + 10 * mp.GIB
    assert p["FSDP2"] == 16 * n / 8 + 2 * 10_000_000 + 12 * 5_000_000 + 10 * mp.GIB
    assert mp.fits(30 * mp.GIB, 39.4) and not mp.fits(36 * mp.GIB, 39.4)
