"""Loading pickles without running code: security code with its own threat model.

A features pickle comes from anywhere (a colleague, a download, the original project). A plain
``pickle.load`` runs whatever the file names; this loader builds only containers, scalars and
numpy arrays of numbers or fixed-size strings, checks every numpy call's arguments before numpy
sees them, never allocates more than the file holds, and meters the work reconstruction does
(depth, elements, hashing, characters) in proportion to the file's size: any file loads or is
refused in time and memory linear in its size. Its tests are ``tests/test_unpickle.py``; its fuzzer
is ``benchmarks/fuzz_unpickle.py``.
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

from deepfusion.errors import FeaturesFileError
from deepfusion.io.names import one_line
from deepfusion.io.pickle_meter import (_CONTAINERS, _MAPPINGS, _SCALARS, _SET_UNITS, _TEXT,
                                        WORK_FLOOR, WORK_PER_BYTE, CostMeter, _describe, _refuse)

# ----------------------------------------------------------------------------- safe unpickling
#
# pickle.Unpickler.find_class alone is not enough: numpy's C code trusts the state a pickle hands
# to ``dtype.__setstate__`` and ``ndarray.__setstate__``, and a crafted state crashes the process
# (or rewrites numpy's own float32 descriptor). So the unpickler below is the pure-Python one,
# which lets every call and every BUILD be checked: globals are replaced by functions that
# validate their arguments, a state is applied only to a dtype or array this load just created
# and only when it is one numpy itself writes, and no call can allocate more than the file holds.
# Bounding allocations is not enough either: the work is metered too (io/pickle_meter.py).

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


class _RestrictedUnpickler(CostMeter, pickle._Unpickler):  # type: ignore[name-defined]
    """Containers, scalars and numpy arrays of numbers or fixed-size strings; nothing else."""

    dispatch = {**pickle._Unpickler.dispatch, **CostMeter.dispatch}  # type: ignore[attr-defined]

    def __init__(self, file: IO[bytes], size: int):
        import numpy as np

        file = _BoundedReader(file, size)
        super().__init__(file)
        self._raw_readinto = file.readinto
        self._np = np
        self._size = size
        self._fresh: dict[int, Any] = {}          # id -> dtype/array awaiting its one BUILD
        # the meter: id -> [container, weight, depth, used]; it holds the container, so ids
        # are not reused during the load. A container not in it is empty and unused.
        self._budget = WORK_FLOOR + WORK_PER_BYTE * size
        self._work = 0
        self._info: dict[int, list] = {}
        self._same_hash: dict[int, dict[int, int]] = {}   # id(dict or set) -> hash -> keys
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
        raise _refuse(f"{module[:80]}.{name[:80]}")

    # -- what a pickle may call
    def _check_call(self, func: Any) -> None:
        if id(func) not in self._callables:
            raise _refuse(f"a call of {getattr(func, '__name__', type(func).__name__)}")

    def _call_type(self, cls: type, args: Any, kwargs: Optional[dict], make: Any) -> Any:
        """``make()`` (``cls(*args)`` or ``cls.__new__(cls, *args)``) for one of the plain types,
        once its arguments are known not to make it walk a shared structure: ``str``, ``int``,
        ``float``, ``complex`` and ``bool`` take only scalars (there is no features file that
        needs ``str(list)``); the containers take one flat iterable, whose copy and hashing are
        charged; ``slice`` takes anything (it only holds it). The result is weighed."""
        if not isinstance(args, tuple) or (kwargs is not None and type(kwargs) not in _MAPPINGS):
            raise _refuse(f"a call of {cls.__name__} with {_describe(args)}")
        values = list(args) + list((kwargs or {}).values())
        if kwargs and not all(type(k) is str for k in kwargs):
            raise _refuse(f"a call of {cls.__name__} with keywords that are not names")
        if cls is slice:
            if len(values) > 3:
                raise _refuse(f"a slice of {len(values)} values")
        elif cls in (str, int, float, complex, bool):
            for value in values:
                if not isinstance(value, _SCALARS):
                    raise _refuse(f"a call of {cls.__name__} on {_describe(value)}")
                if cls is not str and isinstance(value, _TEXT) and len(value) > 5000:
                    raise _refuse(f"{cls.__name__}() of {len(value)} characters")
            if cls is str and not all(isinstance(v, _TEXT) for v in values):
                raise _refuse(f"a call of str on {', '.join(_describe(v) for v in values)}")
            self._charge(sum(len(v) for v in values if isinstance(v, _TEXT)))
        else:  # tuple, list, set, frozenset, dict, OrderedDict: copy one iterable
            if len(values) > 1 and not (cls in _MAPPINGS and len(args) <= 1):
                raise _refuse(f"a call of {cls.__name__} with {len(values)} arguments")
            for value in args:
                if type(value) not in _CONTAINERS - {slice} and not isinstance(value, _TEXT):
                    raise _refuse(f"a {cls.__name__} from {_describe(value)}")
                self._charge(len(value))
                if cls in (set, frozenset):
                    self._hash_keys(value)
                elif cls in _MAPPINGS:
                    if type(value) in _MAPPINGS:
                        self._hash_keys(value.keys())
                    elif not isinstance(value, _TEXT):
                        if not all(type(p) in (tuple, list) and len(p) == 2 for p in value):
                            raise _refuse(f"a {cls.__name__} from {_describe(value)}")
                        self._hash_keys([p[0] for p in value])
        if cls in (set, frozenset):
            self._charge(_SET_UNITS)
        result = make()
        if type(result) in _MAPPINGS:
            return self._build(result, [x for kv in result.items() for x in kv])
        if type(result) is slice:
            return self._build(result, [result.start, result.stop, result.step])
        if type(result) in _CONTAINERS:
            return self._build(result, result)
        return result

    def _call(self, func: Any, args: Any) -> Any:
        self._check_call(func)
        if isinstance(func, type):
            return self._call_type(func, args, None, lambda: func(*args))
        if not isinstance(args, (tuple, list)):
            raise _refuse(f"a call of {func.__name__} with {_describe(args)}")
        return func(*args)

    def load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)
    dispatch[pickle.REDUCE[0]] = load_reduce

    def _new(self, cls: Any, args: tuple, kwargs: Optional[dict] = None) -> Any:
        if not (isinstance(cls, type) and (cls in _SAFE_TYPES or cls is collections.OrderedDict)):
            raise _refuse(f"an object of {getattr(cls, '__name__', type(cls).__name__)}")
        return self._call_type(cls, args, kwargs,
                               lambda: cls.__new__(cls, *args, **(kwargs or {})))

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
        self.append(self._call(klass, tuple(args)))

    def load_build(self) -> None:
        state = self.stack[-1]
        inst = self.stack[-2]
        if self._fresh.pop(id(inst), None) is not inst:
            raise _refuse(f"a state for {type(inst).__name__}")
        if isinstance(inst, self._np.dtype):
            self._check_dtype_state(inst, state)
        else:
            self._check_array_state(state)
            self._charge(len(state[4]))
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
            if len(args) > 1 and not (type(args[1]) is str and args[1].lower() in _TEXT_CODECS):
                raise _refuse(f"the codec {_describe(args[1])}")
            if len(args) > 2 and type(args[2]) is not str:
                raise _refuse(f"the error handler {_describe(args[2])}")
            if args:   # a copy of a string, of bytes or of a flat list of small ints
                if not (isinstance(args[0], _TEXT) or type(args[0]) in (list, tuple)):
                    raise _refuse(f"{kind.__name__} from {_describe(args[0])}")
                self._charge(len(args[0]))
            return kind(*args)
        make.__name__ = kind.__name__
        return make

    def _encode(self, obj: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
        if not (isinstance(obj, str) and type(encoding) is str and encoding.lower() in _TEXT_CODECS
                and type(errors) is str):
            raise _refuse(f"the codec {_describe(encoding)}")
        self._charge(len(obj))
        return obj.encode(encoding, errors)

    def _dtype(self, spec: Any, align: Any = False, copy: Any = True) -> Any:
        if not isinstance(spec, str) or not _DTYPE_SPEC.match(spec):
            raise _refuse(f"dtype {_describe(spec)} (only numbers, booleans and fixed-size strings)")
        base = self._np.dtype(spec)
        if base.kind not in _ARRAY_KINDS or not 0 < base.itemsize <= self._size + 64:
            raise _refuse(f"dtype {spec!r}")
        dtype = self._np.dtype(base, copy=True)   # never numpy's shared descriptor
        self._fresh[id(dtype)] = dtype
        return dtype

    def _check_dtype(self, dtype: Any) -> Any:
        np = self._np
        if not isinstance(dtype, np.dtype) or dtype.kind not in _ARRAY_KINDS or dtype.names \
                or dtype.subdtype is not None:
            raise _refuse(f"an array of dtype {dtype if isinstance(dtype, np.dtype) else _describe(dtype)}")
        return dtype

    def _check_dtype_state(self, dtype: Any, state: Any) -> None:
        expected = dtype.__reduce__()[2]         # the state numpy writes for this dtype
        orders = "<>" if expected[1] in "<>=" else expected[1]   # '|': no byte order to set
        if not (isinstance(state, tuple) and len(state) == len(expected)
                and state[0] == expected[0] and state[1] in tuple(orders)
                and state[2:] == expected[2:]):
            raise _refuse(f"dtype state {_describe(state)}")

    def _check_shape(self, shape: Any, dtype: Any, nbytes: int) -> None:
        if not (isinstance(shape, tuple) and len(shape) <= 32
                and all(type(n) is int and 0 <= n <= nbytes + (1 << 20) for n in shape)):
            raise _refuse(f"array shape {_describe(shape)}")
        if math.prod(shape) * dtype.itemsize != nbytes:
            raise _refuse(f"array shape {shape} of {dtype} over {nbytes} bytes of data")

    def _reconstruct(self, subtype: Any, shape: Any, typecode: Any) -> Any:
        if subtype is not self._np.ndarray:
            raise _refuse(f"an array of type {_describe(subtype)}")
        array = self._np.ndarray((0,), self._np.uint8)   # filled by its BUILD
        self._fresh[id(array)] = array
        return array

    def _check_array_state(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5 and type(state[0]) is int
                and state[0] == 1 and type(state[3]) in (bool, int)
                and isinstance(state[4], (bytes, bytearray))):
            raise _refuse(f"array state {_describe(state)}")
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
        if not isinstance(buf, (bytes, bytearray)) or type(order) is not str \
                or order not in ("C", "F", "K"):
            raise _refuse(f"an array from {type(buf).__name__} in order {_describe(order)}")
        self._check_shape(shape, dtype, len(buf))
        array = self._np.frombuffer(buf, dtype=dtype)
        if order == "K" and axis_order is not None:
            if not (type(axis_order) in (tuple, list) and len(axis_order) == len(shape)
                    and all(type(i) is int for i in axis_order)
                    and sorted(axis_order) == list(range(len(shape)))):
                raise _refuse(f"axis order {_describe(axis_order)}")
            return array.reshape(shape, order="C").transpose(axis_order)
        return array.reshape(shape, order="F" if order == "F" else "C")


def safe_pickle_load(path: Path) -> Any:
    """Load a pickle that may hold only builtin containers/scalars and numpy arrays: anything
    else (a class, a function, ``os.system``) is refused before it can run, and the arguments
    of every numpy call are checked before numpy sees them. A missing, unreadable, truncated or
    unsafe file raises FeaturesFileError naming the file and the reason."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            unpickler = _RestrictedUnpickler(io.BufferedReader(fh, buffer_size=1 << 20), size)
            collecting = gc.isenabled()
            gc.disable()   # a load makes no cycles (the meter refuses them): nothing to collect
            try:
                return unpickler.load()
            finally:
                # the unpickler sits in a reference cycle (its dispatch holds bound methods)
                # and its memo holds every object it built: collected only by the cycle
                # collector, it would keep a second copy of the features alive
                unpickler.memo.clear()
                unpickler._info.clear()
                del unpickler
                if collecting:
                    gc.enable()
                gc.collect()
    except FileNotFoundError:
        raise FeaturesFileError(f"{path}: features file not found; run deepfusion extract "
                                "first, or give --features") from None
    except IsADirectoryError:
        raise FeaturesFileError(f"{path}: a folder, not a features file; give the --out of "
                                "deepfusion extract") from None
    except pickle.UnpicklingError as exc:
        msg = one_line(exc, 300)
        if msg.startswith("refused"):
            raise FeaturesFileError(f"{path}: unsafe pickle, {msg} (only containers, "
                                    "numbers, strings and numpy arrays are allowed)") from None
        short = "truncated" in msg or "exhausted before" in msg or "ran out of input" in msg.lower()
        raise FeaturesFileError(_damaged(path, "cut short" if short else
                                         f"not a well-formed pickle: {msg}")) from None
    except EOFError:
        raise FeaturesFileError(_damaged(path, "cut short")) from None
    except RecursionError:
        raise FeaturesFileError(_damaged(path, "nested too deep")) from None
    except MemoryError:
        raise FeaturesFileError(f"{path}: too large to load here (out of memory)") from None
    except Exception:  # noqa: BLE001 - whatever a damaged stream makes the loader raise
        # the reason's text is never printed: a pickle chose it (a KeyError's is its key)
        raise FeaturesFileError(_damaged(path, "not a well-formed pickle")) from None


def _damaged(path: Path, reason: str) -> str:
    """The line of a file the unpickler could not read: a damaged pickle (it starts as one
    does), or no pickle at all."""
    try:
        with open(path, "rb") as fh:
            pickled = fh.read(1) == b"\x80"      # PROTO: every pickle of protocol 2 or later
    except OSError:
        pickled = False
    if pickled:
        return f"{path}: damaged features file ({reason}); run deepfusion extract again"
    return f"{path}: not a features file (not a pickle); give the --out of deepfusion extract"

