"""The installed llama.cpp is the portable x86-64 build ``make setup`` asks for (issue 9).

A ``-march=native`` build on Sapphire Rapids uses ggml's AMX kernels, which segfault on the first
decode of a Q4_K_M model. The system-info line tells what the library was compiled to use. It
cannot tell a native build made on a CPU without AMX or AVX-512 (such as an AMD EPYC) from a
portable one, so the library's disassembly is checked too: no AVX-512 or AMX instruction in any
of them, and nothing in libggml-cpu that the baseline flags (-msse4.2 -mavx -mavx2 -mfma -mf16c
-mbmi2) do not enable.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from oni_sys.annotators.llamacpp_build import REQUIRED, check_build, judge

not_native = pytest.mark.skipif(
    os.environ.get("ONI_SYS_LLAMA_BUILD") == "native",
    reason="ONI_SYS_LLAMA_BUILD=native: `make setup LLAMA_NATIVE=1` asked for a llama.cpp tuned "
    "to this machine's CPU (-march=native), which may use AMX/AVX-512 and crash on other CPUs; "
    "its portability is NOT checked",
)
x86_only = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"),
    reason=f"the portable baseline is x86-64's; this machine is {platform.machine()}",
)

SAPPHIRE_RAPIDS = (
    "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX_VNNI = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | "
    "BMI2 = 1 | AVX512 = 1 | AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | "
    "AMX_INT8 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | "
)
PORTABLE = (
    "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | "
    "LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | "
)

# Instructions no build with the baseline flags contains: AVX-512 registers (zmm, xmm/ymm 16-31,
# the opmask registers k0-k7), AMX tile instructions and the VNNI dot products.
NATIVE_ONLY = re.compile(
    r"%zmm\d+|%[xy]mm(?:1[6-9]|2\d|3[01])\b|%k[0-7]\b"
    r"|\b(?:ldtilecfg|sttilecfg|tileloaddt?1?|tilestored|tilezero|tilerelease"
    r"|tdpb[su][su]d|tdpbf16ps|tdpfp16ps)\b"
    r"|\bvpdp(?:bu|ws)sds?\b"
)
# What -march=native adds on CPUs without AVX-512 (BMI1, LZCNT, MOVBE, ADX, SHA, VAES, SSE4a):
# harmless on any AVX2 machine, but proof that libggml-cpu was not compiled with the baseline
# flags (the only ggml code compiled with them; libllama's generic code may hold tzcnt/lzcnt,
# so it is not searched for these, and tzcnt is left out: GCC writes ctz as `rep bsf`).
BEYOND_BASELINE = re.compile(
    r"\s(?:andn|blsr|blsi|blsmsk|bextr|lzcnt|movbe|adcx|adox|sha1\w+|sha256\w+"
    r"|v?aes\w+|v?pclmul\w*|extrq|insertq)\s"
)


def test_judge_tells_a_native_line_from_a_portable_one():
    native = judge(SAPPHIRE_RAPIDS)
    assert not native.portable
    assert native.offending == (
        "AVX_VNNI",
        "AVX512",
        "AVX512_VBMI",
        "AVX512_VNNI",
        "AVX512_BF16",
        "AMX_INT8",
    )
    assert "AMX_INT8" in native.sentence() and "make setup" in native.sentence()
    portable = judge(PORTABLE)
    assert portable.portable and portable.offending == () and portable.missing == ()
    assert portable.features[:7] == ("SSE3", "SSSE3", "AVX", "AVX2", "F16C", "FMA", "BMI2")
    # Another backend's entries (e.g. CUDA's) are not CPU features.
    assert judge(PORTABLE + "CUDA : ARCHS = 890 | USE_GRAPHS = 1 | ").portable
    assert not judge("").portable and not judge("CPU : AVX = 0 | ").features


@pytest.fixture(scope="module")
def verdict():
    pytest.importorskip("llama_cpp")
    return check_build()


@not_native
@x86_only
def test_built_library_uses_no_native_only_feature(verdict):
    assert verdict.backends.get("CPU"), f"no CPU backend in the system info: {verdict.line!r}"
    assert not [f for f in verdict.features if f.startswith("AMX")], verdict.line
    assert verdict.offending == (), (
        f"llama.cpp was built for a specific CPU ({', '.join(verdict.offending)}); "
        f"system info: {verdict.line}"
    )
    assert verdict.portable


@not_native
@x86_only
def test_built_library_uses_the_baseline(verdict):
    missing = [f for f in REQUIRED if f not in verdict.features]
    assert not missing, f"the build lacks {missing}: {verdict.line}"


def _libraries() -> list[Path]:
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib"
    # lib*.so, not the versioned copies of the same file next to it
    return sorted(p for p in lib.glob("lib*.so") if "ggml" in p.name or "llama" in p.name)


@not_native
@x86_only
def test_disassembly_has_no_avx512_amx_or_native_code():
    pytest.importorskip("llama_cpp")
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed: the disassembly check needs it")
    libs = _libraries()
    assert any(p.name.startswith("libggml-cpu") for p in libs), libs
    for path in libs:
        text = subprocess.run(
            [objdump, "-d", "--no-show-raw-insn", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        found = sorted({m.group(0) for m in NATIVE_ONLY.finditer(text)})
        assert not found, f"{path.name} contains AVX-512/AMX/VNNI instructions: {found[:10]}"
        if not path.name.startswith("libggml-cpu"):
            continue
        beyond = sorted({m.group(0).strip() for m in BEYOND_BASELINE.finditer(text)})
        assert not beyond, (
            f"{path.name} contains instructions the baseline flags do not enable: {beyond[:10]} "
            "(a -march=native build?)"
        )
        # the baseline is really used: AVX2 registers, FMA and F16C instructions
        assert "%ymm" in text, f"{path.name} has no AVX code"
        assert re.search(r"\bvfn?m(?:add|sub)\d{3}", text), f"{path.name} has no FMA code"
        assert re.search(r"\bvcvt(?:ph2ps|ps2ph)\b", text), f"{path.name} has no F16C code"
