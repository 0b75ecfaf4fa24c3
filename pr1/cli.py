"""What every pr1 command line shares: one flag dialect, and errors as one line naming what to fix.

The dialect: absl flags whose words are joined by underscores (`--max_new_tokens`, as training's
`--config.a.b`), and every OpenAI-compatible service named by its role with the same suffixes
(`define_service`): `--judge_url --judge_model --judge_api_key_env --judge_timeout_s ...`, likewise
`--checker_*`, `--teacher_*`, `--extractor_*`.

The errors: a bad flag, a missing or unreadable file and a bad value are reported as
`<prog>: <what to fix>` on one line of stderr with exit code 2; a flag that was renamed names its
new spelling; a traceback is kept for bugs (errors nobody asked the user to fix).

`parse` serves every command but `pr1.train` and `pr1.bench.memory`, which parse ml_collections'
`--config` with absl's app.run (their `--config.a.b` overrides need the global flag registry).
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Callable, Sequence

from absl import flags

USAGE_EXIT = 2
HELP_FLAGS = ("-h", "--help", "--helpshort", "--helpfull")

# The OpenAI-compatible services pr1's commands talk to, by role: the perception judge, the answer
# checker of pr1.eval, and pr1.annotate's teacher and extractor.
ROLES = ("judge", "checker", "teacher", "extractor")
# A service's flags are `--<role>_<suffix>`, one for each of these, in every command that talks to it.
SERVICE_SUFFIXES = (
    "url",
    "model",
    "api_key_env",
    "timeout_s",
    "max_concurrency",
    "retries",
    "backoff_s",
    "backoff_max_s",
)


def one_line(error: BaseException | str) -> str:
    """The message with its line breaks and runs of spaces folded into single spaces."""
    return " ".join(str(error).split())


def fail(prog: str, error: BaseException | str) -> int:
    """Prints `<prog>: <error>` as one line on stderr; returns the exit code (2) for main to return."""
    print(f"{prog}: {one_line(error)}", file=sys.stderr)
    return USAGE_EXIT


def usage_error(prog: str, error: BaseException | str):
    """`fail`, then exit 2: for errors found while parsing, before main has anything to return."""
    sys.exit(fail(prog, f"{one_line(error)} (--help for usage)"))


@dataclasses.dataclass(frozen=True)
class Service:
    """The values of one role's service flags (see define_service)."""

    url: str | None
    model: str | None
    api_key_env: str
    timeout_s: float
    max_concurrency: int
    retries: int
    backoff_s: float
    backoff_max_s: float


def define_service(
    fv: flags.FlagValues,
    role: str,
    what: str,
    *,
    model: str | None = None,
    api_key_env: str = "",
    timeout_s: float = 120.0,
    max_concurrency: int = 64,
    max_concurrency_help: str = "",
    retries: int = 4,
    backoff_s: float = 1.0,
    backoff_max_s: float = 30.0,
    url_help: str = "",
) -> None:
    """Declares `--<role>_<suffix>` for every SERVICE_SUFFIXES on fv: one OpenAI-compatible server.
    The defaults are the command's own; `service(fv, role)` reads the values back."""
    if role not in ROLES:
        raise ValueError(f"unknown service role {role!r}; add it to pr1.cli.ROLES ({', '.join(ROLES)})")
    p = f"{role}_"
    flags.DEFINE_string(
        p + "url",
        None,
        f"{what}: OpenAI-compatible base URL, e.g. http://host:30000/v1{url_help}",
        flag_values=fv,
    )
    flags.DEFINE_string(p + "model", model, f"{what}: model name as the server knows it", flag_values=fv)
    flags.DEFINE_string(
        p + "api_key_env",
        api_key_env,
        f"NAME of the environment variable holding the {what}'s API key (never the key itself; "
        "empty: no key)",
        flag_values=fv,
    )
    flags.DEFINE_float(p + "timeout_s", timeout_s, f"seconds per {what} request", flag_values=fv)
    flags.DEFINE_integer(
        p + "max_concurrency",
        max_concurrency,
        f"{what} requests in flight at most{max_concurrency_help}",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        p + "retries",
        retries,
        f"retries of a failed {what} request (timeouts, 429, 5xx, dropped connections)",
        flag_values=fv,
    )
    flags.DEFINE_float(
        p + "backoff_s",
        backoff_s,
        f"first {what} retry back-off in seconds (doubles, with jitter)",
        flag_values=fv,
    )
    flags.DEFINE_float(
        p + "backoff_max_s", backoff_max_s, f"{what} retry back-off cap in seconds", flag_values=fv
    )


def service(fv: flags.FlagValues, role: str) -> Service:
    """The parsed values of the flags define_service declared for role."""
    return Service(**{s: fv[f"{role}_{s}"].value for s in SERVICE_SUFFIXES})


def parse(
    prog: str,
    argv: Sequence[str] | None,
    define: Callable[[flags.FlagValues], None],
    *,
    doc: str,
    renamed: dict[str, str] | None = None,
) -> flags.FlagValues:
    """The flags of argv (without the program name; None: sys.argv[1:]) on a fresh FlagValues that
    define declared, so that a command's main may run many times in one process. No positional
    arguments. --help prints doc and the flags and exits 0; an error exits 2 (see parse_args)."""
    fv, args = parse_args(prog, argv, define, doc=doc, renamed=renamed)
    if args:
        usage_error(prog, f"unexpected arguments: {' '.join(args)}")
    return fv


def parse_args(
    prog: str,
    argv: Sequence[str] | None,
    define: Callable[[flags.FlagValues], None],
    *,
    doc: str,
    renamed: dict[str, str] | None = None,
) -> tuple[flags.FlagValues, list[str]]:
    """parse, but also returns the positional arguments (flags and arguments may be interleaved).

    Before absl sees argv, each flag is checked against `renamed` ({old name: new name}, without
    dashes) and against the underscore rule, so that an old spelling gets `--old was renamed to
    --new` rather than absl's "unknown flag"."""
    argv = list(sys.argv[1:] if argv is None else argv)
    fv = flags.FlagValues()
    define(fv)
    names = set(fv)
    renamed = renamed or {}
    for arg in argv:
        if arg == "--":
            break
        if arg in HELP_FLAGS:
            print(f"{doc.strip()}\n\nflags:\n{flags_help(fv)}")
            sys.exit(0)
        if not arg.startswith("-") or arg == "-":
            continue
        name = arg.lstrip("-").split("=", 1)[0]
        new = renamed.get(name)
        if new is None and "-" in name and name.replace("-", "_") in names:
            new = name.replace("-", "_")
        if new is not None:
            sys.exit(fail(prog, f"--{name} was renamed to --{new}"))
    try:
        rest = fv([prog, *argv])
    except flags.Error as e:
        usage_error(prog, f"bad flag: {e}")
    return fv, rest[1:]


def flags_help(fv: flags.FlagValues) -> str:
    """absl's help for fv's flags, sorted by name in one list (absl groups them by defining module)."""
    blocks: list[list[str]] = []
    for line in fv.get_help(include_special_flags=False).splitlines():
        if line.startswith("  --"):
            blocks.append([line])
        elif line.startswith("    ") and blocks:
            blocks[-1].append(line)
    blocks.sort(key=lambda b: re.sub(r"^\s*--(\[no\])?", "", b[0]))
    return "\n".join("\n".join(b) for b in blocks)
