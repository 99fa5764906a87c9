"""Build ``crossgenres``: a second real-music corpus of minigenres' four genres, from other sources.

``../shared/data/minigenres`` holds 80 clips of ambient, electronic, metal and orchestral music
cut from four Debian packages. This script rebuilds, reproducibly, a second corpus of the same
four genres with the same genre definitions and the same clip rules, from *other* Debian
packages and *other* artists, so that a model can be trained on one corpus and tested on the
other (``benchmarks/cross_source.py``).

What it does: downloads the pinned Debian packages listed in ``PACKAGES`` (``apt-get download
PKG=VERSION``; it refuses a different version unless ``--allow-other-versions``), extracts only
the music files listed in ``TRACKS`` (checking each file's SHA-256), cuts them into 30-s clips
(see ``CLIP RULES`` below and the README it writes) and writes ``DIR/<genre>/<genre>.NNNNN.ogg``,
``DIR/manifest.csv`` (minigenres' columns plus ``label_source``) and ``DIR/README.md``. The
folder is built beside ``DIR`` and renamed into place at the end; a non-empty ``DIR`` is only
replaced with ``--overwrite``.

Labels: a track is in a genre only because its package or its own tags say so (a Vorbis
``GENRE`` tag, or a title/album/file name that names the genre); nobody listened and no
signal check chose a label. ``TRACKS`` records, per track, that reason (``label_source``).

Reserved packages: warzone2100-music, singularity-music, fretsonfire-songs-sectoid and
ufoai-music are kept for an external test and must never be used here in any form (not even
downloaded to look at); minigenres' own packages (ufoai-music, nexuiz-music,
fretsonfire-songs-muldjord, wesnoth-1.16-music) and the artists of minigenres' manifest are
excluded too. The script checks its own tables against these lists before it runs.

Needs Debian's ``apt-get`` and ``dpkg-deb`` (with bookworm's ``main`` in the apt sources and
``apt-get update`` done once), numpy, soundfile and soxr. Every selected file is Ogg Vorbis,
decoded by soundfile; no other decoder is used.

Usage::

    python3 benchmarks/crossgenres.py --out data/crossgenres
    python3 benchmarks/crossgenres.py --out data/crossgenres --workdir /tmp/cg --overwrite

``--workdir`` keeps the downloaded packages there (a second build reuses them); without it a
temporary folder is used and removed.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

# --------------------------------------------------------------------------------------------
# What must never be touched, and what minigenres already uses.
# --------------------------------------------------------------------------------------------
#: reserved for an external test: never download, extract or inspect these
RESERVED_PACKAGES = frozenset({"warzone2100-music", "singularity-music",
                               "fretsonfire-songs-sectoid", "ufoai-music"})
#: the packages minigenres is cut from
MINIGENRES_PACKAGES = frozenset({"ufoai-music", "nexuiz-music", "fretsonfire-songs-muldjord",
                                 "wesnoth-1.16-music"})
#: minigenres' artists (from its manifest); also checked against the manifest itself when
#: ``../shared/data/minigenres/manifest.csv`` is present
MINIGENRES_ARTISTS = frozenset({
    "Paul Bee (paulb)", "Simon Green (Psymong)", "Braden Walters",
    "Gerd (elysis) Raudenbusch", "Parapraxis", "blkrbt", "Muldjord (El Senator)",
    "Aleksi Aubry-Carlson", "Doug Kaufman", "Gianmarco Leone", "Jeremy Nicoll",
    "Mattias Westlund", "Ryan Reilly", "Stephen Rozanc", "Timothy Pinkham", "Tyler Johnson"})
MINIGENRES_MANIFEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "minigenres" \
    / "manifest.csv"

# --------------------------------------------------------------------------------------------
# Sources: Debian 12 "bookworm", section main (DFSG-free). Exact versions.
# --------------------------------------------------------------------------------------------
#: package -> exact Debian version
PACKAGES = {
    "brainparty-data": "0.61+dfsg-7",
    "freedroidrpg-data": "1.0-1",
    "krank": "0.7+dfsg2-4",
    "marsshooter-data": "0.7.6-7",
    "naev-data": "0.8.2-1",
    "openclonk-data": "8.1-3",
    "supertux-data": "0.6.3-2",
    "supertuxkart-data": "1.4+dfsg-2",
    "widelands-data": "2:1.1-3",
    "wizznic-data": "0.9.9+dfsg-1",
}

#: where each package states the licence of the files used (for the README's licence notes)
LICENCE_NOTES = {
    "brainparty-data": "copyright file: `Files: Content/electricity.ogg`, Alexander Blu, "
                       "CC-BY-SA-3.0",
    "freedroidrpg-data": "copyright file: `Files: *`, GPL-2+ (the music is not listed "
                         "separately)",
    "krank": "the Debian copyright file states public domain for Krank's code and images but "
             "does not list the sounds; supertuxkart-data's copyright file records legoluft's "
             "Krank sound pack as `public-domain` (`Files: data/sfx/energy_bar_full.ogg`)",
    "marsshooter-data": "copyright file: `Files: data/audio/music/* data/audio/tutorial.ogg "
                        "data/audio/menu.ogg`, Obsidian Shell, CC-BY-SA-3.0 (relicensed by the "
                        "band for Debian)",
    "naev-data": "copyright file: Zeropage CC-BY-3.0, Askyel CC-BY-SA-3.0; "
                 "`pirates_orchestra.ogg` (Dizzy Crow) is CC0 per the package's "
                 "`dat/snd/SOUND_LICENSE.yaml` and falls under `Files: *` (GPL-3+) in the "
                 "copyright file",
    "openclonk-data": "`Music.ocg/authors.txt`: K-Pone's music, CC-BY-3.0",
    "supertux-data": "copyright file: `Files: data/music/*`, GPL-2+",
    "supertuxkart-data": "copyright file: `Files: data/music/valley.ogg`, DJHelium, "
                         "CC-BY-SA-3.0",
    "widelands-data": "copyright file: `Files: *`, GPL-2+ (ingame_15-18 are not listed "
                      "separately)",
    "wizznic-data": "copyright file: `Files: *`, GPL-3",
}


@dataclass(frozen=True)
class Track:
    """One source recording: where it is, who made it, and why it has its genre."""

    genre: str
    package: str
    member: str          #: path inside the package (as ``dpkg-deb -x`` writes it)
    track_id: str        #: ``<package>/<name>``, unique
    artist: str
    licence: str
    sha256: str          #: of the file as shipped
    label_source: str    #: why this track is in this genre


_FD = "usr/share/freedroidrpg/data/sound/music/"
_KR = "usr/share/games/krank/sounds/"
_NV = "usr/share/naev/dat/snd/music/"
_OC = "usr/share/games/openclonk/Music.ocg/"
_WZ = "usr/share/games/wizznic/packs/000_wizznic/music/Sean Hawk - "
_MS = "usr/share/games/marsshooter/audio/"
_WL = "usr/share/games/widelands/data/music/"
_KPONE = "Martin Strohmeier (K-Pone)"
_FFM = "vorbis GENRE tag: Female Fronted Metal"
_HAWK = "vorbis GENRE tag: Electronica"

TRACKS = (
    # ---- ambient ---------------------------------------------------------------------------
    Track("ambient", "freedroidrpg-data", _FD + "TheBeginning.ogg",
          "freedroidrpg-data/TheBeginning", "4T Thieves", "GPL-2+",
          "fb07b31bc3dc01dfd948b4d00a156bed9867523f90fe48c8c7350c74790b9a2d",
          "vorbis GENRE tag: ambient"),
    Track("ambient", "krank", _KR + "industry/atmo.ogg", "krank/industry-atmo",
          "Legoluft", "public-domain",
          "0444e29bf7ddf91ec86269107df2f34e334028e112412f8696c44b8c1093bbc1",
          "vorbis GENRE tag: Ambient (and DESCRIPTION tag: Ambient)"),
    Track("ambient", "krank", _KR + "space/atmo.ogg", "krank/space-atmo",
          "Legoluft", "public-domain",
          "550607f7af7e102366e3f437d686d9bd865a97f05d1587643727a54975f2bd4b",
          "vorbis GENRE tag: Ambient (and DESCRIPTION tag: Ambient)"),
    Track("ambient", "krank", _KR + "summer/atmo.ogg", "krank/summer-atmo",
          "Legoluft", "public-domain",
          "b8a8a6c8081222bc6dcbf8c654aa0bbb26a1b17a8e96e7f7ecd95a3186bc973e",
          "vorbis GENRE tag: Ambient (and DESCRIPTION tag: Ambient)"),
    Track("ambient", "krank", _KR + "water/atmo.ogg", "krank/water-atmo",
          "Legoluft", "public-domain",
          "f054cb690dac5d469bb0a01feb2214ebb7ea907116a66f3da352e0fc606088a5",
          "vorbis GENRE tag: Ambient (and DESCRIPTION tag: Ambient)"),
    Track("ambient", "naev-data", _NV + "ambiphonic.ogg", "naev-data/ambiphonic",
          "Zeropage", "CC-BY-3.0",
          "0266bd6152a842a9c07439024db0fe874a80328f19db2700b95164140860fc10",
          "vorbis ALBUM tag: Ambient Pills (the artist's album; no GENRE tag)"),
    Track("ambient", "naev-data", _NV + "void_sensor.ogg", "naev-data/void_sensor",
          "Zeropage", "CC-BY-3.0",
          "f87da083cee7d92d9632ce7f87c4364503e9413648fa9da57fe9efe9ab23a516",
          "vorbis ALBUM tag: Ambient Pills (the artist's album; no GENRE tag)"),
    Track("ambient", "openclonk-data", _OC + "LucidDream.ogg", "openclonk-data/LucidDream",
          _KPONE, "CC-BY-3.0",
          "7ff7af360774feed22b65ad8ca17f90055817d6b4a1ddd0680a112255d165902",
          "vorbis GENRE tag: Ambient"),
    # ---- electronic ------------------------------------------------------------------------
    Track("electronic", "brainparty-data", "usr/share/games/brainparty/electricity.ogg",
          "brainparty-data/electricity", "Alexander Blu", "CC-BY-SA-3.0",
          "f495a29e95872ba2381b2907c8cc06dd2accd3ebcdb00d4a69e3b1d8203643f1",
          "vorbis GENRE tag: Electronic"),
    Track("electronic", "freedroidrpg-data", _FD + "temple.ogg", "freedroidrpg-data/temple",
          "Arvid Picciani", "GPL-2+",
          "7f050e0a76fbedb0df3dcb999dba81dff06095222124a977792b5181d570ac37",
          "vorbis GENRE tag: dnb (drum and bass)"),
    Track("electronic", "naev-data", _NV + "eureka.ogg", "naev-data/eureka",
          "Askyel", "CC-BY-SA-3.0",
          "75aeb0fa563b484fa16adedf91d581b95ed9e4dd8f8769873825462c3e0e179a",
          "vorbis GENRE tag: Electronic"),
    Track("electronic", "naev-data", _NV + "terminal.ogg", "naev-data/terminal",
          "Askyel", "CC-BY-SA-3.0",
          "ac7ebea1054d0e2ab4b4f6a8f5fbd51c07d338176c516cf32ffff50a5173937d",
          "vorbis GENRE tag: Electronic"),
    Track("electronic", "openclonk-data", _OC + "@CrushedIceCocktail.ogg",
          "openclonk-data/CrushedIceCocktail", _KPONE, "CC-BY-3.0",
          "d30b9647ba2c35ab8ca8c106f0801790377f2a49774e2690577f604d70bb0244",
          "vorbis GENRE tag: House"),
    Track("electronic", "supertuxkart-data", "usr/share/games/supertuxkart/data/music/valley.ogg",
          "supertuxkart-data/valley", "DJ Helium", "CC-BY-SA-3.0",
          "e799dd161e1fdffac75e6bdb54c70adf7bfc4e8faa1393d0f5456166e64beecf",
          "vorbis GENRE tag: Electronic"),
    Track("electronic", "wizznic-data", "usr/share/games/wizznic/data/menu-music.ogg",
          "wizznic-data/menu-music", "Sean Hawk", "GPL-3",
          "19d72b1fbbe65591bba334f9241cf89465279b46b79dfac8369707d5c2340881", _HAWK),
    Track("electronic", "wizznic-data", _WZ + "7 Nights.ogg", "wizznic-data/7-nights",
          "Sean Hawk", "GPL-3",
          "a3fa98c34ab80602a567403400d1a2d08a2c6bfcc3bb40b89b032c83934fee78", _HAWK),
    Track("electronic", "wizznic-data", _WZ + "Imperia.ogg", "wizznic-data/imperia",
          "Sean Hawk", "GPL-3",
          "854d0dc59f78b85ff3e432ceced549a887f859f5e4311ef3b8a1974050ba9555", _HAWK),
    Track("electronic", "wizznic-data", _WZ + "In Rome.ogg", "wizznic-data/in-rome",
          "Sean Hawk", "GPL-3",
          "f22333dfb3caf7b0cb6f7cfd4e3cf56b18c6e235063506d31c6b876d9bb9bc61", _HAWK),
    Track("electronic", "wizznic-data", _WZ + "Mysteria.ogg", "wizznic-data/mysteria",
          "Sean Hawk", "GPL-3",
          "66a6805541f2c193fc1f523a9c0cbba6b0572aeb984c9ecb36c843afb8cb800f", _HAWK),
    Track("electronic", "wizznic-data", _WZ + "Sexaine.ogg", "wizznic-data/sexaine",
          "Sean Hawk", "GPL-3",
          "417e33ce77af52b3a5fa211489e70f7dbc4f36b5f9650108d000fefea8c7c0fd", _HAWK),
    Track("electronic", "wizznic-data", _WZ + "Smash It.ogg", "wizznic-data/smash-it",
          "Sean Hawk", "GPL-3",
          "2ec600d45348b836b684dfdb5f3f7ff6e2b566c6c6ed0902218e513f64962006", _HAWK),
    Track("electronic", "wizznic-data", _WZ + "Wizz 2.ogg", "wizznic-data/wizz-2",
          "Sean Hawk", "GPL-3",
          "d8af90fc5e4ae2d4aa580da8ecc3393fe4a1cb8a5e4602e3b1e49e1d2c2f55d7", _HAWK),
    Track("electronic", "wizznic-data", _WZ + "Wizz 3.ogg", "wizznic-data/wizz-3",
          "Sean Hawk", "GPL-3",
          "b42b47efde357970faa70df3bc0e3427cd5d58b4eebf012f708505174f7253f1", _HAWK),
    # ---- metal -----------------------------------------------------------------------------
    Track("metal", "marsshooter-data", _MS + "menu.ogg", "marsshooter-data/menu",
          "Obsidian Shell", "CC-BY-SA-3.0",
          "f62ac3358ac34114839b665a0c8a8013a6298f2e4734758bfa3722bb753c803d", _FFM),
    Track("metal", "marsshooter-data", _MS + "music/01_-_Ezer_Ev.ogg",
          "marsshooter-data/01_-_Ezer_Ev", "Obsidian Shell", "CC-BY-SA-3.0",
          "a59964f98cfaed11698bf9fa4c60522d52cfe60fdf2565c2bc868c89f0dd38c0", _FFM),
    Track("metal", "marsshooter-data", _MS + "music/06_-_Elveszett_Lelkek.ogg",
          "marsshooter-data/06_-_Elveszett_Lelkek", "Obsidian Shell", "CC-BY-SA-3.0",
          "a60b11af35e030d9cc6227f0a79d346c7117a523b3d209f9bd1198f1f68a5ea5", _FFM),
    Track("metal", "marsshooter-data", _MS + "music/07_-_Vermocsar.ogg",
          "marsshooter-data/07_-_Vermocsar", "Obsidian Shell", "CC-BY-SA-3.0",
          "4ae94548ba412a430aa21472ac3289ec409e3b5f94baa2bf2e59d163c8df1df2", _FFM),
    Track("metal", "marsshooter-data", _MS + "music/12_-_Misanthropia.ogg",
          "marsshooter-data/12_-_Misanthropia", "Obsidian Shell", "CC-BY-SA-3.0",
          "eb1adef09d0c62f3a042d6e85b9994e0c8fc9827c81049192563d6e4f169d3c3", _FFM),
    Track("metal", "marsshooter-data", _MS + "tutorial.ogg", "marsshooter-data/tutorial",
          "Obsidian Shell", "CC-BY-SA-3.0",
          "e4f4d58830b136c705daa1f0893bb2bfa2f8a041c70c8f75f319b76ac6590c7b", _FFM),
    Track("metal", "widelands-data", _WL + "ingame_15.ogg", "widelands-data/ingame_15",
          "MiddleFinger", "GPL-2+",
          "71fbab6703b561a051585455c3448891bd56e82bf8bdf84328abc219e0ed01e9",
          "vorbis GENRE tag: Trash Metal (sic; title Widelands_01)"),
    Track("metal", "widelands-data", _WL + "ingame_16.ogg", "widelands-data/ingame_16",
          "MiddleFinger", "GPL-2+",
          "1ebef9afc173d206c2c4daa5291b77d52edf4b2377b8a205aeb682af7829e9ff",
          "vorbis GENRE tag: Thrash Metal (title Widelands_02)"),
    Track("metal", "widelands-data", _WL + "ingame_17.ogg", "widelands-data/ingame_17",
          "MiddleFinger", "GPL-2+",
          "8a5c0bad6165c4c9dffaa8dc4fafe239c8ad3d271c209813aa12d0dce1b08ca1",
          "vorbis GENRE tag: Trash Metal (sic; title Widelands_03)"),
    # ---- orchestral ------------------------------------------------------------------------
    Track("orchestral", "naev-data", _NV + "pirates_orchestra.ogg", "naev-data/pirates_orchestra",
          "Dizzy Crow", "CC0-1.0",
          "f4e0f41676b1bcb6975dd029033b3d784ffe4c58e136704f812127b55a888b19",
          "file name pirates_orchestra.ogg, titled 'Pirate Orchestra' in the package's "
          "dat/snd/soundtrack.yaml (no GENRE tag)"),
    Track("orchestral", "openclonk-data", _OC + "UrbanBolero.ogg", "openclonk-data/UrbanBolero",
          _KPONE, "CC-BY-3.0",
          "12cdb070a14f1854e21543bdf07dd33cd6e3e02937873b5e836153c6704bc64e",
          "vorbis GENRE tag: Orchestral"),
    Track("orchestral", "supertux-data",
          "usr/share/games/supertux2/music/antarctic/airship_remix.ogg",
          "supertux-data/airship_remix", "Bart Kelsey", "GPL-2+",
          "b917671a3d1f3d7824278fd3d81f097f8f2baac341fcaa9a829ab73ed628a5c2",
          "vorbis TITLE tag: Airship Song Orchestral Mix (no GENRE tag)"),
    Track("orchestral", "widelands-data", _WL + "ingame_18.ogg", "widelands-data/ingame_18",
          "Nikola Whallon (saturn)", "GPL-2+",
          "93e222100c812c7f0c8c1f55f928cea1844041c954154ffde84476ef3140c767",
          "vorbis TITLE tag: orchestralsample (no GENRE tag)"),
)

#: what was examined and not used, and why (rendered in the README)
LEFT_OUT = (
    ("0ad-data (66 music tracks)", "neither the package nor the files state a style; the "
     "credits list orchestral instruments next to djembe, didgeridoo, darbuka, taiko and others, "
     "so no track can be called orchestral from the package alone"),
    ("unknown-horizons, Peer Gynt Suite No. 1 (GENRE Classical, Czech National Symphony "
     "Orchestra)", "period classical music, which the orchestral definition excludes"),
    ("megaglest-data, romans.ogg (GENRE Classical)", "music by Mattias Westlund, an artist of "
     "minigenres"),
    ("openarena-088-data, OA##.ogg (Jute Gyte)", "no genre in the package or the tags"),
    ("openarena-*, Psymong's tracks", "an artist of minigenres"),
    ("marsshooter-data, the four 'Angelic Asylum' tracks of Obsidian Shell",
     "no GENRE tag (only the 'Elysia' tracks are tagged Female Fronted Metal)"),
    ("naev-data, ambient1-4.ogg", "'ambient' names Naev's non-combat game state (dat/snd/"
     "music.lua), not a style; ambient4 is titled 'Classic'"),
    ("openclonk-data, Motorway and TheSkylands (GENRE Rock); wordwarvi-sound, Lucky 13 "
     "(GENRE Instrumental Rock)", "rock, not metal"),
    ("warmux-data, construction.ogg (GENRE Ambiance) and Divertissement pour flute (GENRE "
     "Classique)", "French 'ambiance' means background music; a flute divertissement is not "
     "shown to be orchestral"),
    ("flare-game, wind_ambient.ogg (GENRE Ambient)", "a wind sound effect, not music"),
    ("supertuxkart-data, SkyVibe-HighFrequency (GENRE Psychedelic)", "does not name one of the "
     "four genres"),
    ("tracker modules (pingus-data, gl-117-data, pachi-data, rafkill-data, "
     "tecnoballz-data)", "need a decoder other than soundfile, and carry no genre"),
    ("dozens of other game-data packages (hedgewars, redeclipse, supertux, flare, freecol, "
     "adonthell, colobot, berusky2, ...)", "music with no genre in tags or package text"),
    ("searched again for orchestral music (tags, file names and every text file of the "
     "packages): the other tracks of naev-data (incl. Matthew Pablo's), openclonk-data, "
     "supertux-data, supertuxkart-data, widelands-data and freedroidrpg-data; 0ad-data "
     "(credits and 62 tracks), hedgewars-data, freeorion-data, freeciv-data (Dawning "
     "Fanfare), lincity-ng-data, enigma-data, btanks-data, zaz-data, lugaru-data, "
     "fillets-ng-data, scorched3d-data, glob2-data, tuxfootball, asc-music, starfighter-data, "
     "boswars-data, extremetuxracer-data, neverball-data, dreamchess-data, gcompris-qt-data, "
     "caveexpress-data, lordsawar-data, drascula-music, xmoto-data, torcs-data, funnyboat and "
     "others", "no text or tag names an orchestral or symphonic style (freedink-data's "
     "orchestral recordings are period classical: Bach, Mendelssohn)"),
)

#: minigenres' genre definitions, word for word
DEFINITIONS = {
    "ambient": "beatless or nearly beatless electronic soundscapes: drones, pads, slow textures",
    "electronic": "synthesizer- and drum-machine-based electronic music with a steady beat "
                  "(techno, trance, industrial, downtempo)",
    "metal": "guitar-driven heavy metal (distorted guitars, drum kit); death metal and "
             "instrumental metal",
    "orchestral": "orchestral / symphonic score (strings, brass, woodwinds, orchestral "
                  "percussion); game and film-style scores, not period classical music",
}
GENRES = tuple(DEFINITIONS)

# --------------------------------------------------------------------------------------------
# Clip rules (minigenres' README).
# --------------------------------------------------------------------------------------------
SR = 22050
CLIP_SECONDS = 30
SKIP_FRACTION = 0.10
#: A genre whose tracks give fewer than MIN_CLIPS clips after the usual skip skips only this
#: much of each of its tracks (orchestral: its four tracks are short, 68-229 s)
SHORT_GENRE_SKIP_FRACTION = 0.05
MIN_RMS_DBFS = -50.0
PEAK_LIMIT = 0.999
TARGET_PER_GENRE = 20
CLIPS_PER_TRACK = 2          #: the usual cap
MAX_CLIPS_PER_TRACK = 6      #: the cap is raised one step at a time only while a genre is short
MIN_CLIPS, MIN_TRACKS = 15, 3  #: below these a genre is reported as short
SEED = "crossgenres-v1"      #: seeds the order in which a track's clips are taken

MANIFEST_COLUMNS = ("path", "genre", "source_package", "source_file", "track_id", "clip_index",
                    "offset_seconds", "artist", "licence", "label_source")


class BuildError(RuntimeError):
    """A build that cannot go on (missing tool, wrong package version, changed file...)."""


def check_tables(tracks=TRACKS, packages=PACKAGES) -> None:
    """Refuse tables that touch reserved or minigenres packages/artists or are inconsistent."""
    used = {t.package for t in tracks} | set(packages)
    bad = used & (RESERVED_PACKAGES | MINIGENRES_PACKAGES)
    if bad:
        raise BuildError(f"reserved or minigenres packages in the tables: {sorted(bad)}")
    artists = set(MINIGENRES_ARTISTS)
    if MINIGENRES_MANIFEST.is_file():
        with open(MINIGENRES_MANIFEST, newline="", encoding="utf-8") as fh:
            artists |= {row["artist"] for row in csv.DictReader(fh) if row.get("artist")}
    known = {" ".join(a.lower().split()) for a in artists}
    clash = sorted({t.artist for t in tracks if " ".join(t.artist.lower().split()) in known})
    if clash:
        raise BuildError(f"artists already in minigenres: {clash}")
    ids = [t.track_id for t in tracks]
    if len(ids) != len(set(ids)):
        raise BuildError("duplicate track_id in TRACKS")
    for t in tracks:
        if t.package not in packages:
            raise BuildError(f"{t.track_id}: package {t.package} has no pinned version")
        if t.genre not in DEFINITIONS:
            raise BuildError(f"{t.track_id}: unknown genre {t.genre!r}")


# --------------------------------------------------------------------------------------------
# Packages
# --------------------------------------------------------------------------------------------
def _deb_field(deb: Path, field: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), field], check=True, capture_output=True,
                          text=True).stdout.strip()


def _find_deb(folder: Path, package: str, version: str | None) -> Path | None:
    for deb in sorted(folder.glob(f"{package}_*.deb")):
        if _deb_field(deb, "Package") == package and (
                version is None or _deb_field(deb, "Version") == version):
            return deb
    return None


def fetch_package(package: str, version: str, debs: Path, *, allow_other: bool,
                  log=print) -> tuple[Path, str]:
    """The ``.deb`` of ``package`` at ``version`` in ``debs`` (downloaded if not already there).

    Returns (path, version found). A different version is an error unless ``allow_other``.
    """
    if package in RESERVED_PACKAGES:  # belt and braces: never even download these
        raise BuildError(f"{package} is reserved for an external test")
    deb = _find_deb(debs, package, version)
    if deb is None:
        proc = subprocess.run(["apt-get", "download", f"{package}={version}"], cwd=debs,
                              capture_output=True, text=True)
        deb = _find_deb(debs, package, version)
        if deb is None:
            why = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode
            msg = f"{package}={version}: apt-get download failed ({why})"
            if not allow_other:
                raise BuildError(msg + "; run `apt-get update` once, or fetch that exact version "
                                 "from snapshot.debian.org into --workdir/debs, or pass "
                                 "--allow-other-versions")
            log(f"warning: {msg}; trying the version apt offers", file=sys.stderr)
            subprocess.run(["apt-get", "download", package], cwd=debs, capture_output=True,
                           text=True)
            deb = _find_deb(debs, package, None)
            if deb is None:
                raise BuildError(f"{package}: apt-get download failed")
    found = _deb_field(deb, "Version")
    if found != version:
        log(f"warning: {package}: using version {found}, the tables expect {version}",
            file=sys.stderr)
    return deb, found


def extract_members(deb: Path, members: set[str], dest: Path) -> dict[str, Path]:
    """Extract only ``members`` (paths as ``dpkg-deb -x`` writes them) of ``deb`` into ``dest``.

    Streams ``dpkg-deb --fsys-tarfile`` through :mod:`tarfile`, so a 600-MB package is never
    written out in full. Raises :class:`BuildError` if a member is missing or not a file.
    """
    out: dict[str, Path] = {}
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for info in tar:
                name = info.name[2:] if info.name.startswith("./") else info.name
                if name not in members:
                    continue
                if not info.isfile():
                    raise BuildError(f"{deb.name}: {name} is not a regular file")
                target = dest / name
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(info) as src, open(target, "wb") as fh:
                    shutil.copyfileobj(src, fh)
                out[name] = target
                if len(out) == len(members):
                    break   # the rest of a large package need not be decompressed
    finally:
        proc.stdout.close()   # after an early stop dpkg-deb dies of SIGPIPE: expected
        err = proc.stderr.read().decode(errors="replace").strip()
        proc.stderr.close()
        if proc.wait() != 0 and len(out) < len(members):
            raise BuildError(f"dpkg-deb --fsys-tarfile {deb.name} failed: {err[-300:]}")
    missing = members - set(out)
    if missing:
        raise BuildError(f"{deb.name}: not in the package: {sorted(missing)}")
    return out


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Audio
# --------------------------------------------------------------------------------------------
def load_mono(path: Path) -> np.ndarray:
    """Decode, average the channels, resample to :data:`SR` with soxr.

    Returns
    -------
    np.ndarray [shape=(n,), dtype=float32]
    """
    y, sr = sf.read(str(path), dtype="float32", always_2d=True)
    y = y.mean(axis=1)
    if sr != SR:
        y = soxr.resample(y, sr, SR)
    return np.ascontiguousarray(y, dtype=np.float32)


def rms_dbfs(x: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(np.square(x, dtype=np.float64)) + 1e-20))


def candidate_clips(y: np.ndarray, skip: float = SKIP_FRACTION) -> tuple[list[tuple[int, float]], int]:
    """Every 30-s clip of a track after its first ``skip`` (10 %), minus the too-quiet ones.

    Returns ([(clip_index, offset_seconds), ...], number dropped as too quiet). ``clip_index``
    counts all clips after the skip, quiet ones included (as in minigenres' manifest).
    """
    n = SR * CLIP_SECONDS
    start = int(round(skip * len(y)))
    out, quiet = [], 0
    for k in range((len(y) - start) // n):
        a = start + k * n
        if rms_dbfs(y[a:a + n]) < MIN_RMS_DBFS:
            quiet += 1
            continue
        out.append((k, a / SR))
    return out, quiet


def select_clips(tracks: list[Track], clips: dict[str, list[tuple[int, float]]],
                 target: int = TARGET_PER_GENRE) -> list[tuple[Track, int, float]]:
    """Up to ``target`` clips of one genre, round-robin over sources and tracks.

    A source is one (package, artist). Each track's usable clips are taken in a fixed
    pseudo-random order (seeded by :data:`SEED` and the track id). First pass: at most
    :data:`CLIPS_PER_TRACK` clips per track; each source offers its tracks' first clips, then
    their second clips, and the sources take turns, one clip per turn, until the genre has
    ``target`` clips or nothing is left. Only while the genre is still short is the cap raised
    by one (up to :data:`MAX_CLIPS_PER_TRACK`) and another pass made the same way.
    """
    order = {}
    for t in tracks:
        ks = list(clips[t.track_id])
        random.Random(f"{SEED}:{t.track_id}").shuffle(ks)
        order[t.track_id] = ks
    sources: dict[tuple[str, str], list[Track]] = defaultdict(list)
    for t in sorted(tracks, key=lambda t: (t.package, t.artist, t.member)):
        sources[(t.package, t.artist)].append(t)
    chosen: list[tuple[Track, int, float]] = []
    levels = [range(0, CLIPS_PER_TRACK)] + [range(c - 1, c) for c in
                                             range(CLIPS_PER_TRACK + 1, MAX_CLIPS_PER_TRACK + 1)]
    for level_range in levels:
        queues = [[(t, *order[t.track_id][lv]) for lv in level_range for t in group
                   if lv < len(order[t.track_id])] for group in sources.values()]
        while len(chosen) < target and any(queues):
            for q in queues:
                if q and len(chosen) < target:
                    chosen.append(q.pop(0))
        if len(chosen) >= target:
            break
    return chosen


def write_clip(path: Path, x: np.ndarray) -> None:
    """16-bit samples, scaled down only if the peak exceeds :data:`PEAK_LIMIT`, as Ogg Vorbis."""
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak > PEAK_LIMIT:
        x = x * (PEAK_LIMIT / peak)
    pcm = np.clip(np.round(x.astype(np.float64) * 32767.0), -32768, 32767).astype(np.int16)
    sf.write(str(path), pcm, SR, format="OGG", subtype="VORBIS")


# --------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------
def _md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def readme_text(rows: list[dict], versions: dict[str, str], short: list[str]) -> str:
    """minigenres' README structure for this corpus."""
    by_genre = defaultdict(list)
    for r in rows:
        by_genre[r["genre"]].append(r)
    genre_rows = [[g, len(by_genre[g]), len({r["track_id"] for r in by_genre[g]}),
                   len({r["artist"] for r in by_genre[g]}), DEFINITIONS[g]] for g in GENRES]
    src = defaultdict(int)
    for r in rows:
        src[(r["genre"], r["source_package"], r["artist"], r["licence"])] += 1
    source_rows = [[g, p, versions[p], a, lic, n] for (g, p, a, lic), n in sorted(src.items())]
    used = {r["track_id"] for r in rows}
    label_rows = [[t.track_id, t.genre, t.artist, t.label_source] for t in TRACKS
                  if t.track_id in used]
    unused = [t.track_id for t in TRACKS if t.track_id not in used]
    total = len(rows)
    parts = [
        "# crossgenres: a second genre corpus of free-licensed music, from other sources",
        "",
        f"{total} clips of 30 s, 4 genres, mono, 22050 Hz, 16-bit, stored as Ogg Vorbis. Built by "
        "`benchmarks/crossgenres.py` (deepfusion) from Debian packages and artists that "
        "`minigenres` does not use, with minigenres' genre definitions and clip rules, so that a "
        "model can be trained on one corpus and tested on the other.",
        "",
        "Layout (as in GTZAN): `<genre>/<genre>.<NNNNN>.ogg`; `manifest.csv` lists, for every "
        "clip, its source package, source file, track, clip index, offset in the source track "
        "(seconds), artist, licence and `label_source`: why the track has its genre.",
        "",
        "## Genres",
        "",
        _md_table(["genre", "clips", "tracks", "artists", "definition"], genre_rows),
        "",
    ]
    if short:
        parts += ["**Short of the intended size** (at least 15 clips and 3 tracks per genre): "
                  + "; ".join(short) + ". No other track in the packages examined for this "
                  "corpus is labelled with that genre by its package or its tags (see "
                  "'Examined and left out' below), and raising the per-track cap would not "
                  "help: every track of a short genre already gives all its non-overlapping "
                  "30-s clips after the 10 % skip.", ""]
    parts += [
        "## Labels",
        "",
        "A track is in a genre only because its package or its own tags say so; nobody "
        "listened to the tracks and no signal analysis chose a label. Per track:",
        "",
        _md_table(["track", "genre", "artist", "label_source"], label_rows),
        "",
    ]
    if unused:
        parts += [f"Listed in the build script but not selected (the genre was full): "
                  f"{', '.join(unused)}.", ""]
    parts += ["Examined and left out (a label the package or tags do not support, a reserved "
              "or minigenres source, or a format soundfile does not decode):", ""]
    parts += [f"- {what}: {why}" for what, why in LEFT_OUT]
    parts += [""]
    parts += [
        "## Sources",
        "",
        "All audio was taken from music shipped in Debian packages (Debian 12 \"bookworm\", "
        "section main). Each clip is an excerpt of a complete recording made by the credited "
        "artist; nothing was composed or generated for this corpus. The packages reserved for "
        "an external test (warzone2100-music, singularity-music, fretsonfire-songs-sectoid, "
        "ufoai-music) and minigenres' packages (ufoai-music, nexuiz-music, "
        "fretsonfire-songs-muldjord, wesnoth-1.16-music) were not used, nor any artist of "
        "minigenres' manifest.",
        "",
        _md_table(["genre", "Debian package", "version", "artist", "licence", "clips"],
                  source_rows),
        "",
        "Licences: CC-BY-SA-3.0 = Creative Commons Attribution-ShareAlike 3.0 Unported; "
        "CC-BY-3.0 = Creative Commons Attribution 3.0 Unported; CC0-1.0 = Creative Commons "
        "Zero 1.0 (public-domain dedication); public-domain = no rights reserved; GPL-2+ / "
        "GPL-3 = GNU General Public License version 2 or later / version 3. The full licence "
        "texts and copyright notices are in each package's `/usr/share/doc/<package>/copyright` "
        "and in `/usr/share/common-licenses/`. For the GPL-licensed recordings the "
        "corresponding source is the unmodified audio file in the named Debian package "
        "(`source_file` in the manifest).",
        "",
        "Where each licence is stated:",
        "",
    ]
    parts += [f"- {p}: {LICENCE_NOTES[p]}" for p in sorted({r['source_package'] for r in rows})]
    parts += [
        "",
        "Changes made to the original recordings (stated as the CC BY-SA and CC BY licences "
        "ask): excerpted, mixed down to mono, resampled, levels scaled down where needed to "
        "avoid clipping, re-encoded as Ogg Vorbis. These clips are an adaptation and are "
        "distributed under the same licence as their source recording.",
        "",
        "## Clip rules",
        "",
        "- each source track is decoded, channels are averaged to mono and the result is "
        "resampled to 22050 Hz (soxr);",
        "- the first 10 % of every track is skipped (5 % in a genre whose tracks would give "
        "fewer than 15 clips otherwise: orchestral, whose four tracks are short); the rest is "
        "cut into non-overlapping clips of exactly 30 s; tracks shorter than one clip after the "
        "skip are dropped, and so are clips quieter than -50 dBFS RMS;",
        f"- at most {CLIPS_PER_TRACK} clips per track, chosen round-robin over sources (a "
        "package and artist) and tracks so that each genre gets up to 20 clips from as many "
        "tracks as possible; only while a genre is still short of 20 is the cap raised, one "
        f"clip at a time, up to {MAX_CLIPS_PER_TRACK}; a track's clips are taken in a fixed "
        f"pseudo-random order (seed `{SEED}` and the track id);",
        "- samples are 16-bit; a clip whose peak exceeds 0.999 full scale is scaled down to that "
        "peak, all other clips keep the level of the source recording (levels therefore differ "
        "between sources and genres);",
        "- clips are numbered per genre in order of (package, source file, offset).",
        "",
        "Game music is often written to loop and some files repeat material (e.g. "
        "`supertux-data/airship_remix` holds its 54-s loop twice), so two clips of one track "
        "can share material: keep clips of one `track_id` (or artist) on the same side of any "
        "split.",
        "",
        "## Rebuilding",
        "",
        "`python3 benchmarks/crossgenres.py --out DIR` downloads the pinned package versions "
        "with `apt-get download`, checks the SHA-256 of every source file and rebuilds the same "
        "clips (the decoded audio is the same; the Ogg files' bytes differ between builds "
        "because the Ogg stream serial number is random).",
        "",
    ]
    return "\n".join(parts)


def build(out: Path, *, workdir: Path | None = None, overwrite: bool = False,
          allow_other_versions: bool = False, log=print) -> dict:
    """Build the corpus into ``out`` (atomically). Returns a summary dict."""
    check_tables()
    out = out.resolve()
    if out.exists() and not out.is_dir():
        raise BuildError(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise BuildError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise BuildError(f"{tool} not found (this script needs Debian's apt and dpkg)")
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_work = None
    if workdir is None:
        tmp_work = tempfile.TemporaryDirectory(prefix="crossgenres-work-")
        workdir = Path(tmp_work.name)
    workdir = workdir.resolve()
    debs, files = workdir / "debs", workdir / "files"
    debs.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    stage.chmod(0o777 & ~umask)   # mkdtemp's 0700 would outlive the rename
    try:
        # 1. packages and source files
        versions, paths = {}, {}
        wanted = defaultdict(set)
        for t in TRACKS:
            wanted[t.package].add(t.member)
        for package in sorted(wanted):
            t1 = time.perf_counter()
            deb, versions[package] = fetch_package(package, PACKAGES[package], debs,
                                                   allow_other=allow_other_versions, log=log)
            got = extract_members(deb, wanted[package], files / package)
            for t in TRACKS:
                if t.package == package:
                    paths[t.track_id] = got[t.member]
            log(f"{package} {versions[package]}: {len(got)} file(s) "
                f"({time.perf_counter() - t1:.1f} s)")
        for t in TRACKS:
            digest = sha256(paths[t.track_id])
            if digest != t.sha256:
                msg = f"{t.track_id}: SHA-256 {digest} differs from the table's {t.sha256}"
                if not allow_other_versions:
                    raise BuildError(msg)
                log(f"warning: {msg}", file=sys.stderr)
        # 2. candidate clips, selection, writing
        rows, short = [], []
        for genre in GENRES:
            tracks = [t for t in TRACKS if t.genre == genre]
            audio = {t.track_id: load_mono(paths[t.track_id]) for t in tracks}
            skip = SKIP_FRACTION
            if sum(min(len(candidate_clips(y)[0]), MAX_CLIPS_PER_TRACK)
                   for y in audio.values()) < MIN_CLIPS:
                skip = SHORT_GENRE_SKIP_FRACTION
                log(f"  {genre}: fewer than {MIN_CLIPS} clips after a {SKIP_FRACTION:.0%} skip; "
                    f"its tracks skip {skip:.0%}")
            clips = {}
            for t in tracks:
                y = audio[t.track_id]
                clips[t.track_id], quiet = candidate_clips(y, skip)
                note = f", {quiet} too quiet" if quiet else ""
                if not clips[t.track_id]:
                    note += ", no clip (too short or too quiet)"
                log(f"  {genre:10s} {t.track_id}: {len(y) / SR:6.1f} s, "
                    f"{len(clips[t.track_id])} usable clip(s){note}")
            chosen = select_clips(tracks, clips)
            chosen.sort(key=lambda c: (c[0].package, c[0].member, c[2]))
            (stage / genre).mkdir()
            for number, (t, k, offset) in enumerate(chosen):
                rel = f"{genre}/{genre}.{number:05d}.ogg"
                a = int(round(offset * SR))
                write_clip(stage / rel, audio[t.track_id][a:a + SR * CLIP_SECONDS])
                rows.append({"path": rel, "genre": genre, "source_package": t.package,
                             "source_file": t.member, "track_id": t.track_id, "clip_index": k,
                             "offset_seconds": f"{offset:.3f}", "artist": t.artist,
                             "licence": t.licence, "label_source": t.label_source})
            n_tracks = len({t.track_id for t, _, _ in chosen})
            if len(chosen) < MIN_CLIPS or n_tracks < MIN_TRACKS:
                short.append(f"{genre} has {len(chosen)} clips from {n_tracks} tracks")
            del audio
        with open(stage / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        (stage / "README.md").write_text(readme_text(rows, versions, short), encoding="utf-8")
        # 3. into place
        old = None
        if out.exists():
            if any(out.iterdir()):
                old = out.with_name(f".{out.name}.old-{os.getpid()}")
                os.replace(out, old)
            else:
                out.rmdir()
        os.replace(stage, out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        if tmp_work is not None:
            tmp_work.cleanup()
    seconds = time.perf_counter() - t0
    for s in short:
        log(f"warning: {s} (wanted at least {MIN_CLIPS} clips and {MIN_TRACKS} tracks)",
            file=sys.stderr)
    return {"clips": len(rows), "short": short, "seconds": seconds, "versions": versions}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="corpus folder to write")
    ap.add_argument("--workdir", type=Path,
                    help="keep downloaded packages and extracted files here (reused next time); "
                         "default: a temporary folder, removed at the end")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    ap.add_argument("--allow-other-versions", action="store_true",
                    help="warn instead of failing when a pinned version or a file's SHA-256 "
                         "is not what the tables expect")
    args = ap.parse_args(argv)
    try:
        summary = build(args.out, workdir=args.workdir, overwrite=args.overwrite,
                        allow_other_versions=args.allow_other_versions)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {summary['clips']} clips to {args.out} in {summary['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
