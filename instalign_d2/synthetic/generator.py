"""The synthetic GRES generator: seeded scenes and expressions written in the gRefCOCO layout.

``<root>`` (default ``$DETECTRON2_DATASETS/synthetic_gres``) receives::

    grefs(unc).json      refs of the splits train / val / test, gRefCOCO style
                         (each sentence also records its expression_template and kind)
    instances.json       COCO images, annotations (compressed RLE of the visible pixels, plus the
                         object's shape / colour / size) and categories (one per shape)
    images/<split>/*.png
    text_encoder/        byte-level BPE tokenizer of this vocabulary + a tiny RobertaConfig
    generator.json       parameters and statistics; written last, so its presence means "complete"

Everything is written into a hidden staging folder beside ``<root>`` and renamed into place, so an
interrupted run leaves no half-written dataset. The output depends only on the parameters
(:class:`~instalign_d2.synthetic.params.SyntheticParams`): each image draws from its own random
stream ``(seed, split, index)``, so any number of worker processes gives the same bytes, and no
choice depends on the order of a hashed set, so neither does ``PYTHONHASHSEED``.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from collections import Counter
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
from iopath.common.file_io import file_lock
from PIL import Image

from instalign_d2.data.masks import mask_to_rle
from instalign_d2.synthetic.expressions import KINDS, SPATIAL_WORDS, TEMPLATES, generate_expressions
from instalign_d2.synthetic.params import (
    IMAGES_DIR,
    INSTANCES_FILE,
    MARKER_FILE,
    REFS_FILE,
    SYNTHETIC_SPLITS,
    TEXT_ENCODER_DIR,
    SyntheticParams,
    read_marker,
    synthetic_root,
)
from instalign_d2.synthetic.scene import COLOURS, SHAPE_PLURALS, SHAPES, SIZES, generate_scene
from instalign_d2.synthetic.text_encoder import write_local_text_encoder

logger = logging.getLogger(__name__)

TEMPLATE_NAMES = tuple(TEMPLATES)  # the values of expression_template
CATEGORY_IDS = {shape: i + 1 for i, shape in enumerate(SHAPES)}
# Every word the generator can emit, so the tokenizer knows all of them even for a tiny dataset.
VOCABULARY = (
    ["the", "all", "both", "and", "shape", "shapes"]
    + list(SHAPES)
    + list(SHAPE_PLURALS.values())
    + list(COLOURS)
    + list(SIZES)
    + list(SPATIAL_WORDS)
)
TEXT_ENCODER_SIZE = {
    "dropout": 0.0,  # trained from scratch in minutes on plentiful synthetic data: no dropout
    "hidden_size": 128,
    "num_layers": 2,
    "num_heads": 4,
    "intermediate_size": 256,
    "max_tokens": 20,
}


# ----------------------------------------------------------------------------- one image
def _touching(masks: List[np.ndarray]) -> List[bool]:
    """Whether each mask touches or borders another one (4-neighbourhood)."""
    out = []
    for i, mask in enumerate(masks):
        grown = mask.copy()
        grown[1:] |= mask[:-1]
        grown[:-1] |= mask[1:]
        grown[:, 1:] |= mask[:, :-1]
        grown[:, :-1] |= mask[:, 1:]
        out.append(any((grown & other).any() for j, other in enumerate(masks) if j != i))
    return out


def generate_image_record(job: Dict[str, object]) -> Dict[str, object]:
    """Draw, save and describe one image; ``job`` holds the parameters and its position.

    A module-level function of plain data, so worker processes can run it.
    """
    rng = np.random.default_rng([int(job["seed"]), int(job["split_index"]), int(job["index"])])
    size = int(job["image_size"])
    scene = generate_scene(size, rng)
    while len(scene.objects) < 2:  # practically never: the first two objects always fit
        scene = generate_scene(size, rng)
    # Fast zlib level: noisy textures barely compress, and level 6 would triple the run time.
    Image.fromarray(scene.image).save(str(job["image_path"]), format="PNG", compress_level=1)
    attributes = [o.attributes for o in scene.objects]
    centers = [o.center for o in scene.objects]
    expressions = generate_expressions(
        attributes,
        centers,
        size,
        rng,
        count=int(job["expressions_per_image"]),
        kind_weights=job["kind_weights"],
    )
    touching = _touching([o.mask for o in scene.objects])
    objects = []
    for obj, touches in zip(scene.objects, touching):
        ys, xs = np.nonzero(obj.mask)
        objects.append(
            {
                **obj.attributes,
                "center": [round(obj.center[0], 2), round(obj.center[1], 2)],
                "bbox": [
                    int(xs.min()),
                    int(ys.min()),
                    int(xs.max() - xs.min() + 1),
                    int(ys.max() - ys.min() + 1),
                ],
                "area": int(obj.mask.sum()),
                "segmentation": mask_to_rle(obj.mask),
                "visible_fraction": round(obj.visible_fraction, 4),
                "touching": bool(touches),
            }
        )
    return {
        "file_name": str(job["file_name"]),
        "objects": objects,
        "expressions": [
            {
                "text": e.text,
                "template": e.template,
                "kind": e.kind,
                "targets": list(e.targets),
                "style": e.style,
            }
            for e in expressions
        ],
    }


# ----------------------------------------------------------------------------- whole dataset
def _jobs(params: SyntheticParams, staging: str) -> List[Dict[str, object]]:
    jobs = []
    for split_index, split in enumerate(SYNTHETIC_SPLITS):
        os.makedirs(os.path.join(staging, IMAGES_DIR, split), exist_ok=True)
        for index in range(params.num_images(split)):
            file_name = f"{split}/{index:06d}.png"
            jobs.append(
                {
                    "seed": params.seed,
                    "split_index": split_index,
                    "index": index,
                    "split": split,
                    "image_size": params.image_size,
                    "expressions_per_image": params.expressions_per_image,
                    "kind_weights": list(params.kind_weights),
                    "file_name": file_name,
                    "image_path": os.path.join(staging, IMAGES_DIR, file_name),
                }
            )
    return jobs


def _run_jobs(jobs: List[Dict[str, object]], workers: int) -> List[Dict[str, object]]:
    """Records in job order, computed by ``workers`` processes (1: here), with progress logs."""
    records: List[Dict[str, object]] = []
    start = last_log = time.perf_counter()

    def consume(results: Iterable[Dict[str, object]]) -> None:
        nonlocal last_log
        for record in results:
            records.append(record)
            if time.perf_counter() - last_log > 5:
                last_log = time.perf_counter()
                logger.info(
                    "synthetic GRES: %d / %d images (%.0f s)",
                    len(records),
                    len(jobs),
                    last_log - start,
                )

    if workers <= 1 or len(jobs) < 64:
        consume(map(generate_image_record, jobs))
    else:
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with multiprocessing.get_context(method).Pool(workers) as pool:
            consume(pool.imap(generate_image_record, jobs, chunksize=16))
    return records


def _build_json(jobs, records) -> Tuple[dict, list]:
    """COCO instances and gRefCOCO refs from the per-image records (ids in generation order)."""
    images, annotations, refs = [], [], []
    ann_id = ref_id = sent_id = 0
    size = int(jobs[0]["image_size"]) if jobs else 0
    for image_id, (job, record) in enumerate(zip(jobs, records), start=1):
        images.append(
            {"id": image_id, "file_name": record["file_name"], "height": size, "width": size}
        )
        object_ann_ids = []
        for obj in record["objects"]:
            ann_id += 1
            object_ann_ids.append(ann_id)
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": CATEGORY_IDS[obj["shape"]],
                    "segmentation": obj["segmentation"],
                    "area": obj["area"],
                    "bbox": obj["bbox"],
                    "iscrowd": 0,
                    "shape": obj["shape"],
                    "colour": obj["colour"],
                    "size": obj["size"],
                    "center": obj["center"],
                }
            )
        # One ref per distinct target set of the image (its sentences share the annotations).
        by_targets: Dict[tuple, List[dict]] = {}
        for expression in record["expressions"]:
            by_targets.setdefault(tuple(expression["targets"]), []).append(expression)
        for targets, expressions in by_targets.items():
            ref_id += 1
            ann_ids = [object_ann_ids[t] for t in targets]
            sentences = []
            for expression in expressions:
                sent_id += 1
                sentences.append(
                    {
                        "sent_id": sent_id,
                        "raw": expression["text"],
                        "sent": expression["text"],
                        "tokens": expression["text"].split(),
                        "expression_template": expression["template"],
                        "expression_kind": expression["kind"],
                        **({"no_target_style": expression["style"]} if expression["style"] else {}),
                    }
                )
            refs.append(
                {
                    "ref_id": ref_id,
                    "image_id": image_id,
                    "split": job["split"],
                    "file_name": record["file_name"],
                    "ann_id": ann_ids or [-1],
                    "category_id": [CATEGORY_IDS[record["objects"][t]["shape"]] for t in targets]
                    or [-1],
                    "no_target": not targets,
                    "sent_ids": [s["sent_id"] for s in sentences],
                    "sentences": sentences,
                }
            )
    categories = [
        {"id": i, "name": shape, "supercategory": "shape"} for shape, i in CATEGORY_IDS.items()
    ]
    return {"images": images, "annotations": annotations, "categories": categories}, refs


def dataset_statistics(jobs, records) -> Dict[str, object]:
    """Per split: images, objects, expressions, kind and template shares, occlusion, touching."""
    stats: Dict[str, object] = {}
    for split in SYNTHETIC_SPLITS:
        chosen = [r for j, r in zip(jobs, records) if j["split"] == split]
        if not chosen:
            continue
        objects = [o for r in chosen for o in r["objects"]]
        expressions = [e for r in chosen for e in r["expressions"]]
        kinds = Counter(e["kind"] for e in expressions)
        templates = Counter(e["template"] for e in expressions)
        styles = Counter(e["style"] for e in expressions if e["style"])
        n_expr = max(len(expressions), 1)
        stats[split] = {
            "images": len(chosen),
            "objects_per_image": round(len(objects) / len(chosen), 3),
            "objects_histogram": dict(sorted(Counter(len(r["objects"]) for r in chosen).items())),
            "expressions": len(expressions),
            "expressions_per_image": round(len(expressions) / len(chosen), 3),
            "kind_share": {k: round(kinds[k] / n_expr, 4) for k in KINDS},
            "template_share": {t: round(n / n_expr, 4) for t, n in sorted(templates.items())},
            "no_target_styles": dict(sorted(styles.items())),
            "occluded_object_share": round(
                sum(o["visible_fraction"] < 0.98 for o in objects) / max(len(objects), 1), 4
            ),
            "touching_object_share": round(
                sum(o["touching"] for o in objects) / max(len(objects), 1), 4
            ),
        }
    return stats


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, separators=(",", ":"))


def generate_synthetic_gres(
    root: Optional[str] = None,
    params: SyntheticParams = SyntheticParams(),
    *,
    workers: Optional[int] = None,
) -> Dict[str, object]:
    """Generate the dataset into ``root`` (replacing an earlier generated one); return its statistics.

    Args:
        root: output folder; default ``$DETECTRON2_DATASETS/synthetic_gres``.
        params: what to generate; the same parameters give the same bytes.
        workers: processes drawing images (default: the CPU count); does not change the output.
    """
    root = os.path.abspath(root or synthetic_root())
    workers = (os.cpu_count() or 1) if workers is None else int(workers)
    _refuse_foreign_folder(root)
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    start = time.perf_counter()
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.staging-", dir=parent)
    try:
        jobs = _jobs(params, staging)
        logger.info(
            "synthetic GRES: drawing %d images with %d process(es) into %s",
            len(jobs),
            workers,
            root,
        )
        records = _run_jobs(jobs, workers)
        instances, refs = _build_json(jobs, records)
        _write_json(os.path.join(staging, INSTANCES_FILE), instances)
        _write_json(os.path.join(staging, REFS_FILE), refs)
        corpus = [s["raw"] for ref in refs for s in ref["sentences"]] + [" ".join(VOCABULARY)]
        write_local_text_encoder(
            os.path.join(staging, TEXT_ENCODER_DIR),
            corpus,
            save_weights=True,
            seed=params.seed,
            **TEXT_ENCODER_SIZE,
        )
        stats = dataset_statistics(jobs, records)
        marker = {"params": params.to_record(), "statistics": stats}
        _write_json(os.path.join(staging, MARKER_FILE), marker)
        _replace_folder(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log_statistics(stats, time.perf_counter() - start, root)
    return stats


def _refuse_foreign_folder(root: str) -> None:
    """Never replace a non-empty folder that the generator did not write."""
    if os.path.isdir(root) and os.listdir(root) and read_marker(root) is None:
        raise FileExistsError(
            f"{root} exists but has no {MARKER_FILE}: it was not written by the synthetic generator. "
            "Move it away or choose another folder for the synthetic dataset."
        )


def _replace_folder(new: str, target: str) -> None:
    """Move ``new`` to ``target``; an old ``target`` is moved aside first, then deleted."""
    if os.path.exists(target):
        old = tempfile.mkdtemp(
            prefix=f".{os.path.basename(target)}.old-", dir=os.path.dirname(target)
        )
        os.rmdir(old)
        os.rename(target, old)
        os.rename(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, target)


def log_statistics(stats: Dict[str, object], seconds: float, root: str) -> None:
    lines = [f"synthetic GRES written to {root} in {seconds:.1f} s"]
    for split, s in stats.items():
        lines.append(
            f"  {split:5s}: {s['images']} images, {s['objects_per_image']} objects/image {s['objects_histogram']}, "
            f"{s['expressions']} expressions ({s['expressions_per_image']}/image), kinds {s['kind_share']}, "
            f"occluded {s['occluded_object_share']}, touching {s['touching_object_share']}"
        )
        lines.append(
            f"         templates {s['template_share']}, no-target styles {s['no_target_styles']}"
        )
    logger.info("\n".join(lines))


class SyntheticDatasetMismatch(FileExistsError):
    """A generated dataset is there, made with other parameters than the ones asked for."""


def ensure_synthetic_gres(
    root: Optional[str] = None,
    params: SyntheticParams = SyntheticParams(),
    *,
    workers: Optional[int] = None,
) -> str:
    """Generate the dataset in ``root`` when absent; check that one found there has ``params``.

    Never replaces a dataset that is already there: one made with other parameters (another seed,
    other counts, an older generator) stops with :class:`SyntheticDatasetMismatch`, naming the
    folder and both parameter sets, because the user may have made it on purpose. Safe to call
    from several processes at once: a file lock beside ``root`` lets one generate while the
    others wait. Returns ``root``.
    """
    root = os.path.abspath(root or synthetic_root())
    wanted = params.to_record()
    with file_lock(root):
        marker = read_marker(root)
        if marker is not None:
            found = marker.get("params")
            if found != wanted:
                differing = ", ".join(
                    f"{key} {found.get(key) if isinstance(found, dict) else None!r} (asked: {value!r})"
                    for key, value in wanted.items()
                    if not isinstance(found, dict) or found.get(key) != value
                )
                raise SyntheticDatasetMismatch(
                    f"the synthetic dataset in {root} was generated with other parameters: "
                    f"{differing}. It is left as it is: move or delete it to generate the one asked "
                    "for, point $DETECTRON2_DATASETS elsewhere, or set DATASETS.SYNTHETIC.* to "
                    "the values found."
                )
            logger.info("synthetic GRES: %s is up to date", root)
            return root
        generate_synthetic_gres(root, params, workers=workers)
    return root
