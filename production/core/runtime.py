"""Device, precision and environment facts: where a run executes, how it is timed, what it ran on."""

from __future__ import annotations

import contextlib
import ctypes
import platform
import resource
import subprocess
import sys
from dataclasses import asdict, dataclass

import torch

from production.core.errors import UserError
from production.core.layout import REPO_ROOT

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how a run executes. `dtype` is the autocast precision; master weights stay fp32."""

    device: str
    dtype: str
    compile: bool | None  # None: let the tuner measure it (CUDA)

    def to_dict(self) -> dict:
        return asdict(self)

    def autocast(self):
        """bf16 autocast on the run's device, or nothing for fp32."""
        if self.dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype=DTYPES[self.dtype])


def mps_available() -> bool:
    return torch.backends.mps.is_available()


def resolve_runtime(device: str = "auto", dtype: str = "auto", compile: bool | None = None) -> RuntimeConfig:
    """auto device: cuda > mps > cpu. auto dtype: bf16 where the accelerator supports it, fp32 on CPU.
    auto compile: measured by the tuner on CUDA (None here), off elsewhere."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device} requested but CUDA is not available on this machine; use --device cpu")
    if kind == "mps" and not mps_available():
        raise UserError("--device mps requested but MPS is not available on this machine; use --device cpu")
    if kind not in ("cuda", "mps", "cpu"):
        raise UserError(f"unsupported device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    if dtype == "auto":
        bf16_ok = (kind == "cuda" and torch.cuda.is_bf16_supported()) or kind == "mps"
        dtype = "bf16" if bf16_ok else "fp32"
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; valid: auto, {', '.join(DTYPES)}")
    if compile is None and kind != "cuda":
        compile = False
    return RuntimeConfig(device=device, dtype=dtype, compile=compile)


def device_name(device: str) -> str:
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    if kind == "mps":
        return "Apple MPS"
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return names[0]
    except (OSError, IndexError):
        return platform.processor() or platform.machine()


def git_state() -> dict:
    """Commit and dirty flag of the code that runs (None outside a git checkout)."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain")  # untracked (not ignored) files count: they may be code that runs
    return {"commit": commit, "dirty": None if commit is None else bool(status)}


def environment(device: str) -> dict:
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "device": device,
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        **{f"git_{k}": v for k, v in git_state().items()},
    }


# dense bf16 peak FLOP/s of common accelerators, by a substring of torch.cuda.get_device_name()
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "4090": 165e12}
# HBM/GDDR bandwidth in bytes/s (SXM parts; the first matching name wins, so the A100 80GB precedes the A100)
PEAK_BANDWIDTH = {
    "H200": 4.8e12,
    "H100 PCIe": 2.0e12,
    "H100": 3.35e12,
    "A100-SXM4-80GB": 2.039e12,
    "A100 80GB PCIe": 1.935e12,
    "A100": 1.555e12,
    "L40S": 0.864e12,
    "A10G": 0.6e12,
    "4090": 1.008e12,
}


def peak_flops(device: str, dtype: str) -> float | None:
    """The device's dense bf16 peak, for MFU; None where unknown (CPU, fp32, other GPUs)."""
    if torch.device(device).type != "cuda" or dtype != "bf16":
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def peak_bandwidth(device: str) -> float | None:
    """The device's memory bandwidth in bytes/s, for effective-bandwidth fractions; None where unknown."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((v for k, v in PEAK_BANDWIDTH.items() if k in name), None)


def retain_cpu_heap() -> bool:
    """Keep freed memory in the process heap (glibc only). A training step allocates and frees hundreds of MB
    of logits and gradients; by default glibc maps each such block fresh from the OS and returns it on free,
    so every step pays page faults for all of it (a third of CPU step time at nano size). Returns whether the
    setting took effect (False off glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from glibc's malloc.h
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def device_signature(device: str) -> str:
    """What a measured decision depends on, e.g. cuda:NVIDIA H200:cc90, mps:Apple MPS, cpu:<model name>:2."""
    kind = torch.device(device).type
    if kind == "cuda":
        major, minor = torch.cuda.get_device_capability(torch.device(device))
        return f"cuda:{torch.cuda.get_device_name(torch.device(device))}:cc{major}{minor}"
    if kind == "mps":
        return f"mps:{device_name(device)}"
    return f"cpu:{device_name(device)}:{torch.get_num_threads()}"


def maxrss_bytes(maxrss: int, system: str | None = None) -> int:
    """getrusage's ru_maxrss in bytes: macOS reports bytes, Linux (and the BSDs) KiB. `system`: sys.platform."""
    return maxrss if (system or sys.platform) == "darwin" else maxrss * 1024


def peak_rss_bytes(who: int = resource.RUSAGE_SELF) -> int:
    """Peak resident memory of this process (or of its largest waited-for child: RUSAGE_CHILDREN)."""
    return maxrss_bytes(resource.getrusage(who).ru_maxrss)


def synchronize(device: str) -> None:
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.synchronize()
    elif kind == "mps":
        torch.mps.synchronize()
