"""How :class:`~lightning_lnsgd.LabelNoise` reads a training target: padding (``ignore_index``), the class targets
that flips act on (integer labels, one-hot float rows, 0/1 multi-label entries) with their checks, and where
``num_classes`` is found when it is not given."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from ..checks import is_int
from .batch import describe, path_str

__all__ = [
    "NUM_CLASSES_NAMES", "VOCAB_NAME", "ClassTargets", "InvalidLabels", "NumClasses", "find_num_classes",
    "ignored_entries", "output_space",
]

#: Attribute / hyper-parameter names that hold the number of classes, read when ``num_classes`` is None.
NUM_CLASSES_NAMES = ("num_classes", "num_labels")
#: Read at the same places only when neither the model's output space nor :data:`NUM_CLASSES_NAMES` gives a value:
#: often the size of the input vocabulary (a tagger's), which is not the label space.
VOCAB_NAME = "vocab_size"


def ignored_entries(labels: torch.Tensor, ignore_index: int | None) -> torch.Tensor | None:
    """Where ``labels`` equals ``ignore_index`` (``None`` when it is off or the dtype cannot hold it)."""
    if ignore_index is None:
        return None
    if not labels.is_floating_point():
        info = torch.iinfo(labels.dtype) if labels.dtype != torch.bool else None
        if info is None or not info.min <= ignore_index <= info.max:
            return None
    return labels == ignore_index


class ClassTargets:
    """The class targets of flip noise with ``num_classes`` classes: their checks, their class indices and which
    entries may flip.

    A float target is read, on the first training batch, as one-hot rows (last dim C, every row without
    ``ignore_index`` one-hot) or, with C = 2, as 0/1 multi-label entries; any other float target is a soft target
    and refused. Invalid labels of later batches are collected on their device (:class:`InvalidLabels`).
    """

    def __init__(self, num_classes: int, ignore_index: int | None) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.one_hot = False  # the targets are one-hot rows (decided by check_first)
        self.invalid = InvalidLabels()

    def check_first(self, labels: torch.Tensor, where: str) -> None:
        """First-batch checks of the target's dtype, and for float targets which kind of target it is."""
        if labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(
                f"LabelNoise: kind='flip' needs integer class labels or one-hot float rows, but the label at {where}"
                f" has dtype {labels.dtype}. Use kind='rademacher' or 'gaussian' for real-valued labels."
            )
        c = self.num_classes
        if not labels.is_floating_point():
            if torch.iinfo(labels.dtype).max < c - 1:
                raise ValueError(
                    f"LabelNoise: the label at {where} has dtype {labels.dtype} (max {torch.iinfo(labels.dtype).max}),"
                    f" which cannot hold class {c - 1} of num_classes={c}; use a wider integer dtype (e.g. int64)."
                )
            return
        # The rule: one-hot if the last dim is C and every row without ignore_index is one-hot; else, with C = 2,
        # multi-label if every entry other than ignore_index is 0 or 1; else a soft target (refused).
        ignored = ignored_entries(labels, self.ignore_index)
        self.one_hot = False
        if labels.dim() > 0 and labels.shape[-1] == c:
            rows = labels if ignored is None else labels[~ignored.any(-1)]
            binary_rows = ((rows == 0) | (rows == 1)).all()
            self.one_hot = bool(binary_rows & (rows.sum(-1) == 1).all())
        entries = labels if ignored is None else labels[~ignored]
        if not self.one_hot and not (c == 2 and bool(((entries == 0) | (entries == 1)).all())):
            raise ValueError(
                f"LabelNoise: kind='flip' needs integer class labels or one-hot float rows, but the label at {where}"
                f" is the soft target {describe(labels)} (not one-hot rows with last dim num_classes={c}, nor 0/1"
                " multi-label entries with num_classes=2): flipping a soft target (label smoothing, mixup) is not"
                " defined, as a distribution has no single class to replace; flip the hard labels before smoothing or"
                " mixing, or use kind='gaussian' for real-valued targets."
            )

    def classes(
        self, labels: torch.Tensor, ignored: torch.Tensor | None, path: tuple
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(class indices, the entries counted in flipped_frac, the entries that may flip)`` of flip labels, and
        the invalid ones recorded in :attr:`invalid` (device-side, no host sync)."""
        c = self.num_classes
        if self.one_hot:
            if labels.shape[-1] != c:
                raise ValueError(
                    f"LabelNoise: the one-hot target at {path_str(path)} has shape {tuple(labels.shape)}; its last"
                    f" dim must be num_classes={c}."
                )
            row_ignored = None if ignored is None else ignored.any(-1)
            binary = ((labels == 0) | (labels == 1)).all(-1)
            valid = binary & (labels.sum(-1) == 1)
            counted = None if row_ignored is None else ~row_ignored
            bad = ~valid if counted is None else ~valid & counted
            self.invalid.add(bad, labels.sum(-1), lambda v: (
                f"LabelNoise: kind='flip' treats the float target at {path_str(path)} as one-hot rows, but a"
                f" training batch has a row that is not one-hot (entries in {{0, 1}} summing to 1; row sum {v:g});"
                f" mark rows without a label with ignore_index={self.ignore_index}."
            ))
            return labels.argmax(-1), counted, valid if counted is None else valid & counted
        counted = None if ignored is None else ~ignored
        if labels.is_floating_point():  # multi-label 0/1 with num_classes=2
            valid = (labels == 0) | (labels == 1)
            allowed = "0 or 1 (float multi-label targets)"
        else:
            valid = (labels >= 0) & (labels <= c - 1)  # c itself may not fit the dtype (uint8, c = 256)
            allowed = f"in [0, {c - 1}]"
        bad = ~valid if counted is None else ~valid & counted
        self.invalid.add(bad, labels, lambda v: (
            f"LabelNoise: kind='flip' with num_classes={c} needs labels {allowed}, but the label at {path_str(path)}"
            f" holds label {v:g}. Set `num_classes` to the number of classes, and `ignore_index` to the padding label"
            f" (now {self.ignore_index})."
        ))
        return labels, counted, valid if counted is None else valid & counted

    def to_one_hot(self, noisy: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The flipped class indices ``noisy`` back as one-hot rows in the dtype of ``labels`` (flipped rows only)."""
        rows = torch.nn.functional.one_hot(noisy, self.num_classes).to(labels.dtype)
        return torch.where(mask[..., None], rows, labels)


class InvalidLabels:
    """Invalid flip labels seen since the last host sync, kept on the labels' device: ``add`` costs no host sync;
    :meth:`raise_if_any` syncs once and raises the message of the first invalid label seen."""

    def __init__(self) -> None:
        self.any: torch.Tensor | None = None  # bool scalar: some label was invalid
        self.value: torch.Tensor | None = None  # the first invalid value (float64 scalar)
        self.message: Any = None

    def add(self, bad: torch.Tensor, values: torch.Tensor, message: Any) -> None:
        """Records the entries of ``values`` where ``bad`` is True; ``message(value)`` is the error text."""
        if bad.numel() == 0:
            return
        flat = bad.reshape(-1)
        value = values.reshape(-1)[flat.to(torch.uint8).argmax()].to(torch.float64)  # first bad entry, on device
        found = flat.any()
        if self.any is None or self.any.device != found.device:
            self.any, self.value, self.message = found, value, message
            return
        first = ~self.any & found  # keep the first batch's value and message
        self.value = torch.where(first, value, self.value)  # type: ignore[arg-type]
        if self.message is None:
            self.message = message
        self.any = self.any | found

    def raise_if_any(self) -> None:
        if self.any is not None and bool(self.any):
            value, message = float(self.value), self.message  # type: ignore[arg-type]
            self.any = self.value = self.message = None
            raise ValueError(message(value))
        self.any = self.value = self.message = None


@dataclasses.dataclass(frozen=True)
class NumClasses:
    """What :func:`find_num_classes` found: the number of classes C (``None``: nothing found), where it came from,
    and every place it looked (for the error when nothing was found)."""

    value: int | None
    source: str
    looked: list[str]


def output_space(pl_module: Any) -> tuple[int, str] | None:
    """``(C, where)``: the size of the output space of ``pl_module``'s network, where it can be known.

    * A Hugging Face model among its submodules (duck-typed: ``config`` and ``get_output_embeddings``; the
      outermost one): ``config.num_labels`` for a ``*Classification`` head (``*ForTokenClassification``,
      ``*ForSequenceClassification``, ...); the rows of its output embeddings for a language-model head
      (``*LMHeadModel``, ``*ForCausalLM``, ``*ForMaskedLM``, ...).
    * Otherwise the last submodule with parameters of its own, when it is a layer with an output size
      (``out_features`` of a linear layer, ``out_channels`` of a convolution, e.g. a segmentation head) of at least 2
      and not inside a Hugging Face model without a head (whose last layer gives hidden states, not classes).
    """
    if not hasattr(pl_module, "named_modules"):
        return None
    name = type(pl_module).__name__
    headless: list[str] = []  # paths of Hugging Face models without a head
    last = None
    for path, module in pl_module.named_modules():
        if _is_hugging_face(module) and not any(_inside(path, h) for h in headless):
            where, cls = f"{name}.{path}" if path else name, type(module).__name__
            if cls.endswith("Classification") and is_int(getattr(module.config, "num_labels", None)):
                return int(module.config.num_labels), f"{where}.config.num_labels ({cls})"
            weight = getattr(module.get_output_embeddings(), "weight", None)
            if isinstance(weight, torch.Tensor):
                return int(weight.shape[0]), f"the output embeddings of {where} ({cls}: its vocabulary)"
            headless.append(path)
        if next(module.parameters(recurse=False), None) is not None:
            last = path, module
    if last is None or any(_inside(last[0], h) for h in headless):
        return None
    path, module = last
    for attribute in ("out_features", "out_channels"):
        value = getattr(module, attribute, None)
        if is_int(value) and value >= 2:
            return int(value), f"{name}.{path}.{attribute} (the last layer, {type(module).__name__})"
    return None


def _inside(path: str, parent: str) -> bool:
    return parent == "" or path == parent or path.startswith(parent + ".")


def _is_hugging_face(module: Any) -> bool:
    return hasattr(module, "config") and callable(getattr(module, "get_output_embeddings", None))


def find_num_classes(pl_module: Any, datamodule: Any = None) -> NumClasses:
    """The number of classes of ``pl_module``'s labels, and where it came from.

    Two kinds of source: the model's output space (:func:`output_space`), and the names :data:`NUM_CLASSES_NAMES`
    on the module, its ``hparams``, its ``model`` attribute (a wrapped network, as in Lightning's demo Transformer
    and LSTM), that model's ``config`` and the module's own ``config`` (a Hugging Face model's ``config`` is read
    only through its head, above), the datamodule and its ``hparams``. When they hold different values a
    ``ValueError`` names two of them. Only when neither kind holds a value is :data:`VOCAB_NAME` read at the same
    places (the vocabulary of a language model whose output layer says nothing).
    """
    module_name = type(pl_module).__name__
    model = getattr(pl_module, "model", None)
    hugging_face = [m.config for m in pl_module.modules() if _is_hugging_face(m)] if hasattr(pl_module, "modules") else []
    places = [
        (module_name, pl_module),
        (f"{module_name}.hparams", getattr(pl_module, "hparams", None)),
        (f"{module_name}.model", model),
        (f"{module_name}.model.config", getattr(model, "config", None)),
        (f"{module_name}.config", getattr(pl_module, "config", None)),
        ("the datamodule" if datamodule is None else type(datamodule).__name__, datamodule),
        ("its hparams" if datamodule is None else f"{type(datamodule).__name__}.hparams",
         getattr(datamodule, "hparams", None)),
    ]
    looked = ["the model's output layer"] + [
        f"{name} (a Hugging Face config: read through its model's head)" if any(obj is c for c in hugging_face)
        else name if obj is not None else f"{name} (none)" for name, obj in places
    ]
    places = [(name, None if any(obj is c for c in hugging_face) else obj) for name, obj in places]
    found = [] if (output := output_space(pl_module)) is None else [output]
    found += _named(places, NUM_CLASSES_NAMES)
    for (a, where_a), (b, where_b) in zip(found, found[1:]):
        if a != b:
            raise ValueError(
                f"LabelNoise: two sources of num_classes disagree: {where_a} is {a} but {where_b} is {b}; set"
                f" `num_classes=` to the number of classes of the labels (e.g. LabelNoise(kind='flip',"
                f" num_classes={a}))."
            )
    found = found or _named(places, (VOCAB_NAME,))
    if not found:
        return NumClasses(None, "", looked)
    return NumClasses(found[0][0], found[0][1], looked)


def _named(places: list[tuple[str, Any]], names: tuple[str, ...]) -> list[tuple[int, str]]:
    """``(value, "place.name")`` of every int >= 2 held under one of ``names`` at ``places``."""
    found = []
    for place, obj in places:
        if obj is None:
            continue
        for key in names:
            value = obj.get(key) if isinstance(obj, Mapping) else getattr(obj, key, None)
            if is_int(value) and value >= 2:
                found.append((int(value), f"{place}.{key}" if not isinstance(obj, Mapping) else f"{place}[{key!r}]"))
    return found
