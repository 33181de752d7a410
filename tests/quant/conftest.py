"""Fixtures shared by the quantization tests."""

from __future__ import annotations

import os
import shutil

import pytest

from agoq_ds.quant import backends


@pytest.fixture(scope="module")
def cpp():
    """The cpp backend module; skipped only where it is deliberately off or no compiler exists."""
    st = backends.status("cpp")
    if not st.available:
        if os.environ.get("AGOQ_DISABLE_CPP") == "1" or shutil.which("c++") is None:
            pytest.skip(f"cpp backend unavailable: {st.detail}")
        pytest.fail(f"cpp backend unavailable although a C++ compiler exists: {st.detail}")
    return backends.get("cpp")
