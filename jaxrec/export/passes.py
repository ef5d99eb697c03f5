"""A small graph of ONNX nodes with constant weights, its simplification, and its ONNX proto.

`jaxpr_onnx` fills a `Graph`; `simplify` then does what an exported inference graph needs and
the traced model does not say directly:

- a per-channel `Mul`/`Div`/`Add`/`Sub` by a constant after a `Conv`/`Gemm` (the conv bias, a
  folded BatchNorm's affine map, dropout's eval factor), possibly behind `Reshape`s that only
  add or drop size-1 axes, merges into the `Conv`/`Gemm` weights and bias;
- consecutive `Reshape`s collapse, and reshapes to the same shape disappear;
- a 1x1 `Conv` on globally pooled [N, C, 1, 1] values that is then flattened becomes
  `Flatten` + `Gemm`.

Everything here is exact algebra on float32 numbers (float64 for the products).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

ONNX_OPSET = 17
_AFFINE = ("Mul", "Div", "Add", "Sub")


@dataclasses.dataclass
class Node:
    op: str
    inputs: list[str]
    output: str
    attrs: dict[str, Any]


def _is_dim(d: Any) -> bool:
    return isinstance(d, (int, np.integer))


def _nonunit(shape: tuple[Any, ...]) -> list[int]:
    return [i for i, d in enumerate(shape) if not (_is_dim(d) and d == 1)]


class Graph:
    """Nodes in topological order, float/int64 initializers, and each value's ONNX shape."""

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.inits: dict[str, np.ndarray] = {}
        self.shapes: dict[str, tuple[Any, ...]] = {}
        self.input: str | None = None
        self.output: str | None = None
        self._count = 0

    # ------------------------------------------------------------------ building
    def fresh(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"

    def add(self, node: Node, shape: tuple[Any, ...]) -> None:
        self.nodes.append(node)
        self.shapes[node.output] = tuple(shape)

    def initializer(self, value: np.ndarray, prefix: str = "c") -> str:
        name = self.fresh(prefix)
        self.inits[name] = value
        self.shapes[name] = value.shape
        return name

    def set_io(self, inp: str, in_shape, out: str, out_shape) -> None:
        self.input, self.output = inp, out
        self.shapes[inp] = tuple(in_shape)
        self.shapes[out] = tuple(out_shape)

    def producer(self, name: str) -> Node | None:
        return next((n for n in reversed(self.nodes) if n.output == name), None)

    def consumers(self, name: str) -> list[Node]:
        return [n for n in self.nodes if name in n.inputs]

    def sum_to_mean(self, name: str, divisor: float) -> bool:
        """If `name` is a ReduceSum (maybe behind a Reshape) used nowhere else and `divisor`
        is the number of summed elements, make it a ReduceMean; returns whether it did."""
        node = reshape = self.producer(name)
        if node is not None and node.op == "Reshape" and len(self.consumers(node.inputs[0])) == 1:
            node = self.producer(node.inputs[0])
        else:
            reshape = None
        if node is None or node.op != "ReduceSum" or self.consumers(name):
            return False
        axes = [int(a) for a in self.inits[node.inputs[1]]]
        x_shape = self.shapes[node.inputs[0]]
        dims = [x_shape[a] for a in axes]
        if not all(map(_is_dim, dims)) or not np.isclose(float(np.prod(dims)), divisor):
            return False
        kept = tuple(1 if i in axes else d for i, d in enumerate(x_shape))
        if reshape is not None and self.shapes[reshape.output] == kept:
            self._bypass(reshape, node.output)  # the mean keeps the reduced axes as size 1
            if len(x_shape) == 4 and axes == [2, 3]:  # ONNX's own op, NCHWc-friendly in ORT
                node.op, node.inputs, node.attrs = "GlobalAveragePool", node.inputs[:1], {}
                return True
            node.attrs = {**node.attrs, "keepdims": 1}
        node.op, node.inputs = "ReduceMean", node.inputs[:1]
        node.attrs = {**node.attrs, "axes": axes}
        return True

    # ------------------------------------------------------------------ simplification
    def simplify(self) -> None:
        while any(self._absorb_affine(n) for n in list(self.nodes) if n.op in ("Conv", "Gemm")):
            pass
        self._collapse_reshapes()
        for node in [n for n in self.nodes if n.op == "Conv"]:
            self._conv_to_gemm(node)
        used = {i for n in self.nodes for i in n.inputs}
        self.inits = {k: v for k, v in self.inits.items() if k in used}

    def _bypass(self, node: Node, replacement: str) -> None:
        """Remove `node`; the producer of `replacement` takes over its output name."""
        self.nodes.remove(node)
        self.producer(replacement).output = node.output

    def _follow_reshape(self, src: str, dst: str, axis: int) -> int | None:
        a, b = self.shapes[src], self.shapes[dst]
        na, nb = _nonunit(a), _nonunit(b)
        if [a[i] for i in na] != [b[i] for i in nb] or axis not in na:
            return None
        return nb[na.index(axis)]

    def _absorb_affine(self, node: Node) -> bool:
        """Merge the next per-channel affine op on `node`'s output into its weights."""
        if any(i not in self.inits for i in node.inputs[1:]):
            return False
        name, axis = node.output, 1
        width = self.shapes[name][1]
        while name != self.output:
            (nxt, *more) = self.consumers(name) or [None]
            if nxt is None or more:
                return False
            if nxt.op == "Reshape":
                axis = self._follow_reshape(name, nxt.output, axis)
                if axis is None:
                    return False
                name = nxt.output
                continue
            if nxt.op not in _AFFINE or nxt.inputs[0] != name or nxt.inputs[1] not in self.inits:
                return False  # (const * x and const + x are not produced by the converter)
            vec = self._per_channel(self.inits[nxt.inputs[1]], len(self.shapes[name]), axis, width)
            if vec is None:
                return False
            self._apply(node, nxt.op, vec)
            self._bypass(nxt, name)
            return True
        return False

    @staticmethod
    def _per_channel(k: np.ndarray, rank: int, axis: int, width: int) -> np.ndarray | None:
        k = k.reshape((1,) * (rank - k.ndim) + k.shape)
        if any(d != 1 for i, d in enumerate(k.shape) if i != axis):
            return None
        return np.broadcast_to(k.reshape(-1).astype(np.float64), (width,))

    def _apply(self, node: Node, op: str, vec: np.ndarray) -> None:
        w = self.inits[node.inputs[1]].astype(np.float64)
        out_axis = 0 if node.op == "Conv" else 1  # Conv W [M, C/g, kh, kw]; Gemm W [K, M]
        shape = [1] * w.ndim
        shape[out_axis] = -1
        if len(node.inputs) < 3:
            node.inputs.append(self.initializer(np.zeros(w.shape[out_axis], np.float32), "b"))
        b = self.inits[node.inputs[2]].astype(np.float64)
        if op == "Mul":
            w, b = w * vec.reshape(shape), b * vec
        elif op == "Div":
            w, b = w / vec.reshape(shape), b / vec
        else:
            b = b + vec if op == "Add" else b - vec
        self.inits[node.inputs[1]] = w.astype(np.float32)
        self.inits[node.inputs[2]] = b.astype(np.float32)

    def _conv_to_gemm(self, node: Node) -> None:
        """A 1x1 conv on [N, C, 1, 1] whose result is flattened to [N, M] -> Flatten + Gemm
        (the dense layer after global pooling; onnxruntime runs Gemm without layout changes)."""
        (nxt, *more) = self.consumers(node.output) or [None]
        x_shape = self.shapes[node.inputs[0]]
        if (
            nxt is None
            or more
            or nxt.op != "Reshape"
            or len(x_shape) != 4
            or tuple(x_shape[2:]) != (1, 1)
            or len(self.shapes[nxt.output]) != 2
            or node.attrs.get("group", 1) != 1
            or any(node.attrs.get("pads", [0]))
        ):
            return
        w = self.inits[node.inputs[1]]
        flat = self.fresh("flatten")
        flatten = Node("Flatten", node.inputs[:1], flat, {"axis": 1})
        self.nodes.insert(self.nodes.index(node), flatten)
        self.shapes[flat] = tuple(x_shape[:2])
        self.inits[node.inputs[1]] = np.ascontiguousarray(w.reshape(w.shape[:2]).T)
        node.op, node.inputs[0], node.attrs = "Gemm", flat, {}
        self._bypass(nxt, node.output)

    def _collapse_reshapes(self) -> None:
        for node in list(self.nodes):
            if node.op != "Reshape":
                continue
            prev = self.producer(node.inputs[0])
            if prev is not None and prev.op == "Reshape" and len(self.consumers(prev.output)) == 1:
                node.inputs[0] = prev.inputs[0]
                self.nodes.remove(prev)
            src = node.inputs[0]
            if self.shapes[src] != self.shapes[node.output]:
                continue
            if node.output != self.output:  # a no-op: its users read its input instead
                for user in self.consumers(node.output):
                    user.inputs = [src if i == node.output else i for i in user.inputs]
                self.nodes.remove(node)
            elif src != self.input and len(self.consumers(src)) == 1:
                self._bypass(node, src)

    # ------------------------------------------------------------------ output
    def param_count(self) -> int:
        """Numbers in the float initializers (weights and biases)."""
        return int(sum(v.size for v in self.inits.values() if v.dtype.kind == "f"))

    def op_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for n in self.nodes:
            out[n.op] = out.get(n.op, 0) + 1
        return out

    def to_onnx(self, input_name: str, output_name: str, opset: int = ONNX_OPSET):
        """The graph as an `onnx.ModelProto` (checked); symbolic dims are named "batch"."""
        import onnx  # noqa: PLC0415 - optional dependency (jaxrec[onnx])
        from onnx import TensorProto, helper, numpy_helper  # noqa: PLC0415 - as above

        rename = {self.input: input_name, self.output: output_name}

        def r(name: str) -> str:
            return rename.get(name, name)

        def value(name: str, shape):
            dims = [int(d) if _is_dim(d) else "batch" for d in shape]
            return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)

        nodes = [
            helper.make_node(n.op, [r(i) for i in n.inputs], [r(n.output)], r(n.output), **n.attrs)
            for n in self.nodes
        ]
        inits = [numpy_helper.from_array(np.ascontiguousarray(v), k) for k, v in self.inits.items()]
        graph = helper.make_graph(
            nodes,
            "jaxrec_rec_features",
            [value(input_name, self.shapes[self.input])],
            [value(output_name, self.shapes[self.output])],
            initializer=inits,
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="jaxrec.export"
        )
        model.ir_version = min(model.ir_version, 8)  # readable by older runtimes too
        onnx.checker.check_model(model)
        return model
