"""What the tests, the benchmarks and the examples share, kept out of the runtime (the shape of
``torchao.testing``). Nothing in the rest of ``agoq_ds`` imports this package
(``tests/integration/test_ground_floor.py`` checks it).

* ``models``: small LLaMA-architecture HF models built from a config (no download), and the layer
  list a ``PipelineModule`` takes.
* ``data``: the embedded default corpus (the Python standard library's source, byte-level).
* ``stats``: byte meters (collectives, saved activations, gradient buffers) for stock and agoq runs.
* ``shutdown``: a launched example's clean ending, and the clean-up of DeepSpeed's CPU all-reduce
  workspaces in ``/dev/shm`` for test and benchmark drivers.
* ``distributed``: ``run_ranks``, a function on N real gloo processes.
* ``host_sync``: ``HostSyncCounter``, the operations that make a GPU program wait for the device.
* ``live_bytes``: ``LiveBytes`` / ``measure_step``, live tensor bytes of a step on any device.

The modules import ``transformers`` and ``deepspeed`` where they use them, not at import.
"""
