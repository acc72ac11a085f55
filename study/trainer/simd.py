"""Sixteen float32 lanes as a numba value, for compiled kernels that keep their sums in registers.

numba's loops are vectorized by LLVM only where a loop's iterations are independent, and an
accumulator then lives in memory: one load and one store per multiply-add, a few times
slower than the machine's peak. Keeping a tile of sums in registers across a loop over rows
needs vectors that are values. :data:`f32x16` is such a value (an LLVM ``<16 x float>``);
these intrinsics load, store, broadcast and combine it lane by lane, each lane with exactly
the float32 arithmetic of the scalar code it replaces (``vfma`` is one rounding, as a
contracted scalar multiply-add; ``vadd``/``vmul`` one rounding each), so a kernel written
with them gives the same bits as its scalar version, just faster. Loads and stores take a
C-contiguous 1-D array and the index of the first of 16 lanes; nothing checks bounds. LLVM
maps a vector to the machine's registers (one AVX-512 register, two AVX2 ones, four SSE
ones); lanes never mix, so the bits are the same on each. numba checks a cached kernel
against its own file only, so ``numba_cache.drop_stale_cache`` drops the caches of the
kernels built on these when this file changes.
"""

from __future__ import annotations

from typing import Any

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic as _numba_intrinsic
from numba.extending import models, register_model

__all__ = ["LANES", "f32x16", "transpose16", "vadd", "vdiv", "vfma", "vlane", "vload",
           "vload4_rows", "vload4_tiled", "vmul", "vsplat", "vsqrt", "vstore", "vsub", "vwhere_eq",
           "vwhere_gt", "vwhere_le", "vwhere_lt"]

LANES = 16
# Typed as Any: the intrinsics' Python signatures (typing context first) are numba's, not
# the ones compiled code calls.
intrinsic: Any = _numba_intrinsic
_VEC = ir.VectorType(ir.FloatType(), LANES)


class F32x16(types.Type):
    """numba's type of a ``<16 x float>`` value."""

    def __init__(self) -> None:
        super().__init__(name="F32x16")


f32x16 = F32x16()


@register_model(F32x16)
class _F32x16Model(models.PrimitiveModel):
    def __init__(self, dmm: Any, fe_type: Any) -> None:
        super().__init__(dmm, fe_type, _VEC)


def _lane_pointer(context: Any, builder: Any, arrty: Any, arr: Any, idx: Any) -> Any:
    ary = context.make_array(arrty)(context, builder, arr)
    ptr = cgutils.get_item_pointer(context, builder, arrty, ary, [idx], wraparound=False)
    return builder.bitcast(ptr, _VEC.as_pointer())


def _splat(context: Any, builder: Any, x: Any, ty: Any) -> Any:
    if ty != types.float32:
        x = context.cast(builder, x, ty, types.float32)
    one = builder.insert_element(ir.Constant(_VEC, ir.Undefined), x,
                                 ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, ir.Constant(_VEC, ir.Undefined),
                                  ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0] * LANES))


@intrinsic
def vload(typingctx: Any, arr: Any, idx: Any) -> Any:
    """``arr[idx : idx + 16]`` as a vector."""
    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return builder.load(_lane_pointer(context, builder, sig.args[0], args[0], args[1]),
                            align=4)
    return f32x16(arr, idx), codegen


_QUAD = ir.VectorType(ir.FloatType(), 4)


def _quad(context: Any, builder: Any, arrty: Any, arr: Any, idx: Any) -> Any:
    ary = context.make_array(arrty)(context, builder, arr)
    ptr = cgutils.get_item_pointer(context, builder, arrty, ary, [idx], wraparound=False)
    return builder.load(builder.bitcast(ptr, _QUAD.as_pointer()), align=4)


def _mask(lanes: list[int]) -> Any:
    return ir.Constant(ir.VectorType(ir.IntType(32), len(lanes)), lanes)


@intrinsic
def vload4_rows(typingctx: Any, a0: Any, a1: Any, a2: Any, a3: Any, idx: Any) -> Any:
    """``a_i[idx : idx + 4]`` of four 1-D arrays, side by side (lanes 4i .. 4i + 3)."""
    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        q = [_quad(context, builder, sig.args[i], args[i], args[4]) for i in range(4)]
        low = builder.shuffle_vector(q[0], q[1], _mask(list(range(8))))
        high = builder.shuffle_vector(q[2], q[3], _mask(list(range(8))))
        return builder.shuffle_vector(low, high, _mask(list(range(16))))
    return f32x16(a0, a1, a2, a3, idx), codegen


@intrinsic
def vload4_tiled(typingctx: Any, arr: Any, idx: Any) -> Any:
    """``arr[idx : idx + 4]`` four times over (lanes 4i + m hold ``arr[idx + m]``)."""
    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        q = _quad(context, builder, sig.args[0], args[0], args[1])
        return builder.shuffle_vector(q, ir.Constant(_QUAD, ir.Undefined),
                                      _mask([m for _ in range(4) for m in range(4)]))
    return f32x16(arr, idx), codegen


@intrinsic
def vstore(typingctx: Any, arr: Any, idx: Any, v: Any) -> Any:
    """``arr[idx : idx + 16] = v``."""
    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        builder.store(args[2], _lane_pointer(context, builder, sig.args[0], args[0], args[1]),
                      align=4)
        return context.get_dummy_value()
    return types.void(arr, idx, v), codegen


@intrinsic
def vsplat(typingctx: Any, x: Any) -> Any:
    """``x`` (rounded to float32) in every lane."""
    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return _splat(context, builder, args[0], sig.args[0])
    return f32x16(x), codegen


@intrinsic
def vfma(typingctx: Any, a: Any, b: Any, c: Any) -> Any:
    """``a * b + c`` lane by lane, rounded once (``llvm.fma``)."""
    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_VEC, [_VEC, _VEC, _VEC]), "llvm.fma.v16f32")
        return builder.call(fn, args)
    return f32x16(a, b, c), codegen


@intrinsic
def vsqrt(typingctx: Any, a: Any) -> Any:
    """The square root of every lane, correctly rounded (``llvm.sqrt``, as ``np.sqrt``)."""
    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_VEC, [_VEC]), "llvm.sqrt.v16f32")
        return builder.call(fn, args)
    return f32x16(a), codegen


def _binary(op: str) -> Any:
    @intrinsic
    def vop(typingctx: Any, a: Any, b: Any) -> Any:
        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            return getattr(builder, op)(args[0], args[1])
        return f32x16(a, b), codegen
    return vop


vadd = _binary("fadd")
vadd.__doc__ = "``a + b`` lane by lane."
vsub = _binary("fsub")
vsub.__doc__ = "``a - b`` lane by lane."
vmul = _binary("fmul")
vmul.__doc__ = "``a * b`` lane by lane."
vdiv = _binary("fdiv")
vdiv.__doc__ = "``a / b`` lane by lane."


def _where(predicate: str) -> Any:
    @intrinsic
    def vwhere(typingctx: Any, a: Any, b: Any, x: Any, y: Any) -> Any:
        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            # Ordered comparisons: false where a lane is NaN, as Python's scalar ones.
            return builder.select(builder.fcmp_ordered(predicate, args[0], args[1]),
                                  args[2], args[3])
        return f32x16(a, b, x, y), codegen
    return vwhere


vwhere_lt = _where("<")
vwhere_lt.__doc__ = "``x`` where ``a < b``, else ``y``, lane by lane (NaN: ``y``)."
vwhere_le = _where("<=")
vwhere_le.__doc__ = "``x`` where ``a <= b``, else ``y``, lane by lane (NaN: ``y``)."
vwhere_gt = _where(">")
vwhere_gt.__doc__ = "``x`` where ``a > b``, else ``y``, lane by lane (NaN: ``y``)."
vwhere_eq = _where("==")
vwhere_eq.__doc__ = "``x`` where ``a == b``, else ``y``, lane by lane (NaN: ``y``)."


def _swap_bit(rows: list[Any], bit: int, builder: Any) -> list[Any]:
    """Swap bit ``bit`` of the row index with the same bit of the lane index: rows i and
    i | bit exchange the lanes where their own bit differs from the lane's."""
    low = _mask([c if not c & bit else LANES + (c ^ bit) for c in range(LANES)])
    high = _mask([c ^ bit if not c & bit else LANES + c for c in range(LANES)])
    out = list(rows)
    for i in range(LANES):
        if not i & bit:
            out[i] = builder.shuffle_vector(rows[i], rows[i | bit], low)
            out[i | bit] = builder.shuffle_vector(rows[i], rows[i | bit], high)
    return out


@intrinsic
def transpose16(typingctx: Any, src: Any, dst: Any, r0: Any, c0: Any) -> Any:
    """``dst[c0 + i, r0 + j] = src[r0 + j, c0 + i]`` for i, j < 16: a 16 x 16 block of a 2-D
    array with contiguous rows, transposed in registers (16 row loads, the four swaps of
    bits between row and lane, 16 row stores) into another."""
    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        src_ty, dst_ty = sig.args[0], sig.args[1]
        src_a = context.make_array(src_ty)(context, builder, args[0])
        dst_a = context.make_array(dst_ty)(context, builder, args[1])
        r0 = context.cast(builder, args[2], sig.args[2], types.intp)
        c0 = context.cast(builder, args[3], sig.args[3], types.intp)

        def row(ty: Any, ary: Any, i: Any, j: Any) -> Any:
            ptr = cgutils.get_item_pointer(context, builder, ty, ary, [i, j], wraparound=False)
            return builder.bitcast(ptr, _VEC.as_pointer())

        def plus(x: Any, k: int) -> Any:
            return builder.add(x, ir.Constant(x.type, k))

        rows = [builder.load(row(src_ty, src_a, plus(r0, j), c0), align=4) for j in range(LANES)]
        for bit in (1, 2, 4, 8):
            rows = _swap_bit(rows, bit, builder)
        for i in range(LANES):
            builder.store(rows[i], row(dst_ty, dst_a, plus(c0, i), r0), align=4)
        return context.get_dummy_value()
    return types.void(src, dst, r0, c0), codegen


@intrinsic
def vlane(typingctx: Any, v: Any, i: Any) -> Any:
    """Lane ``i`` of ``v`` (a float32), read from the register."""
    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        index = context.cast(builder, args[1], sig.args[1], types.int32)
        return builder.extract_element(args[0], index)
    return types.float32(v, i), codegen
