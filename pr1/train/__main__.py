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

import sys

from absl import app, flags, logging
from ml_collections import config_flags

# Keys that were renamed: the old spelling gets the new name instead of a did-you-mean guess.
_RENAMED = {"--config.model.dtype": "model.dtype was replaced by model.param_dtype (the fp32 master weights) "
                                    "and model.compute_dtype (e.g. bfloat16)"}

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
    from pr1.data.dataset import DataError
    from pr1.train.config import ConfigError
    from pr1.train.loop import train

    # Before anything asks JAX for its devices.
    multiprocess = distributed.maybe_initialize(_CONFIG.value)
    with distributed.abort_peers_on_error():
        try:
            train(_CONFIG.value, _WORKDIR.value)
        except (ConfigError, DataError) as e:
            # Errors about the user's config or data name the key, file, row and field: one line
            # says it all, a traceback would only bury it.
            kind = "bad config" if isinstance(e, ConfigError) else "bad data"
            print(f"pr1.train: {kind}: {e}", file=sys.stderr)
            if multiprocess:
                distributed.abort(2)  # the others may not have found it (e.g. a per-process check)
            return 2
    return 0


def _parse_flags(argv):
    """absl's flag parsing, plus a usage error (not a traceback) for `--config.no.such.key=...`."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:  # what ml_collections raises for a key the config lacks
        inner = e
        while isinstance(inner, BaseException) and inner.args:  # AttributeError(KeyError(text))
            inner = inner.args[0]
        text = str(inner)
        key, _, hint = text.partition("\n")
        key = key.strip("'\" ")
        culprit = next((a.split("=")[0] for a in argv[1:] if a.startswith("--config.")
                        and key in a.split("=")[0].split(".")), "--config")
        hint = f" ({hint.strip()})" if hint.strip() else ""
        if culprit in _RENAMED:
            hint = f" ({_RENAMED[culprit]})"
        print(f"pr1.train: bad config override {culprit}: the config has no key {key!r}{hint}", file=sys.stderr)
        sys.exit(2)

if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
