"""Perception-R1 on Qwen2.5-VL-7B-Instruct: the released recipe (../shared/reference/paper.md).

    python -m pr1.train --config configs/perception_r1_qwen2_5_vl_7b.py --workdir gs://bucket/run \
        --config.model.path=/models/Qwen2.5-VL-7B-Instruct \
        --config.data.train_files='("/data/perception_r1/train.parquet",)' \
        --config.rewards.judge.url=http://judge-host:30000/v1

The judge (Qwen2.5-32B-Instruct, launch/serve_judge.sh) must be reachable; for SGLang rollouts set
rollout.engine=sglang and rollout.sglang.urls (launch/serve_rollout.sh), otherwise rollouts run on
the trainer's own mesh.
"""

from pr1.train.config import default_config


def get_config(arg: str | None = None):
    if arg:  # nothing here is chosen by an argument: say so rather than ignore it
        raise ValueError(
            f"the 7B recipe takes no argument, got {arg!r}; set keys with --config.<key>=<value>"
        )
    c = default_config()
    c.model.path = "/models/Qwen2.5-VL-7B-Instruct"
    c.model.param_dtype = "float32"  # fp32 master weights (the release loads the actor in fp32)
    c.model.compute_dtype = "bfloat16"  # bf16 matmuls/activations; norms, softmax, logprobs fp32
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1

    c.data.train_files = ["/data/perception_r1/train.parquet"]  # the 1,442 problems of stage 1
    c.data.val_files = []
    c.data.prompts_per_step = 128  # x 8 responses = 1024 per optimizer step
    c.data.max_prompt_length = 4096
    c.data.min_pixels, c.data.max_pixels = 3136, 1806336

    c.rollout.n = 8
    c.rollout.temperature, c.rollout.top_p, c.rollout.top_k = 1.0, 1.0, -1
    c.rollout.max_new_tokens = 4096
    c.rollout.val_max_new_tokens = 4096
    c.rollout.prefill_chunk = 32  # prompts prefilled at a time (the KV of all 128 is kept)

    c.rewards.weights.accuracy, c.rewards.weights.format = 0.9, 0.1
    c.rewards.weights.perception = 0.7  # gamma of the released run
    c.rewards.weights.repetition = 1.0
    c.rewards.judge.url = "http://localhost:30000/v1"
    c.rewards.judge.model = "Qwen2.5-32B-Instruct"
    c.rewards.judge.max_tokens = 512
    c.rewards.judge.max_concurrency = 512
    c.rewards.judge.failure_policy = "zero"  # the paper: a failed judgement scores 0
    c.rollout.sglang.weights_dtype = "bfloat16"  # what the server serves; halves the per-step disk write

    c.learner.clip_low, c.learner.clip_high, c.learner.dual_clip = 0.2, 0.3, 3.0
    c.learner.loss_agg = "chunk-token-mean"  # the release: token-mean per 8-response micro-batch, then mean
    c.learner.loss_chunk_responses = 8
    c.learner.kl_coef = 0.0  # no reference model
    c.learner.temperature = 1.0
    c.learner.micro_batches = 0  # from the mesh: one response per device per micro-batch
    # (128 of 8 on 8 GPUs, 32 of 32 on v5p-64)
    c.learner.remat = "full"
    c.learner.logprob_chunk = 1024  # 152k-vocab logits in chunks

    c.optim.learning_rate = 1e-6
    c.optim.b1, c.optim.b2 = 0.9, 0.999
    c.optim.weight_decay = 1e-3
    c.optim.warmup_ratio, c.optim.schedule = 0.05, "constant"
    c.optim.max_grad_norm = 1.0
    c.optim.freeze_vision_tower = False  # the vision tower is trained too

    c.train.steps = 275  # 25 epochs x 11 steps over 1,442 problems
    c.train.mini_batches = 1  # one PPO epoch, one optimizer step per rollout batch
    c.train.checkpoint_every = 25
    c.train.val_every = 0
    return c
