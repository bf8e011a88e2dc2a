"""Which CPU features the installed llama.cpp (llama-cpp-python) was built to use, read from its
system-info line, and whether that build is the portable one ``make setup`` makes
(docs/ANNOTATOR.md, "The llama.cpp build and oni-sys doctor").
"""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

#: instruction sets the portable build enables (SSE3 and SSSE3 come with -msse4.2)
BASELINE: tuple[str, ...] = ("SSE3", "SSSE3", "AVX", "AVX2", "F16C", "FMA", "BMI2")
#: the baseline features the tests insist on (without them llama.cpp falls back to slow code)
REQUIRED: tuple[str, ...] = ("AVX2", "FMA", "F16C")
#: entries that are build options, not instruction sets: neutral for portability
BUILD_OPTIONS: tuple[str, ...] = (
    "LLAMAFILE",
    "OPENMP",
    "REPACK",
    "ACCELERATE",
    "CPU_HBM",
    "KLEIDIAI",
)
#: the CMake flags of the portable build (the Makefile's LLAMA_CMAKE_ARGS)
PORTABLE_CMAKE_ARGS = (
    "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON "
    "-DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
)
#: how to rebuild llama-cpp-python portably by hand (pip's wheel cache ignores CMAKE_ARGS)
PORTABLE_PIP = (
    f'CMAKE_ARGS="{PORTABLE_CMAKE_ARGS}" pip install --force-reinstall --no-deps '
    "--no-cache-dir 'llama-cpp-python>=0.3'"
)
#: where ``make setup`` records which build it asked for, relative to the venv (``sys.prefix``)
STAMP_NAME = ".llama-cpp-build"


@dataclass(frozen=True)
class BuildVerdict:
    """What the system-info line says about the build's portability."""

    #: True when the CPU backend uses nothing beyond :data:`BASELINE`
    portable: bool
    #: CPU features the library was built to use, in the order the line lists them
    features: tuple[str, ...]
    #: features beyond the portable baseline (AMX_*, AVX512*, AVX_VNNI, ...)
    offending: tuple[str, ...]
    #: the line as llama.cpp printed it
    line: str
    #: every backend's entries, e.g. ``{"CPU": {"AVX2": "1", ...}}``
    backends: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def missing(self) -> tuple[str, ...]:
        """Entries of :data:`REQUIRED` the build does not use."""
        return tuple(f for f in REQUIRED if f not in self.features)

    def sentence(self) -> str:
        """One line for a user: portable or not, and why."""
        if not self.backends.get("CPU"):
            return "llama.cpp reports no CPU backend features; cannot judge the build"
        if self.portable:
            text = "portable build: x86-64 baseline (" + ", ".join(
                f for f in self.features if f in BASELINE
            )
            text += "), no AVX-512, AVX-VNNI or AMX"
            if self.missing:
                text += f"; but without {', '.join(self.missing)} (slow)"
            return text
        return (
            f"built for a specific CPU (uses {', '.join(self.offending)}): may crash on other "
            f"CPUs (AMX segfaults on Sapphire Rapids); rebuild portably with `make setup` "
            f"(without LLAMA_NATIVE=1) or: {PORTABLE_PIP}"
        )


def parse_system_info(line: str) -> dict[str, dict[str, str]]:
    """``"CPU : AVX = 1 | AVX2 = 1 | "`` -> ``{"CPU": {"AVX": "1", "AVX2": "1"}}``.

    llama.cpp writes each registered backend as ``NAME : key = value | ...`` back to back.
    """
    backends: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for part in line.split("|"):
        part = part.strip()
        if not part:
            continue
        if " : " in part:
            name, _, part = part.partition(" : ")
            current = backends.setdefault(name.strip(), {})
        key, sep, value = part.partition("=")
        if current is None or not sep:
            continue  # text llama.cpp did not write in this shape: nothing to judge
        current[key.strip()] = value.strip()
    return backends


def judge(line: str) -> BuildVerdict:
    """Judge a system-info line: which CPU features the build uses, which are not portable."""
    backends = parse_system_info(line)
    cpu = backends.get("CPU", {})
    features = tuple(k for k, v in cpu.items() if v not in ("", "0"))
    offending = tuple(f for f in features if f not in BASELINE and f not in BUILD_OPTIONS)
    return BuildVerdict(
        portable=bool(cpu) and not offending,
        features=features,
        offending=offending,
        line=line.strip(),
        backends=backends,
    )


def system_info() -> str:
    """The installed library's system-info line, read in this process (imports llama_cpp)."""
    import llama_cpp

    raw = llama_cpp.llama_print_system_info()
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)


def system_info_isolated(timeout_s: float = 60.0) -> str:
    """:func:`system_info` read in a child Python, so a library built for another CPU (SIGILL
    on import) fails with a RuntimeError instead of killing the caller."""
    code = (
        "import sys, llama_cpp; "
        "sys.stdout.write(llama_cpp.llama_print_system_info().decode('utf-8', 'replace'))"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"importing llama_cpp took more than {timeout_s:g} s") from None
    if done.returncode < 0:
        import signal

        name = signal.Signals(-done.returncode).name
        raise RuntimeError(
            f"importing llama_cpp killed the process with {name}: the library was built for "
            f"another CPU; rebuild it: {PORTABLE_PIP}"
        )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"cannot read llama.cpp's system info: {last}")
    return done.stdout


def check_build(*, isolated: bool = False) -> BuildVerdict:
    """The verdict on the installed llama-cpp-python (ImportError when it is not installed)."""
    return judge(system_info_isolated() if isolated else system_info())


def recorded_build(prefix: str | Path | None = None) -> str | None:
    """What ``make setup`` recorded for this venv (``portable ...`` or ``native ...``), if any."""
    path = Path(prefix or sys.prefix) / STAMP_NAME
    try:
        return path.read_text().strip() or None
    except OSError:
        return None
