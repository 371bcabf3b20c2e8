"""Canonical expression classes shared by every dataset in fer_jax.

The canonical order follows FER-2013's integer coding (0 anger .. 6 neutral) and appends
contempt (FER+, CK+, AffectNet). A dataset keeps the canonical order but only the classes it has:
CK+48 has no neutral, so its 7 classes are (anger, disgust, fear, happiness, sadness, surprise,
contempt) and its label 6 means contempt. `Dataset.class_names` always says which is which.
"""

from __future__ import annotations

CANONICAL = ("anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral", "contempt")

# Every spelling seen in the public datasets' folder names and annotation files.
_ALIASES = {
    "anger": "anger", "angry": "anger",
    "disgust": "disgust", "disgusted": "disgust",
    "fear": "fear", "fearful": "fear", "afraid": "fear",
    "happiness": "happiness", "happy": "happiness", "joy": "happiness",
    "sadness": "sadness", "sad": "sadness",
    "surprise": "surprise", "surprised": "surprise",
    "neutral": "neutral", "neutrality": "neutral",
    "contempt": "contempt",
}


def canonical_name(name: str, *, source: str = "") -> str:
    """Maps a dataset's class spelling ('happy', 'Angry', 'sadness') to its canonical name."""
    key = name.strip().lower()
    if key not in _ALIASES:
        where = f" in {source}" if source else ""
        raise ValueError(
            f"class name {name!r}{where} maps to no expression class; expected one of "
            f"{sorted(set(_ALIASES))}"
        )
    return _ALIASES[key]


def canonical_order(names) -> tuple[str, ...]:
    """Canonical names of `names`, deduplicated and sorted in canonical order."""
    canon = {canonical_name(n) for n in names}
    return tuple(c for c in CANONICAL if c in canon)
