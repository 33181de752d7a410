"""Adds "agoq": {} to every DeepSpeed config handed to deepspeed.initialize (AGOQ_INJECT=1), as a
user's CI would after adding the block to their configs. Installed as an ordinary post-import hook
for ``deepspeed`` (a sys.meta_path finder that asks the other finders for the spec), beside agoq's."""

import os
import sys

if os.environ.get("AGOQ_INJECT") == "1":
    import functools
    import json

    def _inject(kwargs, args):
        cfg = kwargs.get("config", kwargs.get("config_params"))
        key = "config" if "config" in kwargs else ("config_params" if "config_params" in kwargs else None)
        if cfg is None and args is not None and getattr(args, "deepspeed_config", None):
            with open(args.deepspeed_config) as f:
                cfg = json.load(f)
            args.deepspeed_config = None
            key = "config"
        if isinstance(cfg, str) and os.path.exists(cfg):
            with open(cfg) as f:
                cfg = json.load(f)
        if isinstance(cfg, dict) and "agoq" not in cfg:
            cfg = {**cfg, "agoq": {}}
        if key is not None:
            kwargs[key] = cfg

    def _patch(module):
        original = module.initialize

        @functools.wraps(original)
        def initialize(*args, **kwargs):
            _inject(kwargs, kwargs.get("args", args[0] if args else None))
            return original(*args, **kwargs)

        module.initialize = initialize

    class _Loader:
        def __init__(self, inner):
            self.inner = inner

        def create_module(self, spec):
            return self.inner.create_module(spec)

        def exec_module(self, module):
            self.inner.exec_module(module)
            _patch(module)

    class _Finder:
        searching = False

        def find_spec(self, name, path=None, target=None):
            if name != "deepspeed" or self.searching:
                return None
            self.searching = True
            try:
                for finder in sys.meta_path:
                    if finder is self or not hasattr(finder, "find_spec"):
                        continue
                    spec = finder.find_spec(name, path, target)
                    if spec is not None:
                        spec.loader = _Loader(spec.loader)
                        return spec
            finally:
                self.searching = False
            return None

    sys.meta_path.insert(0, _Finder())
