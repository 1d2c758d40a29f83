"""Networks whose forward pass the data steers (`if x.sum() > 0: ... else: ...`), found before they are cut.

torch.fx cannot trace such a network, and Torch-Pruning's dependency graph is built from one pass on one example
input, so it sees one branch only: a cut narrows the layers of that branch and leaves the other branch's layers at
their old widths, and on real data every candidate fails with a shape error. Such a network is refused at
`validate` by the methods that change its structure, with the tracer's own error. A network fx cannot trace whose
every layer runs on the example (shape checks, asserts: timm's MobileViT) is still cut through the graph.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from core.errors import first_line

LISTED = 4  # layers named in the message at most


def fx_trace_error(model: nn.Module) -> str | None:
    """None if torch.fx traces `model`; else the tracer's error as one line ("TraceError: ...")."""
    try:
        fx.symbolic_trace(model)
    except Exception as err:  # noqa: BLE001 — whatever the user's forward does under the tracer
        return f"{type(err).__name__}: {first_line(err)}"
    return None


def layers_not_run(model: nn.Module, example: torch.Tensor) -> list[str]:
    """The layers with parameters of their own that the forward pass on `example` neither calls nor reads: a
    weight used without calling its module (MultiheadAttention's out_proj) is found in the autograd graph."""
    ran: set[str] = set()
    layers = [(name, m) for name, m in model.named_modules() if name and next(m.parameters(False), None) is not None]
    forward_with_hooks(model, example, [m.register_forward_pre_hook(lambda _m, _a, name=name: ran.add(name))
                                        for name, m in layers])
    idle = [(name, m) for name, m in layers if name not in ran]
    if not idle:
        return []
    used = parameters_used(model, example)
    return [name for name, m in idle if not any(id(p) in used for p in m.parameters(False))]


def parameters_used(model: nn.Module, example: torch.Tensor) -> set[int]:
    """ids of the parameters the autograd graph of one eval-mode forward pass on `example` reaches (with
    gradients: nn.TransformerEncoderLayer's no-grad fast path would skip its layers)."""
    training = model.training
    try:
        with torch.enable_grad():
            output = model.eval()(example)
    finally:
        model.train(training)
    stack = [t.grad_fn for t in _tensors(output) if t.grad_fn is not None]
    seen, used = set(), set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf, the parameter itself
        if variable is not None:
            used.add(id(variable))
        stack.extend(child for child, _ in node.next_functions if child is not None)
    return used


def _tensors(output: object) -> list[torch.Tensor]:
    """The tensors in a model's output (a tensor, a tuple or list, a dict of them)."""
    if isinstance(output, torch.Tensor):
        return [output]
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else []
    return [t for value in values for t in _tensors(value)]


def forward_with_hooks(model: nn.Module, example: torch.Tensor, handles: list) -> None:
    """One forward pass of `model` in eval mode without gradients, then the hooks `handles` removed."""
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for handle in handles:
            handle.remove()


def branch_problem(model: nn.Module, example: torch.Tensor) -> str | None:
    """Why `model` cannot be cut when the data steers its forward pass (torch.fx cannot trace it and some of its
    layers do not run on `example`); None otherwise."""
    trace_error = fx_trace_error(model)
    if trace_error is None:
        return None
    idle = layers_not_run(model, example)
    if not idle:
        return None
    names = ", ".join(idle[:LISTED]) + (f" and {len(idle) - LISTED} more" if len(idle) > LISTED else "")
    return (f"cannot be cut: torch.fx cannot trace it ({trace_error}), and on an example input these layers do not "
            f"run: {names} (a branch the data decides, which the dependency graph, one traced pass, cannot follow)")
