"""ImageNet-1k class names, for prompting class-conditional DiTs (`--prompt "golden retriever"`).

`imagenet_classes.txt` holds the 1000 classes in the ILSVRC-2012 index order that DiT was trained
with (0 tench ... 207 golden retriever ... 999 toilet tissue), one line each: the index, a tab,
the WordNet synonyms separated by ", " (the standard `imagenet1000_clsidx_to_labels` list, which
diffusers' DiTPipeline carries as `id2label`). Every synonym names its class, as in diffusers'
`DiTPipeline.get_label_ids`; matching here also ignores case and surrounding spaces.
"""

from __future__ import annotations

import difflib
from functools import lru_cache
from pathlib import Path

from ldm_rt.errors import InputError

NUM_CLASSES = 1000
_FILE = Path(__file__).with_name("imagenet_classes.txt")


@lru_cache(maxsize=1)
def class_names() -> tuple[tuple[str, ...], ...]:
    """The synonyms of each class, index 0..999."""
    names = []
    for expected, line in enumerate(_FILE.read_text(encoding="utf-8").splitlines()):
        index, _, synonyms = line.partition("\t")
        if int(index) != expected:  # the file is data shipped with the package: a broken copy is a bug
            raise RuntimeError(f"{_FILE}: line {expected + 1} has index {index}, expected {expected}")
        names.append(tuple(s.strip() for s in synonyms.split(",")))
    if len(names) != NUM_CLASSES:
        raise RuntimeError(f"{_FILE} holds {len(names)} classes, expected {NUM_CLASSES}")
    return tuple(names)


@lru_cache(maxsize=1)
def _lookup() -> dict[str, int]:
    table: dict[str, int] = {}
    for index, synonyms in enumerate(class_names()):
        for name in synonyms:
            table.setdefault(name.lower(), index)  # a synonym shared by two classes names the first
    return table


def class_name(index: int) -> str:
    """The first (common) name of a class: 207 -> 'golden retriever'."""
    return class_names()[index][0]


def class_index(prompt: str | int, num_classes: int = NUM_CLASSES) -> int:
    """A class index from a prompt: an index ("207", 207) or an ImageNet class name, any synonym,
    any case ("golden retriever", "Tinca tinca"). Anything else is an InputError naming the
    closest class names."""
    text = str(prompt).strip()
    if text.lstrip("-").isdigit():
        index = int(text)
        if not 0 <= index < num_classes:
            raise InputError(f"class index {index} is out of range; this model has classes 0..{num_classes - 1}.")
        return index
    if num_classes != NUM_CLASSES:
        raise InputError(f"this model has {num_classes} classes, not the 1000 ImageNet ones: give a class index "
                         f"0..{num_classes - 1} instead of the name {text!r}.")
    table = _lookup()
    if text.lower() in table:
        return table[text.lower()]
    close = difflib.get_close_matches(text.lower(), table, n=5, cutoff=0.6)
    hint = (f"closest: {', '.join(repr(f'{c} ({table[c]})') for c in close)}" if close
            else "give an ImageNet class name such as 'golden retriever', or an index 0..999")
    raise InputError(f"unknown ImageNet class {text!r}; {hint}.")
