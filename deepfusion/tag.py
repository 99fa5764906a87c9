"""Music tags of audio files from musicnn: the 50 tag likelihoods of a file, averaged over its
3-s patches, as musicnn's own tagger reports them.

The tags are rows of the pretrained view (:mod:`deepfusion.features.pretrained.view`) computed on
every patch (``pretrained_stride=1``), so a file goes through exactly the per-file job
``extract`` and ``predict`` run (decoding under
``--timeout``, the same cache, the same worker processes and one-line reasons for files that
cannot be read): a file extracted or classified before with the same model is not decoded
again (with extract's and predict's ``--pretrained-stride 1``; their default, one patch in
four, is another cache namespace). A file longer than a clip is covered by
clip-length windows (:mod:`deepfusion.jobs.windows`); its likelihoods are the mean over the patches
of all its windows, and a file shorter than a clip counts only the patches of its own audio
(not those of the padding). The audio reaches musicnn resampled twice (the source rate to the features'
rate with soxr, then to 16 kHz with musicnn's own resampler): for a source at 22,050 Hz, the
features' rate, the likelihoods are musicnn's own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from deepfusion.config import DEFAULT_CACHE_DIR, PRETRAINED_VIEWS, FeatureConfig
from deepfusion.errors import ParameterError
from deepfusion.io.atomic import CACHE_ENTRY_LOST
from deepfusion.views import PRETRAINED_KEY


@dataclass
class Tags:
    """musicnn's tag likelihoods of one file."""

    path: str
    model: str
    tags: dict[str, float]              # every tag of the model -> mean likelihood, model order
    patches: int                        # 3-s patches averaged
    seconds: float                      # length of the file
    computed: int = 0                   # windows whose features were computed (not cached)
    top: list[tuple[str, float]] = field(default_factory=list)   # most likely first

    def to_dict(self) -> dict:
        """``path``, ``model`` and ``tags`` (every tag name -> likelihood, 6 decimals)."""
        return {"path": self.path, "model": self.model,
                "tags": {t: round(p, 6) for t, p in self.tags.items()}}


class Tagger:
    """Inputs listed, the model checked and outputs checked before any file is analysed;
    :meth:`run` then tags the files.

    Parameters
    ----------
    inputs : files and folders (every audio file below a folder, sorted)
    model : ``MTT_musicnn`` (musicnn's own default) or ``MSD_musicnn``
    cache_dir : the feature cache extract and predict use
    destinations : files the caller will write (:class:`~deepfusion.io.guard.Destination`),
        refused when one would replace an input, is an existing file of another kind (unless
        ``overwrite``) or cannot be written

    Raises
    ------
    ParameterError
        An unknown model.
    OutputError
        An output or the cache folder cannot be written.
    """

    def __init__(self, inputs: Iterable[Union[str, Path]], *, model: str = "MTT_musicnn",
                 cache_dir: Path = DEFAULT_CACHE_DIR, destinations: Sequence[Any] = (),
                 overwrite: bool = False):
        from deepfusion.audio import expand_inputs
        from deepfusion.io.atomic import check_writable
        from deepfusion.io.cache import FeatureCache
        from deepfusion.io.guard import audio_inputs, check_destinations

        if model not in PRETRAINED_VIEWS:
            raise ParameterError(f"--model must be one of {', '.join(PRETRAINED_VIEWS)}, got {model!r}")
        self.model = model
        inputs = [Path(p) for p in inputs]
        self.files = expand_inputs(inputs)
        # folders typed that hold no audio file; a folder found under one (a folder named
        # x.wav) is an input like a file, and says "is a folder, not an audio file"
        self._typed = set(inputs)
        if destinations:
            check_destinations(destinations, audio_inputs(p for p in self.files if not p.is_dir()),
                               overwrite=overwrite)
            for dest in destinations:
                check_writable(dest.path)
        # every patch, as musicnn's tagger (extract's default takes one in four)
        self.config = FeatureConfig(pretrained_view=model, pretrained_stride=1)
        self.cache_dir = Path(cache_dir)
        self.cache = FeatureCache(self.cache_dir, self.config)
        self.cache.prepare()
        self.repaired = 0          # damaged cache entries this run replaced
        from deepfusion.features.pretrained.musicnn import TAGS

        self.tag_names = list(TAGS[model])

    def run(self, *, jobs: Optional[int] = None, timeout: Optional[float] = 120.0,
            quiet: bool = True) -> Iterator[Union[Tags, tuple[str, str]]]:
        """Yield, in input order, :class:`Tags` per readable file or ``(path, reason)``.

        ``jobs``: worker processes (default all cores); ``timeout``: seconds one file (one
        window of a long file) may take; ``quiet``: no progress bar.
        """
        from deepfusion.audio import AUDIO_EXTENSIONS
        from deepfusion.jobs.windows import load_window, run_file_tasks
        from deepfusion.progress import progress_bar

        folders = {i for i, p in enumerate(self.files) if p in self._typed and p.is_dir()}
        todo = [p for i, p in enumerate(self.files) if i not in folders]
        results = run_file_tasks(todo, cache_dir=self.cache_dir, config=self.config, jobs=jobs,
                                 timeout=timeout)
        from deepfusion.features.pretrained.view import all_patches, part_rows

        rows = part_rows("taggram")
        with progress_bar(len(todo), desc="tag", unit="file", quiet=quiet) as bar:
            for i, path in enumerate(self.files):
                if i in folders:
                    yield str(path), f"no audio files ({', '.join(AUDIO_EXTENSIONS)})"
                    continue
                key, n_windows, seconds, reason, computed, mended = next(results)
                self.repaired += mended
                bar.update(1)
                if reason:
                    yield str(path), reason
                    continue
                taggrams = []
                for w in range(n_windows):
                    views = load_window(self.cache, key, w)
                    if views is None:
                        break
                    taggrams.append(views[PRETRAINED_KEY][0, rows, :])   # (tags, patches)
                if len(taggrams) < n_windows:
                    yield str(path), CACHE_ENTRY_LOST
                    continue
                if seconds < self.config.duration:
                    # one window, padded to a clip: only the patches of the file's own audio
                    real = all_patches(int(round(seconds * self.config.sample_rate)),
                                       self.config.sample_rate)
                    taggrams[0] = taggrams[0][:, :real]
                taggram = np.concatenate(taggrams, axis=1).astype(np.float64)
                mean = taggram.mean(axis=1)
                tags = {t: float(p) for t, p in zip(self.tag_names, mean)}
                order = np.argsort(-mean, kind="stable")
                yield Tags(str(path), self.model, tags, int(taggram.shape[1]), seconds, computed,
                           [(self.tag_names[j], float(mean[j])) for j in order])


def tag(inputs: Iterable[Union[str, Path]], *, model: str = "MTT_musicnn", top_k: int = 10,
        cache_dir: Path = DEFAULT_CACHE_DIR, jobs: Optional[int] = None,
        timeout: Optional[float] = 120.0, quiet: bool = True
        ) -> Iterator[Union[Tags, tuple[str, str]]]:
    """Yield :class:`Tags` (``top`` cut to ``top_k``) per readable file, or ``(path, reason)``
    for the others; see :class:`Tagger`."""
    for result in Tagger(inputs, model=model, cache_dir=cache_dir).run(jobs=jobs, timeout=timeout,
                                                                      quiet=quiet):
        if isinstance(result, Tags):
            result.top = result.top[:max(1, top_k)]
        yield result
