"""The numerically sensitive MEFT tests, rerun under other ATen CPU kernels.

Which float roundings the reversible inverse flips depends on the CPU's vector kernels (ATen picks the best
of default / avx2 / avx512 at start-up, or the one ATEN_CPU_CAPABILITY names). The ordinary run covers the
machine's best; this reruns the inversion and float64 gradient tests of the largest amplification (MEFT3,
1/(λβ) = 100 per layer) and of the family with float32 islands in float64 (Llama) in a fresh process under
the portable `default` kernels, and under avx2 as well where the best is avx512, so their bounds are
checked against more than one machine's rounding.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .meft_helpers import FAMILIES

SENSITIVE = "(inverse_recovers or float64_four_layers) and (3- or tiny-llama)"
SELECTED = 2 * (len(FAMILIES) + 2)          # both tests: MEFT3 on every family, MEFT1 and MEFT2 on Llama
TESTS = Path(__file__).with_name("test_meft_numerics.py")
# The child reports the capability ATen really chose, then runs pytest on the selection.
CHILD = ("import sys, torch, pytest; print('ATen CPU capability:', torch.backends.cpu.get_cpu_capability()); "
         "sys.exit(pytest.main(sys.argv[1:]))")


def capabilities() -> list[str]:
    best = torch.backends.cpu.get_cpu_capability()
    return ["default", "avx2"] if best == "AVX512" else ["default"]


@pytest.mark.parametrize("capability", capabilities())
def test_sensitive_meft_tests_pass_under_other_cpu_kernels(capability):
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    proc = subprocess.run([sys.executable, "-c", CHILD, "-o", "addopts=", "-q", "-p", "no:cacheprovider", str(TESTS),
                           "-k", SENSITIVE],
                          env=env, cwd=TESTS.parents[2], capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert f"ATen CPU capability: {capability.upper()}" in out, out[-2000:]
    assert proc.returncode == 0, out[-4000:]
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) == SELECTED, out[-2000:]
