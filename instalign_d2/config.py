"""Config keys of instalign_d2, with the paper's defaults (arXiv 2411.15087 §3, §4.1, supp. §8).

``add_instalign_config(cfg)`` adds every key that the project reads to a Detectron2 ``CfgNode``;
``configs/Base-GRES.yaml`` sets the paper setting on top of it.
"""

from detectron2.config import CfgNode as CN

from instalign_d2.synthetic.params import SyntheticParams


def add_instalign_config(cfg: CN) -> CN:
    """Add InstAlign's keys (in place) and return ``cfg``."""
    # ----------------------------------------------------------------------------- input / data
    cfg.INPUT.IMAGE_SIZE = (
        480  # images are resized to IMAGE_SIZE x IMAGE_SIZE (paper §4.1, as ReLA)
    )
    # Coarse-to-fine training (not in the paper): the first EARLY_TRAIN_FRACTION of SOLVER.MAX_ITER
    # train on EARLY_TRAIN_SIZE x EARLY_TRAIN_SIZE inputs, the rest (and evaluation) on IMAGE_SIZE;
    # cheaper early steps buy more of them. 0 = off. Needs DATALOADER.NUM_WORKERS 0.
    cfg.INPUT.EARLY_TRAIN_SIZE = 0
    cfg.INPUT.EARLY_TRAIN_FRACTION = 0.0
    cfg.INPUT.FORMAT = "RGB"  # timm backbones and RoBERTa-era models read RGB
    # Megabytes of resized images (model inputs, uint8) each mapper keeps for the next epochs, so
    # an image is decoded and resized once; as many again for the resized annotation masks (by
    # annotation id) and the token ids (by text). Images and masks only without augmentation; each
    # loader worker has its own. 0 = the last image only (its expressions come one after another).
    cfg.INPUT.CACHE_MB = 0
    cfg.INPUT.DATASET_MAPPER_NAME = "gres"  # the GRES mapper (instalign_d2.data.dataset_mapper)
    cfg.INPUT.AUGMENT = CN()
    cfg.INPUT.AUGMENT.ENABLED = False  # train-time augmentation; the paper trains without it
    cfg.INPUT.AUGMENT.SCALE_RANGE = (0.8, 1.0)  # random crop keeping this fraction of each side
    cfg.INPUT.AUGMENT.BRIGHTNESS = 0.2  # photometric jitter strengths (0 disables each)
    cfg.INPUT.AUGMENT.CONTRAST = 0.2
    cfg.INPUT.AUGMENT.SATURATION = 0.2

    # The embedded synthetic set (instalign_d2/synthetic), generated under
    # $DETECTRON2_DATASETS/synthetic_gres when absent. Its defaults are SyntheticParams' own.
    defaults = SyntheticParams()
    cfg.DATASETS.SYNTHETIC = CN()
    # The dataset's seed, separate from SEED: runs of several training seeds meet one val set.
    cfg.DATASETS.SYNTHETIC.SEED = defaults.seed
    cfg.DATASETS.SYNTHETIC.NUM_TRAIN_IMAGES = defaults.num_train_images
    cfg.DATASETS.SYNTHETIC.NUM_VAL_IMAGES = defaults.num_val_images
    cfg.DATASETS.SYNTHETIC.NUM_TEST_IMAGES = defaults.num_test_images
    cfg.DATASETS.SYNTHETIC.IMAGE_SIZE = defaults.image_size  # side of the generated images
    cfg.DATASETS.SYNTHETIC.EXPRESSIONS_PER_IMAGE = defaults.expressions_per_image
    cfg.DATASETS.SYNTHETIC.KIND_WEIGHTS = defaults.kind_weights  # single / multi / no-target

    # A split whose images are missing (or undecodable) beyond this share stops the run: that is a
    # broken download, not a few bad files. Below it, those expressions are skipped and counted.
    cfg.DATASETS.MAX_MISSING_IMAGE_FRACTION = 0.01

    cfg.DATALOADER.GROUP_EXPRESSIONS_BY_IMAGE = (
        True  # test loader: one batch = one image's expressions
    )
    # Training: 0 = one expression per sample (the paper, ReLA); k > 0 = a sample is an image with
    # up to k of its expressions, which share one backbone pass (IMS_PER_BATCH then counts images).
    cfg.DATALOADER.TRAIN_EXPRESSIONS_PER_IMAGE = 0

    # ----------------------------------------------------------------------------- backbone
    cfg.MODEL.TIMM = CN()
    cfg.MODEL.TIMM.NAME = "swin_base_patch4_window12_384"  # Swin-B, ImageNet-22K init (paper §4.1)
    cfg.MODEL.TIMM.PRETRAINED_WEIGHTS = (
        ""  # local .pth/.safetensors of the timm model; "" = random init
    )
    cfg.MODEL.TIMM.OUT_FEATURES = ["res2", "res3", "res4", "res5"]  # strides 4/8/16/32
    cfg.MODEL.TIMM.FREEZE = False  # freeze all backbone weights
    # Freeze a first part only, as detectron2's MODEL.BACKBONE.FREEZE_AT: 0 nothing, 1 the stem,
    # k = 2..5 the stem and res2..res{k} (weights fixed, BatchNorm statistics kept).
    cfg.MODEL.TIMM.FREEZE_AT = 0
    cfg.MODEL.TIMM.DROP_PATH_RATE = 0.3  # stochastic depth, as Mask2Former's Swin-B
    cfg.MODEL.TIMM.NORM_OUTPUTS = True  # LayerNorm after each returned stage, as Mask2Former's Swin
    cfg.MODEL.TIMM.KWARGS = CN(new_allowed=True)  # extra keyword arguments of timm.create_model
    # Pre-training on the synthetic scenes' object attributes, our stand-in for ImageNet
    # pre-training (synthetic/backbone_pretraining.py): with ITERATIONS > 0, train_net.py
    # writes PRETRAINED_WEIGHTS when that file is absent or was made with other settings.
    cfg.MODEL.TIMM.SYNTHETIC_PRETRAIN = CN()
    cfg.MODEL.TIMM.SYNTHETIC_PRETRAIN.ITERATIONS = 0  # 0 = off
    cfg.MODEL.TIMM.SYNTHETIC_PRETRAIN.IMS_PER_BATCH = 32
    cfg.MODEL.TIMM.SYNTHETIC_PRETRAIN.BASE_LR = 0.002
    cfg.MODEL.TIMM.SYNTHETIC_PRETRAIN.SEED = -1  # -1: Detectron2's SEED (0 when that is -1 too)

    # ----------------------------------------------------------------------------- text encoder
    cfg.MODEL.TEXT_ENCODER = CN()
    cfg.MODEL.TEXT_ENCODER.NAME = (
        "roberta-base"  # local transformers directory (or a name in the local cache)
    )
    cfg.MODEL.TEXT_ENCODER.PRETRAINED = True  # False: random weights from the directory's config
    cfg.MODEL.TEXT_ENCODER.FREEZE = False  # keep the text encoder's weights fixed
    cfg.MODEL.TEXT_ENCODER.MAX_TOKENS = (
        20  # tokens per expression, <s> and </s> included (ReLA: 20)
    )
    # Not in the paper (whose RoBERTa comes pre-trained): with ITERATIONS > 0, train_net.py first
    # pre-trains the synthetic set's text encoder by masked language modelling on its training
    # sentences and trains from that (instalign_d2/synthetic/text_pretraining.py; made once per
    # settings, then reused).
    cfg.MODEL.TEXT_ENCODER.SYNTHETIC_PRETRAIN = CN()
    cfg.MODEL.TEXT_ENCODER.SYNTHETIC_PRETRAIN.ITERATIONS = 0
    cfg.MODEL.TEXT_ENCODER.SYNTHETIC_PRETRAIN.BATCH_SIZE = 128  # sentences per step
    cfg.MODEL.TEXT_ENCODER.SYNTHETIC_PRETRAIN.BASE_LR = 0.001
    cfg.MODEL.TEXT_ENCODER.SYNTHETIC_PRETRAIN.SEED = -1  # -1: Detectron2's SEED (0 when -1 too)

    # ----------------------------------------------------------------------------- pixel decoder
    # Mask2Former's key names, so its users find them where they expect.
    cfg.MODEL.SEM_SEG_HEAD.NAME = "MSDeformAttnPixelDecoder"
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 256  # C of V1..V3
    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = 256  # C of the stride-4 mask features V4
    cfg.MODEL.SEM_SEG_HEAD.NORM = "GN"
    cfg.MODEL.SEM_SEG_HEAD.COMMON_STRIDE = 4  # stride of V4
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS = 6  # deformable encoder layers (supp. §8)
    cfg.MODEL.SEM_SEG_HEAD.NHEADS = 8  # deformable attention heads
    cfg.MODEL.SEM_SEG_HEAD.NPOINTS = 4  # sampling points per head and level
    cfg.MODEL.SEM_SEG_HEAD.DIM_FEEDFORWARD = 1024  # FFN width of the deformable encoder
    cfg.MODEL.SEM_SEG_HEAD.DROPOUT = 0.0
    cfg.MODEL.SEM_SEG_HEAD.MSDA_IMPL = (
        "auto"  # auto | cuda | cpu | pytorch (env INSTALIGN_MSDA_IMPL overrides auto)
    )

    # ----------------------------------------------------------------------------- InstAlign
    cfg.MODEL.INSTALIGN = CN()
    cfg.MODEL.INSTALIGN.DECODER = (
        "POT"  # POT | M2F (no text) | RELA (queries read text only), Table 3(e)
    )
    cfg.MODEL.INSTALIGN.HIDDEN_DIM = 256  # C
    cfg.MODEL.INSTALIGN.NUM_OBJECT_QUERIES = 100  # N, Table 3(d)
    cfg.MODEL.INSTALIGN.DEC_LAYERS = 9  # K POT blocks (paper §4.1)
    cfg.MODEL.INSTALIGN.NHEADS = 8  # attention heads in the decoder
    cfg.MODEL.INSTALIGN.DIM_FEEDFORWARD = 2048  # FFN width in the decoder, as Mask2Former
    cfg.MODEL.INSTALIGN.DROPOUT = 0.0
    cfg.MODEL.INSTALIGN.PRE_NORM = False  # post-norm residual blocks, as Mask2Former
    cfg.MODEL.INSTALIGN.ENFORCE_INPUT_PROJ = False
    cfg.MODEL.INSTALIGN.MASK_ATTENTION = True  # masked cross-attention to V_k, as Mask2Former
    # Add V_k's positions to the values of the visual cross-attention too, not only to its keys
    # (the paper is silent; False is Mask2Former's reading). True lets a query's content carry
    # where its object is, which spatial expressions ("the leftmost ...") need.
    cfg.MODEL.INSTALIGN.POSITIONS_IN_VALUES = False
    # Before each POT block, add to each query's learned positional embedding an embedding of its
    # current mask's centre and spread (the paper is silent; False is Mask2Former's reading), so
    # that the self-attention can compare queries by where their objects lie.
    cfg.MODEL.INSTALIGN.QUERY_POSITIONS_FROM_MASKS = False
    # Add the queries' positional embeddings to the values of their self-attention too (the paper
    # is silent; False is Mask2Former's reading), so that a query reads where the others lie and
    # can tell whether another object of its kind is left of it ("the leftmost ...").
    cfg.MODEL.INSTALIGN.SELF_ATTENTION_POSITIONS_IN_VALUES = False
    # Add to the self-attention logits a learned bias per head from where each query's current
    # mask lies relative to the other's (the paper is silent; False is Mask2Former's reading), so
    # that a head can read the queries left of it and learn whether it is the leftmost of its kind.
    cfg.MODEL.INSTALIGN.SELF_ATTENTION_GEOMETRY_BIAS = False
    # The geometry bias also reads a code of the expression (its mean word feature), so that a
    # spatial word can choose the side a head reads (needs SELF_ATTENTION_GEOMETRY_BIAS).
    cfg.MODEL.INSTALIGN.SELF_ATTENTION_GEOMETRY_BIAS_READS_TEXT = False
    # Add to every relevance logit a term from where the query's mask lies among the candidates
    # (a z-score of its centre) times two coefficients the expression sets (the paper is silent;
    # False is a score read from each query alone): "leftmost" can favour the candidate furthest
    # left. In the spirit of MAttNet's location module.
    cfg.MODEL.INSTALIGN.RELATIVE_LOCATION_SCORE = False
    # Add to every relevance logit a bilinear match of the query with the expression's mean word
    # feature (the paper is silent; False is a score read from each query alone), so that a query
    # of a square and the word "square" can agree by a dot product.
    cfg.MODEL.INSTALIGN.TEXT_MATCH_SCORE = False
    # Before each POT block, add to each query a linear map of the finest visual level (V3) pooled
    # over its current mask (the paper is silent; False is Mask2Former's masked attention alone),
    # so that a query holds its object's shape as well as its colour.
    cfg.MODEL.INSTALIGN.MASK_POOLED_QUERIES = False
    # Not in the paper: with a positive value, a linear head names each query's category over this
    # many classes (more than the largest category_id), and a cross-entropy on the queries matched
    # to a target, weighted by CATEGORY_WEIGHT, asks them to keep what their object is. 0: off.
    cfg.MODEL.INSTALIGN.CATEGORY_CLASSES = 0
    cfg.MODEL.INSTALIGN.CATEGORY_WEIGHT = 2.0  # Mask2Former's weight of its class loss
    # Not in the paper: with a positive weight, a 1x1 convolution names the category (of
    # CATEGORY_CLASSES, 0 = background) at every cell of the mask features, with a cross-entropy
    # over all objects of the image (instalign_d2/modeling/dense_category.py). The train split must
    # list each image's objects (synthetic_gres_train_shape_colour does). 0: off.
    cfg.MODEL.INSTALIGN.DENSE_CATEGORY_WEIGHT = 0.0
    cfg.MODEL.INSTALIGN.SIZE_DIVISIBILITY = (
        32  # images are zero-padded to a multiple of this (backbone stride)
    )
    # Table 3(a): "none" (merged mask loss only) | "standard" (no phrase term) | "phrase" (ours)
    cfg.MODEL.INSTALIGN.INSTANCE_SUPERVISION = "phrase"
    # Table 3(b): "AIA" (Eq. 8) | "AIA_NO_PRELU" | "THRESHOLD" (fixed score threshold)
    cfg.MODEL.INSTALIGN.AGGREGATION = "AIA"
    cfg.MODEL.INSTALIGN.AGGREGATION_THRESHOLD = 0.5  # score threshold of the THRESHOLD variant
    cfg.MODEL.INSTALIGN.PRELU_INIT = 0.25  # initial negative slope of AIA's learnable PReLU
    # Table 3(c): "QGLOBAL_TSEN" (Eq. 11) | "QGLOBAL" | "TSEN" | "MEAN_QUERIES" (ReLA-style)
    cfg.MODEL.INSTALIGN.NO_TARGET_INPUT = "QGLOBAL_TSEN"
    cfg.MODEL.INSTALIGN.DEEP_SUPERVISION = True  # losses on every block's output
    # With deep supervision: L_merged on the last prediction only (L_inst stays on all of them).
    # The paper is silent; False is Mask2Former's practice of supervising every prediction alike.
    cfg.MODEL.INSTALIGN.MERGED_LOSS_ON_LAST_ONLY = False
    # Normaliser of the score terms of Eq. 7: "num_instances" (Eq. 7 as written: every term summed
    # and divided by the number of ground-truth instances) | "mean_over_queries" (score terms a
    # weighted mean over the B*N queries, ~N/instances-per-expression times weaker).
    cfg.MODEL.INSTALIGN.SCORE_LOSS_NORMALIZATION = "num_instances"
    # matching cost, Eq. 6 (supp. §8)
    cfg.MODEL.INSTALIGN.COST_SCORE = 2.0  # lambda_score
    cfg.MODEL.INSTALIGN.COST_MASK = 5.0  # lambda_mask (BCE + Dice)
    cfg.MODEL.INSTALIGN.COST_PHRASE = 1.0  # lambda_phrase
    # total loss, Eq. 13 (supp. §8)
    cfg.MODEL.INSTALIGN.MERGED_WEIGHT = 5.0  # lambda_merged
    cfg.MODEL.INSTALIGN.INSTANCE_WEIGHT = 1.0  # lambda_inst
    cfg.MODEL.INSTALIGN.NO_TARGET_WEIGHT = 0.1  # lambda_nt
    # point-sampled mask losses and costs, as Mask2Former
    cfg.MODEL.INSTALIGN.TRAIN_NUM_POINTS = 112 * 112
    cfg.MODEL.INSTALIGN.OVERSAMPLE_RATIO = 3.0
    cfg.MODEL.INSTALIGN.IMPORTANCE_SAMPLE_RATIO = 0.75

    cfg.MODEL.INSTALIGN.TEST = CN()
    cfg.MODEL.INSTALIGN.TEST.NO_TARGET_THRESHOLD = (
        0.5  # p_nt above this -> all-zero mask (paper §3.6)
    )
    cfg.MODEL.INSTALIGN.TEST.MASK_THRESHOLD = 0.5  # merged mask probability -> binary mask
    cfg.MODEL.INSTALIGN.TEST.INSTANCE_SCORE_THRESH = 0.5  # instances returned to the user
    cfg.MODEL.INSTALIGN.TEST.MAX_INSTANCES = 10  # at most this many returned instances

    # ----------------------------------------------------------------------------- solver
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1  # lr multiplier of the visual backbone
    cfg.SOLVER.TEXT_ENCODER_MULTIPLIER = 0.1  # lr multiplier of the text encoder
    cfg.SOLVER.PIXEL_DECODER_MULTIPLIER = 1.0  # lr multiplier of the pixel decoder
    # More multipliers, by parameter-name prefix: [["transformer_decoder.relative_location.", 10.0]]
    # (the longest matching prefix wins, these over the three above).
    cfg.SOLVER.LR_MULTIPLIERS = []
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0  # no decay on embeddings (queries, token embeddings)
    cfg.SOLVER.BASE_LR_END = 1e-6  # linear decay from BASE_LR to this at MAX_ITER (paper §4.1)
    cfg.SOLVER.LR_SCHEDULER_NAME = "WarmupLinearDecayLR"
    # The schedule in epochs of the train split (paper: 20). With EPOCHS > 0, MAX_ITER is computed
    # at start from the number of training samples and IMS_PER_BATCH
    # (instalign_d2.solver.apply_epoch_schedule); 0 = use MAX_ITER. Warm-up stays in iterations.
    cfg.SOLVER.EPOCHS = 0
    cfg.SOLVER.CHECKPOINT_PERIOD_EPOCHS = (
        0  # > 0: sets CHECKPOINT_PERIOD; 0 = use CHECKPOINT_PERIOD
    )
    # Not in the paper: an exponential moving average of the weights, which replaces them after
    # the last step (model_final.pth and the final evaluation; instalign_d2/engine/ema.py).
    cfg.MODEL_EMA = CN()
    cfg.MODEL_EMA.ENABLED = False
    cfg.MODEL_EMA.DECAY = 0.998  # about the last 1 / (1 - DECAY) steps

    # ----------------------------------------------------------------------------- test
    cfg.TEST.EVAL_RESOLUTION = "input"  # "input" (the mapper's size, as ReLA/DMMI) | "original"
    cfg.TEST.EVAL_PERIOD_EPOCHS = 0  # > 0: sets EVAL_PERIOD; 0 = use EVAL_PERIOD
    cfg.TEST.DUMP_PREDICTIONS = False  # also write RLE predictions to OUTPUT_DIR/inference

    # ----------------------------------------------------------------------------- process
    # Like Detectron2's CUDNN_BENCHMARK, a setting of the process: glibc's malloc keeps freed
    # blocks for the next step instead of giving them back to the kernel and faulting them in again
    # (instalign_d2/utils/host_memory.py). Only Linux with glibc; it changes speed, not results.
    cfg.KEEP_FREED_HOST_MEMORY = True
    return cfg
