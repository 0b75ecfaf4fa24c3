"""The debug run: a tiny random-init Qwen2.5-VL learning a synthetic counting task on CPU in minutes.

    python -m pr1.train --config configs/debug.py --workdir /tmp/pr1-debug/run            # gamma 0.7
    python -m pr1.train --config configs/debug.py:baseline --workdir /tmp/pr1-debug/base  # gamma 0
    python -m pr1.train --config configs/debug.py:/some/dir[,baseline] --workdir ...      # assets dir

The argument is a comma-separated list: a directory for the assets (default /tmp/pr1-debug) and/or
`baseline`, the accuracy-only ablation (perception weight gamma = 0; everything else equal).
`python -m pr1.debug_ablation` runs both on several seeds and prints the numbers.

On first use it writes the tiny checkpoint (`pr1.models.tiny`, random weights seeded by
train.seed) and the synthetic parquet files (`pr1.data.synthetic`, task "dots") under the assets
dir. Rollouts run in-process, the perception reward comes from the offline lexical judge; nothing
is downloaded.

The task and what a random-init model learns of it: the image shows 1-3 red dots (one per
quadrant, i.e. per visual token); the question asks how many; the answer is that count and the
visual annotation is "there are N dots", which the lexical judge checks by the number N appearing in
the response. Responses are 4 tokens and the accuracy reward is math-verify's reading of the whole
response (there is no <answer> block; of two numbers it usually takes the last), so from random init
about 1% of responses already score (a digit among 512 tokens, at one of 4 places). Within the 120
steps GRPO makes the digits 1-3 likely:
the accuracy reward rises from ~0.01 to about 1/3, which is what answering without looking earns,
and greedy validation accuracy stays at that chance level; the model does not learn to read the
count from the image in this budget (nor in 170 steps of plain supervised training on the right
digit: the image moves the tiny model's logits by ~3% of their spread at init). The perception
reward rises with accuracy and above it: it credits the right count anywhere in the response, and
with gamma > 0 the policy learns to state two counts ("1 2"), which this judge cannot tell from
knowing the right one. The paper's `<think>..</think><answer>\\boxed{}</answer>` template is ~21
tokens of the tiny tokenizer, out of reach of random sampling: the format reward stays in the total
at its released weight and stays 0.
"""

import ml_collections

from pr1.train.config import default_config

ARG_FLAGS = ("baseline",)


def parse_arg(arg: str | None) -> tuple[str, set[str]]:
    """The assets root and the set of flags in a `dir,baseline`-style config argument."""
    root, flags = "/tmp/pr1-debug", set()
    for part in (arg or "").split(","):
        part = part.strip()
        if part in ARG_FLAGS:
            flags.add(part)
        elif part:
            root = part
    return root.rstrip("/") or "/", flags


def get_config(arg: str | None = None):
    root, flags = parse_arg(arg)
    c = default_config()
    c.model.path = f"{root}/tiny"
    c.model.make_tiny_if_missing = True
    c.model.param_dtype = c.model.compute_dtype = "float32"

    c.data.train_files = [f"{root}/synthetic_train.parquet"]
    c.data.val_files = [f"{root}/synthetic_val.parquet"]
    c.data.synthetic = ml_collections.ConfigDict(
        dict(enabled=True, task="dots", train_rows=512, val_rows=32, seed=0, image_size=56)
    )
    # The paper's instruction costs ~160 tokens of the tiny tokenizer and a random-init model cannot
    # follow it; a short one keeps prompts in the 64-token bucket.
    c.data.format_instruction = "Answer with a number."
    c.data.prompts_per_step = 16
    c.data.max_prompt_length = 512
    c.data.max_pixels = 56 * 56

    c.rollout.n = 8
    # Short answers: the search for a first reward is over 512 tokens at each of 4 places.
    c.rollout.max_new_tokens = 4
    c.rollout.val_max_new_tokens = 4
    c.rollout.min_prompt_bucket = 64
    c.rollout.min_patch_bucket = 16

    c.rewards.judge.url = ""  # offline LexicalJudge
    c.rewards.judge.measure_unweighted = True  # the baseline logs the perception it does not train on
    c.rewards.accuracy.workers = 1
    if "baseline" in flags:
        c.rewards.weights.perception = 0.0  # accuracy-only GRPO: the paper's ablation

    # 8 micro-batches of 2 prompt groups. Chosen when vision attention was dense over a whole
    # micro-batch (then ~10x faster than one micro-batch of 128 rows on a CPU); vision attention is
    # now per image, so this only bounds activation memory. The loss does not depend on it.
    c.learner.micro_batches = 8
    # A random-init 0.24M-param model, not a 7B one. At 1e-2 accuracy rose by step 20 but swung
    # between steps, and a baseline run collapsed at step 39 onto responses that never score
    # (all-equal groups: no signal left, accuracy 0 to the end); 3e-3 rises later, steadily.
    c.optim.learning_rate = 3e-3
    c.optim.warmup_ratio = 0.0
    c.optim.weight_decay = 0.0

    c.train.steps = 120
    c.train.checkpoint_every = 40
    c.train.keep_checkpoints = 2
    c.train.val_every = 20  # greedy accuracy on the 32 held-out prompts
    c.train.val_prompts = 32
    c.train.log_samples_every = 10
    c.train.tensorboard = True
    c.train.run_name = "debug-baseline" if "baseline" in flags else "debug"
    return c
