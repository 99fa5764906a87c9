"""The feature views: one row each in :data:`VIEWS`; everything per view derives from the rows.

A row says the view's name, its kind, how many rows it has for a
:class:`~deepfusion.config.FeatureConfig`, and the functions that compute it. The kind decides
the rest::

    kind        the model's branch                 time axis          the model's rows
    mel         a CNN (MelCNN) over the image      STFT frames        ModelConfig.n_mels
    vector      an MLP on time-pooled statistics   STFT frames        ModelConfig.aux_rows
    pretrained  an MLP on time-pooled statistics   the network's      ModelConfig.
                (the frozen network's rows)        patches            pretrained_view_rows

The numpy function of a row (``"module:function"``) takes a
:class:`deepfusion.features.numpy_views.Clip` (one clip's shared STFT, masks, mel spectrogram,
each computed once on first use) and returns the view ``(rows, frames)``; the torch function,
where a row has one, takes a :class:`deepfusion.features.torch_views.Batch` and returns
``(B, rows, frames)``. A row without a torch function is computed on the torch path by its numpy
function, clip by clip. The key tuples, the views of a config and their shapes, and the rows of
a model are derived here; :mod:`deepfusion.config` re-exports them.

Adding a view whose rows come from existing settings: its function (in
``deepfusion/features/``), its row here, its test (``tests/test_views.py`` checks every row's
shape and torch/numpy agreement). A view of a new kind, or with its own setting (a
``FeatureConfig`` field, which also gives it a command-line option), needs more; see
``docs/architecture.md``. A view not in the feature code's first version joins the cache key by
name (:meth:`FeatureConfig.fingerprint`): its extraction never reuses an older cache entry.

Plain data: this module imports only the standard library and :mod:`deepfusion.patches`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from deepfusion.patches import VIEW_ROWS

MEL, VECTOR, PRETRAINED = "mel", "vector", "pretrained"
KINDS = (MEL, VECTOR, PRETRAINED)
#: The time axes: STFT frames (every hand-made view), or the pretrained network's patches.
FRAMES, PATCHES = "frames", "patches"

_NUMPY = "deepfusion.features.numpy_views:"
_TORCH = "deepfusion.features.torch_views:"
_PRETRAINED = "deepfusion.features.pretrained.view:"


@dataclass(frozen=True)
class View:
    """One feature view (see the module's docstring)."""

    name: str
    kind: str
    #: its rows: the FeatureConfig field that gives them (``"n_mfcc"``), or a fixed count
    rows: Union[str, int]
    #: ``"module:function"``: the view of one clip, from a numpy ``Clip``
    numpy: str
    #: ``"module:function"``: the views of a batch, from a torch ``Batch``; None: the numpy
    #: function, clip by clip
    torch: Optional[str] = None
    #: the largest absolute difference of the torch function from the numpy one (the two
    #: backends share the cache key within it); a row without a torch function agrees exactly
    tolerance: float = 0.0
    #: how a random spectral tilt (training augmentation) shows in the view: ``"bands"`` (a dB
    #: spectrum: the tilt is added band by band), ``"dct"`` (cepstra of the mel dB spectrum:
    #: its DCT is added); None: the view is left alone
    tilt: Optional[str] = None
    #: the smallest standard deviation a row is normalised by, as a fraction of the view's
    #: mean row deviation (0: the plain floor; :mod:`deepfusion.data.normalize`)
    std_floor: float = 0.0

    @property
    def axis(self) -> str:
        """The time axis: :data:`PATCHES` for the pretrained view, else :data:`FRAMES`."""
        return PATCHES if self.kind == PRETRAINED else FRAMES

    def n_rows(self, config: Any) -> int:
        """Rows of the view under ``config`` (a FeatureConfig)."""
        return int(getattr(config, self.rows)) if isinstance(self.rows, str) else int(self.rows)


#: Every view, in the order the model consumes them (the hand-made views, then the pretrained one).
VIEWS = (
    View("mel_spec_orig", MEL, "n_mels", _NUMPY + "mel_spec_orig_view",
         _TORCH + "mel_spec_orig_view", tolerance=0.1, tilt="bands"),
    View("mel_spec_harm", MEL, "n_mels", _NUMPY + "mel_spec_harm_view",
         _TORCH + "mel_spec_harm_view", tolerance=0.1, tilt="bands"),
    View("mel_spec_perc", MEL, "n_mels", _NUMPY + "mel_spec_perc_view",
         _TORCH + "mel_spec_perc_view", tolerance=0.1, tilt="bands"),
    View("mfcc", VECTOR, "n_mfcc", _NUMPY + "mfcc_view", _TORCH + "mfcc_view",
         tolerance=0.01, tilt="dct"),
    View("chroma", VECTOR, "n_chroma", _NUMPY + "chroma_view",
         "deepfusion.features.torch_chroma:chroma_view", tolerance=1e-4),
    View("tempogram", VECTOR, "tempogram_win_length", _NUMPY + "tempogram_view",
         _TORCH + "tempogram_view", tolerance=1e-3),
    View("musicnn", PRETRAINED, VIEW_ROWS, _PRETRAINED + "clip_view", _PRETRAINED + "batch_view",
         tolerance=1e-3, std_floor=0.1),
)

BY_NAME = {v.name: v for v in VIEWS}
#: The hand-made views (computed from the one STFT), in model order.
FEATURE_KEYS = tuple(v.name for v in VIEWS if v.kind != PRETRAINED)
#: The mel images (CNN branches) and the vector views (MLP branches), in model order.
MEL_KEYS = tuple(v.name for v in VIEWS if v.kind == MEL)
AUX_KEYS = tuple(v.name for v in VIEWS if v.kind == VECTOR)
#: The pretrained view: a frozen music network's representation of each 3-s patch
#: (:mod:`deepfusion.features.pretrained`), present when ``FeatureConfig.pretrained_view``
#: names a network.
(PRETRAINED_KEY,) = (v.name for v in VIEWS if v.kind == PRETRAINED)
#: Every view a features file may hold, in the order the model consumes them.
ALL_KEYS = FEATURE_KEYS + (PRETRAINED_KEY,)


def view_keys(pretrained: bool) -> tuple[str, ...]:
    """The views of a features file or model: the hand-made ones, and the pretrained one if
    present."""
    return ALL_KEYS if pretrained else FEATURE_KEYS


def views_of(config: Any) -> tuple[View, ...]:
    """The rows of the views ``config`` (a FeatureConfig) computes, in model order."""
    return tuple(BY_NAME[k] for k in view_keys(config.pretrained_view is not None))


def feature_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """The ``(rows, time)`` shape of each view ``config`` computes: time is ``n_frames``, or
    ``n_patches`` for the pretrained view."""
    return {v.name: (v.n_rows(config), config.n_patches if v.axis == PATCHES else config.n_frames)
            for v in views_of(config)}


def model_rows(n_mels: int, aux_rows: Sequence[int], pretrained_view_rows: int = 0) -> dict[str, int]:
    """The rows of each view a model reads, in model order, from its
    :class:`~deepfusion.config.ModelConfig` fields: ``n_mels`` for every mel view,
    ``aux_rows`` for the vector views (in :data:`AUX_KEYS` order), ``pretrained_view_rows``
    for the pretrained view (0: the model has none)."""
    aux = dict(zip(AUX_KEYS, aux_rows))
    rows = {}
    for k in view_keys(bool(pretrained_view_rows)):
        kind = BY_NAME[k].kind
        if kind == MEL:
            rows[k] = int(n_mels)
        elif kind == PRETRAINED:
            rows[k] = int(pretrained_view_rows)
        elif k in aux:
            rows[k] = int(aux[k])
    return rows
