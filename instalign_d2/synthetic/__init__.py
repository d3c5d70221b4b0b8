"""The embedded synthetic world: scenes, expressions, the generator, its tiny text encoder and the
backbone pre-training that stands in for ImageNet.

- ``scene.py``                coloured shapes on textured backgrounds, with exact masks
- ``expressions.py``          unambiguous single / multi / no-target expressions about a scene
- ``params.py``               :class:`SyntheticParams` (what a dataset is made of) and its layout
- ``generator.py``            the whole dataset in the gRefCOCO layout (seeded, atomic)
- ``text_encoder.py``         a tiny RoBERTa-style tokenizer + config written from a corpus
- ``backbone_pretraining.py`` the trunk trained to name each object's shape, colour and size
- ``__main__.py``             ``python -m instalign_d2.synthetic`` (the generator's command line)

The registration of the splits (``synthetic_gres_{train,val,test}``) lives with the other
datasets in ``instalign_d2/data/datasets/``.
"""

from .params import SyntheticParams, synthetic_root  # noqa: F401
