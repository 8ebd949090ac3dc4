"""NumPy implementations of the MIL ops (iOS 18 opset) that the Core ML exporter emits.

Each function takes the op's inputs by their MIL names, with the MIL defaults, and
returns its output(s); the interpreter (emulator.py) then rounds each result to the
dtype the program declares. Reductions, matmuls and transcendental functions compute in
fp32 and round once at the end: an fp16 op gets fp16 inputs and an fp16 result, with
fp32 accumulation inside, which is how Core ML's GPU and Neural Engine kernels behave.
The set of ops is OPS; an op outside it is refused by name (emulator.Package.check_supported).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qwen_mobile.errors import QwenMobileError

# inputs that take a list of values
VARIADIC = {"concat": ("values",)}

# uint16: coremltools' fp16 passes narrow gather indices to it
CAST_DTYPES = {"fp16": np.float16, "fp32": np.float32, "int32": np.int32, "int16": np.int16, "uint16": np.uint16,
               "int8": np.int8, "uint8": np.uint8, "bool": np.bool_}


@dataclass
class StateRef:
    """A function's state input: a name into the caller's state dict."""

    name: str
    store: dict

    def get(self) -> np.ndarray:
        return self.store[self.name]

    def set(self, value: np.ndarray) -> None:
        current = self.store[self.name]
        if value.shape != current.shape:
            raise QwenMobileError(f"state {self.name}: update of shape {list(value.shape)} into {list(current.shape)}")
        self.store[self.name] = np.asarray(value, dtype=current.dtype).copy()


# values a weight is widened (linear) or decompressed (constexpr_blockwise_shift_scale) by at a time: 16 MiB in float32
DEQUANTIZED_BLOCK_ELEMENTS = 1 << 22


def f32(x):
    """fp16 (or any float) operands computed in fp32."""
    x = np.asarray(x)
    return x.astype(np.float32) if x.dtype == np.float16 else x


def _axes(axes, rank):
    if axes is None:
        return None
    return tuple(int(a) % rank for a in np.atleast_1d(axes))


# -- constants and state ------------------------------------------------------------------
def identity(x):
    return np.asarray(x)


def const(val, **_):
    return val


def read_state(input: StateRef):
    return input.get().copy()


def coreml_update_state(state: StateRef, value):
    state.set(np.asarray(value))
    return np.asarray(value)


def write_state(input: StateRef, data):
    input.set(np.asarray(data))
    return ()


# -- elementwise --------------------------------------------------------------------------
def _binary(function):
    def op(x, y):
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype.kind == "f" or y.dtype.kind == "f":
            return function(f32(x), f32(y))
        return function(x, y)
    return op


add = _binary(np.add)
sub = _binary(np.subtract)
mul = _binary(np.multiply)
maximum = _binary(np.maximum)
minimum = _binary(np.minimum)


def real_div(x, y):
    return f32(x) / f32(y)


def pow(x, y):  # noqa: A001 (the MIL op's name)
    return np.power(f32(x), f32(y))


def _compare(function):
    return lambda x, y: function(np.asarray(x), np.asarray(y))


equal = _compare(np.equal)
not_equal = _compare(np.not_equal)
less = _compare(np.less)
less_equal = _compare(np.less_equal)
greater = _compare(np.greater)
greater_equal = _compare(np.greater_equal)
logical_and = _compare(np.logical_and)
logical_or = _compare(np.logical_or)


def logical_not(x):
    return np.logical_not(x)


def select(cond, a, b):
    return np.where(np.asarray(cond), a, b)


def _unary(function):
    def op(x):
        with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
            return function(f32(x))
    return op


exp = _unary(np.exp)
sin = _unary(np.sin)
cos = _unary(np.cos)
sqrt = _unary(np.sqrt)
abs = _unary(np.abs)  # noqa: A001
tanh = _unary(np.tanh)
sigmoid = _unary(lambda x: 1.0 / (1.0 + np.exp(-x)))
silu = _unary(lambda x: x / (1.0 + np.exp(-x)))
softplus = _unary(lambda x: np.logaddexp(np.float32(0.0), x))


def log(x, epsilon=0.0):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(f32(x) + np.float32(epsilon))


def rsqrt(x, epsilon=1e-12):
    """MIL's rsqrt adds epsilon (default 1e-12) before the square root."""
    x = f32(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1.0 / np.sqrt(x + np.asarray(epsilon, dtype=x.dtype))


def cast(x, dtype):
    if dtype not in CAST_DTYPES:
        raise QwenMobileError(f"cast to {dtype!r} is not modelled by the emulator")
    return np.asarray(x).astype(CAST_DTYPES[dtype])


# -- reductions and linear algebra ---------------------------------------------------------
def reduce_sum(x, axes=None, keep_dims=False):
    x = f32(x)
    return np.sum(x, axis=_axes(axes, x.ndim), keepdims=bool(keep_dims))


def reduce_mean(x, axes=None, keep_dims=False):
    x = f32(x)
    return np.mean(x, axis=_axes(axes, x.ndim), keepdims=bool(keep_dims))


def softmax(x, axis=-1):
    x = f32(x)
    shifted = x - np.max(x, axis=int(axis), keepdims=True)
    with np.errstate(invalid="ignore"):
        weights = np.exp(shifted)
        return weights / np.sum(weights, axis=int(axis), keepdims=True)


def cumsum(x, axis=0, exclusive=False, reverse=False):
    x = f32(x)
    axis = int(axis)
    if reverse:
        x = np.flip(x, axis)
    out = np.cumsum(x, axis=axis)
    if exclusive:
        out = out - x
    return np.flip(out, axis) if reverse else out


def matmul(x, y, transpose_x=False, transpose_y=False):
    x, y = f32(x), f32(y)
    if transpose_x:
        x = np.swapaxes(x, -1, -2)
    if transpose_y:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


def linear(x, weight, bias=None):
    """x @ weight.T in fp32, an fp16 weight widened a block of its rows at a time: whole, the 0.8B
    model's tied lm_head (254 M values) took a 1 GiB float32 copy on every call. Each output column
    is the same dot product either way."""
    x, weight = f32(x), np.asarray(weight)
    rows = max(1, DEQUANTIZED_BLOCK_ELEMENTS // max(1, weight.shape[-1]))
    out = np.empty((*x.shape[:-1], weight.shape[0]), dtype=np.result_type(x, f32(weight[:0])))
    for start in range(0, weight.shape[0], rows):
        out[..., start:start + rows] = np.matmul(x, f32(weight[start:start + rows]).T)
    return out if bias is None else out + f32(bias)


def conv(x, weight, bias=None, strides=None, pad_type="valid", pad=None, dilations=None, groups=1):
    """1-d grouped convolution (the depthwise causal conv of the DeltaNet layers), in fp32:
    out[n, o, t] = sum_{i, k} w[o, i, k] x[n, group(o) * C_in/groups + i, t * stride + k * dilation]."""
    x, weight = f32(x), f32(weight)
    if x.ndim != 3:
        raise QwenMobileError(f"conv over {x.ndim - 2} spatial dims is not modelled by the emulator")
    stride = 1 if strides is None else int(np.atleast_1d(strides)[0])
    dilation = 1 if dilations is None else int(np.atleast_1d(dilations)[0])
    if pad_type == "custom":
        x = np.pad(x, ((0, 0), (0, 0), (int(pad[0]), int(pad[1]))))
    elif pad_type != "valid":
        raise QwenMobileError(f"conv pad_type {pad_type!r} is not modelled by the emulator")
    batch, channels, _ = x.shape
    outputs, per_group, kernel = weight.shape
    groups = int(groups)
    span = (kernel - 1) * dilation + 1
    windows = np.lib.stride_tricks.sliding_window_view(x, span, axis=-1)[:, :, ::stride, ::dilation]  # [N, C, T, K]
    windows = windows.reshape(batch, groups, channels // groups, windows.shape[2], kernel)
    grouped = weight.reshape(groups, outputs // groups, per_group, kernel)
    out = np.einsum("ngitk,goik->ngot", windows, grouped, optimize=True).reshape(batch, outputs, -1)
    return out if bias is None else out + f32(bias)[None, :, None]


# -- shapes ---------------------------------------------------------------------------------
def reshape(x, shape):
    x = np.asarray(x)
    shape = [int(s) for s in np.atleast_1d(shape)]
    shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]  # 0 copies the input's dim
    return x.reshape(shape)


def transpose(x, perm):
    return np.transpose(x, [int(p) for p in perm])


def expand_dims(x, axes):
    x = np.asarray(x)
    rank = x.ndim + len(np.atleast_1d(axes))
    for axis in sorted(int(a) % rank for a in np.atleast_1d(axes)):
        x = np.expand_dims(x, axis)
    return x


def squeeze(x, axes=None):
    x = np.asarray(x)
    if axes is None:
        return np.squeeze(x)
    return np.squeeze(x, axis=_axes(axes, x.ndim))


def tile(x, reps):
    return np.tile(x, [int(r) for r in reps])


def concat(values, axis, interleave=False):
    if interleave:
        raise QwenMobileError("concat with interleave is not modelled by the emulator")
    values = [np.asarray(v) for v in values]
    if any(v.dtype.kind == "f" for v in values):
        values = [f32(v) for v in values]
    return np.concatenate(values, axis=int(axis))


def split(x, axis, num_splits=None, split_sizes=None):
    x = np.asarray(x)
    axis = int(axis)
    if split_sizes is not None:
        points = np.cumsum([int(s) for s in split_sizes])[:-1]
    else:
        points = int(num_splits)
    return tuple(np.split(x, points, axis=axis))


def _slices(shape, begin, end, stride, begin_mask, end_mask, squeeze_mask):
    rank = len(shape)
    stride = [1] * rank if stride is None else [int(s) for s in stride]
    begin_mask = [False] * rank if begin_mask is None else list(begin_mask)
    end_mask = [False] * rank if end_mask is None else list(end_mask)
    squeeze_mask = [False] * rank if squeeze_mask is None else list(squeeze_mask)
    slices, squeezed = [], []
    for axis in range(rank):
        b, e, s = int(begin[axis]), int(end[axis]), stride[axis]
        if squeeze_mask[axis]:
            b = b % shape[axis]
            slices.append(slice(b, b + 1, 1))
            squeezed.append(axis)
            continue
        start = None if begin_mask[axis] else b
        stop = None if end_mask[axis] else e
        slices.append(slice(start, stop, s))
    return tuple(slices), tuple(squeezed)


def slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    x = np.asarray(x)
    slices, squeezed = _slices(x.shape, begin, end, stride, begin_mask, end_mask, squeeze_mask)
    out = x[slices]
    return np.squeeze(out, axis=squeezed) if squeezed else out


def slice_update(x, update, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    out = np.array(x, copy=True)
    slices, squeezed = _slices(out.shape, begin, end, stride, begin_mask, end_mask, squeeze_mask)
    update = np.asarray(update)
    if squeezed:
        update = np.expand_dims(update, squeezed)
    if out[slices].shape != update.shape:
        raise QwenMobileError(f"slice_update: update of shape {list(update.shape)} into a slice of shape "
                              f"{list(out[slices].shape)}")
    out[slices] = update
    return out


def gather(x, indices, axis=0, batch_dims=0, validate_indices=False):
    x, indices = np.asarray(x), np.asarray(indices).astype(np.int64)
    if int(batch_dims) != 0:
        raise QwenMobileError("gather with batch_dims is not modelled by the emulator")
    axis = int(axis) % x.ndim
    size = x.shape[axis]
    if np.any(indices >= size) or np.any(indices < -size):
        raise QwenMobileError(f"gather: index out of range for an axis of size {size}")
    return np.take(x, np.where(indices < 0, indices + size, indices), axis=axis)


# -- compressed weights --------------------------------------------------------------------
def constexpr_blockwise_shift_scale(data, scale, offset=None):
    """iOS 18 blockwise dequantization: scale * (data - offset), with scale and offset
    repeated over blocks (data.shape[i] // scale.shape[i] elements along each axis), in scale's
    dtype (the op's output type).

    Made a few rows at a time into the result: computed whole in float32 it took three
    weight-sized float32 temporaries per call (the 0.8B export's gate went from 4.5 to 9.1 GiB
    resident through them: the embedding is 254 M values). Each block is computed in float32
    and rounded once to the result's dtype, as computing it whole and rounding after does, so
    the values are the same."""
    data, scale = np.asarray(data), np.asarray(scale)
    repeats = [d // s for d, s in zip(data.shape, scale.shape)]

    def expand(t):
        for axis, repeat in enumerate(repeats):
            if repeat > 1:
                t = np.repeat(t, repeat, axis=axis)
        return t

    result = np.empty(data.shape, dtype=scale.dtype)
    row_size = max(1, int(np.prod(data.shape[1:])))
    step = repeats[0] * max(1, DEQUANTIZED_BLOCK_ELEMENTS // (row_size * repeats[0]))  # whole blocks of rows
    for start in range(0, data.shape[0], step):
        rows, scale_rows = slice(start, start + step), slice(start // repeats[0], (start + step) // repeats[0])
        values = data[rows].astype(np.float32)
        if offset is not None:
            values -= expand(np.asarray(offset)[scale_rows].astype(np.float32))
        values *= expand(scale[scale_rows].astype(np.float32))
        result[rows] = values
    return result


OPS = {
    name: function
    for name, function in globals().items()
    if callable(function) and not name.startswith("_") and name not in {"f32", "StateRef", "dataclass", "QwenMobileError"}
}
