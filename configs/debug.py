"""The debug run: a tiny random-init Qwen2.5-VL learning a synthetic image task on CPU in minutes.

    python -m pr1.train --config configs/debug.py --workdir /tmp/pr1-debug/run
    python -m pr1.train --config configs/debug.py:/some/dir --workdir ...   # where the assets go

On first use it writes the tiny checkpoint (`pr1.models.tiny`) and the synthetic parquet files
(`pr1.data.synthetic`) under the assets dir (default /tmp/pr1-debug). Rollouts run in-process,
the perception reward comes from the offline lexical judge; nothing is downloaded.
"""

import ml_collections

from pr1.train.config import default_config


def get_config(arg: str | None = None):
    root = (arg or "/tmp/pr1-debug").rstrip("/")
    c = default_config()
    c.model.path = f"{root}/tiny"
    c.model.make_tiny_if_missing = True
    c.model.param_dtype = c.model.compute_dtype = "float32"

    c.data.train_files = [f"{root}/synthetic_train.parquet"]
    c.data.val_files = [f"{root}/synthetic_val.parquet"]
    c.data.synthetic = ml_collections.ConfigDict(dict(
        enabled=True, task="color", train_rows=512, val_rows=32, seed=0, image_size=56))
    # The paper's instruction costs ~160 tokens of the tiny tokenizer and a random-init model cannot
    # follow it; a short one keeps prompts in the 64-token bucket.
    c.data.format_instruction = "Put the answer in \\boxed{}."
    c.data.prompts_per_step = 16
    c.data.max_prompt_length = 512
    c.data.max_pixels = 56 * 56

    c.rollout.n = 8
    # Short answers: from random init a response earns accuracy 1 only when its last standalone number
    # is the answer, which four uniformly drawn tokens do about 0.3% of the time; that is the seed
    # of the learning signal.
    c.rollout.max_new_tokens = 4
    c.rollout.val_max_new_tokens = 4
    c.rollout.min_prompt_bucket = 64
    c.rollout.min_patch_bucket = 16

    c.rewards.judge.url = ""            # offline LexicalJudge
    c.rewards.accuracy.workers = 1

    c.learner.micro_batches = 1
    c.optim.learning_rate = 1e-2        # a random-init 0.2M-param model, not a 7B one
    c.optim.warmup_ratio = 0.0
    c.optim.weight_decay = 0.0

    c.train.steps = 40
    c.train.checkpoint_every = 10
    c.train.keep_checkpoints = 2
    c.train.val_every = 20
    c.train.val_prompts = 32
    c.train.log_samples_every = 10
    c.train.tensorboard = True
    return c
