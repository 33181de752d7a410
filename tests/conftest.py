"""Shared pytest setup: CPU DeepSpeed, quiet logs, the helper module importable."""

import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "integration"))
