"""Matching of Person Name (PN) keys: what pacsmesh does where PS3.4 C.2.2.2.1 lets
an SCP choose.

A PN value is up to three component groups, `alphabetic=ideographic=phonetic`
(PS3.5 6.2.1.1), each `family^given^middle^prefix^suffix`. Both the key and the
stored value are text by now (each decoded with its own character set), and:

- Case is ignored, and so is Unicode composition: both sides are NFC-normalized
  and folded character by character (so `?` still stands for one character:
  `ß` does not become `ss`, but final sigma folds to sigma).
- Trailing empty components and groups, and spaces around components, are
  padding: `Müller^Jürgen^^^` is `Müller^Jürgen`.
- A key with one group matches if it matches any of the value's groups: `Yamada*`,
  `山田^太郎` and `やまだ*` all find `Yamada^Tarou=山田^太郎=やまだ^たろう`.
- A key with several groups (it holds `=`) matches group by group, in place; an
  empty or `*` group of the key matches anything: `=山田*` asks the ideographic
  group only.
- `*` (any run) and `?` (exactly one) work on characters within a group.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable

GROUPS_MAX = 3


def fold(text: str) -> str:
    """Case- and composition-insensitive form with one character per character of the
    NFC text (full case folding would turn one `ß` into two characters, breaking `?`)."""
    if text.isascii():
        return text.lower()
    out = []
    for ch in unicodedata.normalize("NFC", text):
        folded = ch.casefold()
        if len(folded) != 1:
            folded = ch.lower()
        out.append(folded if len(folded) == 1 else ch)
    return "".join(out)


def _group(text: str) -> str:
    components = [c.strip() for c in text.split("^")]
    while components and not components[-1]:
        components.pop()
    return "^".join(components)


def groups(value: str) -> list[str]:
    """The value's component groups, folded and without padding; at most three."""
    parts = [_group(fold(g)) for g in value.split("=")[:GROUPS_MAX]]
    while parts and not parts[-1]:
        parts.pop()
    return parts


def _group_matches(key: str, group: str, wildcard: Callable[[str, str], bool]) -> bool:
    if "*" not in key and "?" not in key:
        return key == group
    if wildcard(key, group):
        return True
    # `DOE^*` names the components a shorter value leaves out as padding: pad it back
    missing = key.count("^") - group.count("^")
    return missing > 0 and wildcard(key, group + "^" * missing)


def matches(key: str, value: str, wildcard: Callable[[str, str], bool]) -> bool:
    """Does PN `value` match PN key `key`? `wildcard(pattern, text)` does `*`/`?`."""
    if key.strip() in ("", "*"):
        return True
    want, have = groups(key), groups(value)
    if not want:  # nothing but padding
        return True
    if "=" not in key:
        return any(_group_matches(want[0], g, wildcard) for g in have or [""])
    for i, k in enumerate(want):
        if k in ("", "*"):
            continue
        if not _group_matches(k, have[i] if i < len(have) else "", wildcard):
            return False
    return True
