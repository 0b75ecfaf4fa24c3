"""Hugging Face checkpoints in and out: config.json plus (sharded) safetensors.

`load` reads tensor by tensor through memory maps and places each one straight into its (sharded)
device layout, so a 7B checkpoint never needs two full copies in host memory. It accepts both tensor
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
from pr1.models.safetensors_io import SafetensorsFile, save_file

INDEX_FILE = "model.safetensors.index.json"
# Extra files of a checkpoint dir that `save(..., assets_from=dir)` carries along.
ASSET_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
               "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
               "processor_config.json", "video_preprocessor_config.json", "generation_config.json")


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
        return name[len("model."):]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
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


def to_hf(path: tuple, value: np.ndarray, config: Qwen25VLConfig) -> np.ndarray:
    if _is_conv(path):
        v = config.vision
        return np.ascontiguousarray(value.T).reshape(
            v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    if str(path[-1]) == "kernel":
        return np.ascontiguousarray(value.T)
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
        entries = [(name, os.path.join(path, f)) for f in files for name in SafetensorsFile(os.path.join(path, f)).keys()]
    out: dict[str, tuple[str, str]] = {}
    for name, file in entries:
        canon = canonical_name(name)
        if canon in out:
            raise CheckpointError(f"tensor {canon} appears twice: in {out[canon][0]} and {file}")
        out[canon] = (file, name)
    return out


def load(path: str | os.PathLike, *, dtype=jnp.bfloat16, mesh=None, rules=sharding_lib.DEFAULT_RULES) -> Qwen25VL:
    """Load a Hugging Face Qwen2.5-VL checkpoint dir into a `Qwen25VL` with parameters in `dtype`.

    With a `mesh`, every tensor is placed directly in its sharded layout (per-device slices are read
    from the memory map), following `rules` over the parameters' logical axes.
    """
    path = os.fspath(path)
    config = Qwen25VLConfig.from_dir(path)
    abstract = nnx.eval_shape(lambda: Qwen25VL(config, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
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
        tensor = to_ours(p, open_file(file).get(stored), config)
        if tuple(tensor.shape) != tuple(var.shape):
            raise CheckpointError(
                f"tensor {stored} in {file} has shape {list(open_file(file).shape(stored))}, "
                f"which does not fit parameter {'.'.join(map(str, p))} of shape {list(var.shape)} "
                f"(after layout conversion: {list(tensor.shape)})")
        if mesh is None:
            value = jnp.asarray(np.asarray(tensor).astype(dtype))
        else:
            sh = sharding_lib.named_sharding(var.get_metadata().get("logical_axes"), var.shape, mesh, rules, name=name)
            value = jax.make_array_from_callback(
                tuple(var.shape), sh, lambda idx, t=tensor: np.asarray(t[idx]).astype(dtype))
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


def save(model: Qwen25VL, path: str | os.PathLike, *, max_shard_bytes: int = 4 << 30,
         assets_from: str | os.PathLike | None = None, dtype=None) -> None:
    """Write `model` as a Hugging Face checkpoint dir: config.json, sharded safetensors and the index.

    The dir is assembled under a temporary name and renamed into place, so a crash never leaves a
    half-written checkpoint at `path`. `assets_from` copies tokenizer/processor files from another
    checkpoint dir. `dtype` converts the stored tensors (default: the parameters' own dtype).
    """
    path = os.fspath(path).rstrip("/")
    config = model.config
    flat = [(p, v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    store_dtype = lambda v: np.dtype(dtype) if dtype is not None else np.dtype(v.dtype)
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
            tensors[name] = to_hf(p, _host_value(v[...]).astype(store_dtype(v)), config)
            weight_map[name] = file
        if jax.process_index() == 0:
            save_file(tensors, os.path.join(tmp, file), metadata={"format": "pt"})
    if jax.process_index() != 0:
        return
    with open(os.path.join(tmp, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
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
