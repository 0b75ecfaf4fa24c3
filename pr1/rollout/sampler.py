"""The embedded rollout engine: a jitted prefill + decode sampler on the learner's own mesh.

One jitted function per static shape does the whole rollout of a batch of prompts:

1. prefill: the left-padded prompts (with their images) run through the model in chunks of
   `prefill_chunk` prompts (`lax.map`), each filling a prompt KV cache of exactly the prompt bucket's
   slots (attention over the prompt length only); only the last position's logits are projected;
2. the n samples of a prompt share its prompt cache (`pr1.models.decode`: it is held once, not n
   times); each sample gets a response cache of `max_new_tokens` slots;
3. decode: a `lax.while_loop` samples a token per sequence, writes its keys/values in place at the
   next response slot and runs one decode step, until every sequence has hit a stop token or
   `max_new_tokens`.

A new token's MRoPE position is (real tokens so far) + the prompt's rope delta on all three rows.
Shapes are static: the prompt length is rounded up to a power-of-two bucket, the image patch slots
per prompt to a multiple of 256 (`vision.patch_bucket`), and the prompt count up to a multiple of
the mesh's batch axes (and of the prefill chunk), so a training run compiles a handful of variants.
The params are the learner's arrays. With `weights_layout="gathered"` (the default) the rollout
first casts them to the compute dtype and lays them out replicated over the batch axes (data, fsdp;
a `tensor` split is kept): one all-gather per rollout, after which the prefill and decode loops read
local weights. With "learner" they stay FSDP-sharded and the compiler decides: XLA's CPU compiler
hoists the gathers before the loops, but the TPU compiler streams every weight shard around the ring
inside the decode loop (collective-permutes per layer per token step: for the 7B on v5p-64 the
whole 15 GB of bf16 weights cross the interconnect for every generated token; issue 18).

Sampling follows the rollout engines whose logprobs the learner reproduces: logprobs are
log_softmax(logits / T) of the chosen token before top-k/top-p filtering; top-k keeps the k most
likely tokens, top-p the smallest prefix of the sorted distribution whose mass reaches p (the token
that crosses p is kept), applied together; temperature 0 is greedy with logprobs at T = 1.

Several processes (pr1.distributed): each passes its own prompts and gets back its own completions.
The processes agree on the static shapes (prompt bucket, patch bucket, prompts per process), each
places its rows as its block of the global batch, and all run the one jitted rollout together. The
random draws are a function of (seed, step, global row) only (one key per decode step over the
global [rows, vocab] logits; jax.random values do not depend on how an array is sharded), so
k processes with P/k prompts each sample the same tokens as one process with all P prompts, as long
as P/k fills whole rows of each process's devices (no padding rows in between).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pr1 import distributed
from pr1.models.attention import in_mesh
from pr1.models.decode import decode_step
from pr1.models.generation import Completion, Prompt, SamplingParams
from pr1.models.model_def import ModelDef
from pr1.models.rope import rope_index
from pr1.models.vision import LAYOUT_KEYS, batched_vision_inputs, patch_bucket, patch_slots
from pr1.rollout.config import WEIGHTS_LAYOUTS
from pr1.sharding import BATCH_AXES

_VISION_KEYS = ("pixel_values",) + LAYOUT_KEYS


def bucket(n: int, minimum: int) -> int:
    """The smallest power of two >= max(n, minimum): the static length a size is padded to."""
    size = max(int(minimum), 1)
    while size < n:
        size *= 2
    return size


def sample_tokens(logits, key, temperature, top_p, top_k, *, greedy: bool, filtering: bool):
    """(token [B], logprob [B]) from logits [B, V]; see the module docstring for the semantics.

    `temperature`, `top_p` and `top_k` are traced scalars (no recompilation per value); `greedy`
    and `filtering` (top-p < 1 or top-k > 0) are static.
    """
    logits = logits.astype(jnp.float32)
    if greedy:
        token = jnp.argmax(logits, axis=-1)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return token.astype(jnp.int32), jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
    z = logits / temperature
    logp = jax.nn.log_softmax(z, axis=-1)
    if filtering:
        # Filter and sample in sorted order, then map back: thresholding on a logit value would keep
        # every token tied with the cut-off.
        order = jnp.argsort(-z, axis=-1)
        sorted_z = jnp.take_along_axis(z, order, axis=-1)
        probs = jax.nn.softmax(sorted_z, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        rank = jnp.arange(z.shape[-1])[None, :]
        keep = (mass_before < top_p) & ((top_k <= 0) | (rank < top_k))
        keep = keep.at[:, 0].set(True)
        choice = jax.random.categorical(key, jnp.where(keep, sorted_z, -jnp.inf), axis=-1)
        token = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]
    else:
        token = jax.random.categorical(key, z, axis=-1)
    return token.astype(jnp.int32), jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


class EmbeddedEngine:
    """The default rollout engine: samples with the learner's params on the learner's mesh.

    `params` are the current parameters (a pure dict, as in TrainState.params); `sync_weights`
    just points at the new ones, so no copy is made. `tokenizer` decodes the response texts.
    """

    def __init__(
        self,
        model_def: ModelDef,
        params,
        mesh: Mesh,
        tokenizer,
        *,
        stop_token_ids: Sequence[int],
        pad_token_id: int,
        min_prompt_bucket: int = 64,
        min_patch_bucket: int = 256,
        prefill_chunk: int = 0,
        weights_layout: str = "gathered",
    ):
        if not stop_token_ids:
            raise ValueError("EmbeddedEngine needs at least one default stop token id (EOS, <|im_end|>)")
        if weights_layout not in WEIGHTS_LAYOUTS:
            raise ValueError(
                f"rollout.weights_layout must be one of {WEIGHTS_LAYOUTS}, got {weights_layout!r}"
            )
        self.model_def = model_def
        self.mesh = mesh
        self.tokenizer = tokenizer
        self.stop_token_ids = tuple(int(t) for t in stop_token_ids)
        self.pad_token_id = int(pad_token_id)
        self.min_prompt_bucket = min_prompt_bucket
        self.min_patch_bucket = min_patch_bucket
        self.prefill_chunk = int(prefill_chunk)  # prompts per prefill chunk (0: all at once)
        self.weights_layout = weights_layout
        # Shardings of the rollout's compute-dtype weights ("gathered"), derived from the params'
        # own shardings when a rollout is run or lowered; read while tracing (constant per engine).
        self._weights_sharding = None
        self._params = params
        self.weight_version = "step-0"
        self.compilations = 0  # traces of the rollout function (each new static shape is one)
        self._rollout = jax.jit(
            in_mesh(self._rollout_fn, mesh),
            static_argnames=("n", "max_new_tokens", "greedy", "filtering", "chunks"),
        )

    def sync_weights(self, params, step: int) -> None:
        self._params = params
        self.weight_version = f"step-{step}"

    def generate(self, prompts: Sequence[Prompt], sampling: SamplingParams, n: int = 1) -> list[Completion]:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        prompts = list(prompts)
        if distributed.is_multiprocess():
            return self._generate_multiprocess(prompts, sampling, n)
        if not prompts:
            return []
        batch, num_real = self._prefill_inputs(prompts)
        out = self._run(batch, sampling, n)
        tokens, logprobs, lengths, stopped = (np.asarray(x) for x in jax.device_get(out))
        return self._completions(tokens, logprobs, lengths, stopped, num_real, n)

    def _run(self, batch: dict, sampling: SamplingParams, n: int):
        stop = sampling.stop_ids(self.stop_token_ids)
        self._weights_sharding = self.rollout_weights_sharding(self._params)
        return self._rollout(
            self._params,
            batch,
            jax.random.key(sampling.seed),
            jnp.float32(max(sampling.temperature, 1e-6)),
            jnp.float32(sampling.top_p),
            jnp.int32(sampling.top_k),
            jnp.asarray(stop, jnp.int32),
            n=n,
            max_new_tokens=sampling.max_new_tokens,
            greedy=sampling.greedy,
            filtering=sampling.top_p < 1 or sampling.top_k > 0,
            chunks=self.prefill_chunks(batch["input_ids"].shape[0]),
        )

    def lower(
        self, params, batch: dict, stop_ids, *, n: int, max_new_tokens: int, greedy: bool, filtering: bool
    ):
        """The jitted rollout lowered for (possibly abstract) `params` and a placed prefill `batch` (as
        `_prefill_inputs` builds it), for memory planning and tests; scalars are abstract."""
        replicated = NamedSharding(self.mesh, PartitionSpec())

        def scalar(dtype):
            return jax.ShapeDtypeStruct((), dtype, sharding=replicated)

        key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
        self._weights_sharding = self.rollout_weights_sharding(params)
        return self._rollout.lower(
            params,
            batch,
            key,
            scalar(jnp.float32),
            scalar(jnp.float32),
            scalar(jnp.int32),
            stop_ids,
            n=n,
            max_new_tokens=max_new_tokens,
            greedy=greedy,
            filtering=filtering,
            chunks=self.prefill_chunks(batch["input_ids"].shape[0]),
        )

    def rollout_weights_sharding(self, params):
        """Per leaf of `params`: where the rollout keeps its compute-dtype copy ("gathered": the
        leaf's own sharding without the batch axes), or None to read the learner's layout."""
        if self.weights_layout == "learner":
            return None

        def without_batch_axes(x):
            sharding = getattr(x, "sharding", None)
            if not isinstance(sharding, NamedSharding):
                return NamedSharding(self.mesh, PartitionSpec())
            spec = []
            for entry in sharding.spec:
                names = tuple(
                    a for a in ((entry,) if isinstance(entry, str) else entry or ()) if a not in BATCH_AXES
                )
                spec.append(None if not names else names[0] if len(names) == 1 else names)
            return NamedSharding(self.mesh, PartitionSpec(*spec))

        return jax.tree.map(without_batch_axes, params)

    def rollout_weights_bytes_per_device(self, params) -> int:
        """Bytes per device of the rollout's gathered compute-dtype weights (0 for "learner"): they
        live inside the rollout program, so the memory planner shows them as a row of their own."""
        shardings = self.rollout_weights_sharding(params)
        if shardings is None:
            return 0
        total = 0
        for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
            dtype = self.model_def.compute_dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
            shard = s.shard_shape(tuple(x.shape))
            total += int(np.prod(shard)) * jnp.dtype(dtype).itemsize
        return total

    def _batch_devices(self) -> int:
        return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    def _chunk_rows(self) -> int:
        """Prompts per prefill chunk, rounded up to whole rows of every batch device (0: no chunking)."""
        if self.prefill_chunk <= 0:
            return 0
        d = self._batch_devices()
        return -(-self.prefill_chunk // d) * d

    def prefill_chunks(self, rows: int) -> int:
        """How many chunks the prefill of `rows` (global) prompts runs in: the fewest that hold at most
        `prefill_chunk` prompts each and split every device's rows evenly (chunk j takes rows j, j+k, ..)."""
        chunk = self._chunk_rows()
        per_device = rows // self._batch_devices()
        if chunk <= 0 or chunk >= rows:
            return 1
        want = -(-rows // chunk)
        return next(k for k in range(want, per_device + 1) if per_device % k == 0)

    def _generate_multiprocess(
        self, prompts: list[Prompt], sampling: SamplingParams, n: int
    ) -> list[Completion]:
        # Every process must reach the jitted rollout with the same shapes, even one without prompts
        # (a short validation split): the shapes come from maxima over all processes. Process p's
        # rows are its block of the global batch (pr1.distributed.check_process_rows).
        local_rows = self.mesh.shape["data"] * self.mesh.shape["fsdp"] // jax.process_count()
        vision = self.model_def.config.vision
        count, longest, patches = distributed.max_over_processes(
            [
                len(prompts),
                max((len(p.input_ids) for p in prompts), default=1),
                max((patch_slots(p.image_grid_thw, vision) for p in prompts), default=0),
            ]
        )
        if count == 0:
            return []
        rows = -(-count // local_rows) * local_rows
        # A process without prompts feeds one-token rows (their output is discarded).
        filler = (
            prompts[0] if prompts else Prompt(input_ids=np.full((1,), self.pad_token_id, np.int32), text="")
        )
        batch, _ = self._prefill_inputs(prompts or [filler], rows=rows, longest=longest, patches=patches)
        num_real = len(prompts)
        out = self._run(batch, sampling, n)
        first = jax.process_index() * rows * n
        tokens, logprobs, lengths, stopped = (distributed.local_rows(x, first, first + rows * n) for x in out)
        return self._completions(tokens, logprobs, lengths, stopped, num_real, n)

    def _completions(self, tokens, logprobs, lengths, stopped, num_real: int, n: int) -> list[Completion]:
        completions = []
        for p in range(num_real):
            for s in range(n):
                row = p * n + s
                ids = tokens[row, : lengths[row]].astype(np.int32)
                text_ids = ids[:-1] if stopped[row] else ids
                completions.append(
                    Completion(
                        prompt_index=p,
                        sample_index=s,
                        token_ids=ids,
                        logprobs=logprobs[row, : lengths[row]].astype(np.float32),
                        text=self.tokenizer.decode(text_ids.tolist(), skip_special_tokens=False),
                        finish_reason="stop" if stopped[row] else "length",
                        weight_version=self.weight_version,
                    )
                )
        return completions

    # -- host side: padding to static shapes ------------------------------------------------------

    def _prefill_inputs(
        self, prompts: list[Prompt], *, rows: int | None = None, longest: int = 0, patches: int = 0
    ) -> tuple[dict, int]:
        """The placed prefill batch of `prompts` (this process's rows) and the number of real ones.

        One process: `rows` None pads to a multiple of the batch axes. Several: `rows` is every
        process's agreed row count, `longest` / `patches` the longest prompt and most image patches
        over all processes, so every process builds the same shapes.
        """
        num_real = len(prompts)
        if rows is None:
            d = self._batch_devices()
            rows = -(-num_real // d) * d
            chunk = self._chunk_rows()
            if 0 < chunk < rows:  # whole chunks: the prefill's lax.map needs equal ones
                rows = -(-rows // chunk) * chunk
        # Pad the prompt count with copies of prompt 0 (discarded afterwards): a copy is a valid
        # input, where an empty row would be an all-padding sequence.
        padded = prompts + [prompts[0]] * (rows - num_real)
        length = bucket(max([longest] + [len(p.input_ids) for p in padded]), self.min_prompt_bucket)
        ids = np.full((len(padded), length), self.pad_token_id, np.int32)
        mask = np.zeros((len(padded), length), np.int32)
        for b, p in enumerate(padded):
            ids[b, length - len(p.input_ids) :] = p.input_ids
            mask[b, length - len(p.input_ids) :] = 1
        grids = [p.image_grid_thw for p in padded if p.image_grid_thw is not None]
        grid_all = np.concatenate(grids) if grids else None
        pos, deltas = rope_index(self.model_def.config, ids, grid_all, mask)
        batch = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": pos.astype(np.int32),
            "deltas": deltas.astype(np.int32),
        }
        if grids or patches:  # `patches` > 0: another process has images, so every process has these keys
            vision = self.model_def.config.vision
            patches = patch_bucket(
                max([patches] + [patch_slots(p.image_grid_thw, vision) for p in padded]),
                self.min_patch_bucket,
            )
            batch.update(
                batched_vision_inputs(
                    [p.pixel_values for p in padded],
                    [p.image_grid_thw for p in padded],
                    vision,
                    num_patches=patches,
                    dtype=jnp.dtype(self.model_def.compute_dtype),
                )
            )
        placed = {}
        for key, value in batch.items():
            axes = (None, BATCH_AXES) if key == "position_ids" else (BATCH_AXES,)
            placed[key] = distributed.global_array_from_local(
                value, NamedSharding(self.mesh, PartitionSpec(*axes))
            )
        return placed, num_real

    # -- device side: one jitted rollout ----------------------------------------------------------

    def _rollout_fn(
        self,
        params,
        batch,
        key,
        temperature,
        top_p,
        top_k,
        stop_ids,
        *,
        n,
        max_new_tokens,
        greedy,
        filtering,
        chunks,
    ):
        self.compilations += 1  # runs only while tracing
        # Sampled with the compute-dtype weights (bf16 for the recipe), as the learner's forward runs.
        weights = self.model_def.compute_params(params)
        if self._weights_sharding is not None:
            # One gather per rollout, before the loops (see the module docstring).
            weights = jax.lax.with_sharding_constraint(weights, self._weights_sharding)
        model = self.model_def.bind(weights)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        rows, length = ids.shape
        head = model.logits  # fp32 accumulation, as in the learner

        def prefill(chunk):
            """One chunk of prompts → (last logits [C, V], its prompt cache [layers, C, Tp, ...])."""
            vision = {k: chunk[k] for k in _VISION_KEYS if k in chunk}
            layout = {k: vision[k] for k in _VISION_KEYS[1:]} if vision else None
            cache = model.init_cache(chunk["input_ids"].shape[0], length, dtype=self.model_def.compute_dtype)
            hidden, cache = model(
                chunk["input_ids"],
                position_ids=jnp.swapaxes(chunk["position_ids"], 0, 1),
                attention_mask=chunk["attention_mask"],
                pixel_values=vision.get("pixel_values"),
                vision_layout_arrays=layout,
                cache=cache,
                cache_index=0,
                return_hidden=True,
            )
            return head(hidden[:, -1]), cache

        inputs = {k: v for k, v in batch.items() if k != "deltas"}
        inputs["position_ids"] = jnp.swapaxes(inputs["position_ids"], 0, 1)  # rows first, for the split
        if chunks == 1:
            logits, prompt_cache = prefill(inputs)
        else:
            # Chunk j = rows j, j+k, ...: every device keeps prefilling its own rows.

            def split(x):
                return jnp.moveaxis(x.reshape((rows // chunks, chunks) + x.shape[1:]), 1, 0)

            logits, prompt_cache = jax.lax.map(prefill, jax.tree.map(split, inputs))
            logits = jnp.moveaxis(logits, 0, 1).reshape(rows, -1)
            prompt_cache = jax.tree.map(
                lambda x: jnp.moveaxis(x, 0, 2).reshape((x.shape[1], rows) + x.shape[3:]), prompt_cache
            )
        prompt_cache = self._constrain_cache(prompt_cache)
        prompt_segments = jnp.where(mask.astype(bool), 0, -1)

        # n samples per prompt: rows p*n .. p*n+n-1 share prompt p's cache (held once).

        def rep(x):
            return jnp.repeat(x, n, axis=0)

        total = rows * n
        response_cache = self._constrain_cache(
            model.init_cache(total, max_new_tokens, dtype=self.model_def.compute_dtype)
        )
        logits = rep(logits)
        prompt_len, deltas = rep(mask.sum(axis=1)), rep(batch["deltas"])

        def sample(step, logits):
            return sample_tokens(
                logits,
                jax.random.fold_in(key, step),
                temperature,
                top_p,
                top_k,
                greedy=greedy,
                filtering=filtering,
            )

        token, logp = sample(0, logits)
        tokens = jnp.full((total, max_new_tokens), self.pad_token_id, jnp.int32).at[:, 0].set(token)
        logprobs = jnp.zeros((total, max_new_tokens), jnp.float32).at[:, 0].set(logp)
        stopped = jnp.isin(token, stop_ids)
        lengths = jnp.ones((total,), jnp.int32)

        def cond(carry):
            step, _, _, _, _, _, stopped = carry
            return (step < max_new_tokens) & ~jnp.all(stopped)

        def body(carry):
            step, cache, last, tokens, logprobs, lengths, stopped = carry
            # Token step-1 goes into response slot step-1 at position (real tokens so far) + delta.
            position = jnp.broadcast_to((prompt_len + step - 1 + deltas)[None, :, None], (3, total, 1))
            h, cache = decode_step(model, last, position, prompt_cache, prompt_segments, cache, step - 1, n)
            token, logp = sample(step, head(h))
            running = ~stopped
            token = jnp.where(running, token, self.pad_token_id)
            tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, step))
            logprobs = jax.lax.dynamic_update_slice(
                logprobs, jnp.where(running, logp, 0.0)[:, None], (0, step)
            )
            lengths = lengths + running.astype(jnp.int32)
            stopped = stopped | (running & jnp.isin(token, stop_ids))
            return step + 1, self._constrain_cache(cache), token, tokens, logprobs, lengths, stopped

        carry = (jnp.int32(1), response_cache, token, tokens, logprobs, lengths, stopped)
        _, _, _, tokens, logprobs, lengths, stopped = jax.lax.while_loop(cond, body, carry)
        return tokens, logprobs, lengths, stopped

    def _constrain_cache(self, cache):
        """Cache rows follow the batch axes, kv heads the tensor axis when they divide it."""
        kv_heads = self.model_def.config.text.num_key_value_heads
        heads = "tensor" if kv_heads % self.mesh.shape["tensor"] == 0 else None
        spec = NamedSharding(self.mesh, PartitionSpec(None, BATCH_AXES, None, heads, None))
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, spec), cache)
