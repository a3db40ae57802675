"""Accelerator detection: which llama-server variant this machine should run, and why.

Every probe reads the machine through a `System` (files, environment, commands, shared
libraries), so tests describe any machine with a `FixtureSystem`. Every candidate that is not
chosen gets a human reason: a silent fallback to the CPU is the complaint users have about
DMR's peers. Probes run in priority order, cheap checks first, and stop at the first
accelerator that works, so detection on a CPU-only machine runs no command at all.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import platform
import posixpath
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from dmr_cli import config
from dmr_cli.errors import BadRequest

# Priority order: the first available accelerator wins; cpu always works.
ACCELERATORS = ("metal", "cuda", "rocm", "vulkan", "opencl", "cpu")
# Values of DMR_GPU / --gpu.
GPU_CHOICES = ("auto", "cpu", "cuda", "vulkan", "metal", "opencl", "rocm")

# The cuda variant is built against CUDA 12 (llama.cpp's released CUDA builds, and any 12.x
# toolkit a source build uses): CUDA's minor-version compatibility lets a 12.x runtime run on
# the CUDA 12.0 GA driver or newer, and an older driver fails at load with "CUDA driver version
# is insufficient for CUDA runtime version". Minimums from NVIDIA's CUDA 12.0 release notes.
CUDA_MIN_DRIVER = "525.60.13"
CUDA_MIN_DRIVER_WINDOWS = "527.41"

_NVIDIA_SMI_QUERY = (
    "--query-gpu=name,memory.total,memory.free,driver_version",
    "--format=csv,noheader,nounits",
)
# WSL2 ships nvidia-smi and libcuda in /usr/lib/wsl/lib, which is often not on PATH.
_NVIDIA_SMI_PATHS = ("/usr/lib/wsl/lib/nvidia-smi", "/usr/bin/nvidia-smi")
_LIBCUDA_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libcuda.so.1",
    "/usr/lib/aarch64-linux-gnu/libcuda.so.1",
    "/usr/lib64/libcuda.so.1",
    "/usr/lib/wsl/lib/libcuda.so.1",
)
_KFD_NODES = "/sys/class/kfd/kfd/topology/nodes"
_VULKAN_ICD_DIRS = ("/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d", "/usr/local/share/vulkan/icd.d")
_VULKAN_LOADER_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libvulkan.so.1",
    "/usr/lib/aarch64-linux-gnu/libvulkan.so.1",
    "/usr/lib64/libvulkan.so.1",
    "/usr/lib/libvulkan.so.1",
)
# CPU rasterisers exposed as Vulkan devices: llama.cpp on them is slower than the cpu variant.
_SOFTWARE_VULKAN = ("lvp", "llvmpipe", "swiftshader")
_OPENCL_VENDORS = "/etc/OpenCL/vendors"
# Android-style vendor implementations, loaded directly without an ICD loader.
_OPENCL_LIBRARY_PATHS = ("/vendor/lib64/libOpenCL.so", "/system/vendor/lib64/libOpenCL.so")
# The display adapter device class in the Windows registry.
_WINDOWS_DISPLAY_CLASS = (
    r"HKLM\SYSTEM\CurrentControlSet\Control\Class\{4d36e968-e325-11ce-bfc1-08002be10318}"
)
_PCI_VENDORS = {"0x1002": "AMD", "0x8086": "Intel", "0x10de": "NVIDIA", "0x5143": "Qualcomm"}


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: int | None = None
    driver: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "memory_bytes": self.memory_bytes, "driver": self.driver}


@dataclass(frozen=True)
class Detection:
    """The accelerator chosen, its runner variant, and why each other candidate was not."""

    accelerator: str
    variant: str
    devices: list[Device]
    reasons: dict[str, str]
    reason: str
    requested: str = "auto"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.accelerator,
            "variant": self.variant,
            "devices": [d.to_json() for d in self.devices],
            "reasons": dict(self.reasons),
            "reason": self.reason,
            "requested": self.requested,
        }


class System(Protocol):
    """What the probes may read of a machine. Paths are absolute, POSIX or Windows style."""

    @property
    def platform(self) -> str: ...  # sys.platform: linux, darwin, win32

    @property
    def machine(self) -> str: ...  # platform.machine(): x86_64, arm64, ARM64, aarch64

    @property
    def env(self) -> Mapping[str, str]: ...

    def exists(self, path: str) -> bool: ...

    def read_text(self, path: str) -> str | None: ...

    def listdir(self, path: str) -> list[str]: ...

    def which(self, cmd: str) -> str | None: ...

    def run(self, argv: list[str], timeout: float = 5) -> tuple[int, str] | None:
        """(exit status, stdout; stderr instead when it failed), or None if it could not run."""
        ...

    def find_library(self, name: str) -> str | None: ...


class RealSystem:
    """The machine this process runs on."""

    def __init__(self) -> None:
        self.platform = sys.platform
        self.machine = platform.machine()
        gpu = config.env("DMR_GPU")  # also from config.toml
        self.env: Mapping[str, str] = {**os.environ, "DMR_GPU": gpu} if gpu else os.environ
        # find_library spawns ldconfig (and gcc when that fails): ask once per name.
        self._libraries: dict[str, str | None] = {}

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def read_text(self, path: str) -> str | None:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return None

    def listdir(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(path))
        except OSError:
            return []

    def which(self, cmd: str) -> str | None:
        return shutil.which(cmd)

    def run(self, argv: list[str], timeout: float = 5) -> tuple[int, str] | None:
        creationflags = 0
        if sys.platform == "win32":
            creationflags = subprocess.CREATE_NO_WINDOW  # the daemon has no console to flash
        try:
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=timeout,
                env={**os.environ, "LC_ALL": "C"},  # parsers expect untranslated output
                creationflags=creationflags,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        if proc.returncode == 0:
            return 0, proc.stdout
        return proc.returncode, proc.stderr.strip() or proc.stdout

    def find_library(self, name: str) -> str | None:
        if name not in self._libraries:
            self._libraries[name] = ctypes.util.find_library(name)
        return self._libraries[name]


@dataclass
class FixtureSystem:
    """A described machine for tests.

    Files live under `root` (an absolute path `/dev/kfd` is `root/dev/kfd`; `C:\\X\\Y` is
    `root/C/X/Y`). `commands` maps a program name, or a program name followed by its
    arguments, to (exit status, output); a program is on PATH when some key names it.
    `libraries` answers find_library. Every run is recorded in `calls`.
    """

    root: Path
    platform: str = "linux"
    machine: str = "x86_64"
    env: dict[str, str] = field(default_factory=dict)
    commands: dict[str, tuple[int, str]] = field(default_factory=dict)
    libraries: dict[str, str] = field(default_factory=dict)
    calls: list[list[str]] = field(default_factory=list)

    def add(self, path: str, text: str = "") -> None:
        """Create a file in the tree (its parents too)."""
        local = self._local(path)
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(text)

    def _local(self, path: str) -> Path:
        posix = re.sub(r"^([A-Za-z]):", r"\1", path.replace("\\", "/"))
        return self.root / posix.lstrip("/")

    def exists(self, path: str) -> bool:
        return self._local(path).exists()

    def read_text(self, path: str) -> str | None:
        try:
            return self._local(path).read_text()
        except OSError:
            return None

    def listdir(self, path: str) -> list[str]:
        try:
            return sorted(p.name for p in self._local(path).iterdir())
        except OSError:
            return []

    def which(self, cmd: str) -> str | None:
        known = any(key.split()[0] == cmd for key in self.commands)
        return f"/usr/bin/{cmd}" if known else None

    def run(self, argv: list[str], timeout: float = 5) -> tuple[int, str] | None:
        self.calls.append(list(argv))
        program = _program_name(argv[0])
        full = " ".join([program, *argv[1:]])
        return self.commands.get(full, self.commands.get(program))

    def find_library(self, name: str) -> str | None:
        return self.libraries.get(name)


def _program_name(path: str) -> str:
    name = path.replace("\\", "/").rsplit("/", 1)[-1]
    return name[:-4] if name.lower().endswith(".exe") else name


# -- probes -------------------------------------------------------------------------------


class _Probe(NamedTuple):
    ok: bool
    reason: str
    devices: list[Device]


def _no(reason: str) -> _Probe:
    return _Probe(False, reason, [])


def _yes(devices: list[Device], reason: str) -> _Probe:
    return _Probe(True, reason, devices)


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _last_line(text: str) -> str:
    return next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


def _int(text: str | None) -> int | None:
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


def _key_values(text: str, separator: str) -> dict[str, str]:
    """`key<sep>value` lines (first occurrence wins), e.g. /proc/cpuinfo or sysfs properties."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(separator)
        if sep:
            values.setdefault(key.strip(), value.strip())
    return values


def _darwin_hardware(system: System) -> tuple[str | None, int | None]:
    """Chip name ("Apple M2 Pro") and memory bytes from sysctl."""
    result = system.run(["sysctl", "-n", "machdep.cpu.brand_string", "hw.memsize"])
    if result is None or result[0] != 0:
        return None, None
    lines = [*result[1].splitlines(), "", ""]
    return lines[0].strip() or None, _int(lines[1])


def _probe_metal(system: System) -> _Probe:
    if system.platform != "darwin":
        return _no(f"Metal needs macOS on Apple silicon (this is {system.platform})")
    note = ""
    if system.machine.lower() != "arm64":
        # An x86_64 Python on Apple silicon runs under Rosetta 2; the runner it starts is a
        # native arm64 binary, so Metal still works.
        translated = system.run(["sysctl", "-n", "sysctl.proc_translated"])
        if translated is None or translated[0] != 0 or translated[1].strip() != "1":
            return _no(f"Intel Mac ({system.machine}): the metal variant needs Apple silicon")
        note = " (this Python runs under Rosetta 2; the runner is native arm64)"
    chip, memory = _darwin_hardware(system)
    device = Device(f"{chip} GPU" if chip else "Apple silicon GPU", memory)
    return _yes([device], f"Apple silicon GPU with Metal and unified memory{note}")


class _NvidiaGpu(NamedTuple):
    device: Device
    free_bytes: int | None


def _nvidia_smi(system: System) -> str | None:
    found = system.which("nvidia-smi")
    if found is None and system.platform == "linux":
        found = next((p for p in _NVIDIA_SMI_PATHS if system.exists(p)), None)
    return found


def _parse_nvidia_smi(text: str) -> list[_NvidiaGpu]:
    gpus = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 4 or not fields[0]:
            continue
        name, total, free, driver = fields
        mib = 1 << 20
        total_mib, free_mib = _int(total), _int(free)  # "[N/A]" on unified-memory parts
        device = Device(name, total_mib * mib if total_mib is not None else None, driver)
        gpus.append(_NvidiaGpu(device, free_mib * mib if free_mib is not None else None))
    return gpus


def _query_nvidia_smi(system: System) -> list[_NvidiaGpu] | str:
    """The GPUs nvidia-smi lists, or why it could not list any."""
    smi = _nvidia_smi(system)
    if smi is None:
        return "nvidia-smi not found"
    result = system.run([smi, *_NVIDIA_SMI_QUERY])
    if result is None:
        return f"{smi} could not be run or did not answer"
    status, output = result
    if status != 0:
        return f"nvidia-smi failed: {_first_line(output) or f'exit status {status}'}"
    return _parse_nvidia_smi(output) or "nvidia-smi lists no NVIDIA GPU"


def _find_libcuda(system: System) -> str | None:
    known = next((p for p in _LIBCUDA_PATHS if system.exists(p)), None)
    return known or system.find_library("cuda")


def _libcuda_version(system: System, libcuda: str) -> str | None:
    """The driver version in the name of the file libcuda.so.1 points to (libcuda.so.550.54.14)."""
    for name in system.listdir(posixpath.dirname(libcuda)):
        match = re.fullmatch(r"libcuda\.so\.(\d{3,}\.\d+(?:\.\d+)?)", name)
        if match:
            return match.group(1)
    return None


def _proc_nvidia_gpus(system: System, driver: str | None) -> list[Device]:
    devices = []
    for bus in system.listdir("/proc/driver/nvidia/gpus"):
        info = system.read_text(f"/proc/driver/nvidia/gpus/{bus}/information") or ""
        devices.append(Device(_key_values(info, ":").get("Model") or "NVIDIA GPU", None, driver))
    return devices


def _probe_cuda(system: System) -> _Probe:
    if system.platform == "darwin":
        return _no("CUDA is not available on macOS")
    minimum = CUDA_MIN_DRIVER_WINDOWS if system.platform == "win32" else CUDA_MIN_DRIVER
    listed = _query_nvidia_smi(system)
    if isinstance(listed, list):
        devices = [gpu.device for gpu in listed]
        driver, source = devices[0].driver, "nvidia-smi"
    elif listed != "nvidia-smi not found" or system.platform != "linux":
        return _no(listed)
    else:
        # Without nvidia-smi the driver shows as its kernel module (/proc/driver/nvidia, or
        # /dev/dxg under WSL2) plus libcuda, its user-space half: the runner needs both.
        version_text = system.read_text("/proc/driver/nvidia/version")
        if version_text is None and not system.exists("/dev/dxg"):
            return _no("nvidia-smi not found and no NVIDIA driver in /proc/driver/nvidia")
        driver = None
        if version_text is not None:
            match = re.search(r"\b(\d{3,}\.\d+(?:\.\d+)?)\b", _first_line(version_text))
            driver = match.group(1) if match else None
        libcuda = _find_libcuda(system)
        if libcuda is None:
            return _no(
                f"NVIDIA kernel driver {driver or '(unknown version)'} is loaded but libcuda "
                "(its user-space library) was not found"
            )
        driver = driver or _libcuda_version(system, libcuda)
        devices = _proc_nvidia_gpus(system, driver) or [Device("NVIDIA GPU", None, driver)]
        source = libcuda
    if driver is None:
        return _yes(
            devices,
            f"NVIDIA driver found ({source}); its version is unknown, "
            f"the cuda variant needs {minimum} or newer",
        )
    if _version_tuple(driver) < _version_tuple(minimum):
        return _no(
            f"driver {driver} is older than {minimum} required by the cuda variant; "
            "update the NVIDIA driver"
        )
    return _yes(devices, f"NVIDIA driver {driver} ({source}) meets the cuda minimum {minimum}")


def _gfx_name(target_version: int) -> str:
    """KFD's gfx_target_version (major*10000 + minor*100 + stepping) as an ISA: 90010 → gfx90a."""
    major, rest = divmod(target_version, 10000)
    minor, stepping = divmod(rest, 100)
    return f"gfx{major}{minor:x}{stepping:x}"


def _kfd_gpus(system: System) -> list[Device]:
    """GPU nodes of the KFD topology (CPU nodes have no SIMDs)."""
    devices = []
    for node in system.listdir(_KFD_NODES):
        props = _key_values(system.read_text(f"{_KFD_NODES}/{node}/properties") or "", " ")
        target = _int(props.get("gfx_target_version"))
        if not _int(props.get("simd_count")) or not target:
            continue
        bank = system.read_text(f"{_KFD_NODES}/{node}/mem_banks/0/properties") or ""
        devices.append(Device(_gfx_name(target), _int(_key_values(bank, " ").get("size_in_bytes"))))
    return devices


def _parse_rocminfo(text: str) -> list[tuple[str, str]]:
    """(gfx name, marketing name) of each GPU agent in `rocminfo` output."""
    agents: list[dict[str, str]] = []
    for line in text.splitlines():
        if re.fullmatch(r"Agent \d+", line.strip()):
            agents.append({})
        # Agent properties are indented by exactly two spaces; nested sections by more.
        match = re.fullmatch(r"  (\S[^:]*):\s*(.*?)\s*", line)
        if match and agents:
            agents[-1].setdefault(match.group(1), match.group(2))
    return [
        (a.get("Name", "AMD GPU"), a.get("Marketing Name") or a.get("Name", "AMD GPU"))
        for a in agents
        if a.get("Device Type") == "GPU"
    ]


def _probe_rocm(system: System) -> _Probe:
    if system.platform != "linux":
        return _no("ROCm is only probed on Linux")
    if not system.exists("/dev/kfd"):
        return _no("no /dev/kfd (no AMD GPU with the amdgpu kernel driver)")
    kfd = _kfd_gpus(system)
    rocminfo = system.which("rocminfo") or (
        "/opt/rocm/bin/rocminfo" if system.exists("/opt/rocm/bin/rocminfo") else None
    )
    if rocminfo is not None:
        result = system.run([rocminfo])
        if result is None or result[0] != 0:
            why = _last_line(result[1]) if result else "no answer"
            return _no(f"rocminfo failed: {why} (is this user in the render and video groups?)")
        agents = _parse_rocminfo(result[1])
        if not agents:
            return _no("rocminfo lists no GPU agent")
        memories = (
            [d.memory_bytes for d in kfd] if len(kfd) == len(agents) else [None] * len(agents)
        )
        devices = [
            Device(f"{marketing} ({gfx})" if marketing != gfx else gfx, memory)
            for (gfx, marketing), memory in zip(agents, memories, strict=True)
        ]
        return _yes(devices, f"AMD GPU {agents[0][0]} via /dev/kfd and rocminfo")
    if not kfd:
        return _no(f"/dev/kfd exists but {_KFD_NODES} lists no GPU")
    runtime = system.find_library("amdhip64") or (
        "/opt/rocm/lib/libamdhip64.so" if system.exists("/opt/rocm/lib/libamdhip64.so") else None
    )
    if runtime is None:
        return _no(
            f"AMD GPU {kfd[0].name} found but no ROCm runtime (rocminfo, /opt/rocm or "
            "libamdhip64); install ROCm to use it"
        )
    return _yes(kfd, f"AMD GPU {kfd[0].name} via /dev/kfd and the HIP runtime {runtime}")


def _vulkan_manifests(system: System) -> tuple[list[tuple[str, str]], str]:
    """(manifest path, driver library) of each Vulkan ICD, and where they were looked for.

    VK_DRIVER_FILES (VK_ICD_FILENAMES before it) replaces the search directories, as in the
    Vulkan loader; its entries are manifest files or directories.
    """
    listed = system.env.get("VK_DRIVER_FILES") or system.env.get("VK_ICD_FILENAMES")
    if listed:
        entries, where = [e for e in listed.split(":") if e], "VK_DRIVER_FILES/VK_ICD_FILENAMES"
    else:
        entries, where = list(_VULKAN_ICD_DIRS), ", ".join(_VULKAN_ICD_DIRS)
    paths: list[str] = []
    for entry in entries:
        if entry.endswith(".json"):
            paths.append(entry)
        else:
            paths += [f"{entry}/{n}" for n in system.listdir(entry) if n.endswith(".json")]
    manifests = []
    for path in paths:
        text = system.read_text(path)
        if text is None:
            continue
        try:
            library = str(json.loads(text)["ICD"]["library_path"])
        except (ValueError, KeyError, TypeError):
            library = ""
        manifests.append((path, library))
    return manifests, where


def _is_software_vulkan(manifest: str, library: str) -> bool:
    names = (posixpath.basename(manifest) + " " + posixpath.basename(library)).lower()
    return any(s in names for s in _SOFTWARE_VULKAN)


def _parse_vulkaninfo(text: str) -> list[tuple[Device, str]]:
    """(device, deviceType) of each `GPUn:` block in `vulkaninfo --summary` output."""
    blocks: list[dict[str, str]] = []
    for line in text.splitlines():
        if re.fullmatch(r"GPU\d+:", line.strip()):
            blocks.append({})
        elif blocks and "=" in line:
            key, _, value = line.partition("=")
            blocks[-1].setdefault(key.strip(), value.strip())
    devices = []
    for block in blocks:
        driver = " ".join(filter(None, [block.get("driverName"), block.get("driverInfo")]))
        device = Device(block.get("deviceName", "Vulkan device"), None, driver or None)
        devices.append((device, block.get("deviceType", "")))
    return devices


def _drm_device(system: System, node: str) -> Device:
    base = f"/sys/class/drm/{node}/device"
    vendor = _PCI_VENDORS.get((system.read_text(f"{base}/vendor") or "").strip(), "GPU")
    memory = _int(system.read_text(f"{base}/mem_info_vram_total"))  # amdgpu only
    return Device(f"{vendor} GPU ({node})" if vendor != "GPU" else f"GPU ({node})", memory)


def _probe_vulkan(system: System) -> _Probe:
    if system.platform == "darwin":
        return _no("Vulkan is not used on macOS (the metal variant is)")
    if system.platform != "linux":
        return _no("Vulkan is only probed on Linux (the Windows variants are cpu, cuda and opencl)")
    manifests, where = _vulkan_manifests(system)
    if not manifests:
        return _no(f"no Vulkan ICD manifest in {where}")
    hardware = [(m, lib) for m, lib in manifests if not _is_software_vulkan(m, lib)]
    if not hardware:
        names = ", ".join(posixpath.basename(m) for m, _ in manifests)
        return _no(
            f"only a software Vulkan driver ({names}) is installed; "
            "it is slower than the cpu variant"
        )
    loader = next((p for p in _VULKAN_LOADER_PATHS if system.exists(p)), None)
    loader = loader or system.find_library("vulkan")
    if loader is None:
        return _no("Vulkan ICDs are installed but the Vulkan loader (libvulkan.so.1) was not found")
    drivers = ", ".join(posixpath.basename(m) for m, _ in hardware)
    vulkaninfo = system.which("vulkaninfo")
    if vulkaninfo is not None:
        result = system.run([vulkaninfo, "--summary"])
        if result is None or result[0] != 0:
            why = _first_line(result[1]) if result else "no answer"
            return _no(f"vulkaninfo --summary failed: {why}")
        listed = _parse_vulkaninfo(result[1])
        gpus = [d for d, kind in listed if kind != "PHYSICAL_DEVICE_TYPE_CPU"]
        if not gpus:
            names = ", ".join(d.name for d, _ in listed) or "none"
            return _no(
                f"vulkaninfo lists only software devices ({names}); "
                "they are slower than the cpu variant"
            )
        return _yes(gpus, f"Vulkan GPU {gpus[0].name} through {loader}")
    # Mesa installs every hardware ICD manifest whatever the hardware, so without vulkaninfo
    # a GPU render node is the evidence that one of them has a device to drive.
    nodes = [n for n in system.listdir("/dev/dri") if n.startswith("renderD")]
    if nodes:
        devices = [_drm_device(system, n) for n in nodes]
    elif system.exists("/dev/nvidiactl"):
        devices = [Device("NVIDIA GPU")]
    else:
        return _no(f"Vulkan drivers ({drivers}) are installed but there is no GPU in /dev/dri")
    return _yes(
        devices,
        f"Vulkan drivers ({drivers}) and a GPU; install vulkaninfo (vulkan-tools) for details",
    )


def _opencl_linux(system: System) -> tuple[str | None, str]:
    """A GPU OpenCL implementation (ICD manifest or vendor library), or why there is none."""
    icds = [n for n in system.listdir(_OPENCL_VENDORS) if n.endswith(".icd")]
    if icds:
        # pocl is OpenCL on the CPU: no faster than the cpu variant.
        gpu = [
            n
            for n in icds
            if "pocl" not in (n + (system.read_text(f"{_OPENCL_VENDORS}/{n}") or "")).lower()
        ]
        if gpu:
            return f"{_OPENCL_VENDORS}/{gpu[0]}", ""
        return None, f"only a CPU OpenCL driver ({', '.join(icds)}) is installed"
    library = next((p for p in _OPENCL_LIBRARY_PATHS if system.exists(p)), None)
    if library is None:
        library = system.find_library("OpenCL")
    if library is not None:
        return library, ""
    return None, f"no OpenCL ICD ({_OPENCL_VENDORS}/*.icd or libOpenCL.so)"


def _windows_display_adapters(system: System) -> list[str] | None:
    result = system.run(["reg", "query", _WINDOWS_DISPLAY_CLASS, "/s", "/v", "DriverDesc"])
    if result is None or result[0] != 0:
        return None
    return re.findall(r"DriverDesc\s+REG_SZ\s+(.+?)\s*$", result[1], flags=re.M)


def _probe_opencl(system: System) -> _Probe:
    if system.platform == "win32":
        if system.machine.lower() not in ("arm64", "aarch64"):
            return _no(
                f"the opencl variant is for Qualcomm Adreno GPUs on Windows on ARM "
                f"(this is {system.machine})"
            )
        system_dll = system.env.get("SystemRoot", r"C:\Windows") + r"\System32\OpenCL.dll"
        dll = system.find_library("OpenCL") or (system_dll if system.exists(system_dll) else None)
        if dll is None:
            return _no("OpenCL.dll not found (it comes with the Qualcomm Adreno graphics driver)")
        adapters = _windows_display_adapters(system)
        if adapters is None:
            return _no("could not list the display adapters (reg query failed)")
        adreno = [a for a in adapters if "adreno" in a.lower() or "qualcomm" in a.lower()]
        if not adreno:
            return _no(f"no Qualcomm Adreno GPU among the display adapters ({', '.join(adapters)})")
        return _yes([Device(a) for a in adreno], f"Qualcomm Adreno GPU with OpenCL ({dll})")
    if system.platform != "linux":
        return _no(f"the opencl variant is for Qualcomm Adreno GPUs (none on {system.platform})")
    if not (system.exists("/dev/kgsl-3d0") or system.exists("/sys/class/kgsl")):
        return _no("no Qualcomm Adreno GPU (no /dev/kgsl-3d0 or /sys/class/kgsl)")
    model = (system.read_text("/sys/class/kgsl/kgsl-3d0/gpu_model") or "").strip()
    name = model or "Qualcomm Adreno GPU"
    implementation, why_not = _opencl_linux(system)
    if implementation is None:
        return _no(f"Adreno GPU ({name}) found but {why_not}")
    return _yes([Device(name)], f"Qualcomm Adreno GPU ({name}) with OpenCL ({implementation})")


def _probe_cpu(system: System) -> list[Device]:
    name: str | None = None
    memory: int | None = None
    if system.platform == "darwin":
        name, memory = _darwin_hardware(system)
    elif system.platform == "win32":
        name = system.env.get("PROCESSOR_IDENTIFIER")
    else:
        cpuinfo = _key_values(system.read_text("/proc/cpuinfo") or "", ":")
        name = cpuinfo.get("model name") or cpuinfo.get("Hardware")  # ARM kernels lack the former
        meminfo = _key_values(system.read_text("/proc/meminfo") or "", ":")
        kib = _int(meminfo.get("MemTotal", "").removesuffix("kB"))
        memory = kib * 1024 if kib is not None else None
    return [Device(name or f"{system.machine} CPU", memory)]


_PROBES: dict[str, Callable[[System], _Probe]] = {
    "metal": _probe_metal,
    "cuda": _probe_cuda,
    "rocm": _probe_rocm,
    "vulkan": _probe_vulkan,
    "opencl": _probe_opencl,
}


# -- detection ----------------------------------------------------------------------------

_cache: dict[tuple[str, bool], Detection] = {}


def clear_detection_cache() -> None:
    """Forget the cached detection of this machine (the next detect() probes again)."""
    _cache.clear()


def _requested(system: System, override: str | None) -> tuple[str, bool]:
    """The normalised choice and whether it came from DMR_GPU; BadRequest when invalid."""
    from_env = override is None
    raw = system.env.get("DMR_GPU", "") if override is None else override
    value = raw.strip().strip("\"'").lower() or "auto"
    if value not in GPU_CHOICES:
        source = "DMR_GPU" if from_env else "accelerator"
        raise BadRequest(
            f"invalid {source} value {raw.strip()!r}: valid values are {', '.join(GPU_CHOICES)}"
        )
    return value, from_env


def detect(system: System | None = None, override: str | None = None) -> Detection:
    """Choose the accelerator and llama-server variant for this machine (or `system`).

    `override` is auto|cpu|cuda|vulkan|metal|opencl|rocm; None reads DMR_GPU from the system's
    environment. A forced GPU that is unavailable gives the cpu detection, with a reason that
    says what was requested and why it could not be used. Detections of the real machine are
    cached for the life of the process.
    """
    real = system is None or isinstance(system, RealSystem)
    system = system or RealSystem()
    requested, from_env = _requested(system, override)
    key = (requested, from_env)
    if real and key in _cache:
        return _cache[key]
    result = _detect(system, requested, f"DMR_GPU={requested}" if from_env else requested)
    if real:
        _cache[key] = result
    return result


def _ordered(reasons: dict[str, str]) -> dict[str, str]:
    return {kind: reasons[kind] for kind in ACCELERATORS if kind in reasons}


def _detect(system: System, requested: str, label: str) -> Detection:
    if requested == "auto":
        reasons: dict[str, str] = {}
        for kind, probe in _PROBES.items():
            found = probe(system)
            if found.ok:
                for later in ACCELERATORS[ACCELERATORS.index(kind) + 1 : -1]:
                    reasons[later] = f"not probed: {kind} takes priority"
                reasons["cpu"] = f"available, but {kind} is preferred"
                return Detection(kind, kind, found.devices, reasons, found.reason)
            reasons[kind] = found.reason
        return Detection("cpu", "cpu", _probe_cpu(system), reasons, "no usable GPU found")
    skipped = {kind: f"not probed: {label} requested" for kind in _PROBES if kind != requested}
    if requested == "cpu":
        return Detection(
            "cpu", "cpu", _probe_cpu(system), skipped, f"{label} forces the cpu variant", "cpu"
        )
    found = _PROBES[requested](system)
    if found.ok:
        reasons = _ordered({**skipped, "cpu": f"available, but {label} requested"})
        return Detection(
            requested,
            requested,
            found.devices,
            reasons,
            f"{label} requested: {found.reason}",
            requested,
        )
    return Detection(
        "cpu",
        "cpu",
        _probe_cpu(system),
        _ordered({**skipped, requested: found.reason}),
        f"{label} requested but: {found.reason}; using cpu",
        requested,
    )


# -- free memory --------------------------------------------------------------------------


def _amdgpu_free_vram(system: System) -> int | None:
    free = None
    for card in system.listdir("/sys/class/drm"):
        if not re.fullmatch(r"card\d+", card):
            continue
        total = _int(system.read_text(f"/sys/class/drm/{card}/device/mem_info_vram_total"))
        used = _int(system.read_text(f"/sys/class/drm/{card}/device/mem_info_vram_used"))
        if total is not None and used is not None:
            free = (free or 0) + total - used
    return free


def free_memory(detection: Detection, system: System | None = None) -> tuple[int, int | None]:
    """(available RAM bytes, free VRAM bytes or None) for memory admission.

    VRAM is the sum over the GPUs (llama.cpp splits layers across them): nvidia-smi for cuda,
    amdgpu's sysfs counters for rocm. None where it cannot be read or where the GPU shares
    RAM (metal, opencl on Adreno), so RAM is the limit the caller checks.
    """
    import psutil

    ram = int(psutil.virtual_memory().available)
    system = system or RealSystem()
    vram: int | None = None
    if detection.accelerator == "cuda":
        listed = _query_nvidia_smi(system)
        if isinstance(listed, list) and all(g.free_bytes is not None for g in listed):
            vram = sum(g.free_bytes or 0 for g in listed)
    elif detection.accelerator == "rocm":
        vram = _amdgpu_free_vram(system)
    return ram, vram
