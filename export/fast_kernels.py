"""Integer-kernel forms of quantized weights: the graphs onnxruntime's CPU runs fastest.

``compress.export.quantized`` writes a quantized weight as ``DequantizeLinear`` next to its
float consumer. That is exact, but on a CPU without int8 dot-product instructions
onnxruntime's fused N-bit MatMul is slower than float, and a Conv keeps a DequantizeLinear
that runs on every inference. This module writes the alternatives (measured with ORT 1.32 on
an AVX2 CPU, 6 MiniLM-sized MatMuls 384×1536, 1 thread; ms at batch 1 × 16 tokens / 32 × 48):

======================================================  ===========  ============
graph                                                   b1           b32
======================================================  ===========  ============
float MatMul                                            1.50         164
DequantizeLinear(int8) → MatMul  (→ MatMulNBits)        1.96         297
DequantizeLinear(int4, block 32) → MatMulNBits level 4  1.96         408
com.microsoft DynamicQuantizeMatMul (int8 weight)       0.92         102
DynamicQuantizeMatMul over Cast(INT4 → INT8)            0.85          71
======================================================  ===========  ============

On CPUs without VNNI the uint8 × int8 kernel adds two adjacent input channels' products in
int16, which saturates for large codes of one sign. 8-bit codes whose pairs stay within
``compress.grid.U8S8_PAIR_LIMIT`` (what GPFQ and RTN write under dynamic activations) go in
as int8, the fast kernel; other 8-bit codes as uint8 with zero point 128 (exact, slower; see
``dynamic_matmul``).

* **dynamic** activations (``dynamic_matmul``): a Linear becomes one com.microsoft
  ``DynamicQuantizeMatMul`` (activations quantized to uint8 per tensor at run time, integer
  GEMM, per-column weight scales, bias folded in). 4-bit codes are stored as ``INT4`` and
  ``Cast`` to ``INT8``: onnxruntime constant-folds the Cast at load, so the file holds 4 bits
  per weight and the kernel runs on int8. (``DynamicQuantizeLinear + MatMulInteger + Mul``
  is fused by ORT into the same op.)
* **static** activations (``StaticQDQ``): QuantizeLinear/DequantizeLinear pairs on the
  layer's input (and on a Conv's output, a ReLU folded into its zero point), int8 weights and
  int32 bias behind DequantizeLinear: ORT's QDQ fusion runs QLinearConv / QGemm /
  MatMulIntegerToFloat. Residual ``Add``s of two quantized tensors get a pair on their
  output (``QLinearAdd``) and MaxPool / Reshape / Transpose keep their input's grid (run on
  uint8), so no float op is left between the integer kernels of a ResNet.
* **embeddings** (``gather_block_quantized_nodes``, ``gather_nodes``): an 8-bit table read
  only by lookups is one com.microsoft ``GatherBlockQuantized`` per lookup (rows gathered and
  dequantized in one node); a 4-bit table, or one tied to an output layer (one integer copy
  serves both uses), an integer ``Gather`` scaled by the gathered per-row scale. Either way
  only the rows a sequence uses are dequantized.
* **weight-only** weights (``folded_dequantize_nodes``, the default for every consumer):
  ``Cast + Mul`` instead of DequantizeLinear, which ORT constant-folds into a float weight at
  load, so the model runs at float speed (never slower) with the integer file. The fused
  N-bit MatMul rows of the table above are slower than float on this CPU.

* **compact constants** (``compact_float_constants``): float scales that are float16 values
  (``compress.grid.float16_ceil``) are stored as float16, and a large table's row steps on
  256 log-spaced levels as an 8-bit index; both decode through constant nodes onnxruntime
  folds at load (all-MiniLM-L6-v2 int8: 22.97 → 22.82 MB, the same graph at run time).

The weights are always our codes: nothing here re-rounds them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from compress.fake_quant import int32_bias_step, uint8_qparams
from compress.grid import kernel_pairs_fit
from compress.qtensor import QuantizedTensor, UniformTensor, per_column_ok

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
# Ops that only move values (and MaxPool): onnxruntime runs them on uint8 between a
# DequantizeLinear and a QuantizeLinear of the same grid. Rounding commutes with them, so
# the PyTorch simulation rounds once, where a layer reads the tensor
# (``compress.fake_quant.PASS_THROUGH_FUNCS``).
PASS_THROUGH = frozenset({"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity"})


def need_ms_domain(model: onnx.ModelProto) -> None:
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        from onnx import helper

        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def _uint8_weight(rw, base: str, codes: np.ndarray) -> str:
    """``codes + 128`` as a uint8 initializer (its zero point is 128): the exact uint8 × uint8
    kernel, for codes over the uint8 × int8 kernel's pair bound."""
    from compress.export.quantized import _int_initializer

    name = rw.fresh(f"{base}_quantized")
    rw.graph.initializer.append(_int_initializer(name, codes.astype(np.int16) + 128, 8, False))
    return name


def _int8_weight(rw, base: str, codes: np.ndarray, bits: int) -> tuple[str, list]:
    """An int8 weight tensor name (and the nodes making it): INT4 + Cast for ≤ 4 bits."""
    from onnx import TensorProto, helper

    from compress.export.quantized import _int_initializer

    q_name = rw.fresh(f"{base}_quantized")
    if bits > 4:
        rw.graph.initializer.append(_int_initializer(q_name, codes, 8, True))
        return q_name, []
    rw.needs_opset21 = True
    rw.graph.initializer.append(_int_initializer(q_name, codes, 4, True))
    out = rw.fresh(f"{base}_int8")
    return out, [helper.make_node("Cast", [q_name], [out], to=TensorProto.INT8, name=rw.fresh(f"{base}_Cast"))]


def _column_side(qt: UniformTensor) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-output-channel scale (N,) and int8 zero point (N,) or None."""
    rows = qt.rows_cols[0]
    scale = qt.scale.float().numpy()[:, 0]
    zp = None if qt.zero_point is None else qt.zero_point.numpy().astype(np.int8)[:, 0]
    if scale.shape[0] == 1 and rows > 1:
        scale = np.repeat(scale, rows)
        zp = None if zp is None else np.repeat(zp, rows)
    return scale.astype(np.float32), zp


def dynamic_matmul(rw, init_name: str, qt: UniformTensor, consumers: list, transposed: bool) -> list:
    """Rewrite every consumer (``MatMul`` by Wᵀ, or ``Gemm(transB=1)`` by W) as a
    ``DynamicQuantizeMatMul`` over the codes; returns the nodes to put first (weight producers)."""
    from onnx import helper, numpy_helper

    rows, cols = qt.rows_cols
    codes = qt.codes.reshape(rows, cols).numpy().astype(np.int16).T.copy()  # (K, N)
    scale, zp = _column_side(qt)
    s_name = rw.fresh(f"{init_name}_scale")
    rw.graph.initializer.append(numpy_helper.from_array(scale, s_name))
    if not kernel_pairs_fit(qt.codes, qt.bits):
        # x86 CPUs without VNNI multiply uint8 activations by int8 weights with vpmaddubsw,
        # whose int16 sums of two adjacent input channels saturate (measured: errors of 0.4%
        # of the output range with codes at ±127; onnxruntime's quantize_dynamic has
        # `reduce_range` for this). Codes that respect compress.grid.U8S8_PAIR_LIMIT (GPFQ and
        # RTN bound them under dynamic activations; up to 7 bits always) are exact in int8,
        # the fast kernel; others are stored as uint8 with zero point 128: the u8u8 kernel
        # does not saturate, but runs about 1.5x slower.
        b_name = _uint8_weight(rw, init_name, codes)
        pre: list[onnx.NodeProto] = []
        zp_u8 = (np.zeros(rows, np.int16) if zp is None else zp.astype(np.int16)) + 128
        z_name = rw.fresh(f"{init_name}_zero_point")
        rw.graph.initializer.append(numpy_helper.from_array(zp_u8.astype(np.uint8), z_name))
        inputs = [b_name, s_name, z_name]
    else:
        b_name, pre = _int8_weight(rw, init_name, codes.astype(np.int8), qt.bits)
        inputs = [b_name, s_name]
        if zp is not None:
            z_name = rw.fresh(f"{init_name}_zero_point")
            rw.graph.initializer.append(numpy_helper.from_array(zp, z_name))
            inputs.append(z_name)
    need_ms_domain(rw.model)
    for node in consumers:
        idx = next(i for i, n in enumerate(rw.nodes) if n is node)
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else ""
        ins = [node.input[0], *inputs]
        if bias:
            ins += [""] * (4 - len(ins)) + [bias]
        rw.nodes[idx] = helper.make_node(
            "DynamicQuantizeMatMul", ins, [node.output[0]], domain=MS_DOMAIN, name=rw.fresh(f"{init_name}_DQMatMul")
        )
    return pre


def gather_block(cols: int) -> int | None:
    """The block size ``GatherBlockQuantized`` reads a row of ``cols`` values in (the largest
    power of two from 16 that divides it, the op's constraint), or None."""
    block = 1 << (cols.bit_length() - 1)
    while block >= 16 and cols % block:
        block >>= 1
    return block if block >= 16 else None


def gather_block_quantized_nodes(rw, init_name: str, qt: UniformTensor, consumers: list) -> list:
    """com.microsoft ``GatherBlockQuantized`` over an 8-bit per-row table: one node per lookup
    gathers the rows and dequantizes them, where the plain form (``gather_nodes``) runs four
    (Gather codes, Cast, Gather scales, Mul): on all-MiniLM-L6-v2, 9 nodes fewer in the
    optimized graph; onnxruntime profiles at batch 1 (1 thread, separate runs on a loaded
    machine) gave about 200 µs per run for the four-node form of the three tables, 33 µs for
    three GatherBlockQuantized, 71 µs for onnxruntime's own Gather + DequantizeLinear.

    8-bit uint8 data (``bits=8``) runs on onnxruntime 1.23 or later (microsoft/onnxruntime
    PR 25214), hence the project's ``onnxruntime>=1.23``. The op stores 8-bit codes as uint8
    with an implicit zero point of 128 (the same bytes as int8) and takes one scale per block
    of a row: the per-row scale is repeated with a
    ``Tile`` of constants, which onnxruntime folds at load, so the file keeps one per row.
    """
    from onnx import helper, numpy_helper

    from compress.export.quantized import _int_initializer

    rows, cols = qt.rows_cols
    block = gather_block(cols)
    if qt.bits != 8 or block is None or qt.zero_point is not None:
        raise ValueError(f"{init_name}: GatherBlockQuantized takes symmetric 8-bit rows of 16·2^k values")
    codes = qt.codes.reshape(rows, cols).numpy().astype(np.int16) + 128
    table = rw.fresh(f"{init_name}_quantized")
    rw.graph.initializer.append(_int_initializer(table, codes, 8, False))
    scale, _ = _column_side(qt)
    s_name, reps, blocks = (rw.fresh(f"{init_name}_{s}") for s in ("row_scale", "block_repeats", "block_scale"))
    rw.graph.initializer.extend(
        [
            numpy_helper.from_array(scale.reshape(rows, 1), s_name),
            numpy_helper.from_array(np.asarray([1, cols // block], np.int64), reps),
        ]
    )
    pre = [helper.make_node("Tile", [s_name, reps], [blocks], name=rw.fresh(f"{init_name}_TileScales"))]
    need_ms_domain(rw.model)
    for node in consumers:
        idx = next(i for i, n in enumerate(rw.nodes) if n is node)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("axis", 0) != 0:
            raise ValueError(f"{init_name}: Gather over axis {attrs['axis']} of a quantized table is not supported")
        rw.nodes[idx] = helper.make_node(
            "GatherBlockQuantized",
            [table, node.input[1], blocks],
            [node.output[0]],
            domain=MS_DOMAIN,
            bits=8,
            block_size=block,
            gather_axis=0,
            quantize_axis=1,
            name=rw.fresh(f"{init_name}_GatherBlockQuantized"),
        )
    return pre


def gather_nodes(rw, init_name: str, qt: UniformTensor, consumers: list) -> list:
    """Integer ``Gather`` of a per-row quantized table, times the gathered row scales."""
    from onnx import TensorProto, helper, numpy_helper

    rows, cols = qt.rows_cols
    codes = qt.codes.reshape(rows, cols).numpy().astype(np.int8)
    table, pre = _int8_weight(rw, init_name, codes, qt.bits)
    scale, zp = _column_side(qt)
    if zp is not None:
        raise ValueError(f"{init_name}: quantized embedding tables must be symmetric (no zero point)")
    s_name = rw.fresh(f"{init_name}_row_scale")
    rw.graph.initializer.append(numpy_helper.from_array(scale.reshape(rows, 1), s_name))
    for node in consumers:
        idx = next(i for i, n in enumerate(rw.nodes) if n is node)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("axis", 0) != 0:
            raise ValueError(f"{init_name}: Gather over axis {attrs['axis']} of a quantized table is not supported")
        ids, out = node.input[1], node.output[0]
        g_codes, g_float, g_scale = (rw.fresh(f"{out}_{s}") for s in ("codes", "float", "scale"))
        rw.nodes[idx : idx + 1] = [
            helper.make_node("Gather", [table, ids], [g_codes], name=rw.fresh(f"{init_name}_GatherCodes")),
            helper.make_node(
                "Cast", [g_codes], [g_float], to=TensorProto.FLOAT, name=rw.fresh(f"{init_name}_CastRows")
            ),
            helper.make_node("Gather", [s_name, ids], [g_scale], name=rw.fresh(f"{init_name}_GatherScales")),
            helper.make_node("Mul", [g_float, g_scale], [out], name=rw.fresh(f"{init_name}_ScaleRows")),
        ]
    return pre


def folded_dequantize_nodes(rw, out_name: str, qt: UniformTensor, shape: list[int]) -> list:
    """``(Cast(codes) − zero_point) · scale`` producing the float weight ``out_name``: ORT
    constant-folds it into a float initializer at load (float speed, integer file)."""
    from onnx import TensorProto, helper, numpy_helper

    from compress.export.quantized import _int_initializer

    rows, cols = qt.rows_cols
    groups = qt.scale.shape[1]
    codes = qt.codes.reshape(rows, groups, cols // groups).numpy().astype(np.int8)
    q_name = rw.fresh(f"{out_name}_quantized")
    if qt.bits <= 4:
        rw.needs_opset21 = True
    rw.graph.initializer.append(_int_initializer(q_name, codes, qt.bits, True))
    scale = qt.scale.float().numpy().reshape(qt.scale.shape[0], groups, 1)
    s_name = rw.fresh(f"{out_name}_scale")
    rw.graph.initializer.append(numpy_helper.from_array(scale.astype(np.float32), s_name))
    f_name = rw.fresh(f"{out_name}_codes_float")
    nodes = [helper.make_node("Cast", [q_name], [f_name], to=TensorProto.FLOAT, name=rw.fresh(f"{out_name}_Cast"))]
    if qt.zero_point is not None:
        z_name = rw.fresh(f"{out_name}_zero_point")
        zp = qt.zero_point.float().numpy().reshape(qt.zero_point.shape[0], groups, 1)
        rw.graph.initializer.append(numpy_helper.from_array(zp.astype(np.float32), z_name))
        centred = rw.fresh(f"{out_name}_centred")
        nodes.append(helper.make_node("Sub", [f_name, z_name], [centred], name=rw.fresh(f"{out_name}_Sub")))
        f_name = centred
    # The product is (rows, groups, cols / groups): always reshaped to the weight's own shape.
    product = rw.fresh(f"{out_name}_grouped")
    shape_name = rw.fresh(f"{out_name}_shape")
    rw.graph.initializer.append(numpy_helper.from_array(np.asarray(shape, np.int64), shape_name))
    return [
        *nodes,
        helper.make_node("Mul", [f_name, s_name], [product], name=rw.fresh(f"{out_name}_Mul")),
        helper.make_node("Reshape", [product, shape_name], [out_name], name=rw.fresh(f"{out_name}_Reshape")),
    ]


# --- static activations (QDQ) ---------------------------------------------------------------


class StaticQDQ:
    """Collects the static-activation layers of one rewrite and inserts their QDQ pairs.

    Weights are rewritten as they are met (``add``); the activation Q/DQ pairs are placed in
    ``finish`` once every layer is known, so a tensor shared by several layers (or a Conv's
    output feeding the next Conv through a ReLU) gets one pair with one range.
    """

    def __init__(self, rw, spec: dict):
        self.rw, self.spec = rw, spec
        self.layers: list[tuple] = []  # (node, pname, weight_scale (N,))

    def supports(self, qt: QuantizedTensor, consumers: list, init_name: str, transposed: bool) -> bool:
        from compress.export.quantized import _is_matmul_by, _is_plain_linear_gemm

        if not per_column_ok(qt) or qt.zero_point is not None or len(consumers) != 1:
            return False
        node = consumers[0]
        if transposed:
            return _is_matmul_by(node, init_name)
        return _is_plain_linear_gemm(node, init_name) or (node.op_type == "Conv" and node.input[1] == init_name)

    def add(self, pname: str, init_name: str, qt: UniformTensor, node, transposed: bool) -> list:
        """The weight producers for ``node``'s int8 weight (DequantizeLinear per output channel)."""
        from onnx import helper, numpy_helper

        rows, cols = qt.rows_cols
        codes = qt.codes.reshape(rows, cols).numpy().astype(np.int8)
        scale, _ = _column_side(qt)
        axis = 0
        if node.op_type == "Conv":
            codes = codes.reshape(qt.shape)
        elif transposed:
            codes, axis = codes.T.copy(), 1
        s_name = self.rw.fresh(f"{init_name}_scale")
        zp_name = self.rw.fresh(f"{init_name}_zero_point")
        if kernel_pairs_fit(qt.codes, qt.bits):
            w_int8, pre = _int8_weight(self.rw, init_name, codes, qt.bits)
            zero = np.zeros(rows, np.int8)
        else:
            # Codes over the pair bound (the quantize stage bounds its own; these came from
            # elsewhere): the uint8 x uint8 kernel, exact.
            w_int8, pre = _uint8_weight(self.rw, init_name, codes), []
            zero = np.full(rows, 128, np.uint8)
            log.info("static export: %s kept exact on the uint8 x uint8 kernel (codes over the pair bound)", pname)
        self.rw.graph.initializer.extend(
            [numpy_helper.from_array(scale, s_name), numpy_helper.from_array(zero, zp_name)]
        )
        w_out = self.rw.fresh(f"{init_name}_dequantized")
        pre.append(
            helper.make_node(
                "DequantizeLinear",
                [w_int8, s_name, zp_name],
                [w_out],
                axis=axis,
                name=self.rw.fresh(f"{init_name}_DequantizeLinear"),
            )
        )
        node.input[1] = w_out
        self.layers.append((node, pname, scale))
        return pre

    def _range(self, pname: str, key: str) -> list[float]:
        try:
            return self.spec["layers"][pname][key]
        except KeyError:
            raise ValueError(
                f"static activation quantization: no calibrated {key} range for {pname!r} "
                "(re-run the quantize stage with activations: static)"
            ) from None

    def finish(self) -> None:
        """Insert the activation QDQ pairs and the int32 biases.

        Every tensor gets at most one uint8 grid, and every reader reads its rounded copy
        (what ``compress.fake_quant.quantized_inputs`` simulates in PyTorch):

        * a quantized layer's input: the layer's calibrated input range;
        * a Conv's output, with a ReLU right after it folded into the zero point;
        * a residual ``Add`` of two rounded tensors, so onnxruntime runs ``QLinearAdd``;
        * the output of a pass-through op (``PASS_THROUGH``: MaxPool, Reshape, ...) of a
          rounded tensor, on the same grid, so onnxruntime runs it on uint8.

        A Conv or Add output takes the grid of the quantized layer that reads it, directly
        or through pass-through ops (rounding commutes with them); else a Conv its own
        calibrated output range, and an Add stays float.
        """
        from onnx import helper, numpy_helper

        rw = self.rw
        graph_outputs = {o.name for o in rw.graph.output}
        layer_in: dict[str, list[float]] = {}
        for node, pname, _ in self.layers:
            # The first layer reading a tensor sets its grid (the simulation rounds it once too).
            layer_in.setdefault(node.input[0], self._range(pname, "input"))
        wanted: dict[str, list[float]] = dict(layer_in)

        def readers(name: str) -> list[tuple]:
            return [(n, i) for n in rw.nodes for i, t in enumerate(n.input) if t == name]

        def downstream(name: str) -> list[float] | None:
            """The grid of the quantized layer reading ``name`` (through pass-through ops)."""
            if name in layer_in:
                return layer_in[name]
            users = readers(name)
            if not users or name in graph_outputs or any(n.op_type not in PASS_THROUGH or i for n, i in users):
                return None
            return next((r for r in (downstream(n.output[0]) for n, _ in users) if r is not None), None)

        def quantize_output(node, own: list[float] | None) -> None:
            y = node.output[0]
            users = readers(y)
            if len(users) == 1 and users[0][0].op_type == "Relu" and y not in graph_outputs:
                relu = users[0][0]
                r = relu.output[0]
                rng = downstream(r) or (own and [0.0, own[1]])
                if rng is None:
                    return
                # A zero point of 0 clamps at 0: the ReLU is folded into the output quantizer.
                wanted[r] = [0.0, max(rng[1], 0.0)]
                rw.nodes.remove(relu)
                node.output[0] = r
            elif y not in wanted:
                rng = downstream(y) or own
                if rng is not None:
                    wanted[y] = rng

        for node, pname, _ in self.layers:
            if node.op_type == "Conv":  # QGemm / MatMulIntegerToFloat give float outputs
                quantize_output(node, self._range(pname, "output"))
        quantized_adds = 0
        for node in list(rw.nodes):  # topological: an Add's inputs are settled before it
            ins = list(node.input)
            if node.op_type == "Add" and len(ins) == 2 and all(t in wanted and t not in rw.inits for t in ins):
                before = len(wanted)
                quantize_output(node, None)
                quantized_adds += len(wanted) > before
            elif node.op_type in PASS_THROUGH and ins and ins[0] in wanted and node.output[0] not in graph_outputs:
                wanted.setdefault(node.output[0], wanted[ins[0]])
        log.debug("static QDQ: %d tensors rounded, %d residual Adds quantized", len(wanted), quantized_adds)
        readers_of: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for n in rw.nodes:
            for i, name in enumerate(n.input):
                readers_of.setdefault(name, []).append((n, i))
        producers = {o: n for n in rw.nodes for o in n.output}
        in_scale: dict[int, float] = {}
        new_nodes = []
        for tensor, rng in wanted.items():
            scale, zp = uint8_qparams(*rng)
            base = tensor.replace("/", "_")
            s_name, z_name = rw.fresh(f"{base}_act_scale"), rw.fresh(f"{base}_act_zero_point")
            rw.graph.initializer.extend(
                [
                    numpy_helper.from_array(np.asarray(scale, np.float32), s_name),
                    numpy_helper.from_array(np.asarray(zp, np.uint8), z_name),
                ]
            )
            q = rw.fresh(f"{base}_quantized_act")
            if tensor in graph_outputs:  # keep the graph's output name: the pair ends in it
                prod = producers[tensor]
                src, dq = rw.fresh(f"{base}_raw"), tensor
                prod.output[list(prod.output).index(tensor)] = src
            else:
                src, dq = tensor, rw.fresh(f"{base}_dequantized_act")
                for n, i in readers_of.get(tensor, []):
                    n.input[i] = dq
            pair = [
                helper.make_node("QuantizeLinear", [src, s_name, z_name], [q], name=rw.fresh(f"{base}_Quantize")),
                helper.make_node("DequantizeLinear", [q, s_name, z_name], [dq], name=rw.fresh(f"{base}_Dequantize")),
            ]
            for layer, _, _ in self.layers:
                if layer.input[0] == dq:
                    in_scale[id(layer)] = scale
            new_nodes.append((src, pair))
        for node, _pname, w_scale in self.layers:
            self._int32_bias(node, in_scale.get(id(node)), w_scale)
        # Place each pair right after its producer (graph inputs: first) to stay topologically sorted.
        for src, pair in new_nodes:
            prod = next((i for i, n in enumerate(rw.nodes) if src in n.output), None)
            at = 0 if prod is None else prod + 1
            rw.nodes[at:at] = pair

    def _int32_bias(self, node, act_scale: float | None, w_scale: np.ndarray) -> None:
        """A float bias initializer as int32 codes on scale ``s_act · s_w`` (ORT's QDQ form)."""
        from onnx import helper, numpy_helper

        if act_scale is None or len(node.input) < 3 or not node.input[2] or node.input[2] not in self.rw.inits:
            return
        name = node.input[2]
        bias = self.rw.values(self.rw.inits[name]).astype(np.float64)
        scale = int32_bias_step(act_scale, w_scale)
        codes = np.clip(np.round(bias / np.maximum(scale, 1e-30)), -(2**31), 2**31 - 1).astype(np.int32)
        q_name, s_name = self.rw.fresh(f"{name}_int32"), self.rw.fresh(f"{name}_bias_scale")
        z_name = self.rw.fresh(f"{name}_bias_zero_point")
        self.rw.graph.initializer.extend(
            [
                numpy_helper.from_array(codes, q_name),
                numpy_helper.from_array(scale, s_name),
                numpy_helper.from_array(np.zeros(len(codes), np.int32), z_name),
            ]
        )
        if sum(name in n.input for n in self.rw.nodes) == 1:
            self.rw.remove_initializer(name)
        out = self.rw.fresh(f"{name}_dequantized")
        self.rw.nodes.insert(
            0,
            helper.make_node(
                "DequantizeLinear",
                [q_name, s_name, z_name],
                [out],
                axis=0,
                name=self.rw.fresh(f"{name}_DequantizeLinear"),
            ),
        )
        node.input[2] = out


def _init_digest(inits: dict, name: str) -> tuple | None:
    init = inits.get(name)
    if init is None:
        return None
    from onnx import numpy_helper

    values = np.ascontiguousarray(numpy_helper.to_array(init))
    return (str(values.dtype), values.shape, values.tobytes())


def _rename_uses(rw, old: str, new: str) -> None:
    for node in rw.nodes:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def share_dynamic_quantization(rw) -> dict[str, int]:
    """Tidy the ``DynamicQuantizeMatMul`` graph the way onnxruntime's own quantizer writes it.

    * Constant ``Mul`` nodes that scale one tensor by equal values (a smoothed q/k/v input,
      ``compress.smoothing``) become one.
    * A bias ``Add`` right after a ``DynamicQuantizeMatMul`` moves into its bias input.
    * Layers reading one activation (q/k/v) quantize it once: one ``DynamicQuantizeLinear``
      feeding a ``MatMulIntegerToFloat`` per layer, instead of three quantizations.

    Returns counts of what changed.
    """
    from onnx import helper

    outputs = {o.name for o in rw.graph.output}
    inits = {i.name: i for i in rw.graph.initializer}  # the rewrite's new ones too
    counts = {"muls_merged": 0, "biases_fused": 0, "shared_inputs": 0}
    # 1. equal constant Muls of one tensor
    first: dict[tuple, object] = {}
    for node in list(rw.nodes):
        if node.op_type != "Mul" or len(node.input) != 2 or node.output[0] in outputs:
            continue
        digest = _init_digest(inits, node.input[1])
        if digest is None or node.input[0] in inits:
            continue
        key = (node.input[0], digest)
        kept = first.setdefault(key, node)
        if kept is not node:
            rw.nodes.remove(node)
            _rename_uses(rw, node.output[0], kept.output[0])  # type: ignore[attr-defined]
            counts["muls_merged"] += 1
    # 2. bias Add into the DynamicQuantizeMatMul
    for node in list(rw.nodes):
        if node.op_type != "DynamicQuantizeMatMul" or (len(node.input) > 4 and node.input[4]):
            continue
        users = rw.consumers(node.output[0])
        if len(users) != 1 or node.output[0] in outputs or users[0].op_type != "Add":
            continue
        add = users[0]
        bias = add.input[1] if add.input[0] == node.output[0] else add.input[0]
        b_scale = inits.get(node.input[2])
        init = inits.get(bias)
        if init is None or b_scale is None or list(init.dims) != list(b_scale.dims) or init.data_type != 1:
            continue
        while len(node.input) < 4:
            node.input.append("")
        node.input.append(bias)
        node.output[0] = add.output[0]
        rw.nodes.remove(add)
        counts["biases_fused"] += 1
    # 3. one DynamicQuantizeLinear per activation read by several integer MatMuls
    by_input: dict[str, list] = {}
    for node in rw.nodes:
        if node.op_type == "DynamicQuantizeMatMul":
            by_input.setdefault(node.input[0], []).append(node)
    for act, group in by_input.items():
        if len(group) < 2:
            continue
        q, s, z = (rw.fresh(f"{act}_{suffix}") for suffix in ("quantized", "scale", "zero_point"))
        at = min(next(i for i, n in enumerate(rw.nodes) if n is g) for g in group)
        rw.nodes.insert(
            at, helper.make_node("DynamicQuantizeLinear", [act], [q, s, z], name=rw.fresh(f"{act}_DynamicQuantize"))
        )
        for node in group:
            b, b_scale = node.input[1], node.input[2]
            b_zp = node.input[3] if len(node.input) > 3 else ""
            bias = node.input[4] if len(node.input) > 4 else ""
            idx = next(i for i, n in enumerate(rw.nodes) if n is node)
            ins = [q, b, s, b_scale, z, b_zp] + ([bias] if bias else [])
            rw.nodes[idx] = helper.make_node(
                "MatMulIntegerToFloat", ins, list(node.output), domain=MS_DOMAIN, name=rw.fresh(f"{node.name}_shared")
            )
        counts["shared_inputs"] += 1
    return counts


# Initializers read by these keep their layout: onnxruntime's QDQ fusions look for
# initializer scales and zero points before constant folding has run.
_KEEP_FLOAT32_READERS = frozenset({"QuantizeLinear", "DequantizeLinear"})


def compact_float_constants(rw, min_elements: int = 64) -> dict[str, int]:
    """Store float32 initializers in fewer bytes wherever that is exact, decoded by nodes whose
    inputs are all constants, so onnxruntime folds them back into float32 initializers at load
    (the graph it runs is unchanged; only the file shrinks):

    * at most 256 distinct values (an embedding table's row scales on
      ``compress.grid.log_grid_ceil``'s grid): a uint8 index per element, ``Cast`` to int64 and
      ``Gather`` from a float32 table of the distinct values;
    * else every value a float16 (the scales of ``compress.grid.uniform_scale``, the smoothing
      factors): float16 and ``Cast`` to float32.

    Tensors under ``min_elements`` (a few bytes to save, a node each), graph inputs and outputs
    and the scales of QuantizeLinear / DequantizeLinear stay as they are. Returns counts.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = rw.graph
    io = {v.name for v in graph.input} | {o.name for o in graph.output}
    readers: dict[str, set[str]] = {}
    for node in rw.nodes:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    counts = {"lookup": 0, "float16": 0, "bytes_saved": 0}
    pre = []
    for init in list(graph.initializer):
        name = init.name
        if (
            init.data_type != TensorProto.FLOAT
            or name in io
            or name not in readers
            or readers[name] & _KEEP_FLOAT32_READERS
            or int(np.prod(init.dims, dtype=np.int64)) < min_elements
        ):
            continue
        values = rw.values(init)
        n = values.size
        # A strided sample rules most tensors out of the lookup form cheaply: np.unique with
        # its int64 inverse on a 65 M-value embedding table would take seconds and 1 GB.
        few = np.unique(values.reshape(-1)[:: max(1, n // 4096)]).size <= 256
        distinct, index = np.unique(values, return_inverse=True) if few else (None, None)
        half = values.astype(np.float16)
        exact16 = bool(np.array_equal(half.astype(np.float32), values, equal_nan=False))
        lookup_bytes = n + 4 * distinct.size if distinct is not None else 4 * n
        if (
            distinct is not None
            and index is not None
            and distinct.size <= 256
            and lookup_bytes < (2 * n if exact16 else 4 * n)
        ):
            idx_name, table_name, wide = (rw.fresh(f"{name}_{s}") for s in ("index", "levels", "index_int64"))
            graph.initializer.extend(
                [
                    numpy_helper.from_array(index.reshape(values.shape).astype(np.uint8), idx_name),
                    numpy_helper.from_array(distinct.astype(np.float32), table_name),
                ]
            )
            pre += [
                helper.make_node("Cast", [idx_name], [wide], to=TensorProto.INT64, name=rw.fresh(f"{name}_CastIndex")),
                helper.make_node("Gather", [table_name, wide], [name], name=rw.fresh(f"{name}_Lookup")),
            ]
            counts["lookup"] += 1
            saved = 4 * n - lookup_bytes
        elif exact16:
            h_name = rw.fresh(f"{name}_float16")
            graph.initializer.append(numpy_helper.from_array(half, h_name))
            pre.append(helper.make_node("Cast", [h_name], [name], to=TensorProto.FLOAT, name=rw.fresh(f"{name}_Cast")))
            counts["float16"] += 1
            saved = 2 * n
        else:
            continue
        graph.initializer.remove(init)
        rw.inits.pop(name, None)
        counts["bytes_saved"] += saved
    rw.nodes[0:0] = pre
    return counts
