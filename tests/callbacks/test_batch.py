"""Tests of lightning_lnsgd.callbacks.batch: finding the label, replacing it in a copy, and swapping it in and back."""

from __future__ import annotations

import collections
import dataclasses
from types import MappingProxyType

import pytest
import torch

from lightning_lnsgd.callbacks.batch import describe, locate, path_str, replace, swap_in

Pair = collections.namedtuple("Pair", ["x", "y"])


@dataclasses.dataclass
class Mutable:
    x: torch.Tensor
    label: torch.Tensor


@dataclasses.dataclass(frozen=True)
class Frozen:
    x: torch.Tensor
    y: torch.Tensor


def _batches():
    """(name, make a fresh batch, target, path to the label, path of the container the swap writes (None: in place))."""
    x, y = torch.arange(6.0).reshape(3, 2), torch.tensor([1.0, 2.0, 3.0])
    return [
        ("list", lambda: [x.clone(), y.clone()], None, (1,), ()),
        ("dict", lambda: {"x": x.clone(), "y": y.clone()}, None, ("y",), ()),
        ("mutable dataclass", lambda: Mutable(x.clone(), y.clone()), None, ("label",), ()),
        ("tuple in a list", lambda: [(x.clone(), y.clone()), 0], "0.1", (0, 1), ()),
        ("list in a tuple", lambda: (x.clone(), [y.clone(), 0]), "1.0", (1, 0), (1,)),
        ("dict-list-dict", lambda: {"m": [x.clone(), {"y": y.clone()}]}, "m.1.y", ("m", 1, "y"), ("m", 1)),
        ("tuple", lambda: (x.clone(), y.clone()), None, (1,), None),
        ("namedtuple", lambda: Pair(x.clone(), y.clone()), None, (1,), None),
        ("frozen dataclass", lambda: Frozen(x.clone(), y.clone()), None, ("y",), None),
        ("read-only mapping", lambda: MappingProxyType({"x": x.clone(), "y": y.clone()}), None, ("y",), None),
        ("nested tuples", lambda: ((x.clone(), y.clone()), 0), "0.1", (0, 1), None),
    ]


def _get(obj, path):
    for key in path:
        obj = getattr(obj, key) if dataclasses.is_dataclass(obj) else obj[key]
    return obj


def _leaves(obj):
    """Every element object of the batch tree, by path, so that identity can be compared."""
    out = {(): obj}
    if isinstance(obj, (dict, MappingProxyType)):
        items = obj.items()
    elif dataclasses.is_dataclass(obj):
        items = [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    elif isinstance(obj, (tuple, list)):
        items = enumerate(obj)
    else:
        return out
    for key, value in items:
        out.update({(key, *p): v for p, v in _leaves(value).items()})
    return out


@pytest.mark.parametrize("name,make,target,path,container", _batches(), ids=[b[0] for b in _batches()])
def test_locate_finds_the_label(name, make, target, path, container):
    batch = make()
    found, label = locate(batch, target)
    assert found == path and label is _get(batch, path)


@pytest.mark.parametrize("name,make,target,path,container", _batches(), ids=[b[0] for b in _batches()])
def test_replace_copies_and_leaves_the_batch(name, make, target, path, container):
    batch = make()
    before = _leaves(batch)
    values = {p: v.clone() for p, v in before.items() if isinstance(v, torch.Tensor)}
    new = torch.full((3,), 9.0)
    out = replace(batch, path, new)
    # Same container types; a read-only mapping (which cannot be copied and set) becomes a dict.
    assert type(out) is (dict if name == "read-only mapping" else type(batch)) and _get(out, path) is new
    after = _leaves(batch)
    assert after.keys() == before.keys() and all(after[p] is before[p] for p in before)
    assert all(torch.equal(before[p], v) for p, v in values.items())
    x_path = next(p for p in before if isinstance(before[p], torch.Tensor) and p != path)
    assert _get(out, x_path) is before[x_path]  # the other elements are shared, not copied


@pytest.mark.parametrize("name,make,target,path,container", _batches(), ids=[b[0] for b in _batches()])
def test_swap_in_writes_the_batch_object_and_restore_puts_the_original_back(name, make, target, path, container):
    batch = make()
    before = _leaves(batch)
    label = before[path]
    clean = label.clone()
    new = torch.full((3,), 9.0)
    swap = swap_in(batch, path, new)
    assert torch.equal(_get(batch, path), new), "the batch object itself does not hold the new label"
    if container is None:  # no mutable container: the label tensor itself holds the new values
        assert _get(batch, path) is label and swap.in_place
    else:  # the deepest mutable container holds a new element; nothing above it changed
        assert not swap.in_place and _get(batch, path) is not label
        assert all(_leaves(batch)[p] is before[p] for p in before if len(p) <= len(container))
    swap.restore()
    after = _leaves(batch)
    assert after.keys() == before.keys() and all(after[p] is before[p] for p in before), "not the original objects"
    assert torch.equal(label, clean)


def test_swap_in_refuses_a_label_sharing_storage_or_not_writable():
    data = torch.arange(8.0).reshape(4, 2)
    with pytest.raises(ValueError, match=r"batch\[1\].*shares its storage with another tensor of the batch \(Tensor"):
        swap_in((data[:, 0], data[:, 1]), (1,), torch.zeros(4))
    with pytest.raises(ValueError, match=r"batch\['y'\].*an expanded view"):
        swap_in(Frozen(data, torch.zeros(1).expand(4)), ("y",), torch.zeros(4))
    with torch.inference_mode():
        frozen_label = torch.zeros(4)
    with pytest.raises(ValueError, match="an inference tensor"):
        swap_in((data, frozen_label), (1,), torch.zeros(4))
    with pytest.raises(ValueError, match=r"shape \(3,\) and dtype torch.float32.*shape \(4,\) and dtype torch.int64"):
        swap_in((data, torch.zeros(4, dtype=torch.int64)), (1,), torch.zeros(3))
    # A label that is a view of a tensor *outside* the batch (the dataset's storage) is written and restored.
    stored = torch.arange(10.0)
    batch = (torch.zeros(2, 1), stored[2:4])
    swap = swap_in(batch, (1,), torch.tensor([-1.0, -1.0]))
    assert stored[2:4].tolist() == [-1.0, -1.0]
    swap.restore()
    assert torch.equal(stored, torch.arange(10.0))


def test_locate_errors_show_the_batch_layout():
    x, y = torch.zeros(3, 2), torch.zeros(3)
    with pytest.raises(ValueError, match=r"`target='label'` is not in the training batch: no key 'label' among \['x', 'y'\]"):
        locate({"x": x, "y": y}, "label")
    with pytest.raises(ValueError, match=r"keys \['y', 'target', 'label', 'labels'\].*keys \['x', 'out'\]"):
        locate({"x": x, "out": y}, None)
    with pytest.raises(ValueError, match=r"index 5 is not valid for a tuple of length 2.*Tensor\(float32, \[3, 2\]\)"):
        locate((x, y), 5)
    with pytest.raises(ValueError, match=r"which is a tuple, not a tensor"):
        locate(((x, y), y), 0)
    with pytest.raises(ValueError, match=r"Frozen has none of the fields \['y', 'target', 'label', 'labels'\] \(it has \['x', 'z'\]\)"):
        locate(dataclasses.make_dataclass("Frozen", ["x", "z"])(x, y), None)
    assert locate({"a.b": y}, "a.b") == (("a.b",), y)  # a key containing dots is a key
    assert path_str((1, "y")) == "batch[1]['y']"
    assert describe([x, {"y": y}]) == "list[0: Tensor(float32, [3, 2]), 1: {'y': Tensor(float32, [3])}]"


def test_hugging_face_labels_key_is_found_by_default_after_y_target_label():
    ids, mask, labels = torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5), torch.tensor([[1, 2, 0, -100, 3]] * 2)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}  # a Hugging Face tokenizer + collator batch
    assert locate(batch, None) == (("labels",), labels)
    assert locate(collections.UserDict(batch), None)[0] == ("labels",)  # transformers' BatchEncoding is a UserDict
    assert locate({**batch, "label": mask}, None)[0] == ("label",)  # the order: y, target, label, labels


def test_locate_refuses_batches_without_an_identifiable_label():
    x = torch.zeros(2, 3)
    for target in (None, 0, "y"):
        with pytest.raises(ValueError, match=r"single Tensor\(float32, \[2, 3\]\) with no separate label"):
            locate(x, target)
    with pytest.raises(ValueError, match=r"one-element tuple\[0: Tensor\(float32, \[2, 3\]\)\].*set target=0"):
        locate((x,), None)
    assert locate((x,), 0) == ((0,), x) and locate([x, x], None)[0] == (1,)
