"""What a user may hand `kvmpy selftest`'s pytest, checked before anything runs (no pytest here).

The verdict of `kvmpy selftest` holds only if pytest runs the selected tests with kvmpy's
plugins: extra pytest arguments (after ``--``, or in ``PYTEST_ADDOPTS``) that make pytest
not run tests, that set kvmpy's own internal options, or that switch a kvmpy plugin (the
splat watch, the known issues, the KVM guard, the results) off are usage errors. The
report's rule (:func:`kvmpy.selftest.report.not_tested_note`) backs this up for whatever
gets past it: a run in which no test ran to a verdict, or whose kernel log was not watched,
is never green.

Also here: the size multiplier (``--kvmpy-scale``/``KVMPY_SCALE``) and its bound, and the
known-issues file named by ``KVMPY_KNOWN_ISSUES``.
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path

# pytest options after which pytest does not run the tests it collects: a run with them would
# test nothing (pytest exits 0 all the same).
NOT_RUNNING = {
    "--collect-only": "only collects the tests", "--co": "only collects the tests",
    "--collectonly": "only collects the tests",
    "--setup-plan": "only shows the fixtures the tests would set up",
    "--setup-only": "only sets the fixtures up", "--fixtures": "only lists fixtures",
    "--funcargs": "only lists fixtures", "--fixtures-per-test": "only lists fixtures",
    "--markers": "only lists markers", "--help": "only prints pytest's help", "-h": "only prints pytest's help",
    "--version": "only prints pytest's version", "-V": "only prints pytest's version",
    "--cache-show": "only shows the cache",
}
# Options `kvmpy selftest` sets itself, or that turn its safety checks off.
INTERNAL = {
    "--kvmpy-part": "kvmpy-internal: it splits one bed row over boots (`kvmpy selftest --bed --jobs N` sets "
                    "it); given by hand it runs a part of the tests and calls that the verdict (a host run "
                    "cannot be sharded)",
    "--kvmpy-results": "kvmpy-internal: where kvmpy selftest reads pytest's results from",
    "--kvmpy-progress": "kvmpy-internal: where kvmpy selftest reads pytest's progress from",
    "--junitxml": "set by kvmpy selftest: use `kvmpy selftest --junit FILE`",
    "--junit-xml": "set by kvmpy selftest: use `kvmpy selftest --junit FILE`",
    "--no-splat-watch": "switches the kernel-splat watch off: a run that cannot see a kernel splat cannot pass",
}
# What switching each kvmpy plugin off would lose.
PLUGINS = {
    "kvmpy.selftest.splat": "the kernel-splat watch",
    "kvmpy.selftest.known_issues": "the known-issues list",
    "kvmpy.selftest.guard": "the usable-KVM guard",
    "kvmpy.selftest.results": "the results kvmpy reports",
    "kvmpy.selftest.fixtures": "the kvm fixture and requirement skips",
    "kvmpy.selftest.parts": "kvmpy's plugins",
}

# --kvmpy-scale / KVMPY_SCALE: the dirty-log selftests' guests use 8 MiB (2048 pages) times the
# scale, and their writes and rounds grow with it; 100 is 800 MiB per guest and minutes per
# test on real hardware. Beyond that a run exhausts the host's memory before it tests anything.
MAX_SCALE = 100
SCALE_ENV = "KVMPY_SCALE"
KNOWN_ISSUES_ENV = "KVMPY_KNOWN_ISSUES"


class OptionError(ValueError):
    """An argument `kvmpy selftest` refuses (a usage error)."""


def _problem(arg: str, value: str | None) -> str:
    if arg.startswith("@"):
        return (f"{arg}: pytest would read more arguments from that file (relative to the source tree, "
                f"not here), unchecked: give them on the command line")
    name, eq, inline = arg.partition("=")
    if name in NOT_RUNNING:
        return f"{name}: pytest then {NOT_RUNNING[name]} and runs no test: nothing would be tested"
    if name in INTERNAL:
        return f"{name}: {INTERNAL[name]}"
    if arg.startswith("-p") and not arg.startswith("--"):
        plugin = (value or "") if arg == "-p" else arg[2:].removeprefix("=")     # -p X, -pX, -p=X
        if plugin.startswith("no:"):
            target = plugin[3:]
            if target.startswith("kvmpy") or target in ("junitxml", "skipping", "runner", "python", "main"):
                lost = PLUGINS.get(target, "a plugin the report depends on")
                return f"-p {plugin}: switches {lost} off; kvmpy selftest runs with every one of its plugins"
    if name == "--kvmpy-scale":
        try:
            parse_scale(inline if eq else (value or ""), "--kvmpy-scale")
        except OptionError as e:
            return str(e)
    return ""


def check_pytest_args(args: list[str], where: str = "") -> None:
    """OptionError for the first pytest argument of ``args`` that `kvmpy selftest` refuses."""
    for i, arg in enumerate(args):
        if arg == "--":
            break
        value = args[i + 1] if i + 1 < len(args) else None
        why = _problem(arg, value)
        if why:
            raise OptionError(f"{where}{why}")


def check_environment(environ: dict[str, str] | None = None) -> None:
    """The environment pytest would see: PYTEST_ADDOPTS (checked like the arguments) and KVMPY_SCALE."""
    env = os.environ if environ is None else environ
    addopts = env.get("PYTEST_ADDOPTS", "")
    if addopts:
        try:
            words = shlex.split(addopts)
        except ValueError as e:
            raise OptionError(f"PYTEST_ADDOPTS={addopts!r}: {e}") from None
        check_pytest_args(words, "PYTEST_ADDOPTS: ")
    scale_of(None, env)


def scale_of(option: str | None, environ: dict[str, str] | None = None) -> int:
    """The size multiplier of a run: ``option`` (``--kvmpy-scale``) if given, else ``KVMPY_SCALE``,
    else 1; OptionError if the one that applies is malformed."""
    if option is not None:
        return parse_scale(option, "--kvmpy-scale")
    env = os.environ if environ is None else environ
    return parse_scale(env.get(SCALE_ENV, "1"), SCALE_ENV)


def parse_scale(text: str, name: str = "--kvmpy-scale") -> int:
    """A size multiplier: a whole number 1..MAX_SCALE (OptionError saying what is wrong)."""
    try:
        value = int(str(text).strip())
    except ValueError:
        raise OptionError(f"{name} {text!r}: a whole number, 1 to {MAX_SCALE}") from None
    if not 1 <= value <= MAX_SCALE:
        raise OptionError(f"{name} {value}: must be 1 to {MAX_SCALE} (the dirty-log guests use 8 MiB times it; "
                          f"10 suits real hardware)")
    return value


def bed_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables of this module that are set, for the suite inside the bed (which inherits no
    environment): ``KVMPY_SCALE``, and ``KVMPY_KNOWN_ISSUES`` as an absolute path."""
    env = os.environ if environ is None else environ
    out = {}
    if env.get(SCALE_ENV) is not None:
        out[SCALE_ENV] = str(scale_of(None, env))
    path = known_issues_path(env)
    if path is not None:
        out[KNOWN_ISSUES_ENV] = str(path)
    return out


def known_issues_path(environ: dict[str, str] | None = None, cwd: str | None = None) -> Path | None:
    """``KVMPY_KNOWN_ISSUES`` as an absolute path (relative: against ``cwd``, default the current
    directory), None when unset; OptionError if it names no readable file."""
    env = os.environ if environ is None else environ
    text = env.get(KNOWN_ISSUES_ENV)
    if not text:
        return None
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = Path(cwd or os.getcwd()) / path
    if not path.exists():
        raise OptionError(f"{KNOWN_ISSUES_ENV}={text}: {path} does not exist")
    if not path.is_file():
        raise OptionError(f"{KNOWN_ISSUES_ENV}={text}: {path} is not a file")
    return path
