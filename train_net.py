#!/usr/bin/env python
"""Train and evaluate InstAlign with Detectron2.

    python train_net.py --config-file configs/synthetic/instalign_tiny.yaml
    python train_net.py --config-file configs/grefcoco/instalign_swin_base.yaml --num-gpus 4
    python train_net.py --config-file CFG --eval-only MODEL.WEIGHTS output/model_final.pth
    python train_net.py --config-file CFG --resume          # continue from OUTPUT_DIR/last_checkpoint

Works on GPUs and on a CPU-only machine (``--num-gpus N`` there starts N gloo processes).
"""

from __future__ import annotations

import warnings

# detectron2 decorates a few functions with torch.jit.script, which torch 2.14 deprecates; the
# warning says nothing to our users.
warnings.filterwarnings(
    "ignore", message="`torch.jit.script` is deprecated", category=FutureWarning
)

import contextlib
import logging
import os
import sys
import time
import weakref
from typing import List

import torch
from detectron2.config import get_cfg
from detectron2.engine import (
    AMPTrainer,
    DefaultTrainer,
    SimpleTrainer,
    default_argument_parser,
    default_setup,
    launch,
)
from detectron2.engine.hooks import EvalHook, PeriodicCheckpointer
from detectron2.evaluation import DatasetEvaluators
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import instalign_d2  # noqa: F401  (registers the architecture, its parts and the datasets)
from instalign_d2 import add_instalign_config
from instalign_d2.data import checked as checked_datasets
from instalign_d2.data.build import build_gres_test_loader, build_gres_train_loader
from instalign_d2.data.dataset_mapper import GRESDatasetMapper
from instalign_d2.data.datasets.errors import DatasetLayoutError, error_line
from instalign_d2.engine import (
    AtomicCheckpointer,
    ConfigError,
    check_config,
    check_config_file,
    create_ddp_model,
    finish_distributed,
)
from instalign_d2.engine.checks import check_datasets
from instalign_d2.engine.ema import ModelEMAHook
from instalign_d2.engine.image_size_schedule import ImageSizeSchedule, ImageSizeScheduleHook
from instalign_d2.engine.summary import run_summary
from instalign_d2.solver import apply_epoch_schedule, build_lr_scheduler, build_optimizer
from instalign_d2.solver.optimizer import describe_param_groups
from instalign_d2.synthetic import backbone_pretraining, text_pretraining
from instalign_d2.synthetic import generator as synthetic_generator
from instalign_d2.synthetic.params import SyntheticParams, synthetic_root
from instalign_d2.utils.host_memory import keep_freed_host_memory

logger = logging.getLogger("instalign_d2")
# When this run started (data preparation included); a launched worker counts from its import.
_RUN_START = time.perf_counter()


class Trainer(DefaultTrainer):
    """DefaultTrainer with the GRES mapper and evaluator, our optimizer and schedule, atomic
    checkpoints, and DDP that also works for CPU models (gloo)."""

    def __init__(self, cfg):
        # A mirror of DefaultTrainer.__init__ (detectron2 0.7 / main branch of 2024), with two
        # changes: our create_ddp_model, which also wraps a CPU model for gloo (detectron2's passes
        # device_ids, which DDP rejects for a CPU module), and the atomic checkpointer. The DDP
        # wrap happens inside DefaultTrainer.__init__, between classmethods that could otherwise be
        # overridden (as Mask2Former does), so the constructor itself must be ours.
        # tests/test_train_net.py fails when detectron2's constructor sets attributes this one does
        # not: then mirror it again.
        super(DefaultTrainer, self).__init__()
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        # The train mapper is kept: a coarse-to-fine schedule sets its input size during training.
        self.train_mapper = GRESDatasetMapper(cfg, is_train=True)
        data_loader = self.build_train_loader(cfg, mapper=self.train_mapper)
        model = create_ddp_model(
            model,
            broadcast_buffers=False,
            find_unused_parameters=cfg.MODEL.get("FIND_UNUSED_PARAMETERS", False),
        )
        trainer_class = AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer
        self._trainer = trainer_class(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AtomicCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_optimizer(cls, cfg, model):
        optimizer = build_optimizer(cfg, model)
        for line in describe_param_groups(optimizer):
            logger.info("Optimizer group: %s", line)
        return optimizer

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_train_loader(cls, cfg, mapper=None):
        return build_gres_train_loader(cfg, mapper=mapper)

    def build_hooks(self):
        hooks = super().build_hooks()
        if self.cfg.MODEL_EMA.ENABLED:
            # Before the checkpointer and the evaluation, which take the average after the last step.
            first_saver = next(
                i for i, h in enumerate(hooks) if isinstance(h, (PeriodicCheckpointer, EvalHook))
            )
            hooks.insert(first_saver, ModelEMAHook(self.cfg.MODEL_EMA.DECAY))
        schedule = ImageSizeSchedule.from_config(self.cfg)
        if schedule is not None:  # before the other hooks: the size must be set before the step
            hooks.insert(0, ImageSizeScheduleHook(self.train_mapper, schedule))
        return hooks

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        # One batch per image: the model encodes each image once for all its expressions.
        return build_gres_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        from instalign_d2.evaluation import GRESEvaluator

        # Built from cfg so that its thresholds are the model's (MODEL.INSTALIGN.TEST.*).
        return DatasetEvaluators([GRESEvaluator(cfg, dataset_name, output_dir=output_folder)])


def build_config(args):
    """The merged, frozen config of the command line (no side effects)."""
    check_config_file(args.config_file)
    cfg = get_cfg()
    add_instalign_config(cfg)
    try:
        cfg.merge_from_file(args.config_file)
    except (KeyError, ValueError, AssertionError) as exc:
        raise ConfigError(f"--config-file {args.config_file}: {exc}") from None
    if len(args.opts) % 2:
        raise ConfigError(
            f"options after the flags must be KEY VALUE pairs, got an odd list: {' '.join(args.opts)}"
        )
    try:
        cfg.merge_from_list(args.opts)
    except (KeyError, ValueError, AssertionError) as exc:
        raise ConfigError(
            f"command-line option: {exc} (keys are listed in instalign_d2/config.py and detectron2's defaults)"
        ) from None
    if args.eval_only:
        # The checkpoint holds the whole model: the backbone's initial weights are neither read
        # nor made (a user scoring a downloaded checkpoint needs no Swin file, no pre-training).
        cfg.MODEL.TIMM.PRETRAINED_WEIGHTS = ""
        cfg.MODEL.TIMM.SYNTHETIC_PRETRAIN.ITERATIONS = 0
        cfg.MODEL.TEXT_ENCODER.SYNTHETIC_PRETRAIN.ITERATIONS = 0
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        # Detectron2 defaults to CUDA; a laptop or CI machine has none.
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


@contextlib.contextmanager
def console_progress(*logger_names: str):
    """Show these loggers' INFO lines on the console while the block runs.

    Data preparation runs before Detectron2 sets up its loggers (in each launched process); without
    this a first run would sit silent while it generates the dataset and pre-trains the backbone.
    """
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(
        logging.Formatter("[%(asctime)s %(name)s]: %(message)s", datefmt="%m/%d %H:%M:%S")
    )
    loggers = [logging.getLogger(name) for name in logger_names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(console)
        lg.setLevel(logging.INFO)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(console)
            lg.setLevel(level)


def prepare_data(cfg) -> List[str]:
    """Generate the embedded synthetic dataset (and its text encoder) when the config uses it, and
    the synthetically pre-trained backbone and text encoder when the config asks for them.
    Returns config KEY VALUE pairs that point the run at what was made (empty without)."""
    names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    if not any(name.startswith("synthetic_gres") for name in names):
        return []
    made = []
    with console_progress(
        synthetic_generator.__name__, backbone_pretraining.__name__, text_pretraining.__name__
    ):
        try:
            root = synthetic_generator.ensure_synthetic_gres(
                synthetic_root(), SyntheticParams.from_config(cfg)
            )
        except (ValueError, FileExistsError) as exc:
            raise ConfigError(str(exc)) from None
        try:
            if (
                cfg.MODEL.BACKBONE.NAME == "TimmBackbone"
                and cfg.MODEL.TIMM.SYNTHETIC_PRETRAIN.ITERATIONS > 0
            ):
                # The copy made for exactly these settings: another run (another seed) may
                # rewrite the file the config names before this one's model loads it.
                trunk = backbone_pretraining.ensure_synthetic_pretrained_backbone(cfg, root)
                made += ["MODEL.TIMM.PRETRAINED_WEIGHTS", trunk]
            if cfg.MODEL.TEXT_ENCODER.SYNTHETIC_PRETRAIN.ITERATIONS > 0:
                text = text_pretraining.ensure_synthetic_pretrained_text_encoder(cfg, root)
                made += ["MODEL.TEXT_ENCODER.NAME", text, "MODEL.TEXT_ENCODER.PRETRAINED", "True"]
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return made


def setup(args):
    """Config + Detectron2's default setup (logger, config backup in OUTPUT_DIR)."""
    cfg = build_config(args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="instalign_d2")
    if not args.eval_only:
        # SOLVER.EPOCHS (and the *_EPOCHS periods) -> iterations, from the train split that
        # prepare_data has made; before default_setup, so that OUTPUT_DIR/config.yaml records them.
        cfg = apply_epoch_schedule(cfg)
    default_setup(cfg, args)
    if cfg.KEEP_FREED_HOST_MEMORY:
        keep_freed_host_memory()
    if cfg.MODEL.DEVICE == "cpu" and comm.get_world_size() > 1:
        # N processes on one machine share its cores; more threads than cores only thrash.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // comm.get_local_size()))
    return cfg


def main(args):
    try:
        cfg = setup(args)
        if args.eval_only:
            model = Trainer.build_model(cfg)
            AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
                cfg.MODEL.WEIGHTS, resume=args.resume
            )
            return Trainer.test(cfg, model)
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        trainer.train()
        results = getattr(trainer, "_last_eval_results", None)  # set by the final evaluation
        if comm.is_main_process():
            seconds = time.perf_counter() - _RUN_START
            iterations = (
                trainer.iter - trainer.start_iter
            )  # run by this process (a resume counts on)
            print(run_summary(cfg, args.config_file, results, seconds, iterations))
        return results
    except (DatasetLayoutError, ConfigError) as exc:
        # A dataset problem found in this process (a launched worker, or damaged images met in
        # training): one line, and exit status 2 as for the checks before launch.
        print(f"instalign_d2: error: {error_line(exc)}", file=sys.stderr)
        raise SystemExit(2) from None


def distributed_main(args):
    """``main`` in each launched process; the processes leave together (see finish_distributed)."""
    results = main(args)
    finish_distributed()
    return results


def invoke_main(argv=None) -> int:
    global _RUN_START
    _RUN_START = time.perf_counter()
    args = default_argument_parser().parse_args(argv)
    try:
        # Everything that can be checked is checked here, once, before any process starts or
        # anything is written to OUTPUT_DIR.
        cfg = build_config(args)
        check_config(cfg, eval_only=args.eval_only, resume=args.resume)
        # OUTPUT_DIR/config.yaml then records which trunk and text encoder the run started from.
        args.opts = list(args.opts) + prepare_data(cfg)
        with console_progress("instalign_d2.data"):  # the loaders' counts and warnings on stdout
            check_datasets(cfg, eval_only=args.eval_only)
    except ConfigError as exc:
        print(f"instalign_d2: error: {exc}", file=sys.stderr)
        return 2
    except DatasetLayoutError as exc:
        print(f"instalign_d2: error: {error_line(exc)}", file=sys.stderr)
        return 2
    distributed = args.num_gpus * args.num_machines > 1
    if distributed:
        checked_datasets.release()  # each launched process loads its own
    try:
        launch(
            distributed_main if distributed else main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
    except SystemExit as exc:  # main printed its one line
        return exc.code if isinstance(exc.code, int) else 1
    except torch.multiprocessing.ProcessExitedException as exc:
        if exc.exit_code != 2:  # 2: a launched main printed its one line
            raise
        return 2
    finally:
        checked_datasets.release()
    return 0


if __name__ == "__main__":
    sys.exit(invoke_main())
