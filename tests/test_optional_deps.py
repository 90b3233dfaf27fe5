"""What works without the optional packages: bf16 as raw bytes without ml_dtypes, 1.1 without zstandard."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# subprocesses run outside the repository, so they import the installed ckptfmt, not the source tree
GOLDEN = ROOT / "conformance" / "golden"

WITHOUT_ML_DTYPES = r"""
import sys
sys.modules["ml_dtypes"] = None  # as if not installed: ml_dtypes is a core dependency, keep this path working
import numpy as np, ckptfmt
path = sys.argv[1]
state = ckptfmt.load(path)
bf = state["bfloat16"]
assert bf.dtype == np.dtype("V2"), bf.dtype                       # raw 2-byte elements
assert bf.view("<u2").tolist()[:3] == [0, 0x3F80, 0xC000]         # 0.0, 1.0, -2.0 in bfloat16 bits
assert state["float32"].dtype == np.float32                       # everything else is unchanged
assert ckptfmt.verify(path).ok
try:
    ckptfmt.save(sys.argv[2], {"b": bf})
except ckptfmt.UnsupportedDTypeError as e:
    assert "ml_dtypes" in str(e), e
else:
    raise SystemExit("raw V2 bytes were saved without ml_dtypes")
print("ok")
"""


def test_bfloat16_loads_as_raw_bytes_without_ml_dtypes(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-c", WITHOUT_ML_DTYPES, str(GOLDEN / "1.0" / "dtypes.ckpt"),
                        str(tmp_path / "x.ckpt")], capture_output=True, text=True, check=False, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
    assert not (tmp_path / "x.ckpt").exists()


WITHOUT_ZSTD = r"""
import sys
sys.modules["zstandard"] = None
import ckptfmt
try:
    ckptfmt.load(sys.argv[1])
except ckptfmt.MissingDependencyError as e:
    assert "ckptfmt[compress]" in str(e), e
else:
    raise SystemExit("a compressed file loaded without zstandard")
assert ckptfmt.verify(sys.argv[1]).ok              # stored bytes verify without the codec
assert len(ckptfmt.load(sys.argv[2])) > 40         # packed, uncompressed: no extra needed
print("ok")
"""


def test_compressed_files_name_the_compress_extra(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-c", WITHOUT_ZSTD, str(GOLDEN / "1.1" / "compressed_fast.ckpt"),
                        str(GOLDEN / "1.1" / "packed.ckpt")], capture_output=True, text=True, check=False, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
