"""Finding the label in a training batch, and replacing it: in a copy, or in the batch itself and back.

A batch is a tree of tuples (namedtuples too), lists, mappings and dataclasses with tensors at the leaves; a
*path* is the tuple of indices / keys / field names from the root to one element.

* :func:`locate` finds the label tensor (a ``target`` index, key or dotted path, or the default rule);
* :func:`replace` returns a copy of the batch with one element replaced, the batch left as it was;
* :func:`swap_in` puts a value into the batch object itself and returns a :class:`Swap` whose
  :meth:`~Swap.restore` puts the original back exactly (used by the label-noise hooks, which must hand
  ``training_step`` the very batch object Lightning passes them);
* :func:`describe` and :func:`path_str` write a batch layout and a path for error messages.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

import torch

from ..checks import is_int

__all__ = ["DEFAULT_KEYS", "Swap", "describe", "locate", "path_str", "replace", "swap_in", "tensors"]

#: The mapping keys / dataclass fields tried, in order, when no ``target`` is given (``"labels"``: Hugging Face
#: batches, ``{"input_ids", "attention_mask", "labels"}``).
DEFAULT_KEYS = ("y", "target", "label", "labels")



def _is_dataclass(obj: Any) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def describe(obj: Any, depth: int = 0) -> str:
    """A short layout of ``obj`` (containers two levels deep, tensors as ``Tensor(dtype, shape)``)."""
    if isinstance(obj, torch.Tensor):
        return f"Tensor({str(obj.dtype).replace('torch.', '')}, {list(obj.shape)})"
    if depth >= 2:
        return type(obj).__name__
    if isinstance(obj, Mapping):
        return "{" + ", ".join(f"{k!r}: {describe(v, depth + 1)}" for k, v in obj.items()) + "}"
    if _is_dataclass(obj):
        fields = ", ".join(f"{f.name}={describe(getattr(obj, f.name), depth + 1)}" for f in dataclasses.fields(obj))
        return f"{type(obj).__name__}({fields})"
    if isinstance(obj, (tuple, list)):
        inner = ", ".join(f"{i}: {describe(v, depth + 1)}" for i, v in enumerate(obj))
        return f"{type(obj).__name__}[{inner}]"
    return type(obj).__name__


def path_str(path: tuple) -> str:
    """``batch[1]['y']`` for the path ``(1, 'y')``."""
    return "batch" + "".join(f"[{p!r}]" for p in path)


def _get(obj: Any, key: Any) -> Any:
    if _is_dataclass(obj) and not isinstance(obj, Mapping):
        return getattr(obj, key)
    return obj[key]


def _default_key(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        for key in DEFAULT_KEYS:
            if key in obj:
                return key
        raise ValueError(
            f"LabelNoise: `target` is None, so the label is looked up under the keys {list(DEFAULT_KEYS)}, but the"
            f" training batch is a {type(obj).__name__} with keys {list(obj.keys())}. Set `target` to the label's key."
        )
    if _is_dataclass(obj):
        for key in DEFAULT_KEYS:
            if hasattr(obj, key):
                return key
        names = [f.name for f in dataclasses.fields(obj)]
        raise ValueError(
            f"LabelNoise: `target` is None, but the training batch {type(obj).__name__} has none of the fields"
            f" {list(DEFAULT_KEYS)} (it has {names}). Set `target` to the label's field name."
        )
    if isinstance(obj, (tuple, list)) and len(obj) > 0:
        return len(obj) - 1
    raise ValueError(
        f"LabelNoise: cannot find a label in the training batch, which is {describe(obj)}. Batches must be a tuple,"
        " list, dict or dataclass holding the label; set `target`."
    )


def _child_key(obj: Any, step: Any, batch: Any, target: Any) -> Any:
    def fail(what: str) -> ValueError:
        return ValueError(
            f"LabelNoise: `target={target!r}` is not in the training batch: {what}. The batch is {describe(batch)}."
            " Set `target` to an index (sequences), a key (mappings) or a dotted path."
        )

    if isinstance(obj, Mapping):
        if step in obj:
            return step
        if isinstance(step, str) and step.lstrip("-").isdigit() and int(step) in obj:
            return int(step)
        raise fail(f"no key {step!r} among {list(obj.keys())}")
    if _is_dataclass(obj):
        if isinstance(step, str) and hasattr(obj, step):
            return step
        raise fail(f"{type(obj).__name__} has no field {step!r}")
    if isinstance(obj, (tuple, list)):
        if isinstance(step, str) and step.lstrip("-").isdigit():
            step = int(step)
        if is_int(step) and -len(obj) <= step < len(obj):
            return step % len(obj)
        raise fail(f"index {step!r} is not valid for a {type(obj).__name__} of length {len(obj)}")
    raise fail(f"cannot index a {type(obj).__name__} with {step!r}")


def locate(batch: Any, target: int | str | None) -> tuple[tuple, torch.Tensor]:
    """The path to the label tensor of ``batch`` and the tensor.

    ``target``: an index (sequences), a key (mappings) or a field name (dataclasses), or a dotted path of them
    (``"1.y"``); ``None``: the last element of a sequence, the first of :data:`DEFAULT_KEYS` of a mapping or
    dataclass, descending until a tensor is reached. Raises ``ValueError`` (with the batch layout) when the label
    is not there or is not a tensor, and when the batch has no identifiable label: a bare tensor (whatever
    ``target``), or, with ``target=None``, a one-element tuple or list (its element is usually the input).
    """
    if isinstance(batch, torch.Tensor):
        raise ValueError(
            f"LabelNoise: the training batch is a single {describe(batch)} with no separate label, and LabelNoise"
            " noises labels only, never inputs; return (inputs, label) or {'x': ..., 'y': ...} from the dataset (or"
            " from `on_after_batch_transfer`) and set `target` to the label's index or key if it is not the default."
        )
    if target is None and isinstance(batch, (tuple, list)) and len(batch) == 1:
        raise ValueError(
            f"LabelNoise: `target` is None and the training batch is the one-element {describe(batch)}, which has no"
            " identifiable label (by default the label is the last element of a sequence of two or more, and a lone"
            " element is usually the input, as with TensorDataset(x)); if that element is the label, set target=0."
        )
    if target is None:
        steps: list[Any] = []
    elif isinstance(target, str) and isinstance(batch, Mapping) and target in batch:
        steps = [target]  # a key that happens to contain dots
    elif isinstance(target, str):
        steps = target.split(".")
    else:
        steps = [target]
    path: list[Any] = []
    obj = batch
    for step in steps:
        key = _child_key(obj, step, batch, target)
        path.append(key)
        obj = _get(obj, key)
    while target is None and not isinstance(obj, torch.Tensor):
        key = _default_key(obj)
        path.append(key)
        obj = _get(obj, key)
    if not isinstance(obj, torch.Tensor):
        raise ValueError(
            f"LabelNoise: `target={target!r}` selects {path_str(tuple(path))}, which is a {type(obj).__name__},"
            f" not a tensor. The batch is {describe(batch)}."
        )
    return tuple(path), obj


def _with(obj: Any, key: Any, value: Any) -> Any:
    """A shallow copy of the container ``obj`` with element ``key`` set to ``value``; ``obj`` is not changed."""
    if isinstance(obj, tuple):
        items = list(obj)
        items[key] = value
        if hasattr(obj, "_fields"):  # namedtuple
            return type(obj)(*items)
        return tuple(items) if type(obj) is tuple else type(obj)(items)
    if isinstance(obj, list):
        out = copy.copy(obj)
        out[key] = value
        return out
    if isinstance(obj, Mapping):
        try:
            out = copy.copy(obj)
            out[key] = value
        except TypeError:  # a read-only mapping
            out = {**obj, key: value}
        return out
    out = copy.copy(obj)  # a dataclass, frozen or not
    object.__setattr__(out, key, value)
    return out


def replace(batch: Any, path: tuple, value: Any) -> Any:
    """A copy of ``batch`` with the element at ``path`` replaced by ``value``.

    The containers on the path are shallow copies (same types); every other element is the same object, and
    ``batch`` itself is not modified.
    """
    if not path:
        return value
    key = path[0]
    return _with(batch, key, replace(_get(batch, key), path[1:], value))


def _is_mutable(obj: Any) -> bool:
    """Whether an element of the container ``obj`` can be set in place."""
    if isinstance(obj, (list, MutableMapping)):
        return True
    if _is_dataclass(obj) and not isinstance(obj, Mapping):
        fields = dataclasses.fields(obj)
        if not fields:
            return False
        try:  # a frozen dataclass refuses even writing a field's own value back
            setattr(obj, fields[0].name, getattr(obj, fields[0].name))
        except dataclasses.FrozenInstanceError:
            return False
        return True
    return False


def _set(obj: Any, key: Any, value: Any) -> None:
    if isinstance(obj, (list, MutableMapping)):
        obj[key] = value
    else:
        setattr(obj, key, value)


def tensors(batch: Any) -> Iterator[torch.Tensor]:
    """Every tensor in ``batch`` (through tuples, lists, mappings and dataclasses)."""
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for value in batch.values():
            yield from tensors(value)
    elif _is_dataclass(batch):
        for field in dataclasses.fields(batch):
            yield from tensors(getattr(batch, field.name))
    elif isinstance(batch, (tuple, list)):
        for value in batch:
            yield from tensors(value)


class Swap:
    """A value put into a batch object by :func:`swap_in`; :meth:`restore` puts the original back.

    Either an element of a mutable container was replaced (``container[key]`` held ``original``), or, when the
    path to the label has no mutable container, the label tensor's values were overwritten (``original`` is a copy
    of them).
    """

    def __init__(self, container: Any, key: Any, original: Any, in_place: bool) -> None:
        self.container, self.key, self.original, self.in_place = container, key, original, in_place

    def restore(self) -> None:
        """Puts the original element (the same object) or the original values back."""
        if self.in_place:
            with torch.no_grad():
                self.container.copy_(self.original)
        else:
            _set(self.container, self.key, self.original)


def swap_in(batch: Any, path: tuple, value: torch.Tensor) -> Swap:
    """Puts the tensor ``value`` at ``path`` into the batch object itself; :meth:`Swap.restore` undoes it.

    The element is replaced in the deepest mutable container (list, mutable mapping, mutable dataclass) on the
    path, with new copies of the immutable containers (tuples) below it; the original element object is kept for
    the restore. With no mutable container on the path (a top-level tuple, namedtuple or frozen dataclass), the
    label tensor's values are overwritten in place with ``value`` (same shape and dtype), after checking that no
    other tensor of the batch shares its storage and that it can be written.
    """
    if not path:
        raise ValueError("LabelNoise: the training batch is itself the label tensor; put it in a tuple, list or dict.")
    nodes = [batch]
    for key in path[:-1]:
        nodes.append(_get(nodes[-1], key))
    for depth in range(len(path) - 1, -1, -1):
        if _is_mutable(nodes[depth]):
            container, key = nodes[depth], path[depth]
            original = _get(container, key)
            _set(container, key, replace(original, path[depth + 1 :], value))
            return Swap(container, key, original, in_place=False)
    label = _get(nodes[-1], path[-1])
    _check_writable(batch, label, path)
    if value.shape != label.shape or value.dtype != label.dtype:
        raise ValueError(
            f"LabelNoise: the noisy label has shape {tuple(value.shape)} and dtype {value.dtype}, but the label at"
            f" {path_str(path)} has shape {tuple(label.shape)} and dtype {label.dtype}."
        )
    original = label.clone()
    with torch.no_grad():
        label.copy_(value)
    return Swap(label, None, original, in_place=True)


def _check_writable(batch: Any, label: torch.Tensor, path: tuple) -> None:
    where = path_str(path)
    fix = "return the batch as a list or dict (or a copy of the label) from the dataset or `on_after_batch_transfer`"
    expanded = any(s == 0 and n > 1 for s, n in zip(label.stride(), label.shape))
    if label.is_inference() or label.requires_grad or expanded:
        why = "a tensor that requires grad" if label.requires_grad else "an expanded view"
        why = "an inference tensor" if label.is_inference() else why
        raise ValueError(
            f"LabelNoise: the batch has no mutable container on the path to {where}, and that label is {why}, which"
            f" cannot be written in place; {fix}."
        )
    ptr = label.untyped_storage().data_ptr()
    if ptr == 0:  # empty storage: nothing to share
        return
    for other in tensors(batch):
        if other is not label and other.untyped_storage().data_ptr() == ptr:
            raise ValueError(
                f"LabelNoise: the batch has no mutable container on the path to {where}, and that label shares its"
                f" storage with another tensor of the batch ({describe(other)}), so writing noise into it would change"
                f" that tensor too; {fix}."
            )
