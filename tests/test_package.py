"""The package registers what Detectron2 users name in configs, and every shipped config loads."""

import glob
import os

import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY

import instalign_d2
from instalign_d2 import add_instalign_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DATASET_NAMES = (
    [f"grefcoco_unc_{s}" for s in ("train", "val", "testA", "testB")]
    + ["refzom_final_train", "refzom_final_test"]
    + [f"refcoco_unc_{s}" for s in ("train", "val", "testA", "testB")]
    + [f"refcoco+_unc_{s}" for s in ("train", "val", "testA", "testB")]
    + [f"refcocop_unc_{s}" for s in ("train", "val", "testA", "testB")]
    + [f"refcocog_umd_{s}" for s in ("train", "val", "test")]
    + ["refcocog_google_train", "refcocog_google_val"]
    + [f"synthetic_gres_{s}" for s in ("train", "val", "test")]
)


def test_import_registers_the_architecture_its_parts_and_the_datasets():
    assert "InstAlign" in META_ARCH_REGISTRY
    assert "TimmBackbone" in BACKBONE_REGISTRY
    registered = set(DatasetCatalog.list())
    missing = [n for n in DATASET_NAMES if n not in registered]
    assert not missing
    families = {n: MetadataCatalog.get(n).evaluator_type for n in DATASET_NAMES}
    assert families["grefcoco_unc_val"] == "grefcoco"
    assert families["synthetic_gres_val"] == "grefcoco"
    assert families["refzom_final_test"] == "refzom"
    assert families["refcocog_umd_val"] == "refcoco"
    assert instalign_d2.__version__


def test_base_config_merges_and_keeps_the_paper_defaults():
    cfg = add_instalign_config(get_cfg())
    cfg.merge_from_file(os.path.join(REPO, "configs", "Base-GRES.yaml"))
    c = cfg.MODEL.INSTALIGN
    assert (c.NUM_OBJECT_QUERIES, c.DEC_LAYERS, c.HIDDEN_DIM) == (100, 9, 256)
    assert (c.COST_SCORE, c.COST_MASK, c.COST_PHRASE) == (2.0, 5.0, 1.0)  # supp. §8
    assert (c.MERGED_WEIGHT, c.INSTANCE_WEIGHT, c.NO_TARGET_WEIGHT) == (5.0, 1.0, 0.1)  # Eq. 13
    assert (cfg.SOLVER.BASE_LR, cfg.SOLVER.BASE_LR_END, cfg.SOLVER.IMS_PER_BATCH) == (
        1e-4,
        1e-6,
        32,
    )
    assert cfg.INPUT.IMAGE_SIZE == 480 and cfg.MODEL.TEXT_ENCODER.MAX_TOKENS == 20
    assert cfg.SOLVER.OPTIMIZER == "ADAMW" and cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupLinearDecayLR"


CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))


def load_config(path):
    cfg = add_instalign_config(get_cfg())
    cfg.merge_from_file(path)
    return cfg


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: os.path.relpath(p, REPO))
def test_every_config_loads_and_names_registered_datasets(path):
    cfg = load_config(path)
    registered = set(DatasetCatalog.list())
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        assert name in registered, f"{path}: {name}"
    assert cfg.MODEL.META_ARCHITECTURE == "InstAlign"


def test_the_configs_cover_every_ablation_of_table_3():
    seen = set()
    for path in CONFIG_FILES:
        c = load_config(path).MODEL.INSTALIGN
        seen |= {
            c.DECODER,
            c.INSTANCE_SUPERVISION,
            c.AGGREGATION,
            c.NO_TARGET_INPUT,
            c.NUM_OBJECT_QUERIES,
        }
    table_3 = {"M2F", "RELA", "none", "standard", "AIA_NO_PRELU", "THRESHOLD"}
    table_3 |= {"QGLOBAL", "TSEN", "MEAN_QUERIES", 20, 50, 200}
    assert table_3 <= seen, table_3 - seen
