"""Accelerator memory per device and the fits / does-not-fit verdict of `pr1.bench.memory`.

One JAX device per entry: a TPU chip (v5p runs its two TensorCores as one megacore device, so a
v5p-64 slice — 64 TensorCores — is 32 chips = 32 JAX devices) or one GPU. Capacities are the
vendors' nominal HBM figures, taken as GiB; what a program may use differs a little (libtpu's
compiler counts 95.74 GiB per v5p chip; the H200 lent to this project reports about 139 GiB), so
read a headroom of a few GiB as "tight", not "fits".
"""

from __future__ import annotations

import dataclasses

GiB = 1024**3

# HBM per JAX device, in GiB.
HBM_GIB: dict[str, float] = {
    # cloud.google.com/tpu/docs/v5e: "HBM capacity per chip | 16 GB"
    "v5e": 16,
    # cloud.google.com/tpu/docs/v5p: "HBM2e capacity and bandwidth | 95GB, 2765 GBps"; the same page:
    # "v5p-32 specifies a v5p TPU slice with 32 TensorCores (16 chips)": v5p-64 is 2x4x4 = 32 chips.
    "v5p": 95,
    # cloud.google.com/tpu/docs/v6e: "HBM capacity per chip | 32 GB"
    "v6e": 32,
    # NVIDIA H100 SXM5: "80 GB HBM3" (H100 datasheet; glennklockwood.com/garden/processors/h100)
    "H100": 80,
    # NVIDIA H200 SXM: "141GB HBM3e" (H200 datasheet)
    "H200": 141,
}


# jax's device_kind of each TPU chip -> its name above (for plans compiled for a TPU slice).
TPU_DEVICE_KINDS = {"TPU v5": "v5p", "TPU v5p": "v5p", "TPU v5 lite": "v5e", "TPU v6 lite": "v6e"}


@dataclasses.dataclass(frozen=True)
class Verdict:
    accelerator: str
    hbm_bytes: int
    peak_bytes: int

    @property
    def headroom_bytes(self) -> int:
        return self.hbm_bytes - self.peak_bytes

    @property
    def fits(self) -> bool:
        return self.headroom_bytes >= 0

    def __str__(self) -> str:
        word = "fits" if self.fits else "does not fit"
        sign = "headroom" if self.fits else "over by"
        return f"{word} ({sign} {format_bytes(abs(self.headroom_bytes))})"


def hbm_bytes(accelerator: str) -> int:
    if accelerator not in HBM_GIB:
        raise ValueError(f"unknown accelerator {accelerator!r}; known: {', '.join(HBM_GIB)}")
    return int(HBM_GIB[accelerator] * GiB)


def verdict(peak_bytes: int, accelerator: str, hbm: int | None = None) -> Verdict:
    """Does a per-device peak of `peak_bytes` fit `accelerator` (or an explicit `hbm` in bytes)?"""
    return Verdict(accelerator, hbm_bytes(accelerator) if hbm is None else int(hbm), int(peak_bytes))


def format_bytes(n: int | float) -> str:
    """Binary units at three significant figures: 512 B, 1.50 KiB, 95.0 GiB, 2.30 PiB."""
    n = float(n)
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    i = 0
    while abs(n) >= 1024 and i < len(units) - 1:
        n /= 1024
        i += 1
    if i == 0:
        return f"{int(n)} B"
    return (
        f"{n:.2f} {units[i]}"
        if abs(n) < 10
        else f"{n:.1f} {units[i]}"
        if abs(n) < 100
        else f"{n:.0f} {units[i]}"
    )
