"""The zero-code path: the post-import hook, its cost, its switch, and the call-scoped rebinding."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, **env: str) -> str:
    environ = {**os.environ, "DS_ACCELERATOR": "cpu", **env}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environ, cwd=ROOT, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_pth_is_installed_in_site_packages() -> None:
    import site

    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    found = [d for d in dirs if (Path(d) / "agoq_ds_autoload.pth").is_file()]
    assert found, f"agoq_ds_autoload.pth not installed in any of {dirs} (pip install --no-build-isolation -e .)"


def test_plain_deepspeed_import_is_patched_without_importing_agoq() -> None:
    # No agoq import in the script: the installed .pth must do it; a find_spec probe (as
    # transformers does) must not consume the hook before deepspeed really executes.
    code = (
        "import importlib.util, sys; assert importlib.util.find_spec('deepspeed') is not None; "
        "import deepspeed; print(getattr(deepspeed.initialize, '__agoq_ds_patched__', False))"
    )
    assert _python(code) == "True"


def test_switch_off_with_environment_variable() -> None:
    code = "import deepspeed; print(getattr(deepspeed.initialize, '__agoq_ds_patched__', False))"
    assert _python(code, AGOQ_DS_AUTOLOAD="0") == "False"


def test_interpreter_start_stays_cheap() -> None:
    # The hook must not import torch or deepspeed at interpreter start.
    code = "import sys, json; print(json.dumps(['torch' in sys.modules, 'deepspeed' in sys.modules]))"
    assert json.loads(_python(code)) == [False, False]


def test_importing_deepspeed_first_then_agoq_patches_too() -> None:
    code = "import deepspeed, agoq_ds; from agoq_ds.deepspeed.integration import is_patched; print(is_patched())"
    assert _python(code, AGOQ_DS_AUTOLOAD="1") == "True"


def test_untested_deepspeed_version_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    from agoq_ds._compat import UntestedDeepSpeedError, check_deepspeed_version

    check_deepspeed_version("0.19.8")
    monkeypatch.delenv("AGOQ_DS_ALLOW_UNTESTED_DEEPSPEED", raising=False)
    with pytest.raises(UntestedDeepSpeedError, match=re.escape("tested with deepspeed==0.19.8")):
        check_deepspeed_version("0.20.0")
    monkeypatch.setenv("AGOQ_DS_ALLOW_UNTESTED_DEEPSPEED", "1")
    check_deepspeed_version("0.20.0")


def test_config_discovery_covers_every_calling_convention(tmp_path: Path) -> None:
    import argparse
    import base64

    from agoq_ds.deepspeed.config_source import find_ds_config, wants_agoq

    cfg = {"train_batch_size": 2, "agoq": {"activation": {"default_bits": 4}}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    encoded = base64.urlsafe_b64encode(json.dumps(cfg).encode()).decode()
    for found in (
        find_ds_config(config=cfg),
        find_ds_config(config=str(path)),
        find_ds_config(config_params=cfg),
        find_ds_config(args=argparse.Namespace(deepspeed_config=str(path))),
        find_ds_config(config=encoded),
    ):
        assert found == cfg and wants_agoq(found)
    assert find_ds_config() is None
    assert not wants_agoq({"train_batch_size": 2})
    assert not wants_agoq({"agoq": {"enabled": False}})
    assert not wants_agoq({"agoq": False})
    assert wants_agoq({"agoq": {}})


def test_engine_rebinding_is_call_scoped() -> None:
    import deepspeed

    from agoq_ds.deepspeed.engine import AgoqEngine, AgoqPipelineEngine
    from agoq_ds.deepspeed.integration import agoq_engines

    original = deepspeed.DeepSpeedEngine, deepspeed.PipelineEngine
    with agoq_engines(deepspeed):
        assert deepspeed.DeepSpeedEngine is AgoqEngine and deepspeed.PipelineEngine is AgoqPipelineEngine
    assert (deepspeed.DeepSpeedEngine, deepspeed.PipelineEngine) == original
    with pytest.raises(RuntimeError), agoq_engines(deepspeed):
        raise RuntimeError("boom")
    assert (deepspeed.DeepSpeedEngine, deepspeed.PipelineEngine) == original
    assert issubclass(AgoqEngine, original[0]) and issubclass(AgoqPipelineEngine, original[1])


def test_untested_version_only_blocks_agoq_configs() -> None:
    # A stock config must keep working on an untested DeepSpeed; an agoq config must fail loudly.
    import types

    from agoq_ds._compat import UntestedDeepSpeedError
    from agoq_ds.deepspeed.integration import patch_deepspeed

    fake = types.SimpleNamespace(__version__="9.9.9", initialize=lambda *a, **k: "stock")
    patch_deepspeed(fake)
    assert fake.initialize(config={"train_batch_size": 1}) == "stock"
    with pytest.raises(UntestedDeepSpeedError, match=re.escape("9.9.9")):
        fake.initialize(config={"agoq": {}})


_OTHER_HOOK = """
import sys

class OtherPostImportHook:  # the usual shape: ask the other finders for the spec, then wrap it
    def find_spec(self, fullname, path, target=None):
        if fullname != "deepspeed":
            return None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    return spec
        return None

sys.meta_path.insert(0, OtherPostImportHook())
import deepspeed
print(getattr(deepspeed.initialize, '__agoq_ds_patched__', False))
"""


def test_a_second_post_import_hook_neither_recurses_nor_unpatches() -> None:
    """Profilers and test harnesses install ``sys.meta_path`` finders that ask the others (agoq's
    included) for DeepSpeed's spec; agoq's asks them back. Without a reentrancy guard the two call
    each other until RecursionError."""
    assert _python(_OTHER_HOOK) == "True"
