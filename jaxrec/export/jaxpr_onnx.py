"""Translate a traced JAX function (its jaxpr) into an ONNX graph.

The ONNX export is not a second description of the network: `jaxrec.export.artifacts.build_onnx`
traces the BN-folded Flax model with `jax.make_jaxpr` and this module maps the jaxpr's equations
to ONNX nodes, one by one:

- Equations whose inputs are all constants (the weights are closed over, so they are constants
  of the jaxpr) are evaluated here: kernel slicing and casts end up as initializers, not nodes.
- Calls (`jit`, `custom_jvp_call`, `custom_vjp_call`, `closed_call`, `remat`) are inlined.
- `lax.platform_dependent` is resolved for one target platform (`platform`, default "cuda"),
  so the depthwise convs of `jaxrec.ops.depthwise` become grouped ONNX `Conv`s.
- Layout: the jaxpr computes in NHWC; every value remembers how its ONNX tensor's axes map to
  the jaxpr's (`_Tensor.perm`), so convolutions run on NCHW tensors as ONNX wants, the graph
  takes NCHW input, and a `Transpose` appears only where two layouts really meet.

The graph is then simplified (`passes.simplify`): per-channel `Mul`/`Add` by constants after a
`Conv`/`Gemm` (biases, the folded BNNeck, dropout's eval factor) merge into its weights.
Only the primitives the model uses are supported; another raises ExportError naming it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.extend.core as jex_core
import numpy as np

from jaxrec.errors import ExportError
from jaxrec.export.passes import Graph, Node

_UNARY = {
    "logistic": "Sigmoid",
    "neg": "Neg",
    "exp": "Exp",
    "log": "Log",
    "tanh": "Tanh",
    "abs": "Abs",
    "sqrt": "Sqrt",
}
_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "max": "Max", "min": "Min"}
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "remat": "jaxpr"}
_CUSTOM = ("custom_jvp_call", "custom_vjp_call")
_INT64_MAX = np.iinfo(np.int64).max


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """A graph value: its jaxpr (logical) shape and `perm`, ONNX axis i = logical axis perm[i]."""

    name: str
    shape: tuple[Any, ...]
    perm: tuple[int, ...]

    @property
    def stored(self) -> tuple[Any, ...]:
        return tuple(self.shape[p] for p in self.perm)


@dataclasses.dataclass(frozen=True)
class _Const:
    """A constant: `value` broadcasts (numpy rules) to the logical `shape`."""

    value: np.ndarray
    shape: tuple[Any, ...]


def _static(d: Any) -> bool:
    return isinstance(d, (int, np.integer))


def _onnx_dims(shape: Sequence[Any]) -> np.ndarray:
    """A Reshape target: symbolic dims (at most one, the batch) become -1."""
    if sum(not _static(d) for d in shape) > 1:
        raise ExportError(f"cannot reshape to {shape}: more than one symbolic dimension")
    return np.array([int(d) if _static(d) else -1 for d in shape], np.int64)


def _nonunit(shape: Sequence[Any], order: Sequence[int]) -> list[int]:
    return [a for a in order if not (_static(shape[a]) and shape[a] == 1)]


class Converter:
    """Builds a `passes.Graph` from a closed jaxpr whose first input is the image batch."""

    def __init__(self, platform: str = "cuda") -> None:
        self.platform = platform
        self.graph = Graph()

    # ------------------------------------------------------------------ graph helpers
    def emit(self, op: str, inputs: list[str], shape, perm, **attrs) -> _Tensor:
        t = _Tensor(self.graph.fresh(op.lower()), tuple(shape), tuple(perm))
        self.graph.add(Node(op, inputs, t.name, attrs), t.stored)
        return t

    def const(self, value: np.ndarray, prefix: str = "c") -> str:
        return self.graph.initializer(np.asarray(value), prefix)

    def to_perm(self, t: _Tensor, perm: tuple[int, ...]) -> _Tensor:
        if t.perm == tuple(perm):
            return t
        order = [t.perm.index(p) for p in perm]
        return self.emit("Transpose", [t.name], t.shape, perm, perm=order)

    def operand(self, v: _Tensor | _Const, perm: tuple[int, ...], rank: int) -> str:
        """Input name of `v` for an elementwise op whose output has layout `perm`."""
        if isinstance(v, _Const):
            arr = np.asarray(v.value)
            if arr.ndim == 0:
                return self.const(arr)
            arr = arr.reshape((1,) * (rank - arr.ndim) + arr.shape)
            return self.const(np.ascontiguousarray(np.transpose(arr, perm)))
        return v.name if not v.shape else self.to_perm(v, perm).name

    # ------------------------------------------------------------------ traversal
    def run(self, closed: Any, inputs: list[_Tensor | _Const]) -> list[_Tensor | _Const]:
        jaxpr = closed.jaxpr
        env: dict[Any, Any] = {}
        for var, val in zip(jaxpr.constvars, closed.consts, strict=True):
            env[var] = _Const(np.asarray(val), tuple(var.aval.shape))
        for var, val in zip(jaxpr.invars, inputs, strict=True):
            env[var] = val

        def read(a):
            if isinstance(a, jex_core.Literal):
                return _Const(np.asarray(a.val, a.aval.dtype), ())
            return env[a]

        for eqn in jaxpr.eqns:
            outs = self.equation(eqn, [read(a) for a in eqn.invars])
            for var, val in zip(eqn.outvars, outs, strict=True):
                env[var] = val
        return [read(a) for a in jaxpr.outvars]

    def equation(self, eqn: Any, args: list[_Tensor | _Const]) -> list[_Tensor | _Const]:
        name, params = eqn.primitive.name, eqn.params
        if name in _CALLS or name in _CUSTOM:
            sub = params["call_jaxpr" if name in _CUSTOM else _CALLS[name]]
            if not hasattr(sub, "consts"):
                sub = jex_core.ClosedJaxpr(sub, ())
            return self.run(sub, args[params.get("num_consts", 0) :] if name in _CUSTOM else args)
        if name == "platform_index":
            return [_Const(np.int32(self._platform_index(params["platforms"])), ())]
        if name == "cond":
            if not isinstance(args[0], _Const):
                raise ExportError("lax.cond on a computed predicate is not exportable to ONNX")
            return self.run(params["branches"][int(args[0].value)], args[1:])
        if all(isinstance(a, _Const) for a in args):
            return self.fold(eqn, args)
        rule = getattr(self, f"p_{name}", None)
        if rule is None:
            if name in _BINARY:
                return [self.binary(_BINARY[name], eqn, *args)]
            if name in _UNARY:
                (x,) = args
                return [self.emit(_UNARY[name], [x.name], x.shape, x.perm)]
            raise ExportError(f"no ONNX translation for the JAX primitive {name!r}")
        out = rule(eqn, *args, **params)
        return out if isinstance(out, list) else [out]

    def _platform_index(self, platforms: Sequence[tuple[str, ...] | None]) -> int:
        for i, ps in enumerate(platforms):
            if ps is not None and self.platform in ps:
                return i
        if None in platforms:
            return list(platforms).index(None)
        raise ExportError(f"platform_dependent has no branch for {self.platform!r}")

    def fold(self, eqn: Any, args: list[_Const]) -> list[_Const]:
        """Evaluate an equation on constants (weights), at export time."""
        shapes = [tuple(v.aval.shape) for v in eqn.outvars]
        if eqn.primitive.name == "broadcast_in_dim" and not all(map(_static, shapes[0])):
            # e.g. zeros of the batch's shape: keep it small, numpy broadcasting does the rest
            (x,), dims = args, eqn.params["broadcast_dimensions"]
            lazy = [1] * len(shapes[0])
            for i, d in enumerate(dims):
                lazy[d] = np.shape(x.value)[i]
            return [_Const(np.reshape(x.value, lazy), shapes[0])]
        if not all(_static(d) for s in shapes for d in s):
            raise ExportError(f"cannot evaluate {eqn.primitive.name} with symbolic shape {shapes}")
        vals = [np.broadcast_to(a.value, a.shape) for a in args]
        outs = eqn.primitive.bind(*vals, **eqn.params)
        outs = outs if eqn.primitive.multiple_results else [outs]
        return [_Const(np.asarray(o), s) for o, s in zip(outs, shapes, strict=True)]

    # ------------------------------------------------------------------ elementwise
    def binary(self, op: str, eqn: Any, a, b) -> _Tensor:
        shape = tuple(eqn.outvars[0].aval.shape)
        rank = len(shape)
        full = [v for v in (a, b) if isinstance(v, _Tensor) and len(v.shape) == rank]
        perm = full[0].perm if full else tuple(range(rank))
        if op == "Max" and isinstance(b, _Const) and not np.any(b.value):
            return self.emit("Relu", [self.operand(a, perm, rank)], shape, perm)
        if op == "Div" and isinstance(a, _Tensor) and isinstance(b, _Const) and b.value.size == 1:
            if self.graph.sum_to_mean(a.name, float(b.value.reshape(()))):
                return a  # ReduceSum / count -> ReduceMean (jnp.mean traces as sum then divide)
        names = [self.operand(a, perm, rank), self.operand(b, perm, rank)]
        return self.emit(op, names, shape, perm)

    def p_convert_element_type(self, eqn, x: _Tensor, new_dtype, **_) -> _Tensor:
        if np.dtype(new_dtype) == np.float32:
            return x
        raise ExportError(f"only float32 models are exported to ONNX (found a cast to {new_dtype})")

    def p_copy(self, eqn, x: _Tensor, **_) -> _Tensor:
        return x

    p_copy_p = p_copy

    # ------------------------------------------------------------------ shapes and layout
    def reshape(self, x: _Tensor, shape: tuple[Any, ...]) -> _Tensor:
        """Reshape to the logical `shape`. A reshape that only adds or drops size-1 axes keeps
        the value's layout (4-D results stay NCHW); any other works on the logical order."""
        rank = len(shape)
        keep = _nonunit(x.shape, x.perm)
        src_seq = [x.shape[a] for a in _nonunit(x.shape, range(len(x.shape)))]
        dst_axes = _nonunit(shape, range(rank))
        if [shape[a] for a in dst_axes] == src_seq:  # only size-1 axes change
            order = _nonunit(x.shape, range(len(x.shape)))
            mapping = {order[i]: dst_axes[i] for i in range(len(order))}
            want = [mapping[a] for a in keep]  # stored order of the non-unit axes
            for perm in ((0, 3, 1, 2), tuple(range(rank))) if rank == 4 else (tuple(range(rank)),):
                if _nonunit(shape, perm) == want:
                    stored = [shape[p] for p in perm]
                    return self.emit(
                        "Reshape", [x.name, self.const(_onnx_dims(stored))], shape, perm
                    )
        x = self.to_perm(x, tuple(range(len(x.shape))))
        dims = self.const(_onnx_dims(shape))
        return self.emit("Reshape", [x.name, dims], shape, tuple(range(rank)))

    def p_reshape(self, eqn, x: _Tensor, new_sizes, dimensions=None, **_) -> _Tensor:
        if dimensions is not None:
            raise ExportError("reshape with a dimension permutation is not supported")
        return self.reshape(x, tuple(eqn.outvars[0].aval.shape))

    def p_squeeze(self, eqn, x: _Tensor, **_) -> _Tensor:
        return self.reshape(x, tuple(eqn.outvars[0].aval.shape))

    def p_broadcast_in_dim(self, eqn, x: _Tensor, shape, broadcast_dimensions, **_) -> _Tensor:
        shape = tuple(eqn.outvars[0].aval.shape)
        lazy = [1] * len(shape)
        for i, d in enumerate(broadcast_dimensions):
            lazy[d] = x.shape[i]
        y = self.reshape(x, tuple(lazy)) if tuple(lazy) != x.shape else x
        if tuple(lazy) == shape:
            return y
        target = [shape[p] if _static(shape[p]) else 1 for p in y.perm]
        return self.emit("Expand", [y.name, self.const(np.array(target, np.int64))], shape, y.perm)

    def p_transpose(self, eqn, x: _Tensor, permutation, **_) -> _Tensor:
        perm = tuple(list(permutation).index(p) for p in x.perm)
        return _Tensor(x.name, tuple(eqn.outvars[0].aval.shape), perm)

    def p_reduce_sum(self, eqn, x: _Tensor, axes, **_) -> _Tensor:
        stored_axes = [i for i, p in enumerate(x.perm) if p in axes]
        rest = [p for p in x.perm if p not in axes]
        perm = tuple(p - sum(a < p for a in axes) for p in rest)
        axes_name = self.const(np.array(stored_axes, np.int64))
        return self.emit(
            "ReduceSum", [x.name, axes_name], eqn.outvars[0].aval.shape, perm, keepdims=0
        )

    def p_slice(self, eqn, x: _Tensor, start_indices, limit_indices, strides, **_) -> _Tensor:
        steps = strides or (1,) * len(start_indices)
        ends = [int(e) if _static(e) else _INT64_MAX for e in limit_indices]

        def stored(v):
            return self.const(np.array([int(v[p]) for p in x.perm], np.int64))

        axes = self.const(np.arange(len(x.perm), dtype=np.int64))
        ins = [x.name, stored(start_indices), stored(ends), axes, stored(steps)]
        return self.emit("Slice", ins, eqn.outvars[0].aval.shape, x.perm)

    def p_pad(self, eqn, x: _Tensor, value: _Const, padding_config, **_) -> _Tensor:
        if any(c[2] != 0 for c in padding_config) or any(min(c[:2]) < 0 for c in padding_config):
            raise ExportError("only non-negative padding without interior padding is exported")
        pads = [int(padding_config[p][0]) for p in x.perm] + [
            int(padding_config[p][1]) for p in x.perm
        ]
        fill = self.const(np.asarray(value.value, np.float32).reshape(()))
        ins = [x.name, self.const(np.array(pads, np.int64)), fill]
        return self.emit("Pad", ins, eqn.outvars[0].aval.shape, x.perm, mode="constant")

    def p_concatenate(self, eqn, *xs, dimension, **_) -> _Tensor:
        shape = tuple(eqn.outvars[0].aval.shape)
        perm = next(x.perm for x in xs if isinstance(x, _Tensor))
        names = [self.operand(x, perm, len(shape)) for x in xs]
        return self.emit("Concat", names, shape, perm, axis=perm.index(dimension))

    # ------------------------------------------------------------------ linear layers
    def p_conv_general_dilated(self, eqn, x: _Tensor, w: _Const, **p) -> _Tensor:
        if not isinstance(w, _Const):
            raise ExportError("convolutions with a computed kernel are not exported to ONNX")
        if any(d != 1 for d in p["lhs_dilation"]) or p["batch_group_count"] != 1:
            raise ExportError("transposed or batch-grouped convolutions are not exported")
        dn = p["dimension_numbers"]
        x = self.to_perm(x, tuple(dn.lhs_spec))
        kernel = np.ascontiguousarray(np.transpose(np.broadcast_to(w.value, w.shape), dn.rhs_spec))
        pads = [int(lo) for lo, _ in p["padding"]] + [int(hi) for _, hi in p["padding"]]
        return self.emit(
            "Conv",
            [x.name, self.const(kernel.astype(np.float32), "w")],
            eqn.outvars[0].aval.shape,
            tuple(dn.out_spec),
            kernel_shape=list(kernel.shape[2:]),
            strides=list(p["window_strides"]),
            pads=pads,
            dilations=list(p["rhs_dilation"]),
            group=int(p["feature_group_count"]),
        )

    def p_dot_general(self, eqn, x: _Tensor, w: _Const, dimension_numbers, **_) -> _Tensor:
        (lc, rc), (lb, rb) = dimension_numbers
        rank = len(x.shape)
        if not isinstance(w, _Const) or lb or rb or len(w.shape) != 2 or tuple(lc) != (rank - 1,):
            raise ExportError("only x @ W with a constant 2-D W is exported (dot_general)")
        mat = np.broadcast_to(w.value, w.shape)
        mat = mat if tuple(rc) == (0,) else mat.T
        x = self.to_perm(x, tuple(range(rank)))
        op = "Gemm" if rank == 2 else "MatMul"
        ins = [x.name, self.const(np.ascontiguousarray(mat, np.float32), "w")]
        return self.emit(op, ins, eqn.outvars[0].aval.shape, tuple(range(rank)))


def convert(
    fn: Any, input_shape: tuple[Any, ...], input_perm: tuple[int, ...], platform: str = "cuda"
) -> tuple[Graph, _Tensor]:
    """Trace `fn(x)` (x float32 of `input_shape`, may hold one symbolic dim) and convert it.

    The graph input is named "x" and holds x in the layout `input_perm` (ONNX axis i = axis
    input_perm[i] of x). Returns the graph and the output value (logical layout).
    """
    spec = jax.ShapeDtypeStruct(input_shape, np.float32)
    closed = jax.make_jaxpr(fn)(spec)
    conv = Converter(platform)
    x = _Tensor("x", tuple(input_shape), tuple(input_perm))
    (out,) = conv.run(closed, [x])
    if not isinstance(out, _Tensor):
        raise ExportError("the traced function does not depend on its input")
    out = conv.to_perm(out, tuple(range(len(out.shape))))
    conv.graph.set_io(x.name, x.stored, out.name, out.stored)
    return conv.graph, out
