"""Weight sync of the rollout server engines: the learner's params → a weight dir → every server.

Where it sits: `remote.RemoteEngine` is a `WeightSync`; the protocol modules supply how one server
loads a weight dir (`_update_server`) and which version it serves (`_served_version`).
`sync_weights`: `hf.save` writes `<workdir>/weights/step-N/` (every process takes part: it gathers
sharded params), then process 0 loads it into every server and deletes all but the newest
`keep_versions` weight dirs; every process learns the outcome. The servers must see the workdir
path (same node or shared filesystem). A server whose update failed, or that lost its weights
(restarted), gets the current version again before its next sample (`_resync`).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import re
import shutil
import threading

import jax
import jax.numpy as jnp
import numpy as np

from pr1.rollout.server_client import RemoteEngineError

log = logging.getLogger(__name__)

VERSION_DIR = re.compile(r"^step-(\d+)$")


class WeightSync:
    """The weight-sync half of a server engine; `_init_weight_sync` sets its state. It relies on the
    engine's `urls`, `_lock`, `_stats`, `kind`, `Error` and the protocol's `_update_server`."""

    def _init_weight_sync(
        self, *, model_def, workdir, assets_from, keep_versions: int, weights_dtype
    ) -> None:
        if int(keep_versions) < 1:
            raise ValueError(f"{self.config_key}.keep_versions must be >= 1, got {keep_versions}")
        self.model_def = model_def
        self.workdir = None if workdir is None else os.fspath(workdir)
        self.assets_from = None if assets_from is None else os.fspath(assets_from)
        self.keep_versions = int(keep_versions)
        # Unset: what the embedded sampler would sample with (the compute dtype), not the fp32 masters.
        if weights_dtype is None:
            weights_dtype = getattr(model_def, "compute_dtype", None)
        self.weights_dtype = None if weights_dtype is None else jnp.dtype(weights_dtype)
        self.weight_version: str | None = None
        self._weights_path: str | None = None
        self._resync_locks: dict[str, threading.Lock] = {}
        # Bumped whenever a server's weights are replaced, so a sample that was in flight across a
        # reload is recognised as not coming from the version it reports afterwards.
        self._generation = {u: 0 for u in self.urls}
        # Servers whose last weight update failed: their weights are unknown (vLLM may hold partial
        # ones), so they get the current version again before their next sample.
        self._needs_resync: set[str] = set()

    def sync_weights(self, params, step: int) -> None:
        """Write `params` as `<workdir>/weights/step-N/` and load it into every server (see module doc)."""
        if self.model_def is None or self.workdir is None:
            raise ValueError(
                f"{type(self).__name__}.sync_weights needs model_def= and workdir= at construction"
            )
        from pr1.models import hf  # the model stack is only needed for weight sync

        version = f"step-{int(step)}"
        path = os.path.join(os.path.abspath(self.workdir), "weights", version)
        hf.save(self.model_def.bind(params), path, assets_from=self.assets_from, dtype=self.weights_dtype)
        error = None
        if jax.process_index() == 0:
            try:
                self._update_servers(path, version)
                self._prune_versions(version)
            except RemoteEngineError as e:
                error = e
        if jax.process_count() > 1:
            # Every process learns the outcome, so none waits forever or samples from stale servers.
            from jax.experimental import multihost_utils

            ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
            if not int(ok) and error is None:
                error = self.Error(f"{self.kind} weight sync to {version} failed on process 0 (see its log)")
        if error is not None:
            raise error
        self.weight_version, self._weights_path = version, path
        with self._lock:
            self._stats["weight_syncs"] += 1

    def _bump_generation(self, url: str) -> int:
        with self._lock:
            self._generation[url] += 1
            return self._generation[url]

    def _resync(self, url: str) -> None:
        """Loads the current weight version into `url` again, once however many samples noticed."""
        with self._lock:
            lock = self._resync_locks.setdefault(url, threading.Lock())
        with lock:
            got = self._served_version(url)
            if got == self.weight_version:
                return  # another sample already resynced it
            log.warning(
                "%s server %s serves weight_version %r instead of %r (restarted?): loading %s again",
                self.kind,
                url,
                got,
                self.weight_version,
                self._weights_path,
            )
            self._update_server(url, self._weights_path, self.weight_version)
            with self._lock:
                self._stats["resyncs"] += 1

    def _update_servers(self, path: str, version: str) -> None:
        with cf.ThreadPoolExecutor(max_workers=len(self.urls)) as pool:
            futures = {url: pool.submit(self._update_server, url, path, version) for url in self.urls}
        errors = [str(f.exception()) for f in futures.values() if f.exception() is not None]
        with self._lock:
            self._needs_resync = {url for url, f in futures.items() if f.exception() is not None}
        if errors:
            raise self.Error(
                f"weight sync to {version} failed on {len(errors)} of {len(self.urls)} server(s): "
                + " | ".join(errors)
            )
        log.info("%s servers now serve %s from %s", self.kind, version, path)

    def _prune_versions(self, current: str) -> None:
        """Keep `current` and the newest others (by write time) up to keep_versions; delete the rest."""
        root = os.path.join(self.workdir, "weights")
        entries = []
        for name in os.listdir(root):
            full = os.path.join(root, name)
            if name != current and VERSION_DIR.match(name) and os.path.isdir(full):
                entries.append((os.stat(full).st_mtime_ns, int(VERSION_DIR.match(name).group(1)), full))
        entries.sort(reverse=True)
        for _, _, full in entries[self.keep_versions - 1 :]:
            shutil.rmtree(full, ignore_errors=True)
