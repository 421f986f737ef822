"""Device guards: library code creates tensors on its inputs' device, and layouts move whole.

Two checks that run without a GPU. A static one: an AST scan of src/attnlab for tensor factories
called without ``device=`` (the CUDA crash of neighborhood/halo/document/region was a CPU tensor
captured by a predicate). A behavioural one: every static mask layout moved to the ``meta`` device
holds only meta tensors, and its moved predicate runs on meta indices, which fails exactly when a
predicate still reads a host tensor.
"""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch

import attnlab
from attnlab.mechanisms import global_local

SRC = pathlib.Path(attnlab.__file__).parent
FACTORIES = {
    "arange", "zeros", "ones", "full", "empty", "tensor", "as_tensor", "randn", "rand", "randint", "eye",
    "linspace", "logspace", "randperm", "empty_strided", "scalar_tensor", "tril_indices", "triu_indices",
}  # fmt: skip
HOST_TOOLS = ("bench/", "cli.py", "testing.py")  # host-side tools, never on a device path
MARKER = "# host:"  # a deliberate host-side tensor (cached planning, option defaults), with a reason


def _enclosing_functions(tree: ast.AST) -> dict[int, str]:
    """line -> name of the innermost function defined around it."""
    owner: dict[int, str] = {}

    def visit(node, name):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = node.name
            for line in range(node.lineno, (node.end_lineno or node.lineno) + 1):
                owner[line] = name
        for child in ast.iter_child_nodes(node):
            visit(child, name)

    visit(tree, None)
    return owner


def device_findings(root: pathlib.Path = SRC) -> list[tuple[str, int, str | None, str]]:
    """(file, line, function, source) of every ``torch.<factory>(...)`` without ``device=``."""
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(HOST_TOOLS):
            continue
        text = path.read_text()
        lines, tree = text.splitlines(), ast.parse(text)
        owner = _enclosing_functions(tree)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            base = node.func.value
            if not (isinstance(base, ast.Name) and base.id == "torch" and node.func.attr in FACTORIES):
                continue
            if any(kw.arg == "device" for kw in node.keywords) or MARKER in lines[node.lineno - 1]:
                continue
            found.append((rel, node.lineno, owner.get(node.lineno), lines[node.lineno - 1].strip()))
    return found


def test_no_tensor_factory_without_device():
    findings = device_findings()
    report = "\n".join(f"  src/attnlab/{rel}:{line} ({func}): {src}" for rel, line, func, src in findings)
    assert not findings, (
        f"{len(findings)} tensor factories without device= (pass device=x.device, use *_like, or mark "
        f"a deliberate host tensor with '{MARKER} <reason>'):\n{report}"
    )


def test_scan_catches_a_factory_and_honours_the_marker(tmp_path):
    (tmp_path / "mod.py").write_text(
        "import torch\n"
        "def f(x):\n"
        "    a = torch.arange(3)\n"
        "    b = torch.zeros(2, device=x.device)\n"
        "    c = torch.ones(2)  # host: a planning constant\n"
        "    return torch.zeros_like(x), a, b, c\n"
    )
    assert [(r, n, fn) for r, n, fn, _ in device_findings(tmp_path)] == [("mod.py", 3, "f")]


# -- behavioural: layouts moved to the meta device ---------------------------------------------


def _static_layouts():
    """(name, layout) for every registered mask mechanism (example options), plus the variants
    whose predicates read tensors: per-batch document ids, region in group order and causal, a
    2-D neighbourhood (tile order), and global_local's causal pooled layout."""
    T = S = 24
    out = []
    for mech in attnlab.registry.MECHANISMS:
        if mech.layout is None:
            continue
        causal = "self" not in mech.patterns
        kv = {"kv_heads": 2} if mech.per_kv_head else {}
        out.append((mech.name, mech.block_layout(T, S, causal=causal, **kv, **mech.example(S))))
    ids = torch.tensor([[0] * 10 + [1] * 14, [0] * 5 + [1] * 19])
    out.append(("document_ids", attnlab.get("document").block_layout(T, S, causal=True, document_ids=ids)))
    groups = torch.tensor([0, 1, 2, 1] * 6)
    rules = torch.tensor([[True, True, True], [True, True, False], [True, False, True]])
    region = attnlab.get("region")
    out.append(("region_ordered", region.block_layout(T, S, causal=False, groups=groups, rules=rules)))
    out.append(("region_causal", region.block_layout(T, S, causal=True, groups=groups, rules=rules)))
    grid = attnlab.get("neighborhood").block_layout(T, S, shape=(4, 6), kernel_size=3)
    out.append(("neighborhood_2d", grid))
    out.append(("global_local", global_local._global_layout(T, S, 4, attnlab.kernels.block_sizes())))
    return out


LAYOUTS = _static_layouts()
META = torch.device("meta")


def _call_on(lay, device):
    b = torch.tensor(lay.kv_blocks.shape[0] - 1, device=device)
    h = torch.tensor(lay.kv_blocks.shape[1] - 1, device=device)
    q_idx = torch.arange(lay.T, device=device).view(-1, 1)
    kv_idx = torch.arange(lay.S, device=device).view(1, -1)
    return lay.mask_mod(b, h, q_idx, kv_idx)


@pytest.mark.parametrize("name,lay", LAYOUTS, ids=[n for n, _ in LAYOUTS])
def test_layout_moves_whole_to_meta(name, lay):
    moved = lay.to(META)
    tensors = {"kv_blocks": moved.kv_blocks, "partial": moved.partial, "order": moved.order}
    off = {k: t.device for k, t in tensors.items() if t is not None and t.device != META}
    assert not off, f"{name}: layout tensors not moved: {off}"
    allowed = _call_on(moved, META)  # raises when the predicate still reads a host tensor
    assert allowed.device == META and allowed.shape == (lay.T, lay.S)
    assert lay.to(META) is moved, "a second move must hit the cache"
    assert lay.to("cpu") is lay, "a layout already on the device is returned as is"


@pytest.mark.parametrize("name", ["document_ids", "region_ordered", "neighborhood_2d", "halo"])
def test_host_predicates_fail_on_meta_indices(name):
    """The negative control: without BlockLayout.to these predicates read host tensors, which is the
    CUDA bug; the meta check above would catch a mechanism that forgot its ``rebind``."""
    lay = dict(LAYOUTS)[name]
    assert lay.rebind is not None
    try:
        allowed = _call_on(lay, META)
    except (RuntimeError, IndexError):  # a host tensor met a meta one
        return
    assert allowed.device != META  # or a host table indexed by meta indices gave a host result


def test_moved_predicate_agrees_with_the_host_one():
    for name, lay in LAYOUTS:
        if lay.rebind is None:
            continue
        moved = lay.rebind(torch.device("cpu"))  # a rebuilt predicate, same values
        b, h = torch.tensor(lay.kv_blocks.shape[0] - 1), torch.tensor(lay.kv_blocks.shape[1] - 1)
        q_idx, kv_idx = torch.arange(lay.T).view(-1, 1), torch.arange(lay.S).view(1, -1)
        assert torch.equal(moved(b, h, q_idx, kv_idx), lay.mask_mod(b, h, q_idx, kv_idx)), name


def test_block_sizes_follow_the_device():
    assert attnlab.kernels.block_sizes() == (64, 64)
    assert attnlab.kernels.block_sizes("cpu") == (64, 64)
    assert attnlab.kernels.block_sizes(torch.device("cuda")) == (128, 128)
    with attnlab.kernels.block_size(32, 16):
        assert attnlab.kernels.block_sizes("cuda") == (32, 16)  # the user's choice wins everywhere
    assert attnlab.kernels.block_sizes("cuda") == (128, 128)
