"""Reading a compiled graph for the activation packer: which module reads a saved value, which module
a graph's frame belongs to, and which saved values eager mode would keep as they are.

Used at trace time by ``compiled.py`` (the saved node and the backward graph come from AOTAutograd's
saved-tensor-hook context). Module names are ``named_modules()`` names of the quantized model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from .identity import dense_permutation

VIEW_OPS = frozenset(
    {
        "view",
        "_unsafe_view",
        "reshape",
        "permute",
        "transpose",
        "t",
        "expand",
        "unsqueeze",
        "squeeze",
        "alias",
        "slice",
        "select",
        "clone",
    }
)
"""Backward ops that only re-shape a saved value: its class is that of whatever reads their result."""


def op_name(node: torch.fx.Node) -> str:
    """The op's name without overload (``mm`` for ``aten.mm.default``, ``getitem``)."""
    name = getattr(node.target, "__name__", str(node.target))
    return name.split(".")[0]


def normalize_path(path: str) -> str:
    """Dynamo's source of a module or parameter (``L['self'].model.layers._modules['0']._parameters['w']``)
    as a dotted name relative to the compiled frame's ``self`` (``model.layers.0.w``)."""
    start = path.find("L['self']")
    if start >= 0:
        path = path[start + len("L['self']") :]
    elif path.startswith("self"):
        path = path[len("self") :]
    parts: list[str] = []
    for piece in path.replace("]", "").split("."):
        for part in piece.split("["):
            part = part.strip("'\"")
            if part and part not in ("_modules", "_parameters", "_buffers", "__dict__"):
                parts.append(part)
    return ".".join(parts)


def module_path(node: torch.fx.Node) -> str | None:
    """Name (relative to the frame) of the innermost module whose forward ran ``node`` (a backward
    node carries its forward op's); ``""`` for the frame's module itself is never recorded, so
    ``None`` means "the frame's own code"."""
    stack = node.meta.get("fwd_nn_module_stack") or node.meta.get("nn_module_stack")
    if not stack:
        return None
    return normalize_path(list(stack.values())[-1][0])


def frame_module(gm: torch.fx.GraphModule, parameter_names: Mapping[int, str]) -> str | None:
    """Name of the module whose ``forward`` frame Dynamo compiled into ``gm`` (``""``: the root), found
    from a parameter input: its full name minus its name relative to the frame. ``None`` when the
    graph reads no parameter of the model."""
    for node in gm.graph.find_nodes(op="placeholder"):
        arg = node.meta.get("grapharg")
        example = getattr(arg, "example", None) if arg is not None else None
        full = parameter_names.get(id(example)) if example is not None else None
        if full is None:
            continue
        source = arg.source.name
        cut = source.find("_parameters")
        if cut >= 0:  # compare the owners: the parameter's own key may be spelt as an index
            relative, full = normalize_path(source[:cut]), full.rpartition(".")[0]
        else:
            relative = normalize_path(source)
        if full == relative:
            return ""
        if relative and full.endswith("." + relative):
            return full[: -len(relative) - 1]
        if not relative:
            return full
    return None


def readers(saved: torch.fx.Node, bw_graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """The backward ops that read ``saved`` (by name among the backward graph's inputs), looking
    through ops that only re-shape it."""
    inputs = [n for n in bw_graph.find_nodes(op="placeholder") if n.name == saved.name]
    found: list[torch.fx.Node] = []
    seen: set[torch.fx.Node] = set()
    todo = [u for n in inputs for u in n.users]
    while todo:
        node = todo.pop()
        if node in seen or node.op != "call_function":
            continue
        seen.add(node)
        if op_name(node) in VIEW_OPS:
            todo.extend(node.users)
        else:
            found.append(node)
    return found


def is_attention_aux(saved: torch.fx.Node) -> bool:
    """SDPA's log-sum-exp, RNG state and sizes (every output but the first): eager mode keeps them."""
    if op_name(saved) != "getitem" or len(saved.args) < 2:
        return False
    producer = saved.args[0]
    return isinstance(producer, torch.fx.Node) and "scaled_dot_product" in op_name(producer) and saved.args[1] != 0


def memory_order(x: torch.Tensor) -> tuple[int, ...] | None:
    """The permutation that makes ``x`` contiguous (``identity.dense_permutation``, which also orders
    symbolic strides), ``None`` when none does (a non-dense layout, kept as it is)."""
    perm = dense_permutation(x)
    return tuple(perm) if perm is not None else None


def is_pointwise(node: torch.fx.Node) -> bool:
    """An elementwise ATen/prims op (its ``pointwise`` tag): cheap to recompute, and fused by Inductor."""
    target = node.target
    return (
        node.op == "call_function" and isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags
    )


def mark_rebuilds(graph: torch.fx.Graph, bits_of: Callable[[str | None], int]) -> int:
    """Tag for recomputation in backward (``recompute``: ``MUST_RECOMPUTE``) every forward value eager
    mode rebuilds by a recipe instead of storing it: a pointwise value whose readers in other modules
    ask for fewer bits than its own module stores at (a norm's output read by 4-bit projections; the
    gating product read by the down projection), with the pointwise ops before it in its own module (the
    normalisation, the casts). The min-cut partitioner then saves what they are computed from (the
    norm's input, the gate and up outputs) and Inductor fuses the rebuild into the backward.
    ``bits_of(module name relative to the frame)`` gives a module's bits. Returns the number tagged."""
    from torch.utils.checkpoint import CheckpointPolicy

    backward: set[torch.fx.Node] = set()
    todo = [n for n in graph.find_nodes(op="placeholder") if n.name.startswith("tangents")]
    while todo:
        node = todo.pop()
        if node not in backward:
            backward.add(node)
            todo.extend(node.users)

    def tag(node: torch.fx.Node) -> None:
        node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
        node.meta["ac_graph_id"] = 0

    tagged = 0
    for node in graph.nodes:
        if node in backward or not is_pointwise(node) or "recompute" in node.meta:
            continue
        own = module_path(node)
        readers_bits = [bits_of(module_path(u)) for u in node.users if u not in backward and module_path(u) != own]
        if not readers_bits or max(readers_bits) >= bits_of(own):
            continue
        chain = [node]
        while chain:
            current = chain.pop()
            if "recompute" in current.meta:
                continue
            tag(current)
            tagged += 1
            chain.extend(
                arg
                for arg in current.all_input_nodes
                if arg not in backward and is_pointwise(arg) and module_path(arg) == own
            )
    return tagged
