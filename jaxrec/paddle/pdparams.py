"""Read and write PaddlePaddle `.pdparams` state dicts, without Paddle.

A `.pdparams` file, as `paddle.save(layer.state_dict())` writes it (Paddle 2.x/3.x, default
protocol 4), is a pickle of one plain dict: {structured name: float32 numpy array in Paddle's
layout}, in the layer's registration order, followed by the entry
`"StructuredToParameterName@@"`: {structured name: internal parameter name such as
`conv2d_0.w_0`}. `paddle.load` turns every array named in that table into a Tensor (so the table
must name exactly the array entries), and `Layer.set_state_dict` matches by structured name.

Reading uses a restricted unpickler that only admits the globals numpy needs to rebuild arrays
(and plain containers); anything else is refused before it can run.

Writing emits the pickle opcodes directly instead of pickling numpy objects, so the bytes do not
depend on the numpy that runs jaxrec: the arrays reference `numpy.core.multiarray._reconstruct`,
`numpy.ndarray` and `numpy.dtype`, exactly what `paddle.save` writes under numpy 1.x (PaddleClas
pins numpy 1.24, which cannot import the `numpy._core` module numpy 2 would name); numpy 2 still
loads these names. The opcode sequence per array is the one numpy's `ndarray.__reduce__` yields
(`_reconstruct(ndarray, (0,), b"b")`, then BUILD with (1, shape, dtype, False, raw bytes)).
Protocol-4 framing is left out: frames are an optional read-ahead hint that every unpickler
accepts the absence of.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxrec.errors import JaxrecError

#: The name-table entry `paddle.save` appends to a state dict.
NAME_TABLE = "StructuredToParameterName@@"
META_KEYS = (NAME_TABLE,)
#: Present when Paddle split >1 GiB tensors (protocol 2/3 saves); not supported.
SPLIT_TABLE = "UnpackBigParamInfor@@"

# Globals a numpy-array pickle (protocols 2-5, numpy 1.x and 2.x) may reference.
ALLOWED_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
        ("collections", "OrderedDict"),
    }
)
_NUMPY2 = int(np.__version__.split(".")[0]) >= 2


class PdparamsError(JaxrecError):
    """A .pdparams file that cannot be read, written or converted."""


# ------------------------------------------------------------------------------------ reading


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: str) -> None:
        super().__init__(file, encoding="latin1")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise PdparamsError(
                f"{self._path}: refusing to unpickle global {module}.{name}; a .pdparams file "
                "only needs numpy array globals. The file is not a plain Paddle state dict "
                "(possibly malicious); convert it in a trusted Paddle environment first."
            )
        if module.startswith("numpy.core") and _NUMPY2:
            module = "numpy._core" + module[len("numpy.core") :]
        elif module.startswith("numpy._core") and not _NUMPY2:
            module = "numpy.core" + module[len("numpy._core") :]
        return super().find_class(module, name)


def load_pickle(path: str | Path) -> Mapping[Any, Any]:
    """The top-level dict of a .pdparams file (name table included), read safely."""
    path = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise PdparamsError(f"{path}: cannot read ({e.strerror})") from e
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), path).load()
    except PdparamsError:
        raise
    except Exception as e:  # any unpickling failure means "not a pdparams"
        raise PdparamsError(
            f"{path}: not a .pdparams file (pickle load failed: {type(e).__name__}: {e}); "
            "expected a file written by paddle.save(model.state_dict())"
        ) from e
    if not isinstance(obj, Mapping):
        raise PdparamsError(
            f"{path}: not a .pdparams state dict (top-level object is {type(obj).__name__})"
        )
    if SPLIT_TABLE in obj:
        raise PdparamsError(
            f"{path}: holds tensors split into pieces ({SPLIT_TABLE}, Paddle protocol-2 "
            "save of >1 GiB tensors); re-save it with paddle.save(..., protocol=4)"
        )
    return obj


def read_pdparams(path: str | Path) -> dict[str, np.ndarray]:
    """{structured name: array} from a .pdparams file, in file order, read safely."""
    obj = load_pickle(path)
    out: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        if key in META_KEYS:
            continue
        if not isinstance(key, str) or not isinstance(value, np.ndarray):
            raise PdparamsError(
                f"{path}: entry {key!r} is a {type(value).__name__}, not a numpy array"
            )
        out[key] = value
    if not out:
        raise PdparamsError(f"{path}: contains no tensors")
    return out


# ------------------------------------------------------------------------------------ writing

_BN_LEAVES = {"weight": "w_0", "bias": "b_0", "_mean": "w_1", "_variance": "w_2"}


def _layer_type(module: str, state: Mapping[str, np.ndarray]) -> str:
    if f"{module}._mean" in state:
        return "batch_norm1d" if module.endswith("feat_bn") else "batch_norm2d"
    weight = state.get(f"{module}.weight")
    if weight is not None and np.ndim(weight) == 4:
        return "conv2d"
    if weight is not None and np.ndim(weight) == 2 and module.rpartition(".")[2] == "fc":
        return "linear"
    return "create_parameter"


def internal_names(state: Mapping[str, np.ndarray]) -> dict[str, str]:
    """Paddle-style internal parameter names for a state dict, numbered per layer type in key
    order: `conv2d_N.w_0/b_0`, `batch_norm2d_N.w_0/b_0/w_1/w_2` (`batch_norm1d_N` for 1-D
    BatchNorms such as the BNNeck's `feat_bn`), `linear_N.w_0/b_0`, other parameters
    `create_parameter_N.w_0`.

    Paddle only uses these names to label the loaded Tensors (and in optimizer state files,
    which jaxrec does not write); `set_state_dict` matches by structured name. The numbering
    therefore only approximates Paddle's own, which depends on layer construction order.
    """
    counters: dict[str, int] = {}
    numbers: dict[str, str] = {}
    names: dict[str, str] = {}
    for key in state:
        module, _, leaf = key.rpartition(".")
        kind = _layer_type(module, state)
        if module not in numbers:
            numbers[module] = f"{kind}_{counters.get(kind, 0)}"
            counters[kind] = counters.get(kind, 0) + 1
        if kind.startswith("batch_norm"):
            suffix = _BN_LEAVES.get(leaf, "w_0")
        else:
            suffix = "b_0" if leaf == "bias" else "w_0"
        names[key] = f"{numbers[module]}.{suffix}"
    return names


class _Opcodes:
    """A minimal protocol-4 pickle emitter for str/int/bool/bytes/tuple/dict and float32
    arrays, memoizing each global once (as the pickle module does)."""

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.memo = 0
        self.globals: dict[tuple[str, str], int] = {}
        self.out.write(pickle.PROTO + bytes([4]))

    def _memoize(self) -> int:
        self.out.write(pickle.MEMOIZE)
        self.memo += 1
        return self.memo - 1

    def _get(self, index: int) -> None:
        if index < 256:
            self.out.write(pickle.BINGET + bytes([index]))
        else:
            self.out.write(pickle.LONG_BINGET + struct.pack("<I", index))

    def string(self, s: str) -> None:
        b = s.encode("utf-8", "surrogatepass")
        if len(b) < 256:
            self.out.write(pickle.SHORT_BINUNICODE + bytes([len(b)]) + b)
        else:
            self.out.write(pickle.BINUNICODE + struct.pack("<I", len(b)) + b)

    def integer(self, i: int) -> None:
        if 0 <= i < 256:
            self.out.write(pickle.BININT1 + bytes([i]))
        elif -(2**31) <= i < 2**31:
            self.out.write(pickle.BININT + struct.pack("<i", i))
        else:
            raise ValueError(f"integer {i} out of range")

    def raw(self, b: bytes) -> None:
        if len(b) < 256:
            self.out.write(pickle.SHORT_BINBYTES + bytes([len(b)]) + b)
        elif len(b) < 2**32:
            self.out.write(pickle.BINBYTES + struct.pack("<I", len(b)) + b)
        else:
            self.out.write(pickle.BINBYTES8 + struct.pack("<Q", len(b)) + b)

    def tuple_of(self, items: tuple[Any, ...]) -> None:
        ops = {0: pickle.EMPTY_TUPLE, 1: pickle.TUPLE1, 2: pickle.TUPLE2, 3: pickle.TUPLE3}
        if len(items) > 3:
            self.out.write(pickle.MARK)
        for item in items:
            self.value(item)
        self.out.write(ops.get(len(items), pickle.TUPLE))

    def global_(self, module: str, name: str) -> None:
        if (module, name) in self.globals:
            self._get(self.globals[(module, name)])
            return
        self.string(module)
        self.string(name)
        self.out.write(pickle.STACK_GLOBAL)
        self.globals[(module, name)] = self._memoize()

    def value(self, v: Any) -> None:
        if v is None:
            self.out.write(pickle.NONE)
        elif isinstance(v, bool):
            self.out.write(pickle.NEWTRUE if v else pickle.NEWFALSE)
        elif isinstance(v, int):
            self.integer(v)
        elif isinstance(v, str):
            self.string(v)
        elif isinstance(v, bytes):
            self.raw(v)
        elif isinstance(v, tuple):
            self.tuple_of(v)
        elif isinstance(v, np.ndarray):
            self.array(v)
        elif isinstance(v, Mapping):
            self.dict_of(v)
        else:
            raise TypeError(f"cannot write a {type(v).__name__} into a .pdparams file")

    def array(self, a: np.ndarray) -> None:
        # numpy's ndarray.__reduce__: _reconstruct(ndarray, (0,), b"b"), then __setstate__
        # with (version 1, shape, dtype, is_fortran, raw C-order bytes).
        self.global_("numpy.core.multiarray", "_reconstruct")
        self.global_("numpy", "ndarray")
        self.tuple_of((0,))
        self.raw(b"b")
        self.out.write(pickle.TUPLE3 + pickle.REDUCE)
        self.out.write(pickle.MARK)
        self.integer(1)
        self.tuple_of(tuple(int(d) for d in a.shape))
        # dtype('f4', False, True) with state (3, '<', None, None, None, -1, -1, 0)
        self.global_("numpy", "dtype")
        self.tuple_of(("f4", False, True))
        self.out.write(pickle.REDUCE)
        self.tuple_of((3, "<", None, None, None, -1, -1, 0))
        self.out.write(pickle.BUILD)
        self.out.write(pickle.NEWFALSE)
        self.raw(np.ascontiguousarray(a, dtype="<f4").tobytes())
        self.out.write(pickle.TUPLE + pickle.BUILD)

    def dict_of(self, d: Mapping[str, Any]) -> None:
        self.out.write(pickle.EMPTY_DICT)
        items = list(d.items())
        for start in range(0, len(items), 1000):  # the pickle module's SETITEMS batch size
            self.out.write(pickle.MARK)
            for k, v in items[start : start + 1000]:
                self.value(k)
                self.value(v)
            self.out.write(pickle.SETITEMS)

    def finish(self) -> bytes:
        self.out.write(pickle.STOP)
        return self.out.getvalue()


def encode_state_dict(
    state: Mapping[str, np.ndarray], names: Mapping[str, str] | None = None
) -> bytes:
    """The bytes of a .pdparams file holding `state` (in its iteration order) and the name
    table `names` (default `internal_names(state)`). Arrays must be float32-valued."""
    if not state:
        raise PdparamsError("refusing to write an empty state dict")
    names = internal_names(state) if names is None else names
    if set(names) != set(state):
        raise PdparamsError("the name table must name exactly the state dict's entries")
    body: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(key, str) or key in META_KEYS:
            raise PdparamsError(f"invalid state dict key {key!r}")
        a = np.asarray(value)
        if a.dtype != np.float32:
            raise PdparamsError(f"{key}: dtype {a.dtype}, a PaddleClas state dict is float32")
        body[key] = a
    body[NAME_TABLE] = {k: str(names[k]) for k in state}
    em = _Opcodes()
    em.dict_of(body)
    return em.finish()


def write_pdparams(
    path: str | os.PathLike,
    state: Mapping[str, np.ndarray],
    names: Mapping[str, str] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write `state` as a .pdparams file at `path` (atomically; see `encode_state_dict`).

    Paddle's loaders add `.pdparams` to a prefix, so the file name must end with it.
    """
    path = Path(path)
    if path.suffix != ".pdparams":
        raise PdparamsError(f"{path}: a .pdparams file name must end with .pdparams")
    if path.exists() and not overwrite:
        raise PdparamsError(f"{path} exists (use --overwrite)")
    data = encode_state_dict(state, names)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise PdparamsError(f"{path}: cannot write ({e.strerror})") from e
    return path
