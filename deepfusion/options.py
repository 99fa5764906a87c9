"""Every command-line option, defined once (as pip-tools' ``scripts/options.py`` does).

Options that set a config field are generated from the dataclasses of :mod:`deepfusion.config`:
the default is the field's default, the flag its name (``batch_size`` -> ``--batch-size``),
a boolean becomes ``--x/--no-x``; only the help text and, where a range matters, the click type
are written here. A command gets the fields back in its keyword arguments and rebuilds the
config with :func:`take`. Options several commands share (``--device``, ``--quiet``,
``--features``, ``--checkpoint``, ``--split-file``) are one decorator each.

Only :mod:`deepfusion.config` (dataclasses, no numpy) is imported, so ``--help`` stays instant.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Optional

import click

from deepfusion.backbones import BACKBONES, default_backbone
from deepfusion.config import (ADAPT_MIN_CLIPS, ADAPT_MODES, AMP_DTYPES, DEFAULT_CACHE_DIR,
                               DEFAULT_FEATURES, DEFAULT_STORE, FEATURE_FORMATS,
                               INFERENCE_PRECISIONS, MODEL_KINDS, PRETRAINED_VIEWS, SELECTIONS,
                               FeatureConfig, ModelConfig, RuntimeConfig, TrainConfig, flag_of,
                               option_name)
from deepfusion.train.recipe import describe_auto


@dataclass(frozen=True)
class Opt:
    """How one config field appears on the command line."""

    field: str
    help: str = ""
    type: Any = None              # a click type; default: the type of the field's default
    flag: Optional[str] = None    # default: option_name(field)
    short: Optional[str] = None   # e.g. "-q"
    auto: Optional[str] = None    # the field's None default means "auto": this text says what


#: The flag of every config field that has an option and a flag of its own (``--sr``).


def config_options(cls: type, specs: list[Opt]) -> Callable[[Callable], Callable]:
    """A decorator adding one option per spec, with the default of ``cls``'s field."""
    defaults = {f.name: f.default for f in fields(cls)}

    def decorate(func: Callable) -> Callable:
        for spec in reversed(specs):
            # "auto" options default to None (the call did not choose) whatever the field's
            # own default: train resolves them, and --resume can tell given from not given
            default = None if spec.auto else defaults[spec.field]
            assert default is not MISSING, spec.field   # a required field is not an option
            flag = spec.flag or option_name(spec.field)
            kwargs: dict[str, Any] = {"default": default, "help": spec.help}
            if isinstance(default, bool):
                decls = [f"{flag}/--no-{flag[2:]}"]
            else:
                decls = [flag] + ([spec.short] if spec.short else [])
                kwargs["type"] = spec.type or (
                    float if default is None or isinstance(default, float) else type(default))
            if spec.auto:
                kwargs["help"] = f"{spec.help}  [default: {spec.auto}]".strip()
            else:
                kwargs["show_default"] = default is not None
            func = click.option(*decls, spec.field, **kwargs)(func)
        return func
    return decorate


def take(cls: type, kwargs: dict[str, Any]):
    """Pop ``cls``'s fields out of a command's keyword arguments and build the config."""
    return cls(**{f.name: kwargs.pop(f.name) for f in fields(cls) if f.name in kwargs})


class SecondsOrFull(click.ParamType):
    """A positive number of seconds, or ``full`` (None: whole clips)."""

    name = "SECONDS|full"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, float):
            return value
        if str(value).lower() in ("full", "none", "0"):
            return None
        try:
            seconds = float(value)
        except ValueError:
            self.fail(f"{value!r} is neither a number of seconds nor 'full'", param, ctx)
        if seconds <= 0:
            self.fail(f"{value!r} must be > 0", param, ctx)
        return seconds


class Seconds(click.ParamType):
    """A number of seconds, 0 or more (0: no limit)."""

    name = "SECONDS"

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            return value
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not seconds >= 0:
            self.fail(f"{value} is below 0; give 0 (no limit) or more seconds", param, ctx)
        return seconds


class PretrainedViewChoice(click.Choice):
    """A name of :data:`~deepfusion.config.PRETRAINED_VIEWS`, or ``none`` (None: no view)."""

    def __init__(self):
        super().__init__([*PRETRAINED_VIEWS, "none"])

    def convert(self, value, param, ctx):
        if value is None:
            return None
        value = super().convert(value, param, ctx)
        return None if value == "none" else value


# ----------------------------------------------------------------------------- FeatureConfig

feature_options = config_options(FeatureConfig, [
    Opt("sample_rate", "Sample rate to decode to (Hz).", flag=flag_of("sample_rate")),
    Opt("duration", "Clip length in seconds; shorter clips are zero-padded, longer trimmed."),
    Opt("min_duration", "Files shorter than this (seconds) are reported, not used."),
    Opt("n_fft", "STFT frame length."),
    Opt("hop_length", "STFT hop in samples."),
    Opt("n_mels", "Mel bands."),
    Opt("fmin", "Lowest mel frequency (Hz)."),
    Opt("fmax", "Highest mel frequency (Hz).", auto="sr/2"),
    Opt("top_db", "Dynamic range of the dB spectrograms."),
    Opt("hpss_kernel", "Median-filter length of the harmonic/percussive separation."),
    Opt("hpss_power", "Exponent of the HPSS soft masks."),
    Opt("hpss_margin", "HPSS margin (>= 1; 1 splits all energy)."),
    Opt("n_mfcc", "MFCC coefficients."),
    Opt("n_chroma", "Chroma bins."),
    Opt("chroma_tuning", "Tuning offset in chroma bins.", auto="estimated per clip"),
    Opt("tempogram_win_length", "Tempogram lags (onset frames)."),
    Opt("pretrained_view", "The seventh view: what a frozen music network (musicnn, trained on "
        "the Million Song Dataset or MagnaTagATune) makes of each 3-s patch; 'none' extracts "
        "the six hand-made views only.", type=PretrainedViewChoice()),
    Opt("pretrained_stride", "One 3-s patch in every N goes through the pretrained view's "
        "network (1: every patch; the network costs about three times the six other views "
        "per patch on a CPU core).", type=click.IntRange(1)),
])

# ------------------------------------------------------------------------------- TrainConfig

_AUTO = "auto per backbone, see --epochs"

recipe_options = config_options(TrainConfig, [
    Opt("model", "net: the multi-modal network; probe: the linear-probe baseline (logistic "
        "regression on time-pooled statistics of the six views), same checkpoint format.",
        type=click.Choice(MODEL_KINDS)),
    Opt("epochs", "Epochs. With --resume, a larger value extends the run: the cosine schedule "
        "becomes that of the longer run from the next epoch on.", type=click.IntRange(1),
        auto=f"auto per backbone: {describe_auto()}"),
    Opt("batch_size", "Training segments per batch and process (under torchrun, N "
        "processes take N x this per optimizer step).",
        type=click.IntRange(1), auto=_AUTO),
    Opt("lr", "Peak learning rate of AdamW (linear warm-up, cosine decay).",
        type=click.FloatRange(min=0, min_open=True),
        auto="light 1e-3, ResNets 3e-4 from scratch, 1e-4 from ImageNet weights"),
    Opt("weight_decay", "AdamW weight decay.", type=click.FloatRange(min=0)),
    Opt("warmup_epochs", "Epochs of linear learning-rate warm-up.", type=click.IntRange(0)),
    Opt("label_smoothing", "Label smoothing of the cross-entropy.",
        type=click.FloatRange(0, 1, max_open=True)),
    Opt("seed", "Seed of the split, the initial weights and every random draw of training."),
    Opt("segment_seconds", "Train on random crops of this length; 'full' uses whole clips.",
        type=SecondsOrFull()),
    Opt("val_size", "Fraction of the clips (by group) held out for validation.",
        type=click.FloatRange(0, 1, max_open=True)),
    Opt("test_size", "Fraction of the clips (by group) held out for the test.",
        type=click.FloatRange(0, 1, max_open=True)),
    Opt("patience", "Stop after this many epochs without a better validation loss (accuracy "
        "with --select val_acc). May be changed with --resume.", type=click.IntRange(1),
        auto=_AUTO),
    Opt("select", "Which weights best.pth holds: those after the last epoch, or of the epoch "
        "with the lowest validation loss / highest validation accuracy.",
        type=click.Choice(SELECTIONS)),
    Opt("ema", "Decay per step of an exponential moving average of the weights (0: off).",
        type=click.FloatRange(0, 1, max_open=True)),
    Opt("mixup", "Mixup Beta(a, a) parameter (0: off).", type=click.FloatRange(min=0)),
    Opt("freq_mask", "SpecAugment: mask up to this fraction of mel bands (0: off).",
        type=click.FloatRange(0, 1, max_open=True)),
    Opt("time_mask", "SpecAugment: mask up to this fraction of frames (0: off).",
        type=click.FloatRange(0, 1, max_open=True)),
    Opt("tilt_db", "Random spectral tilt of the mel views and MFCC: up to this many dB between "
        "the lowest and the highest mel band, either way (0: off).",
        type=click.FloatRange(min=0)),
    Opt("probe_c", "Inverse regularisation strength of --model probe.",
        type=click.FloatRange(min=0, min_open=True)),
    Opt("init_from", "Fine-tune: start every branch, the attention and the fusion layers from "
        "this deepfusion checkpoint (its features must be this run's); the classifier keeps "
        "the rows of the genres both collections share, the others start fresh.",
        type=click.Path(exists=True, dir_okay=False)),
    Opt("freeze_branches", "With --init-from: train only the modality attention, the fusion "
        "layers and the classifier."),
])

# ------------------------------------------------------------------------------- ModelConfig

model_options = config_options(ModelConfig, [
    Opt("backbone", "CNN of the three mel branches; 'light' is a small CNN for CPUs.",
        type=click.Choice(BACKBONES),
        auto=f"{default_backbone('cpu')} on a CPU or a Mac's GPU, {default_backbone('cuda')} on a "
        "CUDA GPU"),
    Opt("share_backbone", "One set of CNN weights for all three mel views."),
    Opt("band_stats", "Each mel branch also sees the mean and standard deviation over time of "
        "every mel band (the long-term spectral shape) beside its CNN's pooled output."),
])

# ----------------------------------------------------------------------------- RuntimeConfig

device_option = config_options(RuntimeConfig, [
    Opt("device", "auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps."),
])

runtime_options = config_options(RuntimeConfig, [
    Opt("amp", "Mixed precision where the device computes it natively: bf16 on GPUs of "
        "compute capability 8.0+ (Ampere and later), fp16 with loss scaling on older GPUs, "
        "bf16 on CPUs with native bf16, never on MPS. Validation and test run in float32."),
    Opt("amp_dtype", "The reduced precision of --amp: auto (as --amp says), or bf16 / fp16 "
        "(refused where the device does not compute it natively).",
        type=click.Choice(AMP_DTYPES)),
    Opt("channels_last", "Channels-last memory format for the CNNs."),
    Opt("num_workers", "DataLoader worker processes.", type=click.IntRange(0),
        auto="up to 4 per process on CUDA (one core each left to the loop), 0 on CPU and MPS"),
    Opt("sync_bn", "Under torchrun on GPUs: BatchNorm statistics over every process's "
        "segments (SyncBatchNorm); on CPUs a line says it is not available."),
    Opt("deterministic", "Repeatable GPU runs: deterministic algorithms and cuDNN, no TF32, no "
        "cuDNN autotuning (slower). Without it cuDNN autotunes its convolutions on CUDA. CPU "
        "runs repeat either way."),
    Opt("save_every", "Write best.pth and last.pth (a ResNet-50's last.pth is 0.9 GB) at most "
        "every SECONDS of training, at the end, and when the run is interrupted (Ctrl-C, "
        "SIGTERM); a kill -9 loses at most this much. 0: after every epoch.",
        type=click.FloatRange(min=0)),
])

precision_option = click.option(
    "--precision", type=click.Choice(INFERENCE_PRECISIONS), default=INFERENCE_PRECISIONS[0],
    show_default=True, help="fp32: the same answer on every machine (what train's validation "
    "and test use); amp: autocast where the device computes it natively (faster on GPUs; "
    "borderline clips may change).")

# ---------------------------------------------------------------------- shared plain options

quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bars.")

cache_dir_option = click.option(
    "--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_CACHE_DIR,
    show_default=True, envvar="DEEPFUSION_CACHE",
    help="Per-clip feature cache, shared by extract, predict and embed: a file analysed before "
    "(same content, same settings) is not decoded again; predict and embed also keep each "
    "model's outputs there [env: DEEPFUSION_CACHE].")

jobs_option = click.option("--jobs", "-j", type=click.IntRange(1), default=None,
                           help="Worker processes computing features; with extract --backend torch "
                           "they only decode [default: all cores].")

timeout_option = click.option(
    "--timeout", type=Seconds(), default=120.0, show_default=True,
    help="Seconds one file (for predict and embed, one window of a long file) may take before "
    "it is abandoned and reported (0: no limit).")

split_file_option = click.option(
    "--split-file", "split_file", default=TrainConfig.split_file,
    help="CSV 'path,split' (train/val/test) imposing the split, or a shipped alias: "
    "gtzan-fault-filtered.")

checkpoint_option = click.option(
    "--checkpoint", type=click.Path(dir_okay=False, path_type=Path),
    default=Path("models/best.pth"), show_default=True,
    help="A checkpoint written by 'deepfusion train'.")


def features_option(*, default: Optional[Path], help_default: Optional[str] = None):
    """``--features``: a features pickle or store folder (default given per command)."""
    text = "Features pickle or store folder from 'deepfusion extract' (or the original project's pickle)."
    return click.option("--features", type=click.Path(path_type=Path), default=default,
                        show_default=default is not None,
                        help=f"{text}  [default: {help_default}]" if help_default else text)


train_features_option = features_option(default=DEFAULT_FEATURES)


def adapt_option(default: str = "auto") -> Callable[[Callable], Callable]:
    """``--adapt``: normalisation statistics of the collection being classified."""
    return click.option(
        "--adapt", type=click.Choice(ADAPT_MODES), default=default, show_default=True,
        help="Normalise by the statistics of the collection being classified, no labels: "
        "inputs (the views'), full (and the network's BatchNorm statistics, or the probe's); "
        f"auto: full for another collection than the training one with at least {ADAPT_MIN_CLIPS} "
        "clips. A prediction then depends on the other files classified with it.")


def overwrite_option(func):
    """``--overwrite`` of the commands that write files the user names (train has its own)."""
    return click.option("--overwrite", is_flag=True, help="Replace an existing output even "
                        "when it is not a file this command writes (never a file it reads).")(func)


def library_options(func):
    """Options predict and embed share: the models, the engine, the cache and the workers."""
    options = [
        click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path)),
        click.option("--checkpoint", "checkpoints", multiple=True,
                     type=click.Path(dir_okay=False, path_type=Path),
                     default=[Path("models/best.pth")], show_default=True,
                     help="A checkpoint written by 'deepfusion train' (a .onnx model from "
                     "'deepfusion export' with --engine onnx); give it several times to average "
                     "an ensemble (the fold models of train --folds, say)."),
        click.option("--engine", type=click.Choice(["torch", "onnx"]), default="torch",
                     show_default=True, help="onnx: run exported models with onnxruntime, "
                     "without importing torch (pip install 'deepfusion[onnx]')."),
        cache_dir_option,
        jobs_option,
        timeout_option,
        quiet_option,
        device_option,
        precision_option,
    ]
    for option in reversed(options):
        func = option(func)
    return func


def extract_options(func):
    """The options of ``deepfusion extract`` besides the feature settings' own."""
    options = [
        click.option("--audio-dir", required=True,
                     type=click.Path(exists=True, file_okay=False, path_type=Path),
                     help="Dataset root: genre folders of audio files (wav, au, flac, ogg, mp3, ...)."),
        click.option("--out", type=click.Path(path_type=Path),
                     help=f"Features pickle or store folder to write  [default: {DEFAULT_FEATURES}, "
                     f"{DEFAULT_STORE} with --format store]."),
        click.option("--format", "fmt", type=click.Choice(FEATURE_FORMATS), default=FEATURE_FORMATS[0],
                     show_default=True, help="pickle: one file, read whole into RAM by train; store: a "
                     "folder of arrays that train memory-maps (collections larger than RAM)."),
        click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32",
                     show_default=True, help="How a store holds the views: float16 halves its disk "
                     "and page cache (the model computes in float32; see the README for the effect on "
                     "accuracy). Needs --format store."),
        cache_dir_option,
        click.option("--manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="Metadata table of the collection: a CSV with 'path' and 'label' (or "
                     "'genre') columns, paths relative to --audio-dir, and optional 'artist', 'album', "
                     "'track_id' or 'group' columns that splits keep together; MTG-Jamendo's TSV and "
                     "FMA's tracks.csv are read too  [default: such a table found at the root of "
                     "--audio-dir, else genres from folder names]."),
        click.option("--no-metadata", is_flag=True, help="Ignore a metadata table at the root of "
                     "--audio-dir: genres from folder names, no groups."),
        jobs_option,
        click.option("--scheduler", envvar="DEEPFUSION_SCHEDULER", metavar="ADDRESS",
                     help="Run the per-clip work on a Dask cluster: a scheduler address "
                     "(tcp://host:8786) or local:N for N local worker processes; --cache-dir must be "
                     "a folder every worker shares. Needs pip install 'deepfusion[distributed]' "
                     "[env: DEEPFUSION_SCHEDULER]."),
        quiet_option,
        click.option("--strict", is_flag=True, help="Exit non-zero if any file could not be read."),
        timeout_option,
        click.option("--backend", type=click.Choice(["numpy", "torch"]), default=None,
                     help="Feature code: numpy (librosa, in the workers) or torch (batches of the "
                     "clips the workers decode, in the main process on --device). Both agree to float32 "
                     "rounding and share the cache  [default: numpy, torch when --device finds or "
                     "names a GPU (--device is where the torch backend runs)]."),
        device_option,
        overwrite_option,
        feature_options,
    ]
    for option in reversed(options):
        func = option(func)
    return func
