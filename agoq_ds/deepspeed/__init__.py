"""Everything of agoq that touches DeepSpeed's internals, fenced into one package.

* ``engine``: ``AgoqEngine`` / ``AgoqPipelineEngine`` (subclasses of DeepSpeed's engines).
* ``integration``: the call-scoped ``deepspeed.initialize`` seam; ``config_source``: where its config is.
* ``zero_optimizer`` (ZeRO-1/2), ``stage3_optimizer`` (ZeRO-3), ``bf16_optimizer`` (``BF16_Optimizer``):
  DeepSpeed's optimizers with agoq's 8-bit gradients (``agoq_ds.gradient`` is the DeepSpeed-free core
  they share); ``layout``: a ZeRO-1/2 bucket's owner map from DeepSpeed's bookkeeping.
* ``install``: the module globals rebound while an engine builds its optimizer.
* ``unsupported``: what the 8-bit path refuses, by name.
* ``internals``: the few DeepSpeed internals other agoq modules use.
* ``contract``: the table of every DeepSpeed method, attribute and global used here, with source
  hashes, and ``check()``, which names whatever an installed DeepSpeed changed.

Nothing outside this package imports ``deepspeed.runtime`` (a test scans for it).
"""
