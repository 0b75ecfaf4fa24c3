"""python -m pr1.train --config configs/X.py[:arg] --workdir DIR [--config.a.b=value ...]

Trains (or resumes training in) DIR. The config file returns a `pr1.train.config.default_config()`
with its values set; `--config.key=value` overrides any key (the config is locked, so a misspelled
key is an error, not a silent no-op).

Multi-host: run the same command on every host with PR1_DISTRIBUTED=1 (or
--config.distributed.enabled=True); see pr1/distributed.py for where the coordinator address,
process count and id come from. A process that fails ends at once, and the others stop within
config distributed.heartbeat_timeout seconds instead of waiting in a collective.
"""

from __future__ import annotations

import os
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from pr1 import cli

# Keys that were renamed: the old spelling gets the new name instead of a did-you-mean guess.
_RENAMED = {
    "--config.model.dtype": "model.dtype was replaced by model.param_dtype (the fp32 master weights) "
    "and model.compute_dtype (e.g. bfloat16)",
    # Seconds carry the _s suffix of the service flags of the other CLIs (--judge_timeout_s, ...).
    "--config.rewards.judge.timeout": "renamed to rewards.judge.timeout_s",
    "--config.rewards.judge.connect_timeout": "renamed to rewards.judge.connect_timeout_s",
    "--config.rewards.judge.backoff": "renamed to rewards.judge.backoff_s",
    "--config.rewards.judge.backoff_max": "renamed to rewards.judge.backoff_max_s",
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "path to a configs/*.py file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics, config.json")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        # orbax logs every save step at INFO; the progress line and metrics.jsonl say what matters.
        logging.set_verbosity(logging.WARNING)
    from pr1 import distributed
    from pr1.data.rows import DataError
    from pr1.train.checkpoint import CheckpointSaveError
    from pr1.train.config import ConfigError
    from pr1.train.loop import train
    from pr1.train.step import NonFiniteError

    # Before anything asks JAX for its devices.
    multiprocess = distributed.maybe_initialize(_CONFIG.value)
    with distributed.abort_peers_on_error():
        try:
            train(_CONFIG.value, _WORKDIR.value)
        except (ConfigError, DataError) as e:
            # Errors about the user's config or data name the key, file, row and field: one line
            # says it all, a traceback would only bury it.
            kind = "bad config" if isinstance(e, ConfigError) else "bad data"
            cli.fail("pr1.train", f"{kind}: {e}")
            if multiprocess:
                distributed.abort(2)  # the others may not have found it (e.g. a per-process check)
            return 2
        except (NonFiniteError, CheckpointSaveError) as e:
            # The run stopped on purpose; the message names the step (and path), and says what the
            # newest complete checkpoint is: a resume continues from it.
            cli.fail("pr1.train", f"stopped: {e}")
            if multiprocess:
                distributed.abort(1)
            return 1
    return 0


def _fail(message: str):
    sys.exit(cli.fail("pr1.train", message))


def _config_arg(argv) -> str | None:
    """The --config value as given (`path[:arg]`), or None."""
    for k, a in enumerate(argv[1:], 1):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and k + 1 < len(argv):
            return argv[k + 1]
    return None


def _check_config_file(value: str) -> None:
    """A missing or unreadable config file as one line, before ml_collections defers the error to
    the first use of the config (where it would surface as a traceback)."""
    path = value.split(":", 1)[0]  # ml_collections' own split: everything after the first ':' is the arg
    if not path:
        _fail("--config is empty; give a configs/*.py file")
    if not os.path.isfile(path):
        what = "is a directory, not a configs/*.py file" if os.path.isdir(path) else "not found"
        _fail(f"config file {path} {what} (--config {value})")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        _fail(f"cannot read config file {path} (--config): {e.strerror or e}")


def _config_error(e: BaseException, value: str) -> str:
    """One line for an exception raised while the config file ran: where in the file, and what."""
    path = value.split(":", 1)[0]
    arg = value.split(":", 1)[1] if ":" in value else None
    if isinstance(e, AttributeError) and "get_config" in str(e):
        return f"config file {path} defines no get_config() function"
    text = str(e)
    if "Error whilst parsing config file" in text:  # ml_collections wraps get_config's TypeError/ValueError
        text = next((line.strip() for line in reversed(text.splitlines()) if line.strip()), text)
        if "get_config() takes 0 positional arguments" in text:
            return f"config file {path} takes no argument, got {arg!r} (--config {value})"
        if arg is None:
            return f"config file {path}: get_config() failed: {text}"
        return f"config file {path} does not accept the argument {arg!r}: {text}"
    frames = [
        f
        for f in traceback.extract_tb(e.__traceback__)
        if os.path.abspath(f.filename) == os.path.abspath(path)
    ]
    if isinstance(e, SyntaxError) and e.filename and os.path.abspath(e.filename) == os.path.abspath(path):
        return f"config file {path}:{e.lineno}: SyntaxError: {e.msg}"
    where = f"{path}:{frames[-1].lineno}" if frames else path
    return f"config file {where}: {type(e).__name__}: {e}"


def _parse_flags(argv):
    """absl's flag parsing, with one line and exit code 2 (not a traceback or a usage dump) for a
    missing or unreadable config file, one without get_config, an argument get_config does not
    take, an error inside the file, `--config.no.such.key=...` and any other bad flag."""
    value = _config_arg(argv)
    if value is not None:
        _check_config_file(value)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        cause = e.__cause__ or e.__context__
        if value is not None and cause is not None and "Error whilst parsing config file" in str(cause):
            _fail(_config_error(cause, value))
        _fail(f"bad flag: {' '.join(str(e).split())}")
    except (AttributeError, KeyError) as e:  # what ml_collections raises for a key the config lacks
        if value is not None and isinstance(e, AttributeError) and "get_config" in str(e):
            _fail(_config_error(e, value))
        inner = e
        while isinstance(inner, BaseException) and inner.args:  # AttributeError(KeyError(text))
            inner = inner.args[0]
        text = str(inner)
        key, _, hint = text.partition("\n")
        key = key.strip("'\" ")
        culprit = next(
            (
                a.split("=")[0]
                for a in argv[1:]
                if a.startswith("--config.") and key in a.split("=")[0].split(".")
            ),
            "--config",
        )
        hint = f" ({hint.strip()})" if hint.strip() else ""
        if culprit in _RENAMED:
            hint = f" ({_RENAMED[culprit]})"
        _fail(f"bad config override {culprit}: the config has no key {key!r}{hint}")
    except Exception as e:  # noqa: BLE001 - raised by the config file's own code
        if value is None:
            raise
        _fail(_config_error(e, value))


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
