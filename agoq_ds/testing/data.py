"""The embedded default corpus: real text that needs no download.

The Python standard library's own source files (always present where Python is), read in a fixed
order and tokenised byte-level (vocabulary 256), split into train and held-out parts. ``--data`` in
the examples replaces it with the user's own text file(s).
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

VOCAB_SIZE = 256
"""Byte-level vocabulary size."""

DEFAULT_MODULES = (
    "argparse.py",
    "collections/__init__.py",
    "dataclasses.py",
    "difflib.py",
    "email/message.py",
    "enum.py",
    "functools.py",
    "inspect.py",
    "json/decoder.py",
    "json/encoder.py",
    "logging/__init__.py",
    "pathlib.py",
    "pickle.py",
    "random.py",
    "shutil.py",
    "statistics.py",
    "string.py",
    "subprocess.py",
    "textwrap.py",
    "threading.py",
    "typing.py",
    "unittest/case.py",
    "urllib/parse.py",
    "zipfile.py",
)
"""Standard-library files that make up the default corpus (about 1.5 MB of Python source)."""


def default_corpus_files() -> list[Path]:
    """Paths of the default corpus files that exist in this Python (in a fixed order)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [stdlib / name for name in DEFAULT_MODULES if (stdlib / name).is_file()]


def load_bytes(paths: Sequence[str | Path] | None = None, max_bytes: int | None = None) -> torch.Tensor:
    """The corpus as a 1-D uint8 tensor of byte tokens (``paths`` default to the stdlib corpus)."""
    files = [Path(p) for p in paths] if paths else default_corpus_files()
    if not files:
        raise FileNotFoundError("no corpus files found (pass --data PATH)")
    blob = b"\n".join(f.read_bytes() for f in files)
    if max_bytes is not None:
        blob = blob[:max_bytes]
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8)


def split(tokens: torch.Tensor, heldout_fraction: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a token stream into (train, held-out); the held-out part is the tail."""
    cut = int(len(tokens) * (1 - heldout_fraction))
    return tokens[:cut], tokens[cut:]


def batches(
    tokens: torch.Tensor,
    batch_size: int,
    seq_len: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[torch.Tensor]:
    """Endless ``[batch_size, seq_len]`` token batches of random windows, same order for a given seed.

    HF causal-LM convention: pass a batch as both ``input_ids`` and ``labels`` (the model shifts).

    Every rank draws the same global batch and takes its own slice of rows, so the global data order
    does not depend on the number of ranks.
    """
    gen = torch.Generator().manual_seed(seed)
    global_batch = batch_size * world_size
    limit = len(tokens) - seq_len
    while True:
        starts = torch.randint(0, limit, (global_batch,), generator=gen)[rank * batch_size : (rank + 1) * batch_size]
        yield torch.stack([tokens[s : s + seq_len] for s in starts.tolist()]).long()


def heldout_batches(tokens: torch.Tensor, batch_size: int, seq_len: int, count: int) -> list[torch.Tensor]:
    """A fixed list of ``count`` held-out ``[batch_size, seq_len]`` batches of consecutive windows."""
    span = seq_len
    need = batch_size * count * span
    if len(tokens) < need:
        count = max(1, len(tokens) // (batch_size * span))
        need = batch_size * count * span
    return list(tokens[:need].long().view(count, batch_size, span))
