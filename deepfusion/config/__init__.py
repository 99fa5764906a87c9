"""One dataclass per concern, one module each.

:class:`FeatureConfig` (what the features are, :mod:`.features`), :class:`ModelConfig` (the
network, :mod:`.model`), :class:`TrainConfig` (the recipe, :mod:`.train`) and
:class:`RuntimeConfig` (where and how a run executes, :mod:`.runtime`); default paths
(:mod:`.paths`) and how a field is named and refused (:mod:`.fields`). Each config is saved
with :func:`dataclasses.asdict` and rebuilt with ``Config(**d)``, so that features files and
checkpoints carry plain dicts, never code. The CLI generates its options from these
dataclasses, so a default lives here and nowhere else. ``from deepfusion.config import X`` is
the one place to import them from.
"""

from deepfusion.config.features import (FEATURE_CODE_VERSION, FEATURE_FORMATS,
                                        PRETRAINED_VIEW_VERSION, PRETRAINED_VIEWS, VERSION_1_VIEWS,
                                        FeatureConfig)
from deepfusion.config.fields import FLAGS, flag_of, option_name
from deepfusion.config.model import ARCHITECTURE_FIELDS, MODEL_KINDS, ModelConfig
from deepfusion.config.paths import (DEFAULT_CACHE_DIR, DEFAULT_FEATURES, DEFAULT_MODEL_DIR,
                                     DEFAULT_STORE)
from deepfusion.config.runtime import (ADAPT_MIN_CLIPS, ADAPT_MODES, AMP_DTYPES,
                                       INFERENCE_PRECISIONS, RUNTIME_FIELDS, RuntimeConfig)
from deepfusion.config.train import AUTO_FIELDS, SELECTIONS, TrainConfig

__all__ = ["FEATURE_CODE_VERSION", "FEATURE_FORMATS", "PRETRAINED_VIEW_VERSION", "PRETRAINED_VIEWS",
           "VERSION_1_VIEWS", "FeatureConfig", "FLAGS", "flag_of", "option_name",
           "ARCHITECTURE_FIELDS", "MODEL_KINDS", "ModelConfig", "DEFAULT_CACHE_DIR",
           "DEFAULT_FEATURES", "DEFAULT_MODEL_DIR", "DEFAULT_STORE", "ADAPT_MIN_CLIPS",
           "ADAPT_MODES", "AMP_DTYPES", "INFERENCE_PRECISIONS", "RUNTIME_FIELDS", "RuntimeConfig",
           "AUTO_FIELDS", "SELECTIONS", "TrainConfig"]
