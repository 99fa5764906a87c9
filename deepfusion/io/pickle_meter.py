"""The meter of :mod:`deepfusion.io.unpickle`: the work a pickle's reconstruction may do.

Bounding allocations is not enough either: the memo lets a few bytes name one object many times,
so 30 levels of ``a = [a, a]`` (270 bytes) describe 2**30 paths, and whatever walks them
(``str``, ``repr``, hashing a tuple key, comparing two keys) works for minutes and fills
gigabytes. Hence the meter below: every container is weighed as it is built (its weight is
what a walk of it visits: one per container and per item, plus the characters of strings,
counted once per path), from the weights of its items, O(1) per item; a container is never
changed after it was placed in another (a legitimate pickle fills each container before using
it), so a weight never goes stale and no cycle forms. Nothing heavier than the budget (a floor
plus a multiple of the file size) or deeper than MAX_DEPTH is built, hashing and copying are
charged to the same budget, keys whose hashes coincide are counted (hash flooding), and no type
is called on a container when the call would walk it (``str(list)``). A refusal is one line.
"""

from __future__ import annotations

import collections
import math
import pickle
from typing import Any, Optional

#: The work (elements visited, characters, bytes copied) a load may do, and the weight any one
#: object it builds may have: a floor so that small files load, plus this much per byte of file.
#: A legitimate features file weighs less than its size (an array weighs the bytes of the
#: elements its repr prints).
WORK_FLOOR, WORK_PER_BYTE = 1 << 20, 8
#: Nesting a load may build (a features file nests 4 deep: list, clip, features, array).
MAX_DEPTH = 64
#: Keys of one dict or set whose hashes coincide (ints, floats, tuples hash predictably: n of
#: them cost n**2 comparisons); strings hash with a secret seed and are not counted.
MAX_SAME_HASH = 32
#: Bits an int in a container may have: below the 4300 digits Python prints, so that whatever
#: reads the file can print its numbers.
MAX_INT_BITS = 14_000
#: A PUT's memo index (binary PUTs take 4 bytes; a text PUT could name colliding huge ints).
MAX_MEMO_INDEX = 1 << 32

#: What an empty set costs the meter: a 1 MB file of EMPTY_SET opcodes would take 230 MB.
_SET_UNITS = 16

_MAPPINGS = (dict, collections.OrderedDict)
_MUTABLE = frozenset({list, dict, set, collections.OrderedDict})
_CONTAINERS = frozenset({list, tuple, dict, set, frozenset, collections.OrderedDict, slice})
_SCALARS = (type(None), bool, int, float, complex, str, bytes, bytearray)
_UNITS = frozenset({type(None), bool, float, complex})   # weight 1, depth 0
_TEXT = (str, bytes, bytearray)


def _refuse(what: str) -> pickle.UnpicklingError:
    return pickle.UnpicklingError(f"refused to load {what}")


def _too_costly(what: str) -> pickle.UnpicklingError:
    return pickle.UnpicklingError(f"refused to load {what}: more work than a file of this size "
                                  "can need (objects that share themselves, or copies of them)")


def _describe(obj: Any) -> str:
    """A short, safe description of ``obj`` for a message: never its full repr, which for a
    pickle's shared containers could be exponentially long."""
    kind = type(obj)
    if kind in (str, bytes, bytearray):
        return repr(obj[:40]) + ("..." if len(obj) > 40 else "")
    if kind is int and obj.bit_length() > 64:
        return f"an int of {obj.bit_length()} bits"
    if kind in (type(None), bool, int, float, complex):
        return repr(obj)
    if kind in (tuple, list) and len(obj) <= 8 and all(
            type(x) in (type(None), bool, int, float, str) and (type(x) is not int or
                                                              x.bit_length() <= 64)
            and (type(x) is not str or len(x) <= 40) for x in obj):
        return repr(obj)
    if kind in _CONTAINERS:
        return f"a {kind.__name__} of {len(obj) if kind is not slice else 3} items"
    return f"a {kind.__name__}"


class CostMeter:
    """The weighing half of the restricted unpickler (a mixin of ``pickle._Unpickler``): the
    opcodes that build or fill containers, each weighed, and the memo indices it allows.
    Its :attr:`dispatch` entries go over the pure-Python unpickler's."""

    dispatch: dict = {}

    # -- the meter
    def _charge(self, units: int, what: str = "a pickle") -> None:
        self._work += units
        if self._work > self._budget:
            raise _too_costly(what)

    def _measure(self, obj: Any) -> tuple[int, int]:
        """(weight, depth) of ``obj``: O(1), from what was recorded when it was built."""
        kind = type(obj)
        if kind in _CONTAINERS:
            info = self._info.get(id(obj))
            return (info[1], info[2]) if info is not None else (1, 1)
        if kind is str or kind is bytes or kind is bytearray:
            return 1 + len(obj), 0
        if kind is int:
            return 1 + obj.bit_length() // 64, 0
        if kind is self._np.ndarray:
            # what its repr prints, in bytes: every element up to numpy's threshold, else 3 at
            # each end of every axis (so arrays shared by many clips weigh little)
            shown = obj.size if obj.size <= 1000 else math.prod(min(n, 6) for n in obj.shape)
            return 1 + shown * obj.itemsize, 0
        if isinstance(obj, self._np.generic):
            return 1 + obj.nbytes, 0
        return 1, 0

    def _contents(self, items: Any) -> tuple[int, int]:
        """Total weight and greatest depth of ``items``, which are being placed in a container:
        the mutable ones among them are marked used, never to change again."""
        weight = depth = 0
        info_of = self._info
        for item in items:    # _measure inlined for the common kinds: this runs per element
            kind = type(item)
            if kind in _UNITS:
                weight += 1
            elif kind is str or kind is bytes:
                weight += 1 + len(item)
            elif kind is int:
                bits = item.bit_length()
                if bits > MAX_INT_BITS:
                    raise _refuse(f"an int of {bits} bits (at most {MAX_INT_BITS})")
                weight += 1 + bits // 64
            elif kind in _CONTAINERS:
                info = info_of.get(id(item))
                if info is None:
                    info = [item, 1, 1, False]
                    if kind in _MUTABLE:
                        info_of[id(item)] = info
                if kind in _MUTABLE:
                    info[3] = True
                weight += info[1]
                if info[2] > depth:
                    depth = info[2]
            else:
                weight += self._measure(item)[0]
        return weight, depth

    def _record(self, obj: Any, weight: int, depth: int) -> Any:
        """Record a container built from items of this total weight and depth; refuse it when
        walking it would cost more than the budget or it nests too deep."""
        if weight + 1 > self._budget:
            raise _too_costly(f"a {type(obj).__name__} that expands to {weight} elements")
        if depth + 1 > MAX_DEPTH:
            raise _refuse(f"containers nested more than {MAX_DEPTH} deep")
        info = self._info.get(id(obj))
        if info is None:
            self._info[id(obj)] = [obj, weight + 1, depth + 1, False]
        else:
            info[1], info[2] = weight + 1, depth + 1
        return obj

    def _build(self, obj: Any, items: Any) -> Any:
        """``obj``, a new container holding ``items``, weighed and recorded."""
        weight, depth = self._contents(items)
        self._charge(len(items))
        return self._record(obj, weight, depth) if weight else obj

    def _hash_keys(self, keys: Any, owner: Any = None) -> None:
        """Charge the hashing of ``keys`` (each walks its whole weight) and count the keys whose
        hashes coincide in one dict or set: ``owner``, which keeps its tally across SETITEMS,
        or a new one."""
        counts: Optional[dict[int, int]] = None
        for key in keys:
            if isinstance(key, (str, bytes)):   # hashed with a secret seed, and only once
                self._charge(1)
                continue
            weight, depth = self._measure(key)
            self._charge(weight, "a key that takes too long to hash")
            if depth > 16:
                raise _refuse(f"a key nested {depth} deep")
            if counts is None:
                counts = {} if owner is None else self._same_hash.setdefault(id(owner), {})
            h = hash(key)
            n = counts[h] = counts.get(h, 0) + 1
            if n > MAX_SAME_HASH:
                raise _refuse(f"more than {MAX_SAME_HASH} keys with one hash in a dict or set "
                              "(hash flooding)")

    def _grow(self, target: Any, items: list, kinds: tuple, keys: Any = ()) -> None:
        """Check that ``items`` may be added to ``target`` (APPEND, SETITEM, ADDITEMS) and
        record the growth; the caller then adds them."""
        if type(target) not in kinds:
            raise _refuse(f"adding items to {_describe(target)}")
        info = self._info.get(id(target))
        if info is not None and info[3]:
            raise _refuse(f"a {type(target).__name__} changed after it was used "
                          "(a pickle writes each container whole)")
        for item in items:
            if item is target:
                raise _refuse(f"a {type(target).__name__} that holds itself")
        if keys:
            self._hash_keys(keys, target)
        weight, depth = self._contents(items)
        self._charge(len(items))
        if info is None:
            self._record(target, weight, depth)
        else:
            self._record(target, info[1] - 1 + weight, max(info[2] - 1, depth))

    # -- the opcodes that build or fill containers, each weighed
    def load_tuple(self) -> None:
        items = self.pop_mark()
        self.append(self._build(tuple(items), items))
    dispatch[pickle.TUPLE[0]] = load_tuple

    def load_tuple1(self) -> None:
        self.stack[-1] = self._build((self.stack[-1],), self.stack[-1:])
    dispatch[pickle.TUPLE1[0]] = load_tuple1

    def load_tuple2(self) -> None:
        self.stack[-2:] = [self._build((self.stack[-2], self.stack[-1]), self.stack[-2:])]
    dispatch[pickle.TUPLE2[0]] = load_tuple2

    def load_tuple3(self) -> None:
        items = self.stack[-3:]
        self.stack[-3:] = [self._build(tuple(items), items)]
    dispatch[pickle.TUPLE3[0]] = load_tuple3

    def load_list(self) -> None:
        items = self.pop_mark()
        self.append(self._build(items, items))
    dispatch[pickle.LIST[0]] = load_list

    def load_dict(self) -> None:
        items = self.pop_mark()
        if len(items) % 2:
            raise pickle.UnpicklingError("odd number of items for DICT")
        self._hash_keys(items[::2])
        self.append(self._build({items[i]: items[i + 1] for i in range(0, len(items), 2)}, items))
    dispatch[pickle.DICT[0]] = load_dict

    def load_frozenset(self) -> None:
        items = self.pop_mark()
        self._charge(_SET_UNITS)
        self._hash_keys(items)
        self.append(self._build(frozenset(items), items))
    dispatch[pickle.FROZENSET[0]] = load_frozenset

    def load_empty_set(self) -> None:
        self._charge(_SET_UNITS)   # an empty set takes 216 bytes: memory, not work, is charged
        self.append(set())
    dispatch[pickle.EMPTY_SET[0]] = load_empty_set

    def load_append(self) -> None:
        value = self.stack.pop()
        self._grow(self.stack[-1], [value], (list,))
        self.stack[-1].append(value)
    dispatch[pickle.APPEND[0]] = load_append

    def load_appends(self) -> None:
        items = self.pop_mark()
        self._grow(self.stack[-1], items, (list,))
        self.stack[-1].extend(items)
    dispatch[pickle.APPENDS[0]] = load_appends

    def load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._grow(self.stack[-1], [key, value], _MAPPINGS, [key])
        self.stack[-1][key] = value
    dispatch[pickle.SETITEM[0]] = load_setitem

    def load_setitems(self) -> None:
        items = self.pop_mark()
        if len(items) % 2:
            raise pickle.UnpicklingError("odd number of items for SETITEMS")
        target = self.stack[-1]
        self._grow(target, items, _MAPPINGS, items[::2])
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]
    dispatch[pickle.SETITEMS[0]] = load_setitems

    def load_additems(self) -> None:
        items = self.pop_mark()
        self._grow(self.stack[-1], items, (set,), items)
        self.stack[-1].update(items)
    dispatch[pickle.ADDITEMS[0]] = load_additems

    # -- memo indices that would make the memo's hashing costly
    def load_put(self) -> None:
        index = self.readline()[:-1]
        if not (index.isdigit() and len(index) <= 10 and int(index) < MAX_MEMO_INDEX):
            raise pickle.UnpicklingError(f"PUT index {_describe(index)} out of range")
        self.memo[int(index)] = self.stack[-1]
    dispatch[pickle.PUT[0]] = load_put
