"""How long a study must be kept, computed from its manifests' data alone.

The law sets a minimum (years after the study; for minors, until well past the age
of majority). Deleting early is a defect, keeping longer never is, so every
ambiguity here resolves toward keeping longer: an unreadable birth date means "keep
until an operator decides" (no expiry), a garbled study date falls back to the
receipt date, a mixed study takes its longest modality period.

No IO and no clock: every node feeds the same manifest data and the same policy
(compare `fingerprint`s) and gets the same dates, so nodes agree without talking.
Dates are UTC calendar days (`today_utc`) for the same reason.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pacsmesh.node.errors import ConfigError

# Dates before this are typos (1015 for 2015), not records: a study date this old is
# not trusted, a birth date this old cannot tell us whether the patient was a minor.
DATE_MIN = dt.date(1850, 1, 1)
# A birth date may follow the study date by a day: a newborn imaged at 23:30 local
# time may carry tomorrow's date from a modality set to another time zone.
BIRTH_AFTER_STUDY_MAX = dt.timedelta(days=1)
# CS value representation: uppercase letters, digits, underscore; at most 16.
MODALITY_CODE = re.compile(r"[A-Z0-9_]{1,16}")
_DA = re.compile(r"([0-9]{4})([0-9]{2})([0-9]{2})")
_DA_ACR_NEMA = re.compile(r"([0-9]{4})\.([0-9]{2})\.([0-9]{2})")
# Only text made of these is quoted in a rule: a garbled date field may hold anything,
# a patient's name included, and rules end up in logs and reports.
_DATE_LIKE = re.compile(r"[0-9 .:/-]{1,20}")
_PAD = " \x00"  # DICOM pads values with spaces (NULs from some old writers)
_EPOCH = dt.date(1970, 1, 1)
_MS_PER_DAY = 86_400_000

_RANGES = {  # inclusive
    "default_years": (1, 200),
    "minor_until_age": (0, 150),
    "minor_extra_years": (0, 100),
    "grace_days": (0, 3650),
}
_MODALITY_YEARS = (1, 200)

Status = Literal["kept", "expired", "deletable"]


@dataclass(frozen=True)
class RetentionSection:
    """The [retention] table. Cluster-wide: nodes with different policies would
    disagree on expiry dates, so they compare `fingerprint`s."""

    default_years: int = 7
    by_modality: dict[str, int] = field(default_factory=dict)  # e.g. {"MG": 10}
    minor_until_age: int = 21
    minor_extra_years: int = 0
    grace_days: int = 30  # between expiry and the first day deletion is allowed
    delete_expired: bool = False  # False: expired studies are only reported

    def __post_init__(self) -> None:
        # Checked here rather than only in parse_retention, so no policy that could
        # shorten a period (a negative year count) can exist at all.
        for key, (low, high) in _RANGES.items():
            value = getattr(self, key)
            if not low <= value <= high:
                raise ConfigError(f"[retention] {key} = {value} is outside {low}..{high}")
        for code, years in self.by_modality.items():
            _check_modality(code, years)
        # A copy: the caller's dict changing later must not change a checked policy.
        object.__setattr__(self, "by_modality", dict(self.by_modality))


@dataclass(frozen=True)
class Expiry:
    expires: dt.date | None  # None: never expires automatically; an operator decides
    rule: str  # which rule set it; dates and modality codes only, never names


def parse_retention(raw: object) -> RetentionSection:
    """The [retention] table as parsed from TOML; missing or empty gives the defaults."""
    if raw is None:
        return RetentionSection()
    if not isinstance(raw, dict):
        raise ConfigError("[retention] must be a table")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _RANGES:
            values[key] = _int(f"[retention] {key}", value)
        elif key == "delete_expired":
            if not isinstance(value, bool):
                raise ConfigError(f"[retention] delete_expired = {value!r} is not a bool")
            values[key] = value
        elif key == "by_modality":
            values[key] = _by_modality(value)
        else:
            raise ConfigError(f"[retention] has an unknown key '{key}'")
    return RetentionSection(**values)


def fingerprint(policy: RetentionSection) -> str:
    """16 hex digits, equal exactly when two policies are (by_modality order aside)."""
    canonical = json.dumps({"retention": 1, **asdict(policy)}, sort_keys=True,
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def expiry(policy: RetentionSection, study_date: str, birth_date: str,
           modalities: Iterable[str], received_ms: int) -> Expiry:
    """When a study may expire. Dates are DICOM DA ("YYYYMMDD" or ACR-NEMA
    "YYYY.MM.DD"; "" = absent); received_ms is when it was received (ms since the
    epoch; <= 0 = unknown, as a manifest never stamped by a clock)."""
    years, setter = _period(policy, modalities)
    study = _read_da(study_date)
    if study is not None:
        used, base_text = study, f"study date {study.isoformat()}"
    else:
        received = _received_date(received_ms)
        text = study_date.strip(_PAD)
        lacking = f"study date {_shown(text)} unreadable" if text else "no study date"
        if received is None:
            return Expiry(None, f"{lacking} and no receipt time: kept until an operator "
                                "decides")
        used, base_text = received, f"{lacking}: received {received.isoformat()}"
    base_rule = f"{base_text} + {years} years ({setter})"
    base = _add_years(used, years)
    if base is None:
        return Expiry(None, f"{base_rule} is past the year 9999: kept until an operator "
                            "decides")
    birth_text = birth_date.strip(_PAD)
    if not birth_text:
        return Expiry(base, base_rule)
    birth = _read_da(birth_text)
    if birth is None:
        # We cannot tell whether the patient was a minor, whose period may be longer.
        return Expiry(None, f"birth date {_shown(birth_text)} unreadable: kept until an "
                            "operator decides")
    if birth - used > BIRTH_AFTER_STUDY_MAX:
        return Expiry(None, f"birth date {birth.isoformat()} after the study "
                            f"({used.isoformat()}): kept until an operator decides")
    minor = _add_years(birth, policy.minor_until_age + policy.minor_extra_years)
    minor_rule = (f"minor: born {birth.isoformat()}, kept until age "
                  f"{policy.minor_until_age} + {policy.minor_extra_years} years")
    if minor is None:
        return Expiry(None, f"{minor_rule} is past the year 9999: kept until an operator "
                            "decides")
    if minor > base:
        return Expiry(minor, minor_rule)
    return Expiry(base, base_rule)


def deletable_on(exp: Expiry, policy: RetentionSection) -> dt.date | None:
    """The first day deletion is allowed by date; None if never (automatically)."""
    if exp.expires is None:
        return None
    try:
        return exp.expires + dt.timedelta(days=policy.grace_days)
    except OverflowError:  # past 9999-12-31: never
        return None


def status(exp: Expiry, policy: RetentionSection, today: dt.date) -> Status:
    """By date only: "kept" before expiry (and always without one), "expired" from
    the expiry day through the grace period, "deletable" from `deletable_on`.

    "deletable" is not a decision to delete: that also needs policy.delete_expired,
    no legal hold and an operator's grant, which the caller checks. This function
    ignores delete_expired so reports show what would become deletable if enabled.
    """
    if exp.expires is None or today < exp.expires:
        return "kept"
    first = deletable_on(exp, policy)
    if first is not None and today >= first:
        return "deletable"
    return "expired"


def today_utc(now_s: float) -> dt.date:
    """Today as every node counts it, whatever its local time zone."""
    return dt.datetime.fromtimestamp(now_s, tz=dt.UTC).date()


def _int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):  # TOML true is not 1 year
        raise ConfigError(f"{name} = {value!r} is not an int")
    return value


def _by_modality(value: object) -> dict[str, int]:
    if not isinstance(value, dict):
        raise ConfigError(f"[retention] by_modality = {value!r} is not a table")
    out: dict[str, int] = {}
    for code, years in value.items():
        out[code] = _int(f"[retention.by_modality] {code}", years)
        _check_modality(code, out[code])
    return out


def _check_modality(code: object, years: int) -> None:
    if not isinstance(code, str) or not MODALITY_CODE.fullmatch(code):
        hint = ""
        if isinstance(code, str) and MODALITY_CODE.fullmatch(code.strip().upper()):
            hint = f": did you mean '{code.strip().upper()}'?"
        raise ConfigError(f"[retention.by_modality] '{code}' is not a DICOM modality code "
                          f"(1-16 uppercase letters, digits or _){hint}")
    low, high = _MODALITY_YEARS
    if not low <= years <= high:
        raise ConfigError(f"[retention.by_modality] {code} = {years} is outside {low}..{high}")


def _period(policy: RetentionSection, modalities: Iterable[str]) -> tuple[int, str]:
    """The longest period among the study's modalities, and what set it."""
    periods: list[tuple[int, str]] = []
    for modality in modalities:
        code = modality.strip(_PAD)
        if code in policy.by_modality:
            periods.append((policy.by_modality[code], code))
        elif code.upper() in policy.by_modality:
            # "mg" is probably MG, but not surely: never shorter than the default
            guessed = policy.by_modality[code.upper()]
            periods.append((guessed, code.upper()) if guessed > policy.default_years
                           else (policy.default_years, "default"))
        else:
            periods.append((policy.default_years, "default"))
    if not periods:
        return policy.default_years, "default"
    years = max(y for y, _ in periods)
    setters = sorted({name for y, name in periods if y == years and name != "default"})
    return years, ", ".join(setters) or "default"


def _read_da(text: str) -> dt.date | None:
    """A DA value as a date, or None if absent, not a calendar day, or before DATE_MIN."""
    text = text.strip(_PAD)
    match = _DA.fullmatch(text) or _DA_ACR_NEMA.fullmatch(text)
    if match is None:
        return None
    try:
        day = dt.date(int(match[1]), int(match[2]), int(match[3]))
    except ValueError:
        return None
    return day if day >= DATE_MIN else None


def _received_date(received_ms: int) -> dt.date | None:
    if received_ms <= 0:
        return None
    try:
        return _EPOCH + dt.timedelta(days=received_ms // _MS_PER_DAY)
    except OverflowError:
        return None


def _add_years(day: dt.date, years: int) -> dt.date | None:
    """`years` later; Feb 29 in a common year becomes Mar 1 (the later choice).
    None past the calendar's end."""
    year = day.year + years
    if year > dt.MAXYEAR:
        return None
    try:
        return day.replace(year=year)
    except ValueError:  # Feb 29
        return dt.date(year, 3, 1)


def _shown(text: str) -> str:
    """A garbled value quoted if it looks like a date, else only its length."""
    if _DATE_LIKE.fullmatch(text):
        return f"'{text}'"
    return f"({len(text)} characters, not a date)"


# ---- a study's retention inputs, kept on its catalog record ------------------------------
#
# A study's expiry is computed from the latest date, the latest readable birth date and
# every modality over all versions ever added, so a re-sent or corrected instance can
# only make it be kept longer, and nodes that know the same versions agree.

NEVER = "99999999"  # the expiry index's key for "kept until an operator decides"


def retain_inputs(study_date: str, birth_date: str, received_ms: int
                  ) -> tuple[str, str, bool]:
    """One version's contribution: (date used YYYYMMDD or "", readable birth date or "",
    whether its birth date is present but unusable: unreadable or after the study)."""
    study = _read_da(study_date) or _received_date(received_ms)
    used = study.strftime("%Y%m%d") if study is not None else ""
    text = birth_date.strip(_PAD)
    if not text:
        return used, "", False
    birth = _read_da(text)
    if birth is None or (study is not None and birth - study > BIRTH_AFTER_STUDY_MAX):
        return used, "", True
    return used, birth.strftime("%Y%m%d"), False


def record_expiry(policy: RetentionSection, retain_date: str, retain_birth: str,
                  birth_bad: bool, modalities: Iterable[str], dated: bool = True) -> Expiry:
    """The expiry of a study from its record's retention inputs. `dated`: the study has a
    readable study date (else `retain_date` is the date it was received)."""
    if birth_bad:
        return Expiry(None, "a version's birth date is unreadable or after its study: kept "
                            "until an operator decides")
    if not retain_date:
        return Expiry(None, "no study date and no receipt time: kept until an operator "
                            "decides")
    exp = expiry(policy, retain_date, retain_birth, modalities, 0)
    if dated:
        return exp
    return Expiry(exp.expires, exp.rule.replace("study date", "no study date: received", 1))


def readable_date(text: str) -> bool:
    return _read_da(text) is not None


def expiry_key(exp: Expiry) -> str:
    """YYYYMMDD, or NEVER: sorts by date, never-expiring last."""
    return exp.expires.strftime("%Y%m%d") if exp.expires is not None else NEVER
