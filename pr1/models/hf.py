"""Hugging Face checkpoints in and out: config.json plus (sharded) safetensors.

`load` reads tensor by tensor (one whole-tensor read each, straight into a host array in our
layout: a blocked transpose for kernels, fused with any dtype cast) and places each one into its
(sharded) device layout, so a 7B checkpoint never needs two full copies in host memory. It accepts both tensor
name schemes: the hub names (`visual.*`, `model.layers.*`, `lm_head.weight`) and the in-memory names
of transformers >= 4.52 (`model.visual.*`, `model.language_model.*`). `save` writes hub names, which
transformers' `from_pretrained` and SGLang's `update_weights_from_disk` both read.

torch Linear weights are [out, in]; ours are kernels [in, out]. The patch-embedding Conv3d weight
[hidden, C, T, P, P] is a [C·T·P·P, hidden] kernel over pre-flattened patches.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pr1 import sharding as sharding_lib
from pr1.models.config import Qwen25VLConfig
from pr1.models.qwen2_5_vl import Qwen25VL
from pr1.models.safetensors_io import LazyTensor, SafetensorsFile, empty_aligned, save_file

INDEX_FILE = "model.safetensors.index.json"
# Extra files of a checkpoint dir that `save(..., assets_from=dir)` carries along.
ASSET_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "generation_config.json",
)


class CheckpointError(ValueError):
    """A checkpoint that does not match the model; the message names the tensor and the file."""


def hf_name(path: tuple) -> str:
    """Hub tensor name of the parameter at NNX state `path`."""
    parts = [str(p) for p in path]
    leaf = parts[-1]
    parts = parts[:-1]
    if parts[:2] == ["visual", "merger"] and parts[2] in ("fc1", "fc2"):
        parts = ["visual", "merger", "mlp", "0" if parts[2] == "fc1" else "2"]
    if parts[0] in ("embed_tokens", "layers", "norm"):
        parts = ["model"] + parts
    suffix = "bias" if leaf == "bias" else "weight"
    return ".".join(parts + [suffix])


def canonical_name(name: str) -> str:
    """Map the in-memory naming of transformers >= 4.52 onto hub names."""
    if name.startswith("model.visual."):
        return name[len("model.") :]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    return name


def _is_conv(path: tuple) -> bool:
    return tuple(str(p) for p in path) == ("visual", "patch_embed", "proj", "kernel")


def to_ours(path: tuple, tensor: np.ndarray, config: Qwen25VLConfig) -> np.ndarray:
    """HF tensor → our parameter layout (a view where possible)."""
    if _is_conv(path):
        return tensor.reshape(tensor.shape[0], -1).T
    if str(path[-1]) == "kernel":
        return tensor.T
    return tensor


_BLOCK = 256  # columns per transpose tile: source and destination tiles stay in cache


def transposed(a: np.ndarray, dtype=None) -> np.ndarray:
    """A C-contiguous, 64-byte-aligned `a.T` (2-D) in `dtype`, copied tile by tile: one pass over
    memory with cache-sized tiles instead of numpy's strided walk over a whole large matrix (and,
    when the dtype changes, no separate cast pass)."""
    dtype = a.dtype if dtype is None else np.dtype(dtype)
    rows, cols = a.shape
    out = empty_aligned((cols, rows), dtype)
    for i in range(0, rows, _BLOCK):
        for j in range(0, cols, _BLOCK):
            out[j : j + _BLOCK, i : i + _BLOCK] = a[i : i + _BLOCK, j : j + _BLOCK].T
    return out


def _read_ours(path: tuple, src: SafetensorsFile, stored: str, dtype) -> np.ndarray:
    """Stored HF tensor → a C-contiguous, aligned host array in our layout and `dtype`. Kernels
    (transposed) are read in cache-sized row blocks, each transposed into place as it arrives: the
    bytes cross memory once; the rest is one read straight into the array (cast if needed)."""
    dtype = np.dtype(dtype)
    if _is_conv(path) or str(path[-1]) == "kernel":
        shape = src.shape(stored)
        rows, cols = shape[0], int(np.prod(shape[1:], dtype=np.int64))
        out = empty_aligned((cols, rows), dtype)
        for r, block in src.row_blocks(stored):
            for j in range(0, cols, _BLOCK):
                out[j : j + _BLOCK, r : r + block.shape[0]] = block[:, j : j + _BLOCK].T
        return out
    tensor = src.read(stored)
    if tensor.dtype == dtype:
        return tensor
    out = empty_aligned(tensor.shape, dtype)
    out[...] = tensor
    return out


def _hf_writer(value: np.ndarray, shape) -> LazyTensor:
    """The stored [out, in] (or conv) tensor of our kernel `value` [in, out], written in row blocks
    transposed into one reused cache-sized buffer: no full transposed copy is made."""
    rows_in, cols_out = value.shape
    k = max(1, min(cols_out, (1 << 20) // max(rows_in * value.dtype.itemsize, 1)))
    scratch = empty_aligned((k, rows_in), value.dtype)

    def write(f):
        for j in range(0, cols_out, k):
            n = min(k, cols_out - j)
            for i in range(0, rows_in, _BLOCK):
                scratch[:n, i : i + _BLOCK] = value[i : i + _BLOCK, j : j + n].T
            f.write(memoryview(scratch[:n].reshape(-1).view(np.uint8)))

    return LazyTensor(shape, value.dtype, write)


def to_hf(path: tuple, value: np.ndarray, config: Qwen25VLConfig) -> np.ndarray:
    if _is_conv(path):
        v = config.vision
        return transposed(value).reshape(
            v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size
        )
    if str(path[-1]) == "kernel":
        return transposed(value)
    return value


def _tensor_index(path: str) -> dict[str, tuple[str, str]]:
    """canonical name → (file, name in file) over all safetensors files of the checkpoint dir."""
    index_file = os.path.join(path, INDEX_FILE)
    if os.path.exists(index_file):
        with open(index_file) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_file}: no 'weight_map'")
        entries = [(name, os.path.join(path, file)) for name, file in weight_map.items()]
        for file in sorted({f for _, f in entries}):
            if not os.path.exists(file):
                raise CheckpointError(f"{index_file} names {os.path.basename(file)}, which does not exist")
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no *.safetensors files and no {INDEX_FILE}")
        entries = [
            (name, os.path.join(path, f))
            for f in files
            for name in SafetensorsFile(os.path.join(path, f)).keys()
        ]
    out: dict[str, tuple[str, str]] = {}
    for name, file in entries:
        canon = canonical_name(name)
        if canon in out:
            raise CheckpointError(f"tensor {canon} appears twice: in {out[canon][0]} and {file}")
        out[canon] = (file, name)
    return out


_ABSTRACT: dict = {}


def _abstract_model(config: Qwen25VLConfig, dtype):
    """(graphdef, abstract state) of the model, built once per (config, dtype) in a process: tracing
    the constructor costs more than reading a small checkpoint (a weight sync reloads every step)."""
    key = (repr(config), np.dtype(dtype).name)
    if key not in _ABSTRACT:
        abstract = nnx.eval_shape(lambda: Qwen25VL(config, dtype=dtype, rngs=nnx.Rngs(0)))
        _ABSTRACT[key] = nnx.split(abstract)
    return _ABSTRACT[key]


def load(
    path: str | os.PathLike, *, dtype=jnp.bfloat16, mesh=None, rules=sharding_lib.DEFAULT_RULES
) -> Qwen25VL:
    """Load a Hugging Face Qwen2.5-VL checkpoint dir into a `Qwen25VL` with parameters in `dtype`.

    With a `mesh`, every tensor is placed directly in its sharded layout (per-device slices are read
    from the memory map), following `rules` over the parameters' logical axes.
    """
    path = os.fspath(path)
    config = Qwen25VLConfig.from_dir(path)
    graphdef, state = _abstract_model(config, dtype)
    index = _tensor_index(path)
    files: dict[str, SafetensorsFile] = {}

    def open_file(file):
        if file not in files:
            files[file] = SafetensorsFile(file)
        return files[file]

    used = set()
    new_flat = []
    for p, var in nnx.to_flat_state(state):
        name = hf_name(p)
        if name not in index:
            where = os.path.join(path, INDEX_FILE) if os.path.exists(os.path.join(path, INDEX_FILE)) else path
            raise CheckpointError(f"missing tensor {name} (looked in {where})")
        file, stored = index[name]
        used.add(name)
        src = open_file(file)
        # Shape check on the header before any byte is read.
        layout = to_ours(p, np.empty(src.shape(stored), np.uint8), config).shape
        if tuple(layout) != tuple(var.shape):
            raise CheckpointError(
                f"tensor {stored} in {file} has shape {list(src.shape(stored))}, "
                f"which does not fit parameter {'.'.join(map(str, p))} of shape {list(var.shape)} "
                f"(after layout conversion: {list(layout)})"
            )
        sh = (
            None
            if mesh is None
            else sharding_lib.named_sharding(
                var.get_metadata().get("logical_axes"), var.shape, mesh, rules, name=name
            )
        )
        if sh is not None and not sh.is_fully_addressable:
            # Several hosts: each reads only the slices its devices hold, through the memory map.
            tensor = to_ours(p, src.get(stored), config)
            value = jax.make_array_from_callback(
                tuple(var.shape), sh, lambda idx, t=tensor: np.asarray(t[idx]).astype(dtype)
            )
        else:
            host = _read_ours(p, src, stored, dtype)  # aligned: JAX's CPU backend adopts it without a copy
            value = (
                jax.device_put(host)
                if sh is None
                else jax.make_array_from_callback(tuple(var.shape), sh, lambda idx, h=host: h[idx])
            )
        new_flat.append((p, var.replace(value)))

    for name, (file, stored) in index.items():
        if name in used:
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # some tied checkpoints store the output embedding anyway; it is the input one
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a non-persistent buffer older exports wrote; recomputed from config
        raise CheckpointError(f"unexpected tensor {stored} in {file}: no parameter of this model takes it")
    return nnx.merge(graphdef, nnx.from_flat_state(new_flat))


def _host_value(value) -> np.ndarray:
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        from jax.experimental import multihost_utils

        value = multihost_utils.process_allgather(value, tiled=True)
    return np.asarray(jax.device_get(value))


def save(
    model: Qwen25VL,
    path: str | os.PathLike,
    *,
    max_shard_bytes: int = 4 << 30,
    assets_from: str | os.PathLike | None = None,
    dtype=None,
) -> None:
    """Write `model` as a Hugging Face checkpoint dir: config.json, sharded safetensors and the index.

    The dir is assembled under a temporary name and renamed into place, so a crash never leaves a
    half-written checkpoint at `path`. `assets_from` copies tokenizer/processor files from another
    checkpoint dir. `dtype` converts the stored tensors (default: the parameters' own dtype).
    """
    path = os.fspath(path).rstrip("/")
    config = model.config
    flat = [(p, v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]

    def store_dtype(v):
        return np.dtype(dtype) if dtype is not None else np.dtype(v.dtype)

    # Plan the shards from shapes alone so each tensor is fetched from the devices exactly once.
    shards: list[list] = [[]]
    size = 0
    for p, v in flat:
        nbytes = int(np.prod(v.shape)) * store_dtype(v).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((p, v))
        size += nbytes
    total = sum(int(np.prod(v.shape)) * store_dtype(v).itemsize for _, v in flat)

    tmp = f"{path}.partial-{os.getpid()}"
    if jax.process_index() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for p, v in shard:
            name = hf_name(p)
            host = _host_value(v[...]).astype(store_dtype(v), copy=False)
            if _is_conv(p) or str(p[-1]) == "kernel":
                vis = config.vision
                shape = (
                    (
                        vis.hidden_size,
                        vis.in_channels,
                        vis.temporal_patch_size,
                        vis.patch_size,
                        vis.patch_size,
                    )
                    if _is_conv(p)
                    else host.shape[::-1]
                )
                tensors[name] = _hf_writer(np.ascontiguousarray(host), shape)
            else:
                tensors[name] = host
            weight_map[name] = file
        if jax.process_index() == 0:
            save_file(tensors, os.path.join(tmp, file), metadata={"format": "pt"})
    if jax.process_index() != 0:
        return
    with open(os.path.join(tmp, INDEX_FILE), "w") as f:
        json.dump(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2
        )
    hf_config = dict(config.hf_config)
    stored = np.dtype(dtype) if dtype is not None else np.dtype(model.dtype)
    # transformers 5 reads "dtype", the 4.x releases that SGLang pins read "torch_dtype": write both.
    hf_config["dtype"] = hf_config["torch_dtype"] = stored.name
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    if assets_from is not None:
        for name in ASSET_FILES:
            src = os.path.join(assets_from, name)
            if os.path.exists(src):
                shutil.copy2(src, os.path.join(tmp, name))
    if os.path.exists(path):
        old = f"{path}.old-{os.getpid()}"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
