"""Array views for compiled loops: borrowed ones, and reshapes without numba's checks.

Every array numba creates from another (a slice, a row, a reshape) and every array passed
to a function it did not inline takes a reference to the memory's owner and gives it back
later: two atomic operations, each a full memory barrier on x86. In the compiled A2C loop,
a few hundred small views per update (a member's weights, rows of a rollout) cost about a
tenth of its time (measured with ``perf``). A :func:`borrowed` array is the same array
without an owner (a null ``meminfo``), so the views made from it count nothing. numba's
``reshape`` also calls a C helper every time, even for a contiguous array; :func:`view`
reshapes a C-contiguous array inline.
"""

from __future__ import annotations

from typing import Any, cast

import numba
from numba.core import cgutils, errors, types
from numba.extending import intrinsic as _numba_intrinsic
from numba.extending import overload

__all__ = ["borrowed", "borrowed_list", "flat", "view"]

intrinsic: Any = _numba_intrinsic
_JIT: Any = {"cache": True, "nogil": True}


def _borrow(context: Any, builder: Any, ty: Any, value: Any) -> Any:
    """``value`` of type ``ty`` with every array in it (also inside tuples) ownerless; any
    other value as a new reference to itself."""
    if isinstance(ty, types.Array):
        src = context.make_array(ty)(context, builder, value)
        out = context.make_array(ty)(context, builder)
        for field in ("nitems", "itemsize", "data", "shape", "strides"):
            setattr(out, field, getattr(src, field))
        out.meminfo = cgutils.get_null_value(out.meminfo.type)
        out.parent = cgutils.get_null_value(out.parent.type)
        return out._getvalue()
    if isinstance(ty, types.BaseTuple):
        items = [_borrow(context, builder, t, builder.extract_value(value, i))
                 for i, t in enumerate(cast(Any, ty))]
        return context.make_tuple(builder, ty, items)
    context.nrt.incref(builder, ty, value)
    return value


@intrinsic
def borrowed(typingctx: Any, value: Any) -> Any:
    """``value`` (an array, or a tuple or named tuple holding arrays) with its arrays
    borrowed: the same memory, shapes and strides, no owner. Only for arrays that outlive
    every use of the borrowed ones: a compiled call's arguments (its caller keeps them
    alive), never an array allocated in the same call (numba frees that after its last
    named use, which may come before the borrowed view's last)."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return _borrow(context, builder, value, args[0])

    return value(value), codegen


@numba.njit(**_JIT)
def borrowed_list(arrays: Any) -> Any:
    """A new typed list of ``arrays``' items, :func:`borrowed`. For compiled code only:
    returned to Python, its arrays would outlive nothing that keeps their memory."""
    out = numba.typed.List()
    for a in arrays:
        out.append(borrowed(a))
    return out


@intrinsic
def view(typingctx: Any, arr: Any, shape: Any) -> Any:
    """The first ``prod(shape)`` elements of a C-contiguous array as a C-contiguous array of
    ``shape`` (an int or a tuple of ints), sharing its memory and owner (``arr.reshape``
    where that is the same size). A shape larger than the array raises ValueError."""
    if not isinstance(arr, types.Array) or arr.layout != "C":
        raise errors.TypingError(f"view() takes a C-contiguous array, not {arr}")
    dims = list(cast(Any, shape)) if isinstance(shape, types.BaseTuple) else [shape]
    if not all(isinstance(d, types.Integer) for d in dims):
        raise errors.TypingError(f"view() takes a shape of ints, not {shape}")
    out_type = arr.copy(ndim=len(dims), layout="C")

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        src = context.make_array(arr)(context, builder, args[0])
        sizes = ([builder.extract_value(args[1], i) for i in range(len(dims))]
                 if isinstance(shape, types.BaseTuple) else [args[1]])
        sizes = [context.cast(builder, s, t, types.intp) for s, t in zip(sizes, dims, strict=True)]
        strides: list[Any] = []
        stride = src.itemsize
        for size in reversed(sizes):
            strides.insert(0, stride)
            stride = builder.mul(stride, size)
        nbytes = builder.mul(src.nitems, src.itemsize)
        with builder.if_then(builder.icmp_signed(">", stride, nbytes), likely=False):
            context.call_conv.return_user_exc(builder, ValueError,
                                              ("view() larger than its array",))
        out = context.make_array(out_type)(context, builder)
        context.populate_array(out, data=src.data, shape=sizes, strides=strides,
                               itemsize=src.itemsize, meminfo=src.meminfo, parent=src.parent)
        context.nrt.incref(builder, out_type, out._getvalue())
        return out._getvalue()

    return out_type(arr, shape), codegen


def flat(arr):  # type: ignore[no-untyped-def]  # (numba matches its overload by names only)
    """``arr.reshape(-1)``: inline (:func:`view`) where ``arr`` is C-contiguous."""
    return arr.reshape(-1)


@overload(flat, jit_options=_JIT)
def _flat(arr):  # type: ignore[no-untyped-def]  # (its parameters must read as its stub's)
    if isinstance(arr, types.Array) and arr.layout == "C":
        return lambda arr: view(arr, arr.size)
    return lambda arr: arr.reshape(-1)
