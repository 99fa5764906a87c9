"""The synthetic genre generator: the embedded demo dataset and the fixture of every test.

Each genre is a :class:`GenreRecipe`: parameter *ranges* for tempo, a 16-step drum kit
(12 steps in 3/4), a bass line, a chord progression with its voicing and timbre, and noise
textures. :func:`clip_params` draws one clip's values from those ranges (tempo, key, swing,
levels, filter brightness, distortion, noise, output gain) and :func:`render_clip` renders it
with numpy (and :mod:`scipy.signal` filters): drums and notes are one-shot templates rendered
once per clip and overlap-added at their onsets, so a 30-s clip costs about 0.05 s.
Inside a clip, bars vary: hits drop out or gain ghost notes, fills end some 4-bar phrases,
onsets are swung and humanised, velocities jitter.

The classes are meant to be learnable from the views the models fuse (spectral envelope,
harmony, rhythm) but not from any single number: on each dimension below at least two genres
overlap, and only the combination separates them. Chord timbres are drawn per clip from the
listed set (the first is the genre's signature sound).

=======  =======  =====  =====================  =================  ===================  ========
genre    BPM      meter  rhythm                 harmony (mode)     chord timbres        texture
=======  =======  =====  =====================  =================  ===================  ========
techno   122-132  4/4    four-on-the-floor,     i i VI VII         saw, square, fm      pink
                         off-beat bass/hats     (minor)            stabs, close         hiss
rock     110-140  4/4    backbeat, 8th hats,    I5 V5 vi5 IV5      saw, square;         clean
                         fills                  (major)            driven power chords
waltz    132-168  3/4    oom-pah-pah, no        I IV V7 I          pluck, fm, organ     clean
                         snare                  (major)
reggae   66-84    4/4    one-drop, off-beat     I V vi IV          organ, pluck,        crackle
                         skank, swung           (major)            square
ambient  60-80    --     no drums, 2-bar        i9 VI9 III9 VII9   saw, sine, organ     pink
                         pads                   (minor)            slow pads, open      bed
funk     96-116   4/4    syncopated 16ths,      i7 i7 IV7 IV7      fm, pluck, square    clean
                         ghost snares           (dorian)           stabs
march    104-124  4/4    bass drum 1 and 3,     I IV V7 I          square, saw, organ   clean
                         snare runs             (major)            after-beats
ballad   60-76    4/4    half-time, 8th         I7 vi7 ii7 V7      pluck, fm, sine      crackle
                         arpeggios              (major)            arpeggio, open
bossa    120-140  4/4    clave rim, surdo       ii9 V9 I7 vi7      pluck, fm, organ     clean
                         kick, shaker           (major)            open
noise    90-150   4/4    erratic, distorted     whole-tone         bell, fm, saw        pink +
                                                clusters                                crackle
=======  =======  =====  =====================  =================  ===================  ========

"clean" still carries a faint pink hiss, 35-50 dB below the instruments.

Deliberate overlaps, each broken by another feature family:

* tempo: techno, rock and bossa share 122-132 BPM; funk, march and rock share 110-116;
  waltz and rock share 132-140; reggae, ambient and ballad share 66-76; noise spans them.
* harmony: rock and reggae play the same progression (rhythm, voicing and timbre differ);
  waltz and march play the same progression (3/4 against 4/4, tempo).
* mode: techno, ambient and funk are minor-ish; rock, reggae, waltz, march, ballad, bossa major.
* timbre: every chord timbre but noise's bell is drawn by two or more genres (most by five),
  and bass timbre, drum decays, filter cutoffs and bus levels come from overlapping ranges.
* texture: reggae and ballad both carry vinyl crackle; ambient, noise and techno a pink bed.
* pulse: the tresillo (3+3+2) of bossa, and often the syncopation of funk, make onset-
  autocorrelation tempo estimators report 4/3 or 2/3 of the drawn tempo, as on real records.
* keys overlap across genres (the tonic is drawn per clip from each recipe's ``keys``), and the
  output peak is drawn from 0.3-0.9, so loudness and absolute chroma alone do not separate.

:func:`synthesize_dataset` writes the GTZAN layout (``out_dir/<genre>/<genre>.00000.wav``,
16-bit mono WAV); clip ``c`` of genre ``g`` uses the seed derived from ``(seed, g, c)`` by
:class:`numpy.random.SeedSequence`, so a dataset is byte-identical across runs and machines.

Every function that renders takes a ``domain`` (one of :data:`DOMAINS`). ``"default"`` is the
production described above. ``"shifted"`` plays the same recipes (patterns, progressions,
meter, keys, structure) with another production, so that a model trained on one domain and
tested on the other shows whether it learnt the genre or the mix. Per clip, drawn from its own
seed (:func:`_shift_production`):

* mix: drums 3-6 dB quieter, bass 2-4 dB louder, pink bed 2-4 dB quieter (chords unchanged);
* EQ: the whole mix tilted darker by 1-2 dB per octave about 1 kHz (flat below 100 Hz);
* tempo: the upper half of the genre's range (the drawn position in the range is halved
  towards the top), so it never leaves the tempos the genre is documented with;
* timbres: chord and bass timbres swapped for one of similar role (saw <-> square,
  sine <-> organ, fm <-> pluck, bell -> fm); kick decay x0.6-0.8, snare x1.2-1.5, hats x1.3-1.6.

A shifted clip keeps the key, register, swing and every other value of its default twin (same
seed), but not the bar-to-bar variation: the events are drawn for another tempo.
"""

from deepfusion.synth.params import DOMAINS, ClipParams, clip_params
from deepfusion.synth.recipes import GENRES, RECIPES, STEPS_PER_BEAT, GenreRecipe, Range
from deepfusion.synth.render import MIN_SAMPLE_RATE, clip_seed, render_clip, synthesize_dataset

__all__ = ["DOMAINS", "GENRES", "MIN_SAMPLE_RATE", "RECIPES", "STEPS_PER_BEAT",
           "ClipParams", "GenreRecipe", "Range", "clip_params", "clip_seed",
           "render_clip", "synthesize_dataset"]
