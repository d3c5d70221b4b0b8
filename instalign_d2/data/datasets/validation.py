"""Reading and shape checks of the REFER-style files, with one-line errors that name the fix.

A dataset the user assembled by hand fails in a few typical ways: a download cut short, an HTML
error page saved under the file's name, a file of another shape (a dict around the refs list,
a hand-edited ref without ``ann_id``), or the refs file of one dataset copied into another's
folder. Each of these raises :class:`DatasetError` with one line that names the file, what is
wrong with it and what to do, instead of a traceback from ``json``, ``pickle`` or deep inside
Detectron2. The checks look at each ref once (a few hundredths of a second for gRefCOCO).
"""

from __future__ import annotations

import json
import os
import pickle
from numbers import Integral
from typing import Iterable, List, Mapping, Optional, Sequence

from instalign_d2.data.datasets.errors import DatasetError

REQUIRED_REF_KEYS = ("ref_id", "image_id", "split", "ann_id", "sentences")
REQUIRED_SENTENCE_KEYS = ("sent_id",)
SENTENCE_TEXT_KEYS = ("raw", "sent")  # either one
REQUIRED_IMAGE_KEYS = ("id", "file_name", "height", "width")
REQUIRED_ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox")

# Each family of refs: its name, what tells its refs apart, where they belong.
REF_FAMILIES = {
    "grefcoco": ("gRefCOCO", "no-target refs and lists of ann_id", "grefcoco/grefs(unc).json"),
    "refzom": ("Ref-ZOM", "a 'source' tag on each ref", "ref-zom/refs(final).p"),
    "refcoco": (
        "RefCOCO/+/g",
        "one int ann_id per ref and no 'no_target'",
        "refcoco/refs(unc).p, refcoco+/refs(unc).p or refcocog/refs(umd).p",
    ),
}


def _html_problem(data: bytes) -> str:
    start = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n")[:64].lower()
    if start.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")):
        return "is an HTML page, not data (a failed download saved an error or login page)"
    return ""


def _read_bytes(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise DatasetError(
            f"{path}: the {what} cannot be read ({type(exc).__name__}: {exc.strerror or exc}); "
            "check its permissions"
        ) from None
    if len(data) < 4096 and not data.strip():
        raise DatasetError(
            f"{path}: the {what} is empty ({len(data)} bytes), as a failed download leaves it; "
            "download it again"
        )
    return data


def read_json_file(path: str, what: str) -> object:
    """The parsed content of a JSON file, or a :class:`DatasetError` saying why it does not parse."""
    data = _read_bytes(path, what)
    redo = "download it again (or re-extract the archive)"
    html = _html_problem(data)
    if html:
        raise DatasetError(f"{path}: the {what} {html}; {redo}")
    size = len(data)
    try:
        text = data.decode("utf-8-sig")
        del data  # instances.json can be hundreds of MB: keep one copy while parsing
    except UnicodeDecodeError as exc:
        raise DatasetError(
            f"{path}: the {what} is not UTF-8 JSON text (byte {exc.start} is {data[exc.start]:#04x}; "
            "a pickle or archive saved under a .json name?); give the JSON file, or the pickle "
            "under its .p name"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"{exc.msg} at line {exc.lineno} column {exc.colno}"
        if exc.pos >= len(text.rstrip()) - 1:
            raise DatasetError(
                f"{path}: the {what} ends in the middle of its JSON ({where}): the file is cut "
                f"short, as by an interrupted download ({size} bytes); {redo}"
            ) from None
        raise DatasetError(f"{path}: the {what} is not valid JSON ({where}); {redo}") from None


def read_pickle_file(path: str, what: str) -> object:
    """The unpickled content of a published ``.p`` file (a trusted source: pickle runs code).

    Python 2 pickles with non-ASCII text are read as latin-1, the only encoding that never
    fails on them.
    """
    data = _read_bytes(path, what)
    redo = "download it again (or re-extract the archive)"
    html = _html_problem(data)
    if html:
        raise DatasetError(f"{path}: the {what} {html}; {redo}")
    if data[:1024].lstrip()[:1] in (b"[", b"{"):  # no pickle starts so; JSON does
        stem = os.path.splitext(os.path.basename(path))[0]
        raise DatasetError(
            f"{path}: the {what} holds JSON text, not a pickle; rename it to {stem}.json"
        )
    try:
        try:
            return pickle.loads(data)
        except UnicodeDecodeError:
            return pickle.loads(data, encoding="latin1")
    except EOFError:
        problem = "ends in the middle of its pickle"
    except pickle.UnpicklingError as exc:
        problem = (
            "ends in the middle of its pickle"
            if "truncated" in str(exc)
            else f"is not a readable pickle ({exc})"
        )
    except (ValueError, TypeError, IndexError, KeyError, AttributeError, ImportError) as exc:
        problem = f"is not a readable pickle ({type(exc).__name__}: {exc})"
    if problem.startswith("ends"):
        problem += f": the file is cut short, as by an interrupted download ({len(data)} bytes)"
    raise DatasetError(f"{path}: the {what} {problem}; {redo}")


def read_refs_file(path: str) -> object:
    """The content of a refs file: JSON for ``.json``, else a pickle (``.p``)."""
    if path.endswith(".json"):
        return read_json_file(path, "refs file")
    return read_pickle_file(path, "refs file")


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _valid_ann_id(value) -> bool:
    if _is_int(value):
        return True
    return isinstance(value, (list, tuple)) and all(_is_int(v) for v in value)


def check_refs(refs: object, path: str) -> List[Mapping]:
    """``refs`` if it is the published list of refs, else a :class:`DatasetError` naming the
    first offending ref (by index) and key."""
    if isinstance(refs, Mapping):
        keys = sorted(map(str, refs))
        if {"images", "annotations"} <= set(keys):
            raise DatasetError(
                f"{path}: this is a COCO instances file (keys {keys[:6]}), not the list of refs; "
                "put the refs file here and the instances at instances.json beside it"
            )
        lists = [k for k in keys if isinstance(refs[k], list)]
        hint = f"; if the refs are its {lists[0]!r} entry, save that list itself" if lists else ""
        raise DatasetError(
            f"{path}: expected the published list of refs, found a dict with keys "
            f"{keys[:6]}{hint}"
        )
    if not isinstance(refs, (list, tuple)):
        raise DatasetError(
            f"{path}: expected the published list of refs, found a {type(refs).__name__}; "
            "give the dataset's refs file"
        )
    if not refs:
        raise DatasetError(f"{path}: the refs list is empty; download the refs file again")
    for i, ref in enumerate(refs):
        # The exact-type test passes the published files at ~1 µs a ref; anything else (numpy
        # ints, OrderedDicts, or a real problem) gets the general check, which names the problem.
        if not _plain_ref_ok(ref):
            _check_ref(i, ref, path)
    return refs if isinstance(refs, list) else list(refs)


_REQUIRED_REF_KEY_SET = frozenset(REQUIRED_REF_KEYS)


def _plain_ref_ok(ref) -> bool:
    if type(ref) is not dict or not _REQUIRED_REF_KEY_SET.issubset(ref.keys()):
        return False
    ann_id, sentences = ref["ann_id"], ref["sentences"]
    if not (type(ann_id) is int or (type(ann_id) is list and all(type(a) is int for a in ann_id))):
        return False
    return type(sentences) is list and all(
        type(s) is dict
        and "sent_id" in s
        and (type(s.get("raw")) is str or type(s.get("sent")) is str)
        for s in sentences
    )


def _check_ref(i: int, ref, path: str) -> None:
    every = ", ".join(REQUIRED_REF_KEYS)
    if not isinstance(ref, Mapping):
        raise DatasetError(
            f"{path}: ref {i} is a {type(ref).__name__}, expected a dict with {every}; "
            "give the dataset's published refs file"
        )
    missing = [k for k in REQUIRED_REF_KEYS if k not in ref]
    if missing:
        raise DatasetError(
            f"{path}: ref {i} (ref_id {ref.get('ref_id')}) has no {missing[0]!r}; every ref "
            f"needs {every}: give the dataset's published refs file"
        )
    if not _valid_ann_id(ref["ann_id"]):
        raise DatasetError(
            f"{path}: ref {i} (ref_id {ref['ref_id']}) has ann_id {ref['ann_id']!r}; expected "
            "an annotation id or a list of them ([-1]: no target)"
        )
    sentences = ref["sentences"]
    if not isinstance(sentences, (list, tuple)):
        raise DatasetError(
            f"{path}: ref {i} (ref_id {ref['ref_id']}) has 'sentences' of type "
            f"{type(sentences).__name__}; expected a list of {{sent_id, sent, raw, tokens}}"
        )
    for j, sentence in enumerate(sentences):
        problem = _sentence_problem(sentence)
        if problem:
            raise DatasetError(
                f"{path}: ref {i} (ref_id {ref['ref_id']}), sentence {j} {problem}; each "
                "sentence needs 'sent_id' and its text in 'raw' or 'sent'"
            )


def _sentence_problem(sentence) -> str:
    if not isinstance(sentence, Mapping):
        return f"is a {type(sentence).__name__}, not a dict"
    missing = [k for k in REQUIRED_SENTENCE_KEYS if k not in sentence]
    if missing:
        return f"has no {missing[0]!r}"
    if not any(isinstance(sentence.get(k), str) for k in SENTENCE_TEXT_KEYS):
        return "has no text ('raw' or 'sent')"
    return ""


def _ids(ref: Mapping) -> list:
    value = ref["ann_id"]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def ref_format(refs: Sequence[Mapping]) -> str:
    """Which family the refs look like: ``refzom``, ``grefcoco`` or ``refcoco``.

    Ref-ZOM tags each ref with ``source``; gRefCOCO has no-target refs (``no_target``, ann_id
    ``[-1]``) and several targets per ref; RefCOCO/+/g has exactly one target per ref.
    """
    if any("source" in ref for ref in refs):
        return "refzom"
    for ref in refs:
        ids = _ids(ref)
        if "no_target" in ref or len(ids) != 1 or ids[0] < 0:
            return "grefcoco"
    return "refcoco"


def check_ref_format(refs: Sequence[Mapping], path: str, expected: Optional[str]) -> None:
    """A :class:`DatasetError` when the refs are another dataset's (``expected``: the family this
    folder holds; None accepts any)."""
    if expected is None:
        return
    found = ref_format(refs)
    if found == expected:
        return
    if expected == "grefcoco" and found == "refcoco":
        # gRefCOCO stores ann_id as a list even for one target; a split of single-target refs
        # in that form is gRefCOCO's, RefCOCO's REFER files have plain ints.
        if any(isinstance(ref["ann_id"], (list, tuple)) for ref in refs):
            return
    name, signature, where = REF_FAMILIES[found]
    raise DatasetError(
        f"{path}: these are {name} refs ({signature}), not {REF_FAMILIES[expected][0]} refs: "
        f"move them to {where} and put {REF_FAMILIES[expected][0]}'s own refs file here"
    )


def check_instances(data: object, path: str) -> Mapping:
    """``data`` if it is a COCO instances dict whose images and annotations have the keys the
    loaders read, else a :class:`DatasetError` naming the first offending entry."""
    if isinstance(data, list):
        looks_like_refs = bool(data) and isinstance(data[0], Mapping) and "sentences" in data[0]
        hint = " (it looks like a refs file)" if looks_like_refs else ""
        raise DatasetError(
            f"{path}: expected a COCO instances dict with 'images' and 'annotations', found a "
            f"list{hint}; give the dataset's instances.json"
        )
    if not isinstance(data, Mapping):
        raise DatasetError(
            f"{path}: expected a COCO instances dict with 'images' and 'annotations', found a "
            f"{type(data).__name__}; give the dataset's instances.json"
        )
    for key, required in (
        ("images", REQUIRED_IMAGE_KEYS),
        ("annotations", REQUIRED_ANNOTATION_KEYS),
    ):
        entries = data.get(key)
        if not isinstance(entries, list):
            found = "has none" if entries is None else f"has a {type(entries).__name__}"
            raise DatasetError(
                f"{path}: a COCO instances file needs a list {key!r} and this one {found} "
                f"(keys: {sorted(map(str, data))[:6]}); give the dataset's instances.json"
            )
        _check_entries(entries, key, required, path)
    return data


def _check_entries(entries: Iterable, key: str, required: Sequence[str], path: str) -> None:
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise DatasetError(f"{path}: {key}[{i}] is a {type(entry).__name__}, not a dict")
        for name in required:
            if name not in entry:
                raise DatasetError(
                    f"{path}: {key}[{i}] (id {entry.get('id')}) has no {name!r}; every entry of "
                    f"{key!r} needs {', '.join(required)}: give the dataset's instances.json"
                )
