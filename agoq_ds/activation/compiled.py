"""Quantized activation storage under ``torch.compile``: agoq's pack and unpack as graph-module
saved-tensor hooks, which AOTAutograd inlines into the compiled forward's epilogue and the compiled
backward's prologue (pytorch#150032).

In eager mode agoq packs each saved tensor in Python as autograd saves it (``hooks.py``). A compiled
graph saves its tensors inside one ``autograd.Function``, so per-module hooks cannot attribute them,
and Dynamo cannot trace the hooks themselves. PyTorch's answer is a ``saved_tensors_hooks`` pair whose
pack and unpack are ``torch.fx.GraphModule`` s: AOTAutograd traces them once per saved value of each
compiled graph and splices the quantize into the forward graph and the dequantize into the backward
graph, where Inductor schedules them like any other op. While it traces them,
``_get_saved_tensor_hook_context()`` gives the saved node and the backward graph, so the decision is
taken from the graph itself (``compiled_graph.py``):

* **class and module**: the backward ops that read the saved value (looking through views), each
  carrying the forward module it differentiates (``nn_module_stack``), relative to the module whose
  frame the graph is (the root for a whole-model graph; a layer when a graph break split the model,
  as ZeRO-3's parameter gathering does). As in eager mode, a value read in several modules is stored
  once at the largest bit-width any of them asks for; a value read by no recorded module is stored at
  the ``other`` class's bits (``UNATTRIBUTED``, said once);
* **kept as they are**: what eager mode keeps (non-float, fewer than ``min_numel`` elements, per-row
  statistics, SDPA's log-sum-exp and RNG state, non-dense layouts) and the graph's static inputs
  (parameters). Symbolic (dynamic) shapes are quantized like static ones;
* **bytes**: worked out from the traced shapes per compiled graph (``GraphUsage``, evaluated at the
  sizes of each run for a dynamic graph) and counted in the ledger each time that graph runs (the
  backend wrapper, ``wrap_backend``), so ``agoq_stats()`` and the report say what the compiled graphs
  actually saved.

The classification and calibration still come from eager forwards (``PackEngine`` in hook mode): the
AGoQ engine runs the model uncompiled until ``eager_needed`` turns false, then compiled under
``forward()``. Rounding is to nearest under compile (an in-graph constant cannot give stochastic
rounding a fresh seed per step).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ..layer_classes import LayerClass
from ..quant.format import quantized_bytes
from ..quant.ops import DISPATCHER, backend_ops
from .compiled_graph import frame_module, is_attention_aux, mark_rebuilds, memory_order, module_path, readers
from .span import Usage
from .storage import QUANTIZABLE_DTYPES, Ledger, QuantSpec, SavedTensor, SavedView, is_row_statistic

UNATTRIBUTED = "<no module recorded>"
"""Module name under which saved values read by no recorded module are counted (a graph of code
outside every module, eager code between graphs); they are stored at the ``other`` class's bits."""


@dataclass(frozen=True)
class Decision:
    """How one saved value of a compiled graph is stored."""

    cls: str
    """Layer class it is counted under."""
    module: str
    """Module it is counted under."""
    bits: int
    """Stored bit-width (16: kept as it is)."""
    perm: tuple[int, ...] = ()
    """Permutation to memory order."""


@dataclass
class GraphUsage:
    """What one compiled forward graph stores, counted in the ledger each time it runs."""

    group_size: int
    """Elements per scale."""
    frame: str | None = None
    """Name of the module whose frame the graph is (``None``: unknown)."""
    entries: dict[str, tuple[Decision, Any, int, int, int]] = field(default_factory=dict)
    """Saved node name -> (decision, element count (an int or a size expression), its value when traced,
    bytes per element, bytes per scale)."""
    symbols: dict[Any, int] = field(default_factory=dict)
    """Size symbol -> index of the graph input that carries its value (a dynamic graph)."""
    _counted: dict[tuple, tuple[dict, dict, Usage]] = field(default_factory=dict)

    def add(self, name: str, decision: Decision, numel: Any, element_size: int, scale_size: int) -> None:
        """Count the saved node ``name`` once (AOTAutograd calls the pack hook twice per node)."""
        traced = numel
        if isinstance(numel, torch.SymInt):
            numel, traced = numel.node.expr, int(numel.node.hint)
        self.entries.setdefault(name, (decision, numel, traced, element_size, scale_size))

    def usage(self, args: tuple) -> tuple[dict[str, Usage], dict[tuple[str, str], Usage], Usage]:
        """Usage per class, per (module, class) and in all of one run whose inputs are ``args``."""
        key = tuple(args[i] for i in self.symbols.values())
        found = self._counted.get(key)
        if found is None:
            values = dict(zip(self.symbols, key, strict=True))
            found = self._counted[key] = self._count(values)
        return found

    def _count(self, values: Mapping) -> tuple[dict[str, Usage], dict[tuple[str, str], Usage], Usage]:
        by_class: dict[str, Usage] = {}
        by_module: dict[tuple[str, str], Usage] = {}
        total = Usage()
        for decision, numel, traced, element_size, scale_size in self.entries.values():
            if isinstance(numel, int):
                n = numel
            else:  # a size symbol no graph input carries counts at its traced value
                expr = numel.xreplace(values)
                n = int(expr) if expr.is_number else traced
            baseline = n * element_size
            quantized = decision.bits < 16
            stored = quantized_bytes(n, decision.bits, self.group_size, scale_size) if quantized else baseline
            for usage in (
                by_class.setdefault(decision.cls, Usage()),
                by_module.setdefault((decision.module, decision.cls), Usage()),
                total,
            ):
                usage.add(n, stored, baseline, quantized)
        return by_class, by_module, total


@contextmanager
def uncompiled(model: torch.nn.Module) -> Iterator[None]:
    """Calls of ``model`` and its modules run their eager ``_call_impl`` (hooks included) although
    ``module.compile()`` ran on them (DeepSpeed compiles a ``PipelineModule`` layer by layer):
    ``nn.Module`` keeps the compiled call in ``_compiled_call_impl``."""
    compiled = [(m, m._compiled_call_impl) for m in model.modules() if m._compiled_call_impl is not None]
    for module, _ in compiled:
        module._compiled_call_impl = None
    try:
        yield
    finally:
        for module, call in compiled:
            module._compiled_call_impl = call


def compiled_modules(model: torch.nn.Module) -> list[str]:
    """Names of the modules of ``model`` on which ``module.compile()`` ran."""
    return [name for name, m in model.named_modules() if m._compiled_call_impl is not None]


def _hook_module(fn: Callable[[Any], Any]) -> torch.fx.GraphModule:
    """A one-node graph module calling ``fn``: PyTorch inlines graph-module hooks (and re-runs ``fn``
    under its tracer, so the ops ``fn`` calls become graph nodes)."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(fn, (x,)))
    module = torch.fx.GraphModule(torch.nn.Module(), graph)
    module.agoq_compiled = True  # the eager recorder packs eager code (a pipeline's loss) under these
    return module


def _size_symbols(gm: torch.fx.GraphModule) -> dict[Any, int]:
    """Size symbol -> index of the Dynamo graph input carrying it (Dynamo lifts free symbols)."""
    found: dict[Any, int] = {}
    for i, node in enumerate(gm.graph.find_nodes(op="placeholder")):
        value = node.meta.get("example_value")
        if isinstance(value, torch.SymInt) and value.node.expr.is_Symbol:
            found.setdefault(value.node.expr, i)
    return found


class CompiledPacking:
    """agoq's storage decisions as inlineable saved-tensor hooks (see module docstring)."""

    def __init__(
        self,
        model: torch.nn.Module,
        bits: Callable[[str, str], int],
        class_of: Callable[[str], str],
        spec: QuantSpec,
        min_numel: int,
        ledger: Ledger,
        recompute: bool = True,
    ) -> None:
        self.bits = bits
        """Bits for (module name, class), the eager policy's."""
        self.class_of = class_of
        """Class of a module name's own scope (the eager classification)."""
        self.spec = spec
        self.min_numel = min_numel
        self.ledger = ledger
        """The eager packer's ledger: compiled runs are counted in it."""
        self.graphs: list[GraphUsage] = []
        """One per compiled graph that saves something."""
        self.runs = 0
        """Compiled graph runs that stored tensors."""
        self.unattributed: set[str] = set()
        """Saved nodes stored as ``UNATTRIBUTED``."""
        self.recompute = recompute
        """Rebuild in backward what eager mode rebuilds by recipes (``ActivationConfig.recompute``)."""
        self.rebuilt = 0
        """Forward values tagged for recomputation (``mark_rebuilds``) in the graphs compiled so far."""
        self.eager_saved = 0
        """Tensors autograd saved outside any compiled graph (eager code between graph breaks)."""
        self._parameter_names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
        self._said: set[str] = set()
        self._compiling: GraphUsage | None = None
        self._held: list[tuple[int, int, int]] = []
        self._hooks: tuple[torch.fx.GraphModule, torch.fx.GraphModule] | None = None

    # --- running ---------------------------------------------------------------------------------

    def refresh(self) -> None:
        """The bits changed: new hook objects, so Dynamo's guard on them recompiles every graph."""
        self._hooks = None

    @contextmanager
    def forward(self) -> Iterator[None]:
        """Run one forward of the compiled model with the hooks pushed (outside the compiled region)."""
        if self._hooks is None:
            self._hooks = (_hook_module(self._pack), _hook_module(self._unpack))
        with torch.autograd.graph.saved_tensors_hooks(*self._hooks):
            yield
        if torch.is_grad_enabled():
            self.ledger.end_forward()

    def backward_done(self) -> None:
        """A backward finished: the compiled graphs' stored tensors are freed."""
        for stored, baseline, numel in self._held:
            self.ledger.drop(stored, baseline, numel)
        self._held.clear()

    def news(self) -> list[str]:
        """What the user should know about the compiled graphs, each said once: saved values stored
        without a module (at the ``other`` class's bits) and tensors saved outside the graphs."""
        lines = []
        if self.unattributed and "unattributed" not in self._said:
            self._said.add("unattributed")
            lines.append(
                f"agoq: {len(self.unattributed)} saved values of compiled graphs are read by no recorded module; "
                f"they are stored at the '{LayerClass.OTHER.value}' class's bits and counted under {UNATTRIBUTED!r}"
            )
        if self.eager_saved and "eager" not in self._said:
            self._said.add("eager")
            lines.append(
                f"agoq: {self.eager_saved} tensors were saved for backward by eager code between compiled graphs "
                f"(graph breaks); they are stored as eager agoq stores them, at the '{LayerClass.OTHER.value}' "
                f"class's bits, counted under {UNATTRIBUTED!r}. torch._dynamo.explain(model) lists the breaks"
            )
        return lines

    def wrap_backend(self, backend: Any) -> Callable:
        """A Dynamo backend that compiles with ``backend`` (a name or a callable) and counts each run of a
        graph that stores tensors in the ledger."""
        inner = torch._dynamo.lookup_backend(backend) if isinstance(backend, str) else backend

        def agoq_backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
            usage = GraphUsage(self.spec.group_size, frame_module(gm, self._parameter_names), symbols=_size_symbols(gm))
            self._compiling = usage
            try:
                # PyTorch's default hooks only donated intermediates; a graph split at a graph break (ZeRO-3
                # gathers parameters between modules) receives its activations as inputs: hook all
                # saved values but the static inputs (parameters), as eager mode does.
                with (
                    torch._functorch.config.patch(saved_tensors_hooks_filtering_mode="no_static"),
                    torch._inductor.config.patch(joint_custom_pre_pass=self._joint_pass(usage.frame)),
                ):
                    compiled = inner(gm, example_inputs)
            finally:
                self._compiling = None
            if not usage.entries:
                return compiled
            self.graphs.append(usage)
            return self._counting(compiled, usage)

        agoq_backend.__name__ = f"agoq_{getattr(inner, '__name__', 'backend')}"
        return agoq_backend

    def _joint_pass(self, frame: str | None) -> Callable | None:
        """Inductor's joint-graph pass for a graph of ``frame``: the user's, then (``recompute``) the
        tagging of what eager mode rebuilds by recipes (``compiled_graph.mark_rebuilds``)."""
        previous = torch._inductor.config.joint_custom_pre_pass
        if not self.recompute:
            return previous

        def bits_of(relative: str | None) -> int:
            return self.bits(*self._module_class(frame, relative))

        def agoq_rebuilds(graph: torch.fx.Graph) -> None:
            if callable(previous):
                previous(graph)
            self.rebuilt += mark_rebuilds(graph, bits_of)

        return agoq_rebuilds

    def _counting(self, compiled: Callable, usage: GraphUsage) -> Callable:
        def run(*args: Any) -> Any:  # Dynamo calls a backend's result unboxed
            if torch.is_grad_enabled():
                by_class, by_module, total = usage.usage(args)
                self.ledger.hold_many(total.stored, total.baseline, total.numel, total.tensors)
                self.ledger.add_forward(by_class, by_module, total)
                self._held.append((total.stored, total.baseline, total.numel))
                self.runs += 1
            return compiled(*args)

        return run

    # --- the decision, at trace time ---------------------------------------------------------------

    def _module_class(self, frame: str | None, relative: str | None) -> tuple[str, str]:
        """Module name and class of ``relative`` (a module path in a graph of ``frame``'s forward);
        ``UNATTRIBUTED`` and ``other`` when the graph's module is unknown."""
        if frame is None:
            return UNATTRIBUTED, LayerClass.OTHER.value
        name = ".".join(p for p in (frame, relative) if p)
        return name, self.class_of(name)

    def decide(self, saved: torch.fx.Node, bw_graph: torch.fx.Graph, x: torch.Tensor) -> Decision | None:
        """How the saved value ``saved`` (``x``: its traced value) is stored; ``None``: as it is, and
        not counted (eager mode does not count parameters, integers and the like either)."""
        if x.dtype not in QUANTIZABLE_DTYPES or x.layout != torch.strided:
            return None
        frame = self._compiling.frame if self._compiling is not None else None
        best: Decision | None = None
        if frame is None:
            self.unattributed.add(saved.name)
        for reader in readers(saved, bw_graph) or [saved]:
            name, cls = self._module_class(frame, module_path(reader))
            bits = self.bits(name, cls)
            if best is None or bits > best.bits:
                best = Decision(cls, name, bits)
        keep = x.numel() < max(self.min_numel, 1) or is_row_statistic(x) or is_attention_aux(saved)
        perm = None if keep else memory_order(x)
        if perm is None:
            return Decision(best.cls, best.module, 16)
        return Decision(best.cls, best.module, best.bits, perm)

    def _pack(self, x: torch.Tensor) -> Any:
        from torch._functorch._aot_autograd.graph_compile import _get_saved_tensor_hook_context

        context = _get_saved_tensor_hook_context()
        if context is None:  # autograd saving eagerly, between compiled graphs (a graph break)
            return self._pack_eager(x)
        saved = context["_node"]
        decision = self.decide(saved, context["_bw_graph"], x)
        if decision is None:
            return x
        if self._compiling is not None:
            self._compiling.add(saved.name, decision, x.numel(), x.element_size(), self.spec.scale_dtype.itemsize)
        if decision.bits >= 16:
            return x
        source = x.permute(decision.perm)
        quantize = backend_ops(self._backend(x))[0]
        codes, scales, zeros = quantize(
            source, decision.bits, self.spec.group_size, True, False, 0, self.spec.scale_dtype
        )
        inverse = tuple(sorted(range(len(decision.perm)), key=decision.perm.__getitem__))
        return codes, scales, zeros, decision.bits, x.numel(), tuple(source.shape), inverse, x.dtype

    def _pack_eager(self, x: torch.Tensor) -> Any:
        """A tensor saved by eager code between compiled graphs: stored as eager agoq stores a tensor of
        no known module (the ``other`` class's bits), counted in the ledger by its holder."""
        if x.layout != torch.strided or isinstance(x, torch.nn.Parameter) or isinstance(x._base, torch.nn.Parameter):
            return x
        self.eager_saved += 1
        cls = LayerClass.OTHER.value
        holder = SavedTensor(x, self.ledger, self.min_numel)
        # No finiteness check (a host synchronisation per tensor, every step); NaN/Inf read back as NaN.
        holder.finalize(cls, UNATTRIBUTED, [self.bits(UNATTRIBUTED, cls)], False, self.spec, 0)
        return holder.view(x)

    def _unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        if isinstance(packed, SavedView):
            return packed.unpack()
        codes, scales, zeros, bits, numel, shape, inverse, dtype = packed
        dequantize = backend_ops(self._backend(codes))[1]
        flat = dequantize(codes, scales, zeros, bits, self.spec.group_size, numel, dtype)
        return flat.view(shape).permute(inverse)

    def _backend(self, t: torch.Tensor) -> str:
        kernels = self.spec.kernels
        return kernels.compiled(t.device.type) if kernels is not None else DISPATCHER
