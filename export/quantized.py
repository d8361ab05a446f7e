"""Rewrite a float ONNX export so quantized weights are stored as real integers.

For every parameter in ``state.quant`` the float initializer of the same name is replaced:

* Uniform weights without an integer kernel (``activations: none``, or a layout the
  integer kernels do not take) become ``Cast(codes) [− zero point] · scale`` + ``Reshape``
  (``compress.export.fast_kernels.folded_dequantize_nodes``): onnxruntime constant-folds it
  into the float weight at load, so the model runs exactly at float speed from an integer
  file. Measured on this repo's AVX2 CPU without VNNI, the fused N-bit MatMul is slower than
  float (``benchmarks/quantize.py --cnn-speed``); ``weight_only="matmul_nbits"`` still writes
  it (4-/8-bit weights in memory, for CPUs where it is fast):
  - a Linear (``Gemm(transB=1)``) becomes ``DequantizeLinear → MatMul`` (``+ Add`` for the
    bias) on the transposed codes, the pattern onnxruntime fuses into ``MatMulNBits``: bits
    ≤ 4 opset-21 blockwise over ``INT4`` (``UINT4`` plus zero points for asymmetric grids),
    axis 0, per-channel scales as one power-of-two block ≥ max(16, in_features) (ORT fuses
    only power-of-two blocks ≥ 16); bits > 4 ``INT8`` (``UINT8`` with zero points) per output
    channel (``axis=1``) or blockwise for per-group scales;
  - other consumers (Conv, ...) ``DequantizeLinear`` + ``Reshape``.
* Integer kernels for quantized activations and embeddings: ``compress.export.fast_kernels``.
* Codebooks: a ``UINT8`` (``UINT4`` for bits ≤ 4) index initializer → ``Cast(int32)`` →
  ``Gather`` from the codebook (``GatherElements`` over per-row tables for several codebooks).
  onnxruntime constant-folds this into a float weight at load: smaller file, same memory.

With ``matmul_nbits`` the fused kernel quantizes activations to 8 bits by default; ``ort_session`` (and
``session_config_for_exact_parity``) set ``session.qdq_matmulnbits_accuracy_level`` to 1
(fp32 compute), which reproduces the dequantized PyTorch model exactly (measured: 0 error
with levels 0 and 1, ~0.5% relative error with the default 4).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from compress.qtensor import CodebookTensor, QuantizedTensor, UniformTensor

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

EXACT_PARITY_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "1"}
# ORT's MatMul+Add→Gemm fusion runs before the DequantizeLinear→MatMulNBits fusion and hides
# the pattern behind Gemm / FusedGemm(Relu): measured with ORT 1.32 on the zoo MLPs.
DISABLED_OPTIMIZERS = ("MatMulAddFusion",)
MIN_FUSED_BLOCK = 16


def session_config_for_exact_parity() -> dict[str, str]:
    """Session config entries under which ORT's fused N-bit MatMul computes in fp32."""
    return dict(EXACT_PARITY_CONFIG)


def _pack_nibbles(values: np.ndarray) -> bytes:
    """Pack 4-bit values (two's complement or unsigned) two per byte, low nibble first."""
    flat = (values.astype(np.int16).ravel() & 0x0F).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).tobytes()


def _int_initializer(name: str, values: np.ndarray, bits: int, signed: bool):
    """An INT4/UINT4 (bits ≤ 4) or INT8/UINT8 initializer holding ``values``."""
    from onnx import TensorProto, helper, numpy_helper

    if bits <= 4:
        dtype = TensorProto.INT4 if signed else TensorProto.UINT4
        return helper.make_tensor(name, dtype, list(values.shape), _pack_nibbles(values), raw=True)
    return numpy_helper.from_array(values.astype(np.int8 if signed else np.uint8), name)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class _Rewriter:
    def __init__(self, model: onnx.ModelProto, base_dir: Path | None = None):
        import onnx

        # Where external tensors live: the graph is copied, never the weights outside it.
        self.base_dir = "" if base_dir is None else str(base_dir)

        self.model = onnx.ModelProto()
        self.model.CopyFrom(model)
        self.graph = self.model.graph
        self.nodes: list = []  # the node list, edited as Python objects and written back by finish()
        for n in self.graph.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(n)
            self.nodes.append(copy)
        self.inits = {init.name: init for init in self.graph.initializer}
        self.taken = (
            {init.name for init in self.graph.initializer}
            | {o for n in self.graph.node for o in list(n.input) + list(n.output)}
            | {v.name for v in self.graph.input}
        )
        self.needs_opset21 = False
        self._by_value: dict | None = None  # (shape, sha256) -> initializer names, built on demand

    def locate(self, pname: str, qt: QuantizedTensor, alias: str | None = None) -> tuple[str, bool]:
        """The initializer holding parameter ``pname``, and whether it holds it transposed
        (see ``locate_by_value``; a row-permuted match is not returned here)."""
        name, layout, _ = locate_by_value(self, pname, qt, alias, allow_rows=False)
        return name, layout == "transposed"

    def values(self, init) -> np.ndarray:
        """An initializer's values, read from its external data file when it has one."""
        from onnx import numpy_helper

        return numpy_helper.to_array(init, self.base_dir)

    def _digest(self, init) -> tuple:
        values = np.ascontiguousarray(self.values(init), np.float32)
        return tuple(values.shape), hashlib.sha256(values.tobytes()).hexdigest()

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name

    def split_leading(self, name: str) -> list[str]:
        """Replace initializer ``name`` (shape ``[D, ...]``) by ``D`` initializers of shape
        ``[1, ...]`` joined by a ``Concat`` on axis 0 at the graph's start, and return their
        names: each slice can then be replaced on its own (a bidirectional GRU/LSTM holds
        both directions' weights in one ``W``/``R``, one parameter each)."""
        from onnx import helper, numpy_helper

        values = self.values(self.inits[name])
        self.remove_initializer(name)
        parts = []
        for d in range(values.shape[0]):
            part = self.fresh(f"{name}_dir{d}")
            self.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(values[d : d + 1]), part))
            self.inits[part] = self.graph.initializer[-1]
            parts.append(part)
        self.nodes.insert(0, helper.make_node("Concat", parts, [name], axis=0, name=self.fresh(f"{name}_Concat")))
        self._by_value = None
        return parts

    def consumers(self, name: str) -> list:
        return [n for n in self.nodes if name in n.input]

    def finish(self) -> None:
        del self.graph.node[:]
        self.graph.node.extend(self.nodes)

    def remove_initializer(self, name: str) -> None:
        init = self.inits.pop(name)
        self.graph.initializer.remove(init)
        for vi in list(self.graph.value_info):
            if vi.name == name:
                self.graph.value_info.remove(vi)

    # --- uniform -------------------------------------------------------------------------

    def dequantize_linear_matmul(self, pname: str, qt: UniformTensor) -> tuple[str, onnx.NodeProto]:
        """DequantizeLinear producing W^T (in, out) in the layout ORT fuses; returns its output name."""
        from onnx import helper, numpy_helper

        rows, cols = qt.rows_cols
        codes = qt.codes.reshape(rows, cols).numpy().astype(np.int16).T  # (K, N)
        scale = qt.scale.float().numpy()
        zp = None if qt.zero_point is None else qt.zero_point.numpy().astype(np.int16)
        if scale.shape[0] == 1 and rows > 1:  # per tensor: one scale per channel, same value
            scale = np.repeat(scale, rows, axis=0)
            zp = None if zp is None else np.repeat(zp, rows, axis=0)
        groups = scale.shape[1]
        signed = zp is None
        offset = 0 if signed else (8 if qt.bits <= 4 else 128)  # unsigned storage for zero points
        attrs: dict = {}
        if qt.bits <= 4 or groups > 1:
            block = cols // groups if groups > 1 else max(MIN_FUSED_BLOCK, _next_pow2(cols))
            if groups > 1 and (block < MIN_FUSED_BLOCK or block & (block - 1)):
                log.info("%s: group size %d is not a power of two >= 16; ORT will not fuse it", pname, block)
            scale_t = scale.T.copy()  # (groups, N)
            zp_t = None if zp is None else zp.T.copy()
            attrs = {"axis": 0, "block_size": block}
            self.needs_opset21 = True
        else:  # int8 per output channel
            scale_t = scale[:, 0].copy()  # (N,)
            zp_t = None if zp is None else zp[:, 0].copy()
            attrs = {"axis": 1}
        q_name = self.fresh(f"{pname}_quantized")
        s_name = self.fresh(f"{pname}_scale")
        new_inits = [
            _int_initializer(q_name, codes + offset, qt.bits, signed),
            numpy_helper.from_array(scale_t, s_name),
        ]
        inputs = [q_name, s_name]
        if zp_t is not None:
            z_name = self.fresh(f"{pname}_zero_point")
            new_inits.append(_int_initializer(z_name, zp_t + offset, qt.bits, signed))
            inputs.append(z_name)
        out = self.fresh(f"{pname}_transposed")
        self.graph.initializer.extend(new_inits)
        node = helper.make_node(
            "DequantizeLinear", inputs, [out], name=self.fresh(f"{pname}_DequantizeLinear"), **attrs
        )
        return out, node

    def dequantize_generic(self, pname: str, qt: UniformTensor, shape: list[int]) -> list:
        """Nodes producing the float weight under its own name from integer codes."""
        from onnx import numpy_helper

        rows, cols = qt.rows_cols
        codes = qt.codes.reshape(rows, cols).numpy().astype(np.int16)
        scale = qt.scale.float().numpy()
        zp = None if qt.zero_point is None else qt.zero_point.numpy().astype(np.int16)
        signed = zp is None
        offset = 0 if signed else (8 if qt.bits <= 4 else 128)
        if scale.shape == (1, 1):
            scale_v, zp_v, attrs = scale.reshape(()), None if zp is None else zp.reshape(()), {}
        elif scale.shape[1] == 1:
            if scale.shape[0] == 1:
                scale = np.repeat(scale, rows, axis=0)
            scale_v, zp_v, attrs = scale[:, 0].copy(), None if zp is None else zp[:, 0].copy(), {"axis": 0}
        else:
            scale_v, zp_v = scale, zp
            attrs = {"axis": 1, "block_size": cols // scale.shape[1]}
            self.needs_opset21 = True
        if qt.bits <= 4:
            self.needs_opset21 = True
        q_name, s_name = self.fresh(f"{pname}_quantized"), self.fresh(f"{pname}_scale")
        self.graph.initializer.extend(
            [
                _int_initializer(q_name, codes + offset, qt.bits, signed),
                numpy_helper.from_array(np.asarray(scale_v, np.float32), s_name),
            ]
        )
        inputs = [q_name, s_name]
        if zp_v is not None:
            z_name = self.fresh(f"{pname}_zero_point")
            self.graph.initializer.append(_int_initializer(z_name, np.asarray(zp_v) + offset, qt.bits, signed))
            inputs.append(z_name)
        return self._reshaped(pname, "DequantizeLinear", inputs, attrs, shape, rows, cols)

    def _reshaped(
        self, pname: str, op: str, inputs: list[str], attrs: dict, shape: list[int], rows: int, cols: int
    ) -> list:
        from onnx import helper, numpy_helper

        if list(shape) == [rows, cols]:
            return [helper.make_node(op, inputs, [pname], name=self.fresh(f"{pname}_{op}"), **attrs)]
        flat = self.fresh(f"{pname}_2d")
        shape_name = self.fresh(f"{pname}_shape")
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(shape, np.int64), shape_name))
        return [
            helper.make_node(op, inputs, [flat], name=self.fresh(f"{pname}_{op}"), **attrs),
            helper.make_node("Reshape", [flat, shape_name], [pname], name=self.fresh(f"{pname}_Reshape")),
        ]

    # --- codebooks -----------------------------------------------------------------------

    def codebook_nodes(self, pname: str, qt: CodebookTensor, shape: list[int]) -> list:
        from onnx import TensorProto, helper, numpy_helper

        rows, cols = qt.rows_cols
        idx = qt.codes.reshape(rows, cols).numpy()
        idx_name = self.fresh(f"{pname}_indices")
        if qt.bits <= 4:
            self.needs_opset21 = True
        self.graph.initializer.append(_int_initializer(idx_name, idx, qt.bits, signed=False))
        idx32 = self.fresh(f"{pname}_indices_int32")
        nodes = [helper.make_node("Cast", [idx_name], [idx32], to=TensorProto.INT32, name=self.fresh(f"{pname}_Cast"))]
        codebook = qt.codebook.float().numpy()
        if codebook.shape[0] == 1:
            cb_name = self.fresh(f"{pname}_codebook")
            self.graph.initializer.append(numpy_helper.from_array(codebook[0].copy(), cb_name))
            return nodes + self._reshaped(pname, "Gather", [cb_name, idx32], {"axis": 0}, shape, rows, cols)
        cb_name = self.fresh(f"{pname}_codebooks")
        row_name = self.fresh(f"{pname}_codebook_of_row")
        row_dtype = np.uint8 if codebook.shape[0] <= 256 else np.int32
        self.graph.initializer.extend(
            [
                numpy_helper.from_array(codebook, cb_name),
                numpy_helper.from_array(qt.row_codebooks().numpy().astype(row_dtype), row_name),
            ]
        )
        row32 = self.fresh(f"{pname}_codebook_of_row_int32")
        table = self.fresh(f"{pname}_row_tables")
        nodes += [
            helper.make_node("Cast", [row_name], [row32], to=TensorProto.INT32, name=self.fresh(f"{pname}_CastRows")),
            helper.make_node("Gather", [cb_name, row32], [table], axis=0, name=self.fresh(f"{pname}_GatherTables")),
        ]
        return nodes + self._reshaped(pname, "GatherElements", [table, idx32], {"axis": 1}, shape, rows, cols)


# --- finding a parameter's initializer by value (issue 12) ----------------------------------
#
# Exporters rename, transpose, reorder and fold weights: a Linear on sequences becomes MatMul
# over Wᵀ, GRU/LSTM weights move to ONNX's gate order under a direction axis, and an
# optimizer may fold a BatchNorm into a convolution's initializer. A name is therefore only
# a hint: an initializer is used only when it holds exactly the dequantized values (as they
# are, transposed, or the same rows reordered). Anything else is refused, never guessed.


def _row_keys(m: np.ndarray) -> list[bytes]:
    return [r.tobytes() for r in np.ascontiguousarray(m, np.float32)]


def row_permutation(target: np.ndarray, source: np.ndarray) -> np.ndarray | None:
    """``perm`` with ``source[perm] == target`` row for row (bit-exact), or None."""
    if target.shape != source.shape:
        return None
    where: dict[bytes, list[int]] = {}
    for i, key in enumerate(_row_keys(source)):
        where.setdefault(key, []).append(i)
    perm = np.empty(len(target), dtype=np.int64)
    for i, key in enumerate(_row_keys(target)):
        idx = where.get(key)
        if not idx:
            return None
        perm[i] = idx.pop()
    return perm


def locate_by_value(
    rw: _Rewriter, pname: str, qt: QuantizedTensor, alias: str | None = None, *, allow_rows: bool = True
) -> tuple[str, str, np.ndarray | None]:
    """The initializer holding exactly ``qt.dequantize()``: ``(name, layout, perm)``.

    ``layout`` is ``same``, ``transposed`` (``Wᵀ`` of a 2-D weight) or ``rows`` (the same rows
    in the order ``perm``, any leading axes of size 1 flattened: ONNX GRU/LSTM ``W``/``R``; of
    a bidirectional layer, one direction's slice, which is split off its initializer first).
    Among equal candidates the name hints (``alias``, ``pname``) win.

    Raises:
        ValueError: no initializer holds these values; the message says what was found
            under the parameter's name, if anything.
    """
    from onnx import TensorProto

    if rw._by_value is None:
        rw._by_value = {}
        for name, init in rw.inits.items():
            if init.data_type == TensorProto.FLOAT and len(init.dims) >= 2:
                rw._by_value.setdefault(rw._digest(init), []).append(name)
    hints = [n for n in (alias, pname) if n]
    w = qt.dequantize().float().numpy()
    w2d = w.reshape(w.shape[0], -1)
    candidates = [(w, "same")] + ([(w2d.T, "transposed")] if w.ndim == 2 else [])
    for values, layout in candidates:
        key = (tuple(values.shape), hashlib.sha256(np.ascontiguousarray(values, np.float32).tobytes()).hexdigest())
        names = [n for n in rw._by_value.get(key, []) if n in rw.inits]
        if names:
            names.sort(key=lambda n: n not in hints)
            return names[0], layout, None
    if allow_rows:
        rows, cols = w2d.shape
        for name, init in rw.inits.items():
            dims = list(init.dims)
            if (
                init.data_type != TensorProto.FLOAT
                or len(dims) < 2
                or dims[-1] != cols
                or int(np.prod(dims)) != rows * cols
                or any(d != 1 for d in dims[:-2])
            ):
                continue
            perm = row_permutation(rw.values(init).reshape(rows, cols), w2d)
            if perm is not None:
                return name, "rows", perm
        # One direction of a bidirectional recurrent layer: a slice ``[d]`` of ``[D, rows, cols]``.
        for name, init in list(rw.inits.items()):
            dims = list(init.dims)
            if (
                init.data_type != TensorProto.FLOAT
                or len(dims) < 3
                or dims[0] < 2
                or dims[-1] != cols
                or int(np.prod(dims[1:])) != rows * cols
                or any(d != 1 for d in dims[1:-2])
            ):
                continue
            stacked = rw.values(init).reshape(dims[0], rows, cols)
            for d in range(dims[0]):
                perm = row_permutation(stacked[d], w2d)
                if perm is not None:
                    return rw.split_leading(name)[d], "rows", perm
    named = next((n for n in hints if n in rw.inits), None)
    why = (
        f"; initializer {named!r} has that name but other values (the exporter changed the weight, "
        "e.g. folded a BatchNorm or another op into it)"
        if named
        else ""
    )
    shown = ", ".join(sorted(rw.inits)[:20]) + (", ..." if len(rw.inits) > 20 else "")
    raise ValueError(
        f"quantized parameter {pname!r}: no ONNX initializer holds exactly its dequantized values "
        f"(as they are, transposed, or with rows reordered){why}; refusing to guess (initializers: {shown})"
    )


def permute_rows(qt: QuantizedTensor, perm: np.ndarray) -> QuantizedTensor:
    """``qt`` with its output rows (and their scales / codebook assignment) in the order ``perm``."""
    import torch

    rows, cols = qt.rows_cols
    idx = torch.as_tensor(perm, dtype=torch.long)
    codes = qt.codes.reshape(rows, cols)[idx].contiguous()
    if isinstance(qt, CodebookTensor):
        which = qt.codebook_of_row[idx] if qt.codebook_of_row is not None else None
        return dataclasses.replace(qt, codes=codes, codebook_of_row=which)
    scale = qt.scale[idx] if qt.scale.shape[0] > 1 else qt.scale
    zp = None if qt.zero_point is None else (qt.zero_point[idx] if qt.zero_point.shape[0] > 1 else qt.zero_point)
    return dataclasses.replace(qt, codes=codes, scale=scale, zero_point=zp)


def _is_plain_linear_gemm(node, pname: str) -> bool:
    from onnx import helper

    if node.op_type != "Gemm" or len(node.input) < 2 or node.input[1] != pname or node.input[0] == pname:
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return (
        attrs.get("transB", 0) == 1
        and attrs.get("transA", 0) == 0
        and attrs.get("alpha", 1.0) == 1.0
        and attrs.get("beta", 1.0) == 1.0
        and (len(node.input) < 3 or node.input[2] != pname)
    )


def _is_matmul_by(node, name: str) -> bool:
    return node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] == name and node.input[0] != name


def quantize_onnx_model(
    model: onnx.ModelProto,
    quant: dict[str, QuantizedTensor],
    names: dict[str, str] | None = None,
    activations: dict | None = None,
    base_dir: Path | None = None,
    weight_only: str = "folded",
) -> onnx.ModelProto:
    """Replace the float initializers of the parameters in ``quant`` by integer initializers and dequantizing ops.

    Args:
        model: a float export (``compress.export.onnx_export.export_onnx``); it is not modified.
        quant: ``state.quant``: parameter name → ``QuantizedTensor``.
        names: parameter name → initializer name where an export wrapper renamed them
            (``OnnxSignature.module`` adds its own prefix). A parameter whose initializer
            is found under neither name is found by value: a Linear applied to sequences
            is exported as ``MatMul`` over a folded transposed copy of its weight.
        activations: ``state.extras["activation_quantization"]`` (mode ``dynamic`` or
            ``static``): the listed layers get integer-kernel forms
            (``compress.export.fast_kernels``). Quantized embedding tables always become an
            integer Gather; weights without a fused kernel a load-time-folded Cast + Mul.
        weight_only: the form of weight-only (no activation quantization) uniform weights.
            ``folded`` (default): ``Cast + Mul`` that onnxruntime constant-folds into a float
            weight at load, so the model runs exactly at float speed (the file stays
            integer). ``matmul_nbits``: ``DequantizeLinear → MatMul`` for Linears, which
            onnxruntime fuses into ``MatMulNBits`` (4-/8-bit weights in memory too, but
            slower than float on CPUs without int8 dot-product instructions: measured in
            ``benchmarks/quantize.py --cnn-speed``), ``DequantizeLinear`` for other consumers.

    Returns:
        A new model (opset ≥ 21 when INT4/UINT4 or blockwise scales are used) that computes
        with exactly the dequantized weights, with no initializer listed as a graph input.

    Raises:
        ValueError: a quantized parameter has no initializer (by name or value), or the
            model's opset is too old for the integer types needed.
    """
    from onnx import helper

    from compress.export import fast_kernels as fk

    if weight_only not in ("folded", "matmul_nbits"):
        raise ValueError(f"weight_only must be 'folded' or 'matmul_nbits', got {weight_only!r}")
    nbits = weight_only == "matmul_nbits"
    rw = _Rewriter(model, base_dir)
    names = names or {}
    mode = (activations or {}).get("mode", "none")
    act_layers = (activations or {}).get("layers", {})
    static = fk.StaticQDQ(rw, activations) if mode == "static" else None
    for pname, qt in quant.items():
        init_name, layout, perm = locate_by_value(rw, pname, qt, names.get(pname))
        shape = list(rw.inits[init_name].dims)
        if layout == "rows":
            # A recurrent layer's W/R (ONNX gate order, a leading direction axis): the same
            # rows in another order. Dequantize the permuted codes straight into that layout.
            consumers = rw.consumers(init_name)
            rw.remove_initializer(init_name)
            # locate_by_value returns the "rows" layout only together with its permutation.
            assert perm is not None
            moved = permute_rows(qt, perm)
            if isinstance(moved, CodebookTensor):
                new_nodes = rw.codebook_nodes(init_name, moved, shape)
            elif nbits:
                new_nodes = rw.dequantize_generic(init_name, moved, shape)
            else:
                new_nodes = fk.folded_dequantize_nodes(rw, init_name, moved, shape)
            rw.nodes[0:0] = new_nodes
            continue
        transposed = layout == "transposed"
        want = [qt.shape[1], qt.shape[0]] if transposed else list(qt.shape)
        if shape != want:
            raise ValueError(
                f"initializer {init_name!r} has shape {shape} but the quantized codes of {pname!r} "
                f"have {list(qt.shape)}{' (transposed)' if transposed else ''}"
            )
        consumers = rw.consumers(init_name)
        rw.remove_initializer(init_name)
        fast = _fast_kernel_nodes(
            rw, fk, pname, init_name, qt, consumers, transposed, shape, mode if pname in act_layers else "none", static
        )
        if fast is not None:
            new_nodes = fast
        elif transposed:
            # The initializer holds Wᵀ (in, out): exactly the layout DequantizeLinear → MatMul wants.
            if (
                nbits
                and not isinstance(qt, CodebookTensor)
                and consumers
                and all(_is_matmul_by(n, init_name) for n in consumers)
            ):
                w_t, dq = rw.dequantize_linear_matmul(init_name, qt)
                new_nodes = [dq]
                for mm in consumers:
                    mm.input[1] = w_t
            else:
                plain = rw.fresh(f"{init_name}_untransposed")
                if isinstance(qt, CodebookTensor):
                    new_nodes = rw.codebook_nodes(plain, qt, list(qt.shape))
                elif nbits:
                    new_nodes = rw.dequantize_generic(plain, qt, list(qt.shape))
                else:
                    new_nodes = fk.folded_dequantize_nodes(rw, plain, qt, list(qt.shape))
                new_nodes.append(
                    helper.make_node(
                        "Transpose", [plain], [init_name], perm=[1, 0], name=rw.fresh(f"{init_name}_Transpose")
                    )
                )
        elif isinstance(qt, CodebookTensor):
            new_nodes = rw.codebook_nodes(init_name, qt, shape)
        elif nbits and consumers and all(_is_plain_linear_gemm(n, init_name) for n in consumers):
            w_t, dq = rw.dequantize_linear_matmul(init_name, qt)
            new_nodes = [dq]
            for gemm in consumers:
                idx = next(i for i, n in enumerate(rw.nodes) if n is gemm)
                out = gemm.output[0]
                has_bias = len(gemm.input) > 2 and gemm.input[2] != ""
                mm_out = rw.fresh(f"{out}_matmul") if has_bias else out
                repl = [
                    helper.make_node("MatMul", [gemm.input[0], w_t], [mm_out], name=rw.fresh(f"{init_name}_MatMul"))
                ]
                if has_bias:
                    repl.append(
                        helper.make_node("Add", [mm_out, gemm.input[2]], [out], name=rw.fresh(f"{init_name}_AddBias"))
                    )
                rw.nodes[idx : idx + 1] = repl
        else:
            new_nodes = fk.folded_dequantize_nodes(rw, init_name, qt, shape)
        rw.nodes[0:0] = new_nodes  # producers first: keeps the graph topologically sorted
    if static is not None:
        static.finish()
    if mode == "dynamic":
        tidied = fk.share_dynamic_quantization(rw)
        log.debug("dynamic integer kernels: %s", tidied)
    log.debug("compact float constants: %s", fk.compact_float_constants(rw))
    rw.finish()
    # Initializers listed as graph inputs block constant folding and fusion.
    init_names = {i.name for i in rw.graph.initializer}
    for vi in [v for v in rw.graph.input if v.name in init_names]:
        rw.graph.input.remove(vi)
    _require_opset(rw.model, 21 if rw.needs_opset21 else 13)
    return rw.model


def _fast_kernel_nodes(rw, fk, pname, init_name, qt, consumers, transposed, shape, mode, static) -> list | None:
    """The integer-kernel rewrite of one parameter (``compress.export.fast_kernels``), or None
    when none applies and the weight-only forms above are used."""
    if isinstance(qt, CodebookTensor) or not consumers:
        return None
    gathers = [n for n in consumers if n.op_type == "Gather" and n.input[0] == init_name]
    if gathers and not transposed and fk.per_column_ok(qt) and qt.zero_point is None:
        rest = [n for n in consumers if not any(n is g for g in gathers)]
        if not rest and qt.bits == 8 and fk.gather_block(qt.rows_cols[1]) is not None:
            return fk.gather_block_quantized_nodes(rw, init_name, qt, gathers)
        nodes = fk.gather_nodes(rw, init_name, qt, gathers)
        if rest:  # a table tied to an output projection: the same integer copy serves both
            nodes += fk.folded_dequantize_nodes(rw, init_name, qt, shape)
        return nodes
    if mode == "dynamic" and fk.per_column_ok(qt):
        fits = (
            all(_is_matmul_by(n, init_name) for n in consumers)
            if transposed
            else all(_is_plain_linear_gemm(n, init_name) for n in consumers)
        )
        if fits:
            return fk.dynamic_matmul(rw, init_name, qt, consumers, transposed)
    if mode == "static" and static.supports(qt, consumers, init_name, transposed):
        return static.add(pname, init_name, qt, consumers[0], transposed)
    if mode != "none":
        log.info("%s: no integer kernel for this layout (%s, %d-bit); weight-only", pname, qt.granularity, qt.bits)
    return None


def _require_opset(model: onnx.ModelProto, minimum: int) -> None:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            if op.version < minimum:
                raise ValueError(
                    f"the quantized weights need ONNX opset >= {minimum} (INT4 / blockwise DequantizeLinear); "
                    f"the model has opset {op.version}: export with opset={minimum} or higher"
                )
            break
    model.ir_version = max(model.ir_version, 10)  # INT4/UINT4 need IR version 10


# --- onnxruntime helpers ---------------------------------------------------------------------


def ort_session(
    path: Path | str,
    *,
    threads: int = 1,
    exact: bool = True,
    optimized_path: Path | str | None = None,
    config: dict[str, str] | None = None,
    disabled_optimizers: tuple[str, ...] = DISABLED_OPTIMIZERS,
):
    """A CPU session for a quantized model, set up so every quantized Linear fuses.

    Args:
        path: the ONNX file.
        threads: intra-op threads.
        exact: fp32 compute in the fused N-bit MatMul (parity with the dequantized PyTorch
            model); False keeps ORT's default, which quantizes activations to 8 bits.
        optimized_path: where ORT writes the graph it actually runs.
        config: further session config entries.
        disabled_optimizers: ORT graph transformers to switch off. The default disables
            ``MatMulAddFusion``: it turns ``MatMul + Add`` into ``Gemm`` before the
            DequantizeLinear→MatMul fusion runs, and a ``Gemm`` followed by ``Relu`` then
            becomes ``FusedGemm`` over a float weight (the bias Add is absorbed by
            ``MatMulNBits`` instead).
    """
    from compress.runtime import ort_session as float_session

    entries = dict(session_config_for_exact_parity() if exact else {})
    entries.update(config or {})
    optimized = None if optimized_path is None else Path(optimized_path)
    return float_session(Path(path), threads, optimized, entries, tuple(disabled_optimizers))


def optimized_op_types(
    path: Path | str, *, exact: bool = True, disabled_optimizers: tuple[str, ...] = DISABLED_OPTIMIZERS
) -> Counter:
    """Op types (with counts) of the graph onnxruntime runs after its optimizations.

    Used to assert fusion: a 4-/8-bit Linear shows up as ``MatMulNBits``.
    """
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        opt = Path(tmp) / "optimized.onnx"
        ort_session(path, exact=exact, optimized_path=opt, disabled_optimizers=disabled_optimizers)
        graph = onnx.load(str(opt), load_external_data=False).graph
        return Counter(n.op_type for n in graph.node)


def initializer_bytes(model: onnx.ModelProto) -> dict[str, int]:
    """Stored bytes of each initializer (packed INT4 counts half a byte per element)."""
    from onnx import TensorProto, helper

    out: dict[str, int] = {}
    for init in model.graph.initializer:
        if init.raw_data:
            out[init.name] = len(init.raw_data)
            continue
        n = int(np.prod(init.dims)) if init.dims else 1
        if init.data_type in (TensorProto.INT4, TensorProto.UINT4):
            out[init.name] = (n + 1) // 2
        else:
            out[init.name] = n * np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
    return out
