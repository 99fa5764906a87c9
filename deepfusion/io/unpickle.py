"""Loading pickles without running code: security code with its own threat model.

A features pickle comes from anywhere (a colleague, a download, the original project). A plain
``pickle.load`` runs whatever the file names; this loader builds only containers, scalars and
numpy arrays of numbers or fixed-size strings, checks every numpy call's arguments before numpy
sees them, and never allocates more than the file holds. Its tests are ``tests/test_unpickle.py``.
"""

from __future__ import annotations

import _compat_pickle
import collections
import gc
import io
import math
import os
import pickle
import re
import struct
from pathlib import Path
from typing import IO, Any, Optional

from ..errors import FeaturesFileError

# ----------------------------------------------------------------------------- safe unpickling
#
# pickle.Unpickler.find_class alone is not enough: numpy's C code trusts the state a pickle hands
# to ``dtype.__setstate__`` and ``ndarray.__setstate__``, and a crafted state crashes the process
# (or rewrites numpy's own float32 descriptor). So the unpickler below is the pure-Python one,
# which lets every call and every BUILD be checked: globals are replaced by functions that
# validate their arguments, a state is applied only to a dtype or array this load just created
# and only when it is one numpy itself writes, and no call can allocate more than the file holds.

#: Plain builtins a pickle may call or name (``range`` is left out: ``list(range(10**10))``).
_SAFE_TYPES = frozenset({dict, list, tuple, set, frozenset, str, int, float, complex, bool, slice})
#: dtype kinds an array may have: bool, integers, floats, complex, fixed-size strings (no objects).
_ARRAY_KINDS = "biufcSU"
_DTYPE_SPEC = re.compile(r"^[biufcSU][0-9]{1,7}$")
_TEXT_CODECS = {"latin1", "latin-1", "iso-8859-1", "utf-8", "utf8", "ascii"}


class _BoundedReader:
    """A file whose reads never ask for more than it holds (a length field may say 2**60)."""

    def __init__(self, fh: IO[bytes], size: int):
        self._fh, self._size = fh, size
        self.readline = fh.readline

    def _check(self, n: int) -> None:
        if n > 1 << 16 and n > self._size - self._fh.tell():
            raise pickle.UnpicklingError(f"pickle data was truncated ({n} bytes announced)")

    def read(self, n: int = -1) -> bytes:
        self._check(n)
        return self._fh.read(n)

    def readinto(self, buf: Any) -> int:
        self._check(len(buf))
        return self._fh.readinto(buf)


def _refuse(what: str) -> pickle.UnpicklingError:
    return pickle.UnpicklingError(f"refused to load {what}")


class _RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """Containers, scalars and numpy arrays of numbers or fixed-size strings; nothing else."""

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(self, file: IO[bytes], size: int):
        import numpy as np

        file = _BoundedReader(file, size)
        super().__init__(file)
        self._raw_readinto = file.readinto
        self._np = np
        self._size = size
        self._fresh: dict[int, Any] = {}          # id -> dtype/array awaiting its one BUILD
        np_calls = {"_reconstruct": self._reconstruct, "scalar": self._scalar,
                    "_frombuffer": self._frombuffer}
        self._globals: dict[tuple[str, str], Any] = {
            **{("builtins", t.__name__): t for t in _SAFE_TYPES},
            ("builtins", "bytes"): self._bytes_maker(bytes),
            ("builtins", "bytearray"): self._bytes_maker(bytearray),
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("_codecs", "encode"): self._encode,  # how protocols 0-2 spell bytes
            ("numpy", "ndarray"): np.ndarray,     # a value only: calling it is refused
            ("numpy", "dtype"): self._dtype,
            **{(mod, name): call for mod in ("numpy.core.multiarray", "numpy._core.multiarray",
                                             "numpy.core.numeric", "numpy._core.numeric")
               for name, call in np_calls.items()},
        }
        self._callables = {id(v) for v in self._globals.values() if v is not np.ndarray}

    # -- what a pickle may name
    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3 and (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif self.proto < 3:
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = self._globals.get((module, name))
        if found is not None:
            return found
        # numpy's per-type dtype classes (numpy.dtypes.Float32DType) are data, not code
        if module == "numpy.dtypes" and re.fullmatch(r"[A-Za-z0-9]+DType", name):
            found = getattr(self._np.dtypes, name, None)
            if isinstance(found, type):
                return found
        raise _refuse(f"{module}.{name}")

    # -- what a pickle may call
    def _check_call(self, func: Any) -> None:
        if id(func) not in self._callables:
            raise _refuse(f"a call of {getattr(func, '__name__', type(func).__name__)}")

    def load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        self._check_call(func)
        self.stack[-1] = func(*args)
    dispatch[pickle.REDUCE[0]] = load_reduce

    def _new(self, cls: Any, args: tuple, kwargs: Optional[dict] = None) -> Any:
        if not (isinstance(cls, type) and (cls in _SAFE_TYPES or cls is collections.OrderedDict)):
            raise _refuse(f"an object of {getattr(cls, '__name__', type(cls).__name__)}")
        return cls.__new__(cls, *args, **(kwargs or {}))

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args))
    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args, kwargs))
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def _instantiate(self, klass: Any, args: list) -> None:  # INST and OBJ (protocols 0-1)
        self._check_call(klass)
        self.append(klass(*args))

    def load_build(self) -> None:
        state = self.stack[-1]
        inst = self.stack[-2]
        if self._fresh.pop(id(inst), None) is not inst:
            raise _refuse(f"a state for {type(inst).__name__}")
        if isinstance(inst, self._np.dtype):
            self._check_dtype_state(inst, state)
        else:
            self._check_array_state(state)
        self.stack.pop()
        inst.__setstate__(state)
    dispatch[pickle.BUILD[0]] = load_build

    def load_bytearray8(self) -> None:
        (size,) = struct.unpack("<Q", self.read(8))
        if size > self._size:  # checked before bytearray(size) fills that much memory
            raise pickle.UnpicklingError(f"pickle data was truncated ({size} bytes announced)")
        buf = bytearray(size)
        frame = self._unframer.current_frame
        if frame is not None and frame.tell() < len(frame.getbuffer()):
            self.readinto(buf)
        else:  # outside a frame (every large array): straight from the file, one copy
            self._unframer.current_frame = None
            if self._raw_readinto(buf) != size:
                raise pickle.UnpicklingError("pickle data was truncated")
        self.append(buf)
    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8

    # -- the replacements of the globals
    def _bytes_maker(self, kind: type):
        def make(*args: Any) -> Any:
            if args and isinstance(args[0], int):  # bytes(10**12): memory the file never held
                raise _refuse(f"{kind.__name__} of a given size")
            if len(args) > 1 and str(args[1]).lower() not in _TEXT_CODECS:
                raise _refuse(f"the codec {args[1]!r}")
            return kind(*args)
        make.__name__ = kind.__name__
        return make

    def _encode(self, obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        if not isinstance(obj, str) or str(encoding).lower() not in _TEXT_CODECS:
            raise _refuse(f"the codec {encoding!r}")
        return obj.encode(encoding, errors)

    def _dtype(self, spec: Any, align: Any = False, copy: Any = True) -> Any:
        if not isinstance(spec, str) or not _DTYPE_SPEC.match(spec):
            raise _refuse(f"dtype {spec!r} (only numbers, booleans and fixed-size strings)")
        base = self._np.dtype(spec)
        if base.kind not in _ARRAY_KINDS or base.itemsize > self._size + 64:
            raise _refuse(f"dtype {spec!r}")
        dtype = self._np.dtype(base, copy=True)   # never numpy's shared descriptor
        self._fresh[id(dtype)] = dtype
        return dtype

    def _check_dtype(self, dtype: Any) -> Any:
        np = self._np
        if not isinstance(dtype, np.dtype) or dtype.kind not in _ARRAY_KINDS or dtype.names \
                or dtype.subdtype is not None:
            raise _refuse(f"an array of dtype {dtype!r}")
        return dtype

    def _check_dtype_state(self, dtype: Any, state: Any) -> None:
        expected = dtype.__reduce__()[2]         # the state numpy writes for this dtype
        orders = "<>" if expected[1] in "<>=" else expected[1]   # '|': no byte order to set
        if not (isinstance(state, tuple) and len(state) == len(expected)
                and state[0] == expected[0] and state[1] in tuple(orders)
                and state[2:] == expected[2:]):
            raise _refuse(f"dtype state {state!r:.80}")

    def _check_shape(self, shape: Any, dtype: Any, nbytes: int) -> None:
        if not (isinstance(shape, tuple) and len(shape) <= 32
                and all(type(n) is int and n >= 0 for n in shape)):
            raise _refuse(f"array shape {shape!r:.80}")
        if math.prod(shape) * dtype.itemsize != nbytes:
            raise _refuse(f"array shape {shape} of {dtype} over {nbytes} bytes of data")

    def _reconstruct(self, subtype: Any, shape: Any, typecode: Any) -> Any:
        if subtype is not self._np.ndarray:
            raise _refuse(f"an array of type {subtype!r:.80}")
        array = self._np.ndarray((0,), self._np.uint8)   # filled by its BUILD
        self._fresh[id(array)] = array
        return array

    def _check_array_state(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1
                and type(state[3]) in (bool, int) and isinstance(state[4], (bytes, bytearray))):
            raise _refuse(f"array state {state!r:.80}")
        dtype = self._check_dtype(state[2])
        self._check_shape(state[1], dtype, len(state[4]))

    def _scalar(self, dtype: Any, data: Any = None) -> Any:
        dtype = self._check_dtype(dtype)
        if not isinstance(data, bytes) or len(data) != dtype.itemsize:
            raise _refuse(f"a scalar of {dtype} from {type(data).__name__}")
        return self._np.frombuffer(data, dtype)[0]

    def _frombuffer(self, buf: Any, dtype: Any, shape: Any, order: Any,
                    axis_order: Any = None) -> Any:
        dtype = self._check_dtype(dtype)
        if not isinstance(buf, (bytes, bytearray)) or order not in ("C", "F", "K"):
            raise _refuse(f"an array from {type(buf).__name__} in order {order!r:.20}")
        self._check_shape(shape, dtype, len(buf))
        array = self._np.frombuffer(buf, dtype=dtype)
        if order == "K" and axis_order is not None:
            if sorted(axis_order) != list(range(len(shape))):
                raise _refuse(f"axis order {axis_order!r:.80}")
            return array.reshape(shape, order="C").transpose(axis_order)
        return array.reshape(shape, order="F" if order == "F" else "C")


def safe_pickle_load(path: Path) -> Any:
    """Load a pickle that may hold only builtin containers/scalars and numpy arrays.

    Anything else (a class, a function, ``os.system``) is refused before it can run, and the
    arguments of every numpy call are checked before numpy sees them.

    Raises
    ------
    FeaturesFileError
        Missing, unreadable, truncated or unsafe file; the message names the file and reason.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            unpickler = _RestrictedUnpickler(io.BufferedReader(fh, buffer_size=1 << 20), size)
            try:
                return unpickler.load()
            finally:
                # the unpickler sits in a reference cycle (its dispatch holds bound methods)
                # and its memo holds every object it built: collected only by the cycle
                # collector, it would keep a second copy of the features alive
                unpickler.memo.clear()
                del unpickler
                gc.collect()
    except FileNotFoundError:
        raise FeaturesFileError(f"{path}: features file not found") from None
    except IsADirectoryError:
        raise FeaturesFileError(f"{path}: is a folder, not a features file") from None
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        if msg.startswith("refused"):
            raise FeaturesFileError(f"{path}: unsafe pickle, {msg} (only containers, "
                                    "numbers, strings and numpy arrays are allowed)") from None
        raise FeaturesFileError(f"{path}: not a readable pickle ({msg})") from None
    except Exception as exc:  # noqa: BLE001 - whatever a damaged stream makes the loader raise
        reason = f"{type(exc).__name__}: {exc}"[:300]
        raise FeaturesFileError(f"{path}: not a readable pickle ({reason})") from None
