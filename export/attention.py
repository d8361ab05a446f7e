"""Scaled dot-product attention as one onnxruntime kernel.

torch's exporter writes attention as about a dozen nodes per layer: the q/k/v projections
reshaped to heads and transposed, ``MatMul(q, kᵀ)``, a scale, the additive mask, ``Softmax``,
``MatMul`` by v, and the transpose and reshape back. onnxruntime's graph optimizer does not
fuse this form (nor does its offline ``onnxruntime.transformers`` optimizer on torch's
dynamo export), so every node runs as its own kernel, with the transposes copying the
tensors. On all-MiniLM-L6-v2 that is 72 of the graph's nodes.

:func:`fuse_attention` rewrites each such subgraph into one com.microsoft
``MultiHeadAttention``: it takes the projections as they are (batch, sequence, hidden), the
additive mask as its ``attention_bias`` and the scale as an attribute, and returns the heads
already merged. The math is the same (softmax in float32); only subgraphs whose every shape
the rewrite can prove are touched, and anything else is left as exported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compress.export.fast_kernels import MS_DOMAIN, need_ms_domain

log = logging.getLogger(__name__)

_HEADS = [0, 2, 1, 3]  # (B, S, N, d) <-> (B, N, S, d)
_KEYS_T = [0, 2, 3, 1]  # (B, L, N, d) -> (B, N, d, L)
_SMALL = 4096  # initializers copied for shape inference (shapes, scales), in elements


@dataclass
class _Match:
    """One attention subgraph: the nodes it replaces and the inputs of the fused node."""

    nodes: list[onnx.NodeProto]
    query: str
    key: str
    value: str
    bias: str | None
    output: str
    heads: int
    scale: float


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        g = model.graph
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in g.output}
        self.inits = {i.name: i for i in g.initializer}
        # Symbolic shapes (batch and sequence stay named): the rewrite proves its shape
        # conditions on them. Inference runs on a copy that keeps only the small
        # initializers' values (the reshapes' targets): never a second copy of the weights.
        graph_only = onnx.ModelProto(ir_version=model.ir_version)
        graph_only.opset_import.extend(model.opset_import)
        graph_only.graph.node.extend(g.node)
        graph_only.graph.input.extend(g.input)
        graph_only.graph.output.extend(g.output)
        graph_only.graph.value_info.extend(g.value_info)
        for t in g.initializer:
            if _external(t) or np.prod(t.dims, dtype=np.int64) > _SMALL:
                graph_only.graph.initializer.append(onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims))
            else:
                graph_only.graph.initializer.append(t)
        inferred = onnx.shape_inference.infer_shapes(graph_only)
        self.types: dict[str, onnx.TypeProto] = {}
        for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
            self.types[v.name] = v.type

    def shape(self, name: str) -> list | None:
        t = self.types.get(name)
        if t is None or not t.tensor_type.HasField("shape"):
            return None
        return [
            d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else None)
            for d in t.tensor_type.shape.dim
        ]

    def elem_type(self, name: str) -> int | None:
        t = self.types.get(name)
        return t.tensor_type.elem_type if t is not None else None

    def only(self, name: str) -> onnx.NodeProto | None:
        """The single consumer of an intermediate tensor (None if it has several or is an output)."""
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.outputs else None

    def make(self, name: str, op: str) -> onnx.NodeProto | None:
        n = self.producer.get(name)
        return n if n is not None and n.op_type == op and n.domain in ("", "ai.onnx") else None

    def scalar(self, name: str) -> float | None:
        if name in self.inits:
            v = numpy_helper.to_array(self.inits[name]) if not _external(self.inits[name]) else None
        else:
            n = self.producer.get(name)
            if n is None or n.op_type != "Constant" or not n.attribute:
                return None
            v = numpy_helper.to_array(n.attribute[0].t) if n.attribute[0].name == "value" else None
        if v is None or v.size != 1 or not np.issubdtype(v.dtype, np.floating):
            return None
        return float(v.reshape(()))


def _external(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL


def _perm(node: onnx.NodeProto) -> list[int] | None:
    for a in node.attribute:
        if a.name == "perm":
            return list(a.ints)
    return None


_Heads = tuple  # (x (B, S, N·d), x's shape, the transposed shape, the nodes)


def _split_heads(g: _Graph, name: str, perm: list[int]) -> _Heads | None:
    """``Transpose(perm)(Reshape(x))`` with x of shape (B, S, N·d), the two nodes used by
    nothing else."""
    t = g.make(name, "Transpose")
    if t is None or _perm(t) != perm or g.only(t.input[0]) is not t:
        return None
    r = g.make(t.input[0], "Reshape")
    if r is None:
        return None
    x = r.input[0]
    xs, rs = g.shape(x), g.shape(r.output[0])
    if xs is None or rs is None or len(xs) != 3 or len(rs) != 4:
        return None
    heads, dim = rs[2], rs[3]
    if not (isinstance(heads, int) and isinstance(dim, int) and heads > 0 and dim > 0):
        return None
    if xs[0] != rs[0] or xs[1] != rs[1] or xs[2] != heads * dim:
        return None
    return x, xs, [rs[0], heads, rs[1], dim] if perm == _HEADS else [rs[0], heads, dim, rs[1]], [t, r]


def _keys(g: _Graph, name: str) -> _Heads | None:
    """kᵀ: heads split straight into (B, N, d, L), or split into (B, N, L, d) and the last
    two axes swapped afterwards (torch's scaled_dot_product_attention decomposition does this
    through a (B·N, L, d) reshape)."""
    direct = _split_heads(g, name, _KEYS_T)
    if direct is not None:
        return direct
    r2 = g.make(name, "Reshape")
    tr = g.make(r2.input[0], "Transpose") if r2 is not None else None
    r1 = g.make(tr.input[0], "Reshape") if tr is not None else None
    if r2 is None or tr is None or r1 is None or _perm(tr) != [0, 2, 1]:
        return None
    # the (B, N, L, d) tensor may also feed the Shape nodes that compute the reshapes' targets
    if g.only(r2.input[0]) is not r2 or g.only(tr.input[0]) is not tr or r1.input[0] in g.outputs:
        return None
    if any(u is not r1 and u.op_type != "Shape" for u in g.consumers.get(r1.input[0], [])):
        return None
    k = _split_heads(g, r1.input[0], _HEADS)
    if k is None:
        return None
    src = _dims(g, r1.input[0])
    first, second = _shape_value(g, r1.input[1]), _shape_value(g, r2.input[1])
    # (B, N, L, d) -> (-1, L, d) -> (·, d, L) -> (B, N, d, L): a swap of the last two axes
    if src is None or first is None or second is None or len(src) != 4:
        return None
    if len(first) != 3 or first[0] != -1 or first[1:] != src[2:] or second != [src[0], src[1], src[3], src[2]]:
        return None
    x, xs, ts, nodes = k
    return x, xs, [ts[0], ts[1], ts[3], ts[2]], [r2, tr, r1, *nodes]


def _dims(g: _Graph, name: str) -> list | None:
    """A tensor's dims, each an int, a named dim or a token for an unknown one (equal only to
    itself): what ``Shape`` of the tensor evaluates to."""
    shape = g.shape(name)
    if shape is None:
        return None
    return [d if d is not None else (name, i) for i, d in enumerate(shape)]


def _ints(g: _Graph, name: str) -> list[int] | None:
    if name in g.inits:
        t = g.inits[name]
        if _external(t) or t.data_type not in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
            return None
        return [int(v) for v in numpy_helper.to_array(t).reshape(-1)]
    n = g.producer.get(name)
    if n is not None and n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
        v = numpy_helper.to_array(n.attribute[0].t)
        return [int(x) for x in v.reshape(-1)] if np.issubdtype(v.dtype, np.integer) else None
    return None


def _shape_value(g: _Graph, name: str, depth: int = 0) -> list | None:
    """The value of a 1-D shape tensor built from constants, ``Shape``, ``Slice``, ``Gather``,
    ``Unsqueeze``/``Squeeze`` and ``Concat``, as a list of dims (see :func:`_dims`); None if it
    is computed any other way."""
    const = _ints(g, name)
    if const is not None or depth > 16:
        return const
    n = g.producer.get(name)
    if n is None or n.domain not in ("", "ai.onnx"):
        return None
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
    if n.op_type == "Shape":
        dims = _dims(g, n.input[0])
        return None if dims is None else dims[attrs.get("start", 0) : attrs.get("end", len(dims))]
    if n.op_type == "Concat":
        parts = [_shape_value(g, i, depth + 1) for i in n.input]
        return None if any(p is None for p in parts) else [d for p in parts for d in p]  # type: ignore[union-attr]
    if n.op_type in ("Unsqueeze", "Squeeze"):
        return _shape_value(g, n.input[0], depth + 1)
    if n.op_type == "Gather":
        data, idx = _shape_value(g, n.input[0], depth + 1), _ints(g, n.input[1])
        if data is None or idx is None or not all(-len(data) <= i < len(data) for i in idx):
            return None
        return [data[i] for i in idx]
    if n.op_type == "Slice":
        data = _shape_value(g, n.input[0], depth + 1)
        bounds = [_ints(g, i) if i else None for i in list(n.input[1:]) + [""] * (5 - len(n.input))]
        starts, ends, axes, steps = bounds
        if data is None or starts is None or ends is None or len(starts) != 1 or len(ends) != 1:
            return None
        if (axes is not None and axes not in ([0], [-1])) or (steps is not None and steps != [1]):
            return None
        return data[slice(starts[0], ends[0])]
    return None


def _scaled(g: _Graph, name: str) -> tuple[str, float, list[onnx.NodeProto]]:
    """``x · c`` (or ``x / c``) by a scalar constant: (x, c, [the node]); else (name, 1, [])."""
    node = g.producer.get(name)
    if node is None or node.op_type not in ("Mul", "Div") or node.domain not in ("", "ai.onnx"):
        return name, 1.0, []
    if g.only(name) is None:
        return name, 1.0, []
    c = g.scalar(node.input[1])
    x = node.input[0]
    if c is None and node.op_type == "Mul":
        c, x = g.scalar(node.input[0]), node.input[1]
    factor = c if node.op_type == "Mul" else 1.0 / c if c else None
    if not factor or not np.isfinite(factor) or g.only(x) is not node:
        return name, 1.0, []
    return x, factor, [g.producer[name]]


def _nan_guard(g: _Graph, probs: str) -> tuple[str, list[onnx.NodeProto]] | None:
    """``Where(IsNaN(p), 0, p)`` after the softmax (rows whose every key is masked give 0,
    not NaN): (its output, its nodes); None if ``p`` is read any other way."""
    users = g.consumers.get(probs, [])
    if len(users) != 2 or probs in g.outputs:
        return None
    isnan = next((u for u in users if u.op_type == "IsNaN"), None)
    where = next((u for u in users if u.op_type == "Where"), None)
    if isnan is None or where is None or g.only(isnan.output[0]) is not where:
        return None
    if list(where.input) != [isnan.output[0], where.input[1], probs] or g.scalar(where.input[1]) != 0.0:
        return None
    return where.output[0], [isnan, where]


def _finite_mask(g: _Graph, bias: str | None) -> bool:
    """A mask that cannot hold -inf (so no row of scores is all -inf, and the softmax never
    gives NaN): ``Where(condition, a, b)`` over two finite constants, as torch writes one."""
    if bias is None:
        return True
    n = g.producer.get(bias)
    if n is None or n.op_type != "Where":
        return False
    values = [g.scalar(i) for i in n.input[1:]]
    return all(v is not None and np.isfinite(v) for v in values)


def _match(g: _Graph, softmax: onnx.NodeProto) -> _Match | None:
    for a in softmax.attribute:
        if a.name == "axis" and a.i not in (-1, 3):
            return None
    scores = softmax.input[0]
    add = g.make(scores, "Add")
    if add is None or g.only(scores) is not softmax:
        return _match_scores(g, softmax, scores, None, [softmax])
    # an additive mask on either side of the Add
    for side in (0, 1):
        m = _match_scores(g, softmax, add.input[side], add.input[1 - side], [softmax, add])
        if m is not None:
            return m
    return None


def _match_scores(
    g: _Graph, softmax: onnx.NodeProto, scores: str, bias: str | None, nodes: list[onnx.NodeProto]
) -> _Match | None:
    if g.only(scores) is not nodes[-1]:
        return None
    nodes = list(nodes)
    scores, scale, scaling = _scaled(g, scores)  # a scale on the scores
    mm = g.make(scores, "MatMul")
    if mm is None or g.only(scores) is not (scaling[0] if scaling else nodes[-1]):
        return None
    nodes += [*scaling, mm]
    q_in, q_scale, q_scaling = _scaled(g, mm.input[0])  # or on q and k (√scale each)
    k_in, k_scale, k_scaling = _scaled(g, mm.input[1])
    q, k = _split_heads(g, q_in, _HEADS), _keys(g, k_in)
    if q is None or k is None:
        return None
    scale *= q_scale * k_scale
    # softmax · v (after an optional NaN guard), heads merged back
    probs, guard = softmax.output[0], list[onnx.NodeProto]()
    mm2 = g.only(probs)
    if mm2 is None:
        guarded = _nan_guard(g, probs)
        if guarded is None or not _finite_mask(g, bias):
            return None
        probs, guard = guarded
        mm2 = g.only(probs)
    if mm2 is None or mm2.op_type != "MatMul" or mm2.input[0] != probs:
        return None
    v = _split_heads(g, mm2.input[1], _HEADS)
    t_out = g.only(mm2.output[0])
    if v is None or t_out is None or t_out.op_type != "Transpose" or _perm(t_out) != _HEADS:
        return None
    r_out = g.only(t_out.output[0])
    if r_out is None or r_out.op_type != "Reshape":
        return None
    (qx, qs, qt, q_nodes), (kx, ks, kt, k_nodes), (vx, vs, vt, v_nodes) = q, k, v
    heads, dim = qt[1], qt[3]
    # q (B,N,S,d), kᵀ (B,N,d,L), v (B,N,L,dv): one head count, keys and values of one length
    if kt[1] != heads or kt[2] != dim or vt[1] != heads or kt[3] != vt[2] or qs[0] != ks[0] or ks[0] != vs[0]:
        return None
    out_shape = g.shape(r_out.output[0])
    if out_shape is None or out_shape != [qs[0], qs[1], heads * vt[3]]:
        return None
    if bias is not None:
        bs = g.shape(bias)
        # MultiHeadAttention's attention_bias: (B or 1, N or 1, S, L), float like the scores
        if (
            bs is None
            or len(bs) != 4
            or bs[0] not in (1, qs[0])
            or bs[1] not in (1, heads)
            or bs[2] != qt[2]
            or bs[3] != kt[3]
            or g.elem_type(bias) != g.elem_type(qx)
        ):
            return None
    for x in (qx, kx, vx):
        if g.elem_type(x) != onnx.TensorProto.FLOAT:
            return None
    nodes += [*q_scaling, *k_scaling, *q_nodes, *k_nodes, *guard, mm2, *v_nodes, t_out, r_out]
    return _Match(nodes, qx, kx, vx, bias, r_out.output[0], int(heads), scale)


def fuse_attention(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Rewrite each provable attention subgraph of ``model`` (in place) into one
    com.microsoft ``MultiHeadAttention``; returns the model and how many were fused."""
    if not any(n.op_type == "Softmax" for n in model.graph.node):
        return model, 0
    g = _Graph(model)
    matches: list[_Match] = []
    taken: set[int] = set()
    for node in model.graph.node:
        if node.op_type != "Softmax":
            continue
        m = _match(g, node)
        if m is None or any(id(n) in taken for n in m.nodes):
            continue
        taken.update(id(n) for n in m.nodes)
        matches.append(m)
    kept = _rewrite(model, matches)
    while True:  # a match whose removed tensors something outside it still reads stays as exported
        missing = _unavailable(model, kept)
        bad = [m for m in matches if any(o in missing for n in m.nodes for o in n.output)]
        if not bad:
            break
        matches = [m for m in matches if m not in bad]
        kept = _rewrite(model, matches)
    if not matches:
        return model, 0
    del model.graph.node[:]
    model.graph.node.extend(kept)
    _drop_unused_initializers(model)
    need_ms_domain(model)
    log.info("fused %d attention subgraphs into MultiHeadAttention", len(matches))
    return model, len(matches)


def _rewrite(model: onnx.ModelProto, matches: list[_Match]) -> list[onnx.NodeProto]:
    """The graph's nodes with each match replaced by its fused node, dead nodes dropped."""
    taken = {id(n) for m in matches for n in m.nodes}
    fused: dict[int, onnx.NodeProto] = {}
    for i, m in enumerate(matches):
        inputs = [m.query, m.key, m.value, "", "", m.bias or ""]
        while inputs and not inputs[-1]:
            inputs.pop()
        fused[id(m.nodes[-1])] = helper.make_node(
            "MultiHeadAttention",
            inputs,
            [m.output],
            name=f"fused_attention_{i}",
            domain=MS_DOMAIN,
            num_heads=m.heads,
            scale=m.scale,
        )
    # The fused node takes the place of the last node it replaces (the heads' merge), where
    # all of its inputs are already computed.
    kept = [fused.get(id(n), n) for n in model.graph.node if id(n) in fused or id(n) not in taken]
    return _live(kept, {o.name for o in model.graph.output})


def _live(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` less those (the heads' shape computations) whose outputs nothing reads."""
    while True:
        used = set(outputs)
        for n in nodes:
            used.update(n.input)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    used.update(i for sub in a.g.node for i in sub.input)
        keep = [n for n in nodes if any(o in used for o in n.output)]
        if len(keep) == len(nodes):
            return keep
        nodes = keep


def _unavailable(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> set[str]:
    """Tensors ``nodes`` read that neither they, the graph's inputs nor its initializers make."""
    have = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer} | {""}
    have.update(o for n in nodes for o in n.output)
    return {i for n in nodes for i in n.input if i not in have}


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Remove the constants only the replaced nodes read (the scale, the heads' shapes)."""
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    for n in model.graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                used.update(i for sub in a.g.node for i in sub.input)
    graph_inputs = {i.name for i in model.graph.input}
    keep = [t for t in model.graph.initializer if t.name in used or t.name in graph_inputs]
    if len(keep) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
