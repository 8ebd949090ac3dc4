"""`qwen_mobile::gated_delta_rule` as a MIL composite, registered with coremltools' torch frontend.

The converter builds the recurrence from MIL ops only (matmul, exp, cumsum, mul, add,
sub, transpose, reshape, tile, slice_by_index, concat, cast), in one of two forms:

- T == 1 (decode): the token recurrence of `recurrent_gated_delta_rule`;
- T > 1 (prefill, static T): the chunked form of `chunked_gated_delta_rule`, chunk by
  chunk (unrolled), with the unit-lower-triangular chunk system inverted by repeated
  squaring, (I - N)^-1 = prod_j (I + N^(2^j)): matmuls only, no triangular solve.

The same module converts the two small ops (lower.pair_join / lower.pair_split) that
read and write a state held at fp32 precision as an fp16 hi/lo pair, and replaces, for the
duration of a conversion, coremltools' translation of `aten::reciprocal` (exact_reciprocal).

Every op these converters emit computes in fp32 (inputs are cast up when the program
computes in fp16) and carries GDR_TAG in its name, so an fp16 export can leave exactly
these ops in fp32 (see lower.FP32_OPS): the recurrent state accumulates over the whole
sequence.
"""

from __future__ import annotations

import contextlib
import itertools

import numpy as np

GDR_TAG = "__gdr32__"
# A state held at fp32 precision is stored as fp16 hi = fp16(x) and lo = fp16((x - hi) * LO_SCALE).
# x - hi is at most half an fp16 step of x (|x| 2^-11), so unscaled it would sit 11 binary
# orders below x: in fp16's subnormal range for every |x| < 0.25, where fp16 keeps an absolute
# step of 2^-24 instead of 11 significant bits (and a runtime that flushes subnormals keeps
# nothing). Scaled by 2^11 it keeps 11 bits for every |x| >= 2^-13, and still cannot overflow:
# |x| <= 65504 (hi's own range) gives |lo| <= 2^15. A power of two: scaling is exact both ways.
LO_SCALE = 2048.0
MAX_CHUNK = 64  # the op's default chunk (qwen_mobile.ops.gated_delta_rule.DEFAULT_CHUNK_SIZE)

_registered = False


class _Names:
    def __init__(self, prefix: str):
        self.prefix = f"{prefix}{GDR_TAG}"
        self.counter = itertools.count()

    def __call__(self, what: str) -> str:
        return f"{self.prefix}{what}_{next(self.counter)}"


def chunk_size_for(length: int) -> int:
    """The chunk the composite uses for a prefill of `length` tokens."""
    if length <= MAX_CHUNK:
        return length
    if length % MAX_CHUNK:
        raise ValueError(f"a prefill of {length} tokens must be at most {MAX_CHUNK} or a multiple of it")
    return MAX_CHUNK


def build(q, k, v, g, beta, state, name: str):
    """MIL vars for (o [B, T, Hv, Dv], final state [B, Hv, Dk, Dv]), both fp32."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    n = _Names(name)
    batch, length, key_heads, key_dim = q.shape
    value_heads = v.shape[2]
    groups = value_heads // key_heads

    def fp32(x):
        return x if x.dtype == types.fp32 else mb.cast(x=x, dtype="fp32", name=n("cast"))

    q, k, v, g, beta, state = map(fp32, (q, k, v, g, beta, state))

    def by_value_head(x):  # [B, T, Hk, D] -> [B, T, Hv, D], each key head serving `groups` consecutive value heads
        if groups == 1:
            return x
        x = mb.expand_dims(x=x, axes=[3], name=n("expand"))
        x = mb.tile(x=x, reps=[1, 1, 1, groups, 1], name=n("tile"))
        return mb.reshape(x=x, shape=[batch, length, value_heads, key_dim], name=n("reshape"))

    def heads_first(x):  # [B, T, H, ...] -> [B, H, T, ...]
        perm = [0, 2, 1, 3] if x.rank == 4 else [0, 2, 1]
        return mb.transpose(x=x, perm=perm, name=n("transpose"))

    q, k = heads_first(by_value_head(q)), heads_first(by_value_head(k))
    v, g, beta = heads_first(v), heads_first(g), heads_first(beta)  # [B, Hv, T, Dv], [B, Hv, T] x2

    if length == 1:
        out, state = _step(mb, n, q, k, v, g, beta, state, batch, value_heads)
    else:
        chunk = chunk_size_for(length)
        outputs = []
        for start in range(0, length, chunk):
            def cut(x):
                begin = [0, 0, start] + [0] * (x.rank - 3)
                end = [batch, value_heads, start + chunk] + list(x.shape[3:])
                return x if chunk == length else mb.slice_by_index(x=x, begin=begin, end=end, name=n("slice"))

            out, state = _chunk(mb, n, cut(q), cut(k), cut(v), cut(g), cut(beta), state, chunk)
            outputs.append(out)
        out = outputs[0] if len(outputs) == 1 else mb.concat(values=outputs, axis=2, name=n("concat"))
    return mb.transpose(x=out, perm=[0, 2, 1, 3], name=n("out")), state


def _step(mb, n, q, k, v, g, beta, state, batch, value_heads):
    """One token: S = exp(g) S; S += k (beta (v - S^T k))^T; o = S^T q."""
    decay = mb.reshape(x=mb.exp(x=g, name=n("exp")), shape=[batch, value_heads, 1, 1], name=n("reshape"))
    state = mb.mul(x=state, y=decay, name=n("decay"))
    prediction = mb.matmul(x=k, y=state, name=n("predict"))  # [B, Hv, 1, Dv]
    error = mb.sub(x=v, y=prediction, name=n("error"))
    beta = mb.expand_dims(x=beta, axes=[-1], name=n("expand"))  # [B, Hv, 1, 1]
    delta = mb.mul(x=error, y=beta, name=n("delta"))
    state = mb.add(x=state, y=mb.matmul(x=k, y=delta, transpose_x=True, name=n("write")), name=n("state"))
    return mb.matmul(x=q, y=state, name=n("read")), state


def _chunk(mb, n, q, k, v, g, beta, state, size):
    """One chunk of `size` tokens, exactly chunked_gated_delta_rule's algebra."""
    causal = np.tril(np.ones((size, size), dtype=bool))
    log_decay = mb.cumsum(x=g, axis=-1, name=n("cumsum"))  # b_i [B, H, C]
    rows = mb.expand_dims(x=log_decay, axes=[-1], name=n("rows"))
    cols = mb.expand_dims(x=log_decay, axes=[-2], name=n("cols"))
    # decay(i <- j) = exp(b_i - b_j) for j <= i; masked to -inf before exp, so it never overflows
    difference = mb.sub(x=rows, y=cols, name=n("difference"))
    upper = np.where(causal, 0.0, -np.inf).astype(np.float32)
    pairwise = mb.exp(x=mb.add(x=difference, y=upper, name=n("causal")), name=n("pairwise"))
    strictly = mb.mul(x=pairwise, y=np.tril(np.ones((size, size), dtype=np.float32), -1), name=n("strict"))

    beta = mb.expand_dims(x=beta, axes=[-1], name=n("beta"))
    k_beta = mb.mul(x=k, y=beta, name=n("k_beta"))
    gram = mb.matmul(x=k_beta, y=k, transpose_y=True, name=n("gram"))
    lower = mb.mul(x=mb.mul(x=gram, y=strictly, name=n("masked")), y=np.float32(-1.0), name=n("lower"))

    inverse = mb.add(x=lower, y=np.eye(size, dtype=np.float32), name=n("inverse"))
    power, span = lower, 2
    while span < size:
        power = mb.matmul(x=power, y=power, name=n("power"))
        inverse = mb.add(x=inverse, y=mb.matmul(x=inverse, y=power, name=n("product")), name=n("inverse"))
        span *= 2

    decay = mb.exp(x=log_decay, name=n("decay"))  # exp(b_i) [B, H, C]
    decay_column = mb.expand_dims(x=decay, axes=[-1], name=n("decay_column"))
    from_values = mb.matmul(x=inverse, y=mb.mul(x=v, y=beta, name=n("v_beta")), name=n("from_values"))
    per_state = mb.matmul(x=inverse, y=mb.mul(x=k_beta, y=decay_column, name=n("k_decay")), name=n("per_state"))
    attention = mb.mul(x=mb.matmul(x=q, y=k, transpose_y=True, name=n("qk")), y=pairwise, name=n("attention"))
    q_decayed = mb.mul(x=q, y=decay_column, name=n("q_decayed"))

    last = mb.slice_by_index(x=log_decay, begin=[0, 0, size - 1], end=[0, 0, size], begin_mask=[True, True, False],
                             end_mask=[True, True, False], name=n("last"))  # b_C [B, H, 1]
    to_end = mb.exp(x=mb.sub(x=last, y=log_decay, name=n("to_end")), name=n("decay_to_end"))
    k_to_end = mb.mul(x=k, y=mb.expand_dims(x=to_end, axes=[-1], name=n("to_end_column")), name=n("k_to_end"))
    chunk_decay = mb.expand_dims(x=mb.exp(x=last, name=n("chunk_decay")), axes=[-1], name=n("chunk_decay_column"))

    updates = mb.sub(x=from_values, y=mb.matmul(x=per_state, y=state, name=n("from_state")), name=n("updates"))
    out = mb.add(
        x=mb.matmul(x=q_decayed, y=state, name=n("inter")),
        y=mb.matmul(x=attention, y=updates, name=n("intra")),
        name=n("chunk_out"),
    )
    state = mb.add(
        x=mb.mul(x=state, y=chunk_decay, name=n("carried")),
        y=mb.matmul(x=k_to_end, y=updates, transpose_x=True, name=n("written")),
        name=n("state"),
    )
    return out, state


def build_pair_join(high, low, name: str):
    """fp32 value of a state held as an fp16 hi/lo pair: hi + lo / LO_SCALE, in fp32."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    n = _Names(name)
    high, low = (x if x.dtype == types.fp32 else mb.cast(x=x, dtype="fp32", name=n("cast")) for x in (high, low))
    low = mb.mul(x=low, y=np.float32(1.0 / LO_SCALE), name=n("unscale"))
    return mb.add(x=high, y=low, name=n("join"))


def build_pair_split(value, name: str):
    """(hi, lo) with hi = fp16(value) and lo = (value - hi) * LO_SCALE, computed in fp32 (both
    returned as fp32; storing them into fp16 states rounds lo only)."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    n = _Names(name)
    if value.dtype != types.fp32:
        value = mb.cast(x=value, dtype="fp32", name=n("cast"))
    high = mb.cast(x=mb.cast(x=value, dtype="fp16", name=n("round")), dtype="fp32", name=n("high"))
    rest = mb.sub(x=value, y=high, name=n("rest"))
    return high, mb.mul(x=rest, y=np.float32(LO_SCALE), name=n("low"))


def register() -> None:
    """Register the converter for the op as the torch frontend names it (idempotent)."""
    global _registered
    if _registered:
        return
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.frontend.torch.torch_op_registry import register_torch_op

    def qwen_mobile_gated_delta_rule(context, node):
        q, k, v, g, beta, state = _get_inputs(context, node, expected=6)
        out, final = build(q, k, v, g, beta, state, node.name)
        context.add(out, torch_name=node.outputs[0])
        context.add(final, torch_name=node.outputs[1])

    def qwen_mobile_coreml_pair_join(context, node):
        high, low = _get_inputs(context, node, expected=2)
        context.add(build_pair_join(high, low, node.name), torch_name=node.outputs[0])

    def qwen_mobile_coreml_pair_split(context, node):
        (value,) = _get_inputs(context, node, expected=1)
        high, low = build_pair_split(value, node.name)
        context.add(high, torch_name=node.outputs[0])
        context.add(low, torch_name=node.outputs[1])

    register_torch_op(qwen_mobile_gated_delta_rule, torch_alias=["qwen_mobile::gated_delta_rule"], override=True)
    register_torch_op(qwen_mobile_coreml_pair_join, torch_alias=["qwen_mobile_coreml::pair_join"], override=True)
    register_torch_op(qwen_mobile_coreml_pair_split, torch_alias=["qwen_mobile_coreml::pair_split"], override=True)
    _registered = True


def reciprocal(context, node):
    """torch.reciprocal as 1 / x. coremltools translates it to MIL `inverse`, whose epsilon
    (default 1e-4) makes it 1 / (x + 1e-4): the rotary frequencies (1 / theta^(2i/d), folded
    to a constant) came out up to 1e-4 relative too small, so rotation angles were off by
    position x 1e-4 rad (3e-3 at position 31, 0.2 at position 2,047); on the embedded model
    that alone put the fp32 program 4e-4 x std from the eager logits."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.mil import types

    (x,) = _get_inputs(context, node, expected=1)
    if not types.is_float(x.dtype):
        x = mb.cast(x=x, dtype="fp32")
    one = np.array(1.0, dtype=types.nptype_from_builtin(x.dtype))
    context.add(mb.real_div(x=one, y=x, name=node.name))


@contextlib.contextmanager
def exact_reciprocal():
    """coremltools' torch frontend with `reciprocal` translated as 1 / x while the block runs;
    its own translation is restored afterwards (it is global to the process)."""
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY

    mapping = _TORCH_OPS_REGISTRY.name_to_func_mapping
    original = mapping.get("reciprocal")
    mapping["reciprocal"] = reciprocal
    try:
        yield
    finally:
        if original is None:
            mapping.pop("reciprocal", None)
        else:
            mapping["reciprocal"] = original
