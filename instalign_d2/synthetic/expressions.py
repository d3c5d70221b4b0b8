"""Referring expressions of the synthetic GRES dataset, unambiguous by construction.

An expression is built from *filters* (a subset of an object's attributes, e.g. ``{colour: red,
shape: circle}``) whose referents are computed on the scene, so the targets are exact:

- single target: ``attribute`` ("the big blue square": the filter matches exactly one object) and
  ``spatial`` ("the leftmost triangle": the extreme of >= 2 matches, well apart from the next);
- multi target: ``conjunction`` ("the red circle and the blue square"), ``all_of_shape`` ("all
  triangles", "both red circles") and ``all_of_colour`` ("both green shapes");
- ``no_target``: filters that match nothing, mostly near misses of a present object with one
  attribute changed ("the red triangle" beside a red circle and a blue triangle), some naming a
  colour or shape absent from the scene, in the singular, plural, spatial and conjunction forms
  of the target templates, so that no wording alone gives the answer away.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from instalign_d2.synthetic.scene import ATTRIBUTE_VALUES, SHAPE_PLURALS

Filter = Dict[str, str]

PHRASE_ORDER = ("size", "colour", "shape")  # "the big red circle"
# word -> (axis of the centre, sign): the referent has the smallest sign * coordinate.
SPATIAL_WORDS = {"leftmost": (0, 1), "rightmost": (0, -1), "topmost": (1, 1), "bottommost": (1, -1)}
# "leftmost" is unambiguous only when the runner-up's centre is this far away (fraction of side).
SPATIAL_MARGIN = 0.25

KINDS = ("single", "multi", "no_target")
DEFAULT_KIND_WEIGHTS = (0.40, 0.30, 0.30)
TEMPLATE_WEIGHTS = {
    "single": {"attribute": 0.7, "spatial": 0.3},
    "multi": {"conjunction": 0.4, "all_of_shape": 0.3, "all_of_colour": 0.3},
    "no_target": {"no_target": 1.0},
}
NO_TARGET_NEAR_MISS_PROBABILITY = 0.75  # the rest name a colour / shape absent from the image
NO_TARGET_FORMS = {"the": 0.55, "all": 0.2, "spatial": 0.1, "conjunction": 0.15}
NEAR_MISS_ATTRIBUTE_WEIGHTS = {"colour": 0.45, "shape": 0.4, "size": 0.15}


@dataclass(frozen=True)
class Expression:
    text: str
    template: str  # expression_template
    kind: str  # single | multi | no_target
    targets: Tuple[int, ...]  # indices of the referred objects, sorted
    style: str = ""  # no-target only: "near_miss" or "absent"


def matching(objects: Sequence[Mapping[str, str]], filt: Filter) -> List[int]:
    """Indices of the objects whose attributes agree with every entry of ``filt``."""
    return [i for i, obj in enumerate(objects) if all(obj[k] == v for k, v in filt.items())]


def noun_phrase(filt: Filter, plural: bool = False) -> str:
    """'big red circle' / 'red shapes' for a filter (no shape in it: 'shape')."""
    words = [filt[k] for k in PHRASE_ORDER[:2] if k in filt]
    shape = filt.get("shape")
    if shape is None:
        words.append("shapes" if plural else "shape")
    else:
        words.append(SHAPE_PLURALS[shape] if plural else shape)
    return " ".join(words)


def _weighted_choice(rng: np.random.Generator, weights: Mapping[str, float]) -> str:
    keys = list(weights)
    p = np.asarray([weights[k] for k in keys], dtype=np.float64)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def _subsets(attributes: Sequence[str]) -> List[Tuple[str, ...]]:
    return [
        tuple(a for j, a in enumerate(attributes) if mask >> j & 1)
        for mask in range(1 << len(attributes))
    ]


def unique_filters(objects: Sequence[Mapping[str, str]], target: int) -> List[Filter]:
    """Every non-empty filter made of the target's own attributes that matches only the target."""
    out = []
    for keys in _subsets(PHRASE_ORDER):
        if not keys:
            continue
        filt = {k: objects[target][k] for k in keys}
        if matching(objects, filt) == [target]:
            out.append(filt)
    return out


def _pick_filter(rng: np.random.Generator, filters: List[Filter]) -> Filter:
    """A filter, preferring those that name the shape (the usual way of referring)."""
    weights = np.asarray(
        [3.0 if "shape" in f else (0.5 if list(f) == ["size"] else 1.0) for f in filters]
    )
    return filters[int(rng.choice(len(filters), p=weights / weights.sum()))]


# ----------------------------------------------------------------------------- target templates
def attribute_expression(objects, centers, image_size, rng) -> Optional[Expression]:
    target = int(rng.integers(len(objects)))
    filters = unique_filters(objects, target)
    if not filters:
        return None
    return Expression(
        "the " + noun_phrase(_pick_filter(rng, filters)), "attribute", "single", (target,)
    )


def spatial_candidates(objects, centers, image_size) -> List[Tuple[Filter, str, int]]:
    """(filter, spatial word, target) for every group of >= 2 with a well separated extreme."""
    out = []
    for keys in _subsets(PHRASE_ORDER):
        # A filter naming all three attributes matches at most one object: no group.
        if len(keys) == 3:
            continue
        # dict.fromkeys: distinct values in object order (a set's order would follow string
        # hashes, which change with PYTHONHASHSEED, and with it the drawn expressions).
        for group_filter in dict.fromkeys(tuple((k, o[k]) for k in keys) for o in objects):
            filt = dict(group_filter)
            group = matching(objects, filt)
            if len(group) < 2:
                continue
            for word, (axis, sign) in SPATIAL_WORDS.items():
                ranked = sorted(group, key=lambda i: sign * centers[i][axis])
                values = [sign * centers[i][axis] for i in ranked]
                if values[1] - values[0] >= SPATIAL_MARGIN * image_size:
                    out.append((filt, word, ranked[0]))
    return out


def spatial_expression(objects, centers, image_size, rng) -> Optional[Expression]:
    candidates = spatial_candidates(objects, centers, image_size)
    if not candidates:
        return None
    filt, word, target = candidates[int(rng.integers(len(candidates)))]
    return Expression(f"the {word} {noun_phrase(filt)}", "spatial", "single", (target,))


def conjunction_expression(objects, centers, image_size, rng) -> Optional[Expression]:
    if len(objects) < 2:
        return None
    first, second = (int(i) for i in rng.choice(len(objects), size=2, replace=False))
    parts = [noun_phrase(_pick_filter(rng, unique_filters(objects, i))) for i in (first, second)]
    return Expression(
        f"the {parts[0]} and the {parts[1]}", "conjunction", "multi", tuple(sorted((first, second)))
    )


def _group_expression(
    objects, rng, head: str, extra: Sequence[str], template: str
) -> Optional[Expression]:
    options = []
    for other in (None,) + tuple(extra):
        keys = (head,) if other is None else (head, other)
        for value in dict.fromkeys(tuple(o[k] for k in keys) for o in objects):  # object order
            filt = dict(zip(keys, value))
            group = matching(objects, filt)
            if len(group) >= 2:
                options.append((filt, group))
    if not options:
        return None
    filt, group = options[int(rng.integers(len(options)))]
    quantifier = "both" if len(group) == 2 else "all"
    return Expression(
        f"{quantifier} {noun_phrase(filt, plural=True)}", template, "multi", tuple(group)
    )


def all_of_shape_expression(objects, centers, image_size, rng) -> Optional[Expression]:
    return _group_expression(objects, rng, "shape", ("colour", "size"), "all_of_shape")


def all_of_colour_expression(objects, centers, image_size, rng) -> Optional[Expression]:
    return _group_expression(objects, rng, "colour", ("size",), "all_of_colour")


# ----------------------------------------------------------------------------- no target
def near_miss_filter(objects, rng) -> Optional[Filter]:
    """A present object's attributes with one changed, matching nothing ("the red triangle")."""
    obj = objects[int(rng.integers(len(objects)))]
    changed = _weighted_choice(rng, NEAR_MISS_ATTRIBUTE_WEIGHTS)
    present = {o[changed] for o in objects} - {obj[changed]}
    # Prefer a value seen elsewhere in the image: each word then names something present.
    pool = (
        sorted(present)
        if present and rng.random() < 0.7
        else [v for v in ATTRIBUTE_VALUES[changed] if v != obj[changed]]
    )
    filt = {changed: str(rng.choice(pool))}
    others = [k for k in ("colour", "shape") if k != changed]
    for k in others:  # keep the other identity attribute(s); the size only sometimes
        filt[k] = obj[k]
    if changed != "size" and rng.random() < 0.3:
        filt["size"] = obj["size"]
    return filt if not matching(objects, filt) else None


def absent_filter(objects, rng) -> Optional[Filter]:
    """A colour or a shape that no object of the image has (maybe with another attribute)."""
    key = "colour" if rng.random() < 0.5 else "shape"
    missing = [v for v in ATTRIBUTE_VALUES[key] if v not in {o[key] for o in objects}]
    if not missing:
        return None
    filt = {key: str(rng.choice(missing))}
    if rng.random() < 0.4:
        other = "shape" if key == "colour" else "colour"
        filt[other] = str(rng.choice(ATTRIBUTE_VALUES[other]))
    return filt


def no_target_expression(objects, centers, image_size, rng) -> Optional[Expression]:
    style = "near_miss" if rng.random() < NO_TARGET_NEAR_MISS_PROBABILITY else "absent"
    make = near_miss_filter if style == "near_miss" else absent_filter
    form = _weighted_choice(rng, NO_TARGET_FORMS)
    filters: List[Filter] = []
    for _ in range(20):
        filt = make(objects, rng)
        if filt is not None and filt not in filters:
            filters.append(filt)
        if len(filters) == (2 if form == "conjunction" else 1):
            break
    else:
        return None
    if form == "the":
        text = "the " + noun_phrase(filters[0])
    elif form == "all":
        text = "all " + noun_phrase(filters[0], plural=True)
    elif form == "spatial":
        text = f"the {rng.choice(list(SPATIAL_WORDS))} {noun_phrase(filters[0])}"
    else:
        text = f"the {noun_phrase(filters[0])} and the {noun_phrase(filters[1])}"
    return Expression(text, "no_target", "no_target", (), style)


TEMPLATES = {
    "attribute": attribute_expression,
    "spatial": spatial_expression,
    "conjunction": conjunction_expression,
    "all_of_shape": all_of_shape_expression,
    "all_of_colour": all_of_colour_expression,
    "no_target": no_target_expression,
}


def generate_expressions(
    objects: Sequence[Mapping[str, str]],
    centers: Sequence[Tuple[float, float]],
    image_size: int,
    rng: np.random.Generator,
    *,
    count: int,
    kind_weights: Sequence[float] = DEFAULT_KIND_WEIGHTS,
) -> List[Expression]:
    """Up to ``count`` distinct expressions for one scene.

    Each slot draws a kind (single / multi / no_target) with ``kind_weights``, then a template of
    that kind; a template the scene cannot support (e.g. no two circles for "both circles")
    gives way to another template of the same kind, so the kind proportions hold.
    """
    p = np.asarray(kind_weights, dtype=np.float64)
    expressions: List[Expression] = []
    texts = set()
    for kind in rng.choice(KINDS, size=count, p=p / p.sum()):
        for _ in range(4):  # a few tries to avoid repeating a sentence of this image
            first = _weighted_choice(rng, TEMPLATE_WEIGHTS[kind])
            rest = [t for t in TEMPLATE_WEIGHTS[kind] if t != first]
            order = [first] + [rest[i] for i in rng.permutation(len(rest))]
            expression = next(
                (
                    e
                    for e in (TEMPLATES[t](objects, centers, image_size, rng) for t in order)
                    if e is not None
                ),
                None,
            )
            if expression is not None and expression.text not in texts:
                texts.add(expression.text)
                expressions.append(expression)
                break
    return expressions
