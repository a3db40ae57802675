"""Accelerator detection on described machines (one per accelerator), and on this one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import psutil
import pytest

from dmr_cli.errors import BadRequest
from dmr_cli.runtime.detect import (
    ACCELERATORS,
    CUDA_MIN_DRIVER,
    Detection,
    Device,
    FixtureSystem,
    RealSystem,
    clear_detection_cache,
    detect,
    free_memory,
)

GPU_KINDS = [kind for kind in ACCELERATORS if kind != "cpu"]
MIB = 1 << 20

CPUINFO = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD Ryzen 9 7950X\n"
MEMINFO = "MemTotal:       65536000 kB\nMemFree:         1000000 kB\n"

NVIDIA_SMI = (
    "NVIDIA GeForce RTX 4090, 24564, 23012, 550.54.14\n"
    "NVIDIA GeForce RTX 3090, 24576, 24000, 550.54.14\n"
)
PROC_NVIDIA_VERSION = (
    "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  535.129.03  Release Build  "
    "(dvs-builder@U16-I3-B03-4-3)  Thu Oct 19 18:42:12 UTC 2023\n"
    "GCC version:  gcc version 12.3.0 (Ubuntu 12.3.0-1ubuntu1~22.04)\n"
)

ROCMINFO = """\
ROCk module is loaded
==========
HSA Agents
==========
*******
Agent 1
*******
  Name:                    AMD Ryzen 9 7950X 16-Core Processor
  Marketing Name:          AMD Ryzen 9 7950X 16-Core Processor
  Device Type:             CPU
*******
Agent 2
*******
  Name:                    gfx1100
  Uuid:                    GPU-5a1d2e3f4b5c6d7e
  Marketing Name:          Radeon RX 7900 XTX
  Vendor Name:             AMD
  Device Type:             GPU
  ISA Info:
    ISA 1
      Name:                    amdgcn-amd-amdhsa--gfx1100
*** Done ***
"""

VULKANINFO = """\
==========
VULKANINFO
==========

Devices:
========
GPU0:
\tapiVersion         = 1.3.255
\tvendorID           = 0x1002
\tdeviceType         = PHYSICAL_DEVICE_TYPE_DISCRETE_GPU
\tdeviceName         = AMD Radeon RX 6800 XT (RADV NAVI21)
\tdriverName         = radv
\tdriverInfo         = Mesa 23.2.1
GPU1:
\tapiVersion         = 1.3.255
\tvendorID           = 0x10005
\tdeviceType         = PHYSICAL_DEVICE_TYPE_CPU
\tdeviceName         = llvmpipe (LLVM 15.0.7, 256 bits)
\tdriverName         = llvmpipe
\tdriverInfo         = Mesa 23.2.1 (LLVM 15.0.7)
"""
VULKANINFO_SOFTWARE = VULKANINFO.split("GPU0:")[0] + "GPU0:" + VULKANINFO.split("GPU1:")[1]


def icd(library: str) -> str:
    return json.dumps({"file_format_version": "1.0.0", "ICD": {"library_path": library}})


def linux(tmp_path: Path, **kwargs: object) -> FixtureSystem:
    """A Linux x86_64 machine with a CPU and nothing else."""
    system = FixtureSystem(tmp_path / "root", **kwargs)  # type: ignore[arg-type]
    system.add("/proc/cpuinfo", CPUINFO)
    system.add("/proc/meminfo", MEMINFO)
    return system


def assert_explained(d: Detection) -> None:
    """Every candidate not chosen has a reason; the chosen one has none but `reason`."""
    assert set(d.reasons) == set(ACCELERATORS) - {d.accelerator}
    assert all(d.reasons.values())
    assert d.reason
    assert d.variant == d.accelerator


# -- one machine per accelerator ----------------------------------------------------------


def test_metal_on_apple_silicon(tmp_path: Path) -> None:
    system = FixtureSystem(
        tmp_path,
        platform="darwin",
        machine="arm64",
        commands={
            "sysctl -n machdep.cpu.brand_string hw.memsize": (0, "Apple M2 Pro\n34359738368\n")
        },
    )
    d = detect(system)
    assert d.accelerator == "metal"
    assert d.devices == [Device("Apple M2 Pro GPU", 34359738368)]
    assert "Apple silicon" in d.reason
    assert_explained(d)
    assert d.reasons["cuda"] == "not probed: metal takes priority"
    assert d.reasons["cpu"] == "available, but metal is preferred"


def test_metal_under_rosetta_is_still_metal(tmp_path: Path) -> None:
    system = FixtureSystem(
        tmp_path,
        platform="darwin",
        machine="x86_64",
        commands={
            "sysctl -n sysctl.proc_translated": (0, "1\n"),
            "sysctl -n machdep.cpu.brand_string hw.memsize": (0, "Apple M1\n17179869184\n"),
        },
    )
    d = detect(system)
    assert d.accelerator == "metal"
    assert "Rosetta" in d.reason


def test_intel_mac_gets_cpu(tmp_path: Path) -> None:
    system = FixtureSystem(
        tmp_path,
        platform="darwin",
        machine="x86_64",
        commands={
            "sysctl -n sysctl.proc_translated": (0, "0\n"),
            "sysctl -n machdep.cpu.brand_string hw.memsize": (
                0,
                "Intel(R) Core(TM) i9-9880H CPU @ 2.30GHz\n34359738368\n",
            ),
        },
    )
    d = detect(system)
    assert d.accelerator == "cpu"
    assert d.reasons["metal"] == "Intel Mac (x86_64): the metal variant needs Apple silicon"
    assert d.reasons["cuda"] == "CUDA is not available on macOS"
    assert "macOS" in d.reasons["vulkan"]
    assert d.devices == [Device("Intel(R) Core(TM) i9-9880H CPU @ 2.30GHz", 34359738368)]
    assert_explained(d)


def test_cuda_through_nvidia_smi(tmp_path: Path) -> None:
    system = linux(tmp_path, commands={"nvidia-smi": (0, NVIDIA_SMI)})
    d = detect(system)
    assert d.accelerator == "cuda"
    assert d.devices == [
        Device("NVIDIA GeForce RTX 4090", 24564 * MIB, "550.54.14"),
        Device("NVIDIA GeForce RTX 3090", 24576 * MIB, "550.54.14"),
    ]
    assert "550.54.14" in d.reason and CUDA_MIN_DRIVER in d.reason
    assert_explained(d)
    assert d.reasons["metal"] == "Metal needs macOS on Apple silicon (this is linux)"
    assert d.reasons["rocm"] == "not probed: cuda takes priority"
    assert system.calls == [
        [
            "/usr/bin/nvidia-smi",
            "--query-gpu=name,memory.total,memory.free,driver_version",
            "--format=csv,noheader,nounits",
        ]
    ]


def test_cuda_driver_too_old(tmp_path: Path) -> None:
    system = linux(tmp_path, commands={"nvidia-smi": (0, "Tesla T4, 15360, 15000, 470.182.03\n")})
    d = detect(system)
    assert d.accelerator == "cpu"
    assert d.reasons["cuda"].startswith(
        "driver 470.182.03 is older than 525.60.13 required by the cuda variant"
    )
    assert_explained(d)


def test_cuda_windows_minimum_is_the_windows_driver_number(tmp_path: Path) -> None:
    ok = FixtureSystem(
        tmp_path / "a",
        platform="win32",
        machine="AMD64",
        commands={"nvidia-smi": (0, "NVIDIA GeForce RTX 4070, 12282, 11000, 537.58\n")},
    )
    assert detect(ok).accelerator == "cuda"
    old = FixtureSystem(
        tmp_path / "b",
        platform="win32",
        machine="AMD64",
        commands={"nvidia-smi": (0, "NVIDIA GeForce GTX 1080, 8192, 8000, 472.12\n")},
    )
    d = detect(old)
    assert d.accelerator == "cpu"
    assert "older than 527.41" in d.reasons["cuda"]
    assert "Windows on ARM" in d.reasons["opencl"]


def test_nvidia_smi_that_cannot_reach_the_driver(tmp_path: Path) -> None:
    message = (
        "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
        "Make sure that the latest NVIDIA driver is installed and running.\n"
    )
    d = detect(linux(tmp_path, commands={"nvidia-smi": (9, message)}))
    assert d.accelerator == "cpu"
    assert d.reasons["cuda"] == "nvidia-smi failed: " + message.strip()


def test_libcuda_without_nvidia_smi(tmp_path: Path) -> None:
    system = linux(tmp_path, libraries={"cuda": "libcuda.so.1"})
    system.add("/proc/driver/nvidia/version", PROC_NVIDIA_VERSION)
    system.add(
        "/proc/driver/nvidia/gpus/0000:01:00.0/information",
        "Model: \t\t NVIDIA GeForce RTX 3060\nIRQ:   \t\t 140\nBus Type: \t PCIe\n",
    )
    d = detect(system)
    assert d.accelerator == "cuda"
    assert d.devices == [Device("NVIDIA GeForce RTX 3060", None, "535.129.03")]
    assert "535.129.03 (libcuda.so.1)" in d.reason
    assert system.calls == []


def test_libcuda_version_from_its_file_name(tmp_path: Path) -> None:
    """WSL2 style: no /proc/driver/nvidia, the kernel side is /dev/dxg."""
    system = linux(tmp_path)
    system.add("/dev/dxg")
    system.add("/usr/lib/x86_64-linux-gnu/libcuda.so.1")
    system.add("/usr/lib/x86_64-linux-gnu/libcuda.so.545.23.08")
    d = detect(system)
    assert d.accelerator == "cuda"
    assert d.devices == [Device("NVIDIA GPU", None, "545.23.08")]


def test_nvidia_kernel_driver_without_libcuda(tmp_path: Path) -> None:
    system = linux(tmp_path)
    system.add("/proc/driver/nvidia/version", PROC_NVIDIA_VERSION)
    d = detect(system)
    assert d.accelerator == "cpu"
    assert d.reasons["cuda"] == (
        "NVIDIA kernel driver 535.129.03 is loaded but libcuda "
        "(its user-space library) was not found"
    )


def test_nvidia_smi_at_the_wsl_path_off_path(tmp_path: Path) -> None:
    system = linux(tmp_path, commands={"nvidia-smi": (0, NVIDIA_SMI)})
    system.which = lambda cmd: None  # type: ignore[method-assign]
    system.add("/usr/lib/wsl/lib/nvidia-smi")
    d = detect(system)
    assert d.accelerator == "cuda"
    assert system.calls[0][0] == "/usr/lib/wsl/lib/nvidia-smi"


def rocm_machine(tmp_path: Path, **kwargs: object) -> FixtureSystem:
    system = linux(tmp_path, **kwargs)
    system.add("/dev/kfd")
    nodes = "/sys/class/kfd/kfd/topology/nodes"
    system.add(f"{nodes}/0/properties", "cpu_cores_count 16\nsimd_count 0\ngfx_target_version 0\n")
    system.add(
        f"{nodes}/1/properties", "cpu_cores_count 0\nsimd_count 192\ngfx_target_version 110000\n"
    )
    system.add(f"{nodes}/1/mem_banks/0/properties", "heap_type 1\nsize_in_bytes 25753026560\n")
    return system


def test_rocm_with_rocminfo(tmp_path: Path) -> None:
    d = detect(rocm_machine(tmp_path, commands={"rocminfo": (0, ROCMINFO)}))
    assert d.accelerator == "rocm"
    assert d.devices == [Device("Radeon RX 7900 XTX (gfx1100)", 25753026560)]
    assert "gfx1100" in d.reason
    assert_explained(d)
    assert d.reasons["cuda"] == "nvidia-smi not found and no NVIDIA driver in /proc/driver/nvidia"
    assert d.reasons["vulkan"] == "not probed: rocm takes priority"


def test_rocm_from_sysfs_with_the_hip_runtime(tmp_path: Path) -> None:
    system = rocm_machine(tmp_path, libraries={"amdhip64": "libamdhip64.so.6"})
    system.add(
        "/sys/class/kfd/kfd/topology/nodes/2/properties",
        "simd_count 220\ngfx_target_version 90010\n",
    )
    d = detect(system)
    assert d.accelerator == "rocm"
    assert [dev.name for dev in d.devices] == ["gfx1100", "gfx90a"]
    assert system.calls == []


def test_rocm_gpu_without_rocm_installed(tmp_path: Path) -> None:
    d = detect(rocm_machine(tmp_path))
    assert d.accelerator == "cpu"
    assert d.reasons["rocm"].startswith("AMD GPU gfx1100 found but no ROCm runtime")


def test_rocminfo_failure(tmp_path: Path) -> None:
    failure = "ROCk module is loaded\nUnable to open /dev/kfd read-write: Permission denied\n"
    d = detect(rocm_machine(tmp_path, commands={"rocminfo": (1, failure)}))
    assert d.accelerator == "cpu"
    assert d.reasons["rocm"].startswith(
        "rocminfo failed: Unable to open /dev/kfd read-write: Permission denied"
    )


def vulkan_machine(tmp_path: Path, **kwargs: object) -> FixtureSystem:
    system = linux(tmp_path, **kwargs)
    system.add("/usr/lib/x86_64-linux-gnu/libvulkan.so.1")
    system.add("/usr/share/vulkan/icd.d/radeon_icd.x86_64.json", icd("libvulkan_radeon.so"))
    system.add("/usr/share/vulkan/icd.d/lvp_icd.x86_64.json", icd("libvulkan_lvp.so"))
    return system


def test_vulkan_with_vulkaninfo(tmp_path: Path) -> None:
    system = vulkan_machine(tmp_path, commands={"vulkaninfo": (0, VULKANINFO)})
    d = detect(system)
    assert d.accelerator == "vulkan"
    # llvmpipe is listed by vulkaninfo but is not a device worth using.
    assert d.devices == [Device("AMD Radeon RX 6800 XT (RADV NAVI21)", None, "radv Mesa 23.2.1")]
    assert "AMD Radeon RX 6800 XT" in d.reason
    assert_explained(d)
    assert d.reasons["rocm"] == "no /dev/kfd (no AMD GPU with the amdgpu kernel driver)"
    assert d.reasons["opencl"] == "not probed: vulkan takes priority"
    assert system.calls == [["/usr/bin/vulkaninfo", "--summary"]]


def test_vulkaninfo_with_only_llvmpipe(tmp_path: Path) -> None:
    d = detect(vulkan_machine(tmp_path, commands={"vulkaninfo": (0, VULKANINFO_SOFTWARE)}))
    assert d.accelerator == "cpu"
    assert d.reasons["vulkan"] == (
        "vulkaninfo lists only software devices (llvmpipe (LLVM 15.0.7, 256 bits)); "
        "they are slower than the cpu variant"
    )


def test_vulkan_with_only_a_software_icd(tmp_path: Path) -> None:
    system = linux(tmp_path, commands={"vulkaninfo": (0, VULKANINFO_SOFTWARE)})
    system.add("/usr/lib/x86_64-linux-gnu/libvulkan.so.1")
    system.add("/etc/vulkan/icd.d/lvp_icd.x86_64.json", icd("/usr/lib/libvulkan_lvp.so"))
    d = detect(system)
    assert d.accelerator == "cpu"
    assert d.reasons["vulkan"] == (
        "only a software Vulkan driver (lvp_icd.x86_64.json) is installed; "
        "it is slower than the cpu variant"
    )
    assert system.calls == []  # rejected before running vulkaninfo


def test_vulkan_icd_filenames_replaces_the_search_directories(tmp_path: Path) -> None:
    system = vulkan_machine(tmp_path, commands={"vulkaninfo": (0, VULKANINFO)})
    system.env["VK_ICD_FILENAMES"] = "/usr/share/vulkan/icd.d/lvp_icd.x86_64.json"
    d = detect(system)
    assert d.accelerator == "cpu"
    assert d.reasons["vulkan"].startswith("only a software Vulkan driver (lvp_icd.x86_64.json)")


def test_vulkan_without_the_loader(tmp_path: Path) -> None:
    system = linux(tmp_path)
    system.add("/usr/share/vulkan/icd.d/intel_icd.x86_64.json", icd("libvulkan_intel.so"))
    d = detect(system)
    assert d.accelerator == "cpu"
    assert d.reasons["vulkan"] == (
        "Vulkan ICDs are installed but the Vulkan loader (libvulkan.so.1) was not found"
    )


def test_vulkan_without_vulkaninfo_needs_a_render_node(tmp_path: Path) -> None:
    system = vulkan_machine(tmp_path)
    d = detect(system)
    assert d.accelerator == "cpu"
    assert d.reasons["vulkan"] == (
        "Vulkan drivers (radeon_icd.x86_64.json) are installed but there is no GPU in /dev/dri"
    )
    system.add("/dev/dri/renderD128")
    system.add("/sys/class/drm/renderD128/device/vendor", "0x1002\n")
    system.add("/sys/class/drm/renderD128/device/mem_info_vram_total", "17163091968\n")
    d = detect(system)
    assert d.accelerator == "vulkan"
    assert d.devices == [Device("AMD GPU (renderD128)", 17163091968)]


def adreno_linux(tmp_path: Path) -> FixtureSystem:
    system = FixtureSystem(tmp_path, machine="aarch64")
    system.add("/proc/cpuinfo", "processor\t: 0\nBogoMIPS\t: 38.40\nHardware\t: Qualcomm SM8550\n")
    system.add("/dev/kgsl-3d0")
    system.add("/sys/class/kgsl/kgsl-3d0/gpu_model", "Adreno740v2\n")
    return system


def test_adreno_on_linux(tmp_path: Path) -> None:
    system = adreno_linux(tmp_path)
    system.add("/etc/OpenCL/vendors/adreno.icd", "libOpenCL_adreno.so\n")
    d = detect(system)
    assert d.accelerator == "opencl"
    assert d.devices == [Device("Adreno740v2")]
    assert d.reason == (
        "Qualcomm Adreno GPU (Adreno740v2) with OpenCL (/etc/OpenCL/vendors/adreno.icd)"
    )
    assert_explained(d)
    assert d.reasons["vulkan"].startswith("no Vulkan ICD manifest in /usr/share/vulkan/icd.d")
    assert d.reasons["cpu"] == "available, but opencl is preferred"


def test_adreno_on_linux_without_a_gpu_opencl(tmp_path: Path) -> None:
    system = adreno_linux(tmp_path)
    d = detect(system)
    assert d.accelerator == "cpu"
    assert d.reasons["opencl"] == (
        "Adreno GPU (Adreno740v2) found but no OpenCL ICD "
        "(/etc/OpenCL/vendors/*.icd or libOpenCL.so)"
    )
    assert d.devices == [Device("Qualcomm SM8550")]  # ARM kernels have no "model name"
    system.add("/etc/OpenCL/vendors/pocl.icd", "libpocl.so.2\n")
    assert detect(system).reasons["opencl"] == (
        "Adreno GPU (Adreno740v2) found but only a CPU OpenCL driver (pocl.icd) is installed"
    )


REG_QUERY = (
    "\r\nHKEY_LOCAL_MACHINE\\SYSTEM\\CurrentControlSet\\Control\\Class\\"
    "{4d36e968-e325-11ce-bfc1-08002be10318}\\0000\r\n"
    "    DriverDesc    REG_SZ    Qualcomm(R) Adreno(TM) X1-85 GPU\r\n\r\n"
    "End of search: 1 match(es) found.\r\n"
)


def test_adreno_on_windows_arm64(tmp_path: Path) -> None:
    system = FixtureSystem(
        tmp_path,
        platform="win32",
        machine="ARM64",
        env={"SystemRoot": "C:\\Windows", "PROCESSOR_IDENTIFIER": "ARMv8 (64-bit) Family 8"},
        commands={"reg": (0, REG_QUERY)},
    )
    d = detect(system)
    assert d.accelerator == "cpu"
    assert d.reasons["opencl"].startswith("OpenCL.dll not found")
    assert d.devices == [Device("ARMv8 (64-bit) Family 8")]
    system.add("C:\\Windows\\System32\\OpenCL.dll")
    d = detect(system)
    assert d.accelerator == "opencl"
    assert d.devices == [Device("Qualcomm(R) Adreno(TM) X1-85 GPU")]
    assert "C:\\Windows\\System32\\OpenCL.dll" in d.reason
    assert_explained(d)
    assert d.reasons["cuda"] == "nvidia-smi not found"
    assert d.reasons["rocm"] == "ROCm is only probed on Linux"


def test_windows_arm64_opencl_without_an_adreno(tmp_path: Path) -> None:
    listing = REG_QUERY.replace("Qualcomm(R) Adreno(TM) X1-85 GPU", "Parallels Display Adapter")
    system = FixtureSystem(
        tmp_path,
        platform="win32",
        machine="ARM64",
        commands={"reg": (0, listing)},
        libraries={"OpenCL": "C:\\Windows\\System32\\OpenCL.dll"},
    )
    d = detect(system)
    assert d.accelerator == "cpu"
    assert d.reasons["opencl"] == (
        "no Qualcomm Adreno GPU among the display adapters (Parallels Display Adapter)"
    )


def test_cpu_only_machine_runs_no_command(tmp_path: Path) -> None:
    system = linux(tmp_path, commands={"vulkaninfo": (0, VULKANINFO)})
    d = detect(system)
    assert d.accelerator == "cpu"
    assert d.devices == [Device("AMD Ryzen 9 7950X", 65536000 * 1024)]
    assert d.reason == "no usable GPU found"
    assert_explained(d)
    assert system.calls == []


def test_to_json(tmp_path: Path) -> None:
    d = detect(linux(tmp_path, commands={"nvidia-smi": (0, NVIDIA_SMI)}))
    data = d.to_json()
    assert data["name"] == "cuda" and data["variant"] == "cuda" and data["requested"] == "auto"
    assert data["devices"][0] == {
        "name": "NVIDIA GeForce RTX 4090",
        "memory_bytes": 24564 * MIB,
        "driver": "550.54.14",
    }
    assert list(data["reasons"]) == ["metal", "rocm", "vulkan", "opencl", "cpu"]
    assert json.loads(json.dumps(data)) == data


# -- overrides ----------------------------------------------------------------------------


def test_dmr_gpu_cpu_skips_the_gpu(tmp_path: Path) -> None:
    system = linux(tmp_path, env={"DMR_GPU": "cpu"}, commands={"nvidia-smi": (0, NVIDIA_SMI)})
    d = detect(system)
    assert (d.accelerator, d.requested) == ("cpu", "cpu")
    assert d.reason == "DMR_GPU=cpu forces the cpu variant"
    assert d.reasons["cuda"] == "not probed: DMR_GPU=cpu requested"
    assert_explained(d)
    assert system.calls == []


def test_override_picks_a_lower_priority_accelerator(tmp_path: Path) -> None:
    system = vulkan_machine(
        tmp_path, commands={"nvidia-smi": (0, NVIDIA_SMI), "vulkaninfo": (0, VULKANINFO)}
    )
    assert detect(system).accelerator == "cuda"
    d = detect(system, override="vulkan")
    assert (d.accelerator, d.requested) == ("vulkan", "vulkan")
    assert d.reason.startswith("vulkan requested: Vulkan GPU")
    assert d.reasons["cuda"] == "not probed: vulkan requested"
    assert d.reasons["cpu"] == "available, but vulkan requested"


def test_unsatisfiable_override_falls_back_to_cpu_visibly(tmp_path: Path) -> None:
    d = detect(linux(tmp_path, env={"DMR_GPU": " 'ROCm' "}))
    assert (d.accelerator, d.requested) == ("cpu", "rocm")
    assert d.reason == (
        "DMR_GPU=rocm requested but: no /dev/kfd (no AMD GPU with the amdgpu kernel driver); "
        "using cpu"
    )
    assert d.reasons["rocm"] == "no /dev/kfd (no AMD GPU with the amdgpu kernel driver)"
    assert_explained(d)


def test_override_argument_wins_over_the_environment(tmp_path: Path) -> None:
    system = linux(tmp_path, env={"DMR_GPU": "cuda"}, commands={"nvidia-smi": (0, NVIDIA_SMI)})
    assert detect(system).accelerator == "cuda"
    assert detect(system, override="cpu").accelerator == "cpu"
    assert detect(system, override="auto").accelerator == "cuda"


@pytest.mark.parametrize(("env", "override"), [({"DMR_GPU": "tpu"}, None), ({}, "nvidia")])
def test_invalid_override(tmp_path: Path, env: dict[str, str], override: str | None) -> None:
    with pytest.raises(BadRequest) as err:
        detect(linux(tmp_path, env=env), override=override)
    assert "auto, cpu, cuda, vulkan, metal, opencl, rocm" in err.value.message
    assert ("DMR_GPU" in err.value.message) == (override is None)


# -- free memory --------------------------------------------------------------------------


def test_free_memory_cuda_sums_the_gpus(tmp_path: Path) -> None:
    system = linux(tmp_path, commands={"nvidia-smi": (0, NVIDIA_SMI)})
    ram, vram = free_memory(detect(system), system)
    assert vram == (23012 + 24000) * MIB
    assert 0 < ram <= psutil.virtual_memory().total


def test_free_memory_rocm_reads_amdgpu_counters(tmp_path: Path) -> None:
    system = rocm_machine(tmp_path, commands={"rocminfo": (0, ROCMINFO)})
    system.add("/sys/class/drm/card0/device/mem_info_vram_total", "25753026560\n")
    system.add("/sys/class/drm/card0/device/mem_info_vram_used", "753026560\n")
    system.add("/sys/class/drm/card0-DP-1/status", "connected\n")
    assert free_memory(detect(system), system)[1] == 25_000_000_000


def test_free_memory_without_a_readable_vram(tmp_path: Path) -> None:
    system = linux(tmp_path, commands={"nvidia-smi": (0, NVIDIA_SMI)})
    cuda = detect(system)
    system.commands["nvidia-smi"] = (9, "NVIDIA-SMI has failed")
    assert free_memory(cuda, system)[1] is None
    assert free_memory(detect(linux(tmp_path / "cpu")), system)[1] is None


# -- this machine -------------------------------------------------------------------------


def test_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """What `dmr status --json` reports here: cpu, and why each GPU kind was rejected."""
    monkeypatch.delenv("DMR_GPU", raising=False)
    clear_detection_cache()
    d = detect(RealSystem())
    assert_explained(d)
    assert not any(r.startswith("not probed") for k, r in d.reasons.items() if k != "cpu")
    gpu_signs = shutil.which("nvidia-smi") or any(
        Path(p).exists() for p in ("/proc/driver/nvidia", "/dev/kfd", "/dev/dri", "/dev/kgsl-3d0")
    )
    if not gpu_signs:  # the development and CI machine: no GPU at all
        assert d.accelerator == "cpu"
        assert set(d.reasons) == set(GPU_KINDS)
        assert d.reasons["cuda"] == (
            "nvidia-smi not found and no NVIDIA driver in /proc/driver/nvidia"
        )
        assert d.devices[0].memory_bytes == psutil.virtual_memory().total
    ram, vram = free_memory(d)
    assert ram > 0
    if d.accelerator not in ("cuda", "rocm"):
        assert vram is None


def test_real_detection_is_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DMR_GPU", raising=False)
    clear_detection_cache()
    first = detect()
    assert detect() is first
    assert detect(RealSystem()) is first
    assert detect(override="cpu") is not first
    clear_detection_cache()
    again = detect()
    assert again is not first and again == first
