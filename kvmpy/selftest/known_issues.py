"""pytest plugin: the known-issues list turns matching failures into strict xfails.

Each entry of ``known_issues.toml`` (beside the selftests) names a test (fnmatch
on the pytest node id), the kernels it applies to (``kernel_release`` fnmatch on
``uname -r`` and/or a loaded ``module``), a reason, and the evidence that
justified it. On a matching host the test still runs: a failure is reported as
an expected failure with that reason, and a pass fails loudly (strict xfail), so
a fixed kernel or a broken test never hides behind the list.

An entry may also name the kernel splats that are the same defect's signature
(``splats``: regexes searched in the splat's quote, ``^`` anchoring its first
line). The splat watch (kvmpy.selftest.splat) leaves such a splat, in that test's
call only, to this plugin: it counts as the issue reproducing. Any other splat
fails the test whatever the known issue says.
"""
from __future__ import annotations

import fnmatch
import os
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvmpy.selftest.options import KNOWN_ISSUES_ENV

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

DEFAULT_FILE = Path(__file__).resolve().parent.parent.parent / "selftests" / "known_issues.toml"


@dataclass(frozen=True)
class KnownIssue:
    test: str
    reason: str
    evidence: str
    kernel_release: str = "*"
    module: str = ""
    # A regex the failure text must contain; a failure without it is a real failure.
    match: str = ""
    # A race that does not show on every run (the evidence must say how often):
    # a pass is then reported as "known issue absent", loudly but not as a failure.
    intermittent: bool = False
    # Regexes of the kernel splats this defect logs (searched in the splat's quote).
    splats: tuple[str, ...] = ()

    def applies_to_host(self, release: str | None = None, modules: set[str] | None = None) -> bool:
        release = release if release is not None else platform.release()
        if not fnmatch.fnmatchcase(release, self.kernel_release):
            return False
        if self.module:
            loaded = modules if modules is not None else set(os.listdir("/sys/module"))
            return self.module in loaded
        return True

    def matches(self, nodeid: str) -> bool:
        # Node ids are relative to the rootdir: an entry may leave out the leading directories.
        # '[' is literal (parametrize ids use it); only '*' and '?' are wildcards.
        pat = self.test.replace("[", "[[]")
        return fnmatch.fnmatchcase(nodeid, pat) or fnmatch.fnmatchcase(nodeid, "*/" + pat)

    def excuses(self, failure: str) -> bool:
        """Whether a failure with this text is this defect showing (``match`` found in it)."""
        return not self.match or re.search(self.match, failure) is not None

    def explains_splat(self, splat: str) -> bool:
        return any(re.search(pattern, splat) for pattern in self.splats)

    def describe(self) -> str:
        where = f"kernel {self.kernel_release}" + (f" with {self.module}" if self.module else "")
        return f"known issue on {where}: {self.reason}"


class KnownIssueFileError(Exception):
    pass


# An entry's keys: the text ones (``test``, ``reason``, ``evidence`` required), then the others.
_TEXT_KEYS = ("test", "reason", "evidence", "kernel_release", "module", "match")
_KEYS = set(_TEXT_KEYS) | {"intermittent", "splats"}


def load(path: Path, missing_ok: bool = True) -> list[KnownIssue]:
    """Parse the known-issues file; every entry needs test, reason and evidence.

    KnownIssueFileError for anything that is not such a file (unreadable, a directory, not
    UTF-8, not TOML, an entry of the wrong shape); a missing file is none (``missing_ok``,
    the default file beside the selftests) or an error.
    """
    if not path.exists():
        if missing_ok:
            return []
        raise KnownIssueFileError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except IsADirectoryError:
        raise KnownIssueFileError(f"{path}: is a directory, not a TOML file") from None
    except OSError as e:
        raise KnownIssueFileError(f"{path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise KnownIssueFileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise KnownIssueFileError(f"{path}: not valid TOML: {e}") from None
    entries = data.get("issue", [])
    if not isinstance(entries, list) or not all(isinstance(raw, dict) for raw in entries):
        raise KnownIssueFileError(f"{path}: 'issue' must be an array of tables, one [[issue]] per entry")
    unknown_top = set(data) - {"issue"}
    if unknown_top:
        raise KnownIssueFileError(f"{path}: unknown top-level keys {sorted(unknown_top)} (entries are [[issue]])")
    out = []
    for i, raw in enumerate(entries):
        unknown = set(raw) - _KEYS
        if unknown:
            raise KnownIssueFileError(f"{path}: entry {i + 1} has unknown keys {sorted(unknown)}")
        wrong = [k for k in _TEXT_KEYS if k in raw and not isinstance(raw[k], str)]
        if wrong:
            raise KnownIssueFileError(f"{path}: entry {i + 1}: {', '.join(wrong)} must be text (a quoted string)")
        missing = [k for k in ("test", "reason", "evidence") if not raw.get(k, "").strip()]
        if missing:
            raise KnownIssueFileError(f"{path}: entry {i + 1} lacks {', '.join(missing)}")
        if not isinstance(raw.get("intermittent", False), bool):
            raise KnownIssueFileError(f"{path}: entry {i + 1}: intermittent must be true or false")
        splats = raw.get("splats", [])
        if not isinstance(splats, list) or not all(isinstance(x, str) and x for x in splats):
            raise KnownIssueFileError(f"{path}: entry {i + 1}: splats must be a list of regexes")
        for pattern in [raw.get("match", "")] + splats:
            try:
                re.compile(pattern)
            except re.error as e:
                raise KnownIssueFileError(f"{path}: entry {i + 1}: bad regex {pattern!r}: {e}") from None
        fields = {k: v for k, v in raw.items() if k not in ("intermittent", "splats")}
        out.append(KnownIssue(**fields, intermittent=raw.get("intermittent", False), splats=tuple(splats)))
    return out


def known_issues_file(config: pytest.Config) -> Path:
    env = os.environ.get(KNOWN_ISSUES_ENV)
    if env:
        # `kvmpy selftest` makes it absolute (pytest runs in the source tree); plain pytest: its cwd.
        return Path(env).expanduser().absolute()
    local = Path(str(config.rootpath)) / "known_issues.toml"
    for candidate in (Path(__file__).resolve().parent.parent / "selftests" / "known_issues.toml", DEFAULT_FILE, local):
        if candidate.exists():
            return candidate
    return DEFAULT_FILE


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    path = known_issues_file(config)
    try:
        # A file the user named must be there: a typo would quietly drop every entry.
        issues = [k for k in load(path, missing_ok=KNOWN_ISSUES_ENV not in os.environ) if k.applies_to_host()]
    except KnownIssueFileError as e:
        raise pytest.UsageError(f"known-issues file is invalid: {e}") from None
    for item in items:
        for k in issues:
            if k.matches(item.nodeid):
                item.stash[_KEY] = k
                item.user_properties.append(("known_issue", k.describe()))
                break


_KEY = pytest.StashKey[KnownIssue]()
# Report user property set by the splat watch, one per splat: (first line, explained by the known issue).
SPLAT_PROPERTY = "kernel_splat"


def explains_splat(item: pytest.Item, splat: str) -> bool:
    """Whether ``item``'s known issue (if any applies on this host) names ``splat``."""
    k = item.stash.get(_KEY, None)
    return k is not None and k.explains_splat(splat)


# tryfirst: the outermost wrapper, so it decides after the splat watch has looked at the kernel log.
@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    k = item.stash.get(_KEY, None)
    if k is None or call.when != "call":
        return
    rep = outcome.get_result()
    splats = [v for key, v in rep.user_properties if key == SPLAT_PROPERTY]
    if any(not explained for _, explained in splats):
        return  # a splat the entry does not name: a real failure, whatever else happened
    shown = "".join(f"; its kernel splat: {first}" for first, _ in splats)
    if rep.failed:
        if not k.excuses(rep.longreprtext):
            rep.sections.append(("known issue", f"{k.describe()} -- but the failure does not match "
                                                f"{k.match!r}, so it is reported as a real failure"))
            return
        rep.outcome = "skipped"
        rep.wasxfail = k.describe() + shown
    elif splats:
        # The test's checks held, but the kernel logged this defect's signature: it reproduced.
        rep.outcome = "skipped"
        rep.wasxfail = k.describe() + shown
    elif rep.passed and k.intermittent:
        rep.user_properties.append(("known_issue_absent", f"did not reproduce this run: {k.describe()}"))
    elif rep.passed:
        # Strict: a known issue that no longer reproduces must be looked at.
        rep.outcome = "failed"
        rep.longrepr = (f"[XPASS(strict)] the known issue did not reproduce: {k.describe()}\n"
                        f"evidence on file: {k.evidence}\nRemove or narrow its entry in known_issues.toml.")
