"""The sections of spear's config tree (:class:`spear.config.Config` holds one of each): their
fields, defaults and single-section checks. Cross-section checks and loading live in
:mod:`spear.config`, which re-exports every name here."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from spear.schedules import schedule_from_spec

ScheduleSpec = float | dict[str, Any]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def _check_schedule(v: ScheduleSpec) -> ScheduleSpec:
    schedule_from_spec(v)  # raises with the bad field named
    return v


class TinyModelConfig(_Section):
    """The built-in Llama-style model created from scratch (used when ``model.path`` is unset)."""

    vocab_size: int = Field(1024, ge=64)  # BPE merges; numbers below 1000 come on top
    hidden_size: int = Field(128, ge=16)
    intermediate_size: int = Field(384, ge=16)
    num_layers: int = Field(3, ge=1)
    num_heads: int = Field(4, ge=1)
    max_position_embeddings: int = Field(512, ge=32)


class WarmStartConfig(_Section):
    """Supervised warm start of the built-in model on deliberately imperfect demonstrations."""

    num_demos: int = Field(3000, ge=1)
    steps: int = Field(900, ge=0)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(5e-3, gt=0)
    frac_tool: float = Field(0.35, ge=0, le=1)  # correct tool use
    frac_guess: float = Field(0.55, ge=0, le=1)  # no tool, guessed answer
    frac_bad_call: float = Field(0.10, ge=0, le=1)  # malformed or wrong calls
    random_action_rate: float = Field(0.3, ge=0, le=1)  # textworld: random admissible actions
    seed: int = 0  # the warm model is shared by runs of any trainer.seed (and cached once)

    @model_validator(mode="after")
    def _fractions(self) -> WarmStartConfig:
        total = self.frac_tool + self.frac_guess + self.frac_bad_call
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"frac_tool + frac_guess + frac_bad_call must sum to 1, got {total:g}")
        return self


class LoraConfig(_Section):
    enabled: bool = False
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]


class ModelConfig(_Section):
    path: str | None = None  # a local Hugging Face model dir or hub id; None = built-in tiny model
    tokenizer_path: str | None = None  # defaults to ``path``
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    cache_dir: str = "~/.cache/spear"  # built-in model + warm start cache
    tiny: TinyModelConfig = TinyModelConfig()
    warm_start: WarmStartConfig = WarmStartConfig()
    lora: LoraConfig = LoraConfig()
    gradient_checkpointing: bool = False


class TaskConfig(_Section):
    """Which task family to train on and its knobs."""

    # a registered task (arithmetic, math, textworld, ...), package.module:factory, or the name
    # of a `spear.tasks` entry point (spear.tasks); checked when the config loads
    name: str = "arithmetic"
    difficulty: int = Field(2, ge=1, le=5)  # arithmetic: number of operations / operand size
    train_files: list[str] = []  # math: JSONL/Parquet problems with ground truth
    test_files: list[str] = []  # empty: a fixed hash-selected 1/held_out_buckets of train
    held_out_buckets: int = Field(20, ge=2)  # math without test_files
    sandbox: Literal["local", "fusion"] = "local"  # math: where code_interpreter runs
    sandbox_url: str | None = None  # sandbox=fusion: SandboxFusion server, e.g. http://host:8080
    sandbox_memory_mb: int = Field(1024, ge=64)
    sandbox_max_processes: int = Field(64, ge=1)
    # math, sandbox=local: where neither mount/PID/network namespaces nor a user namespace can be
    # made (a container without CAP_SYS_ADMIN), the code would run unisolated on the host; true
    # allows that (with a warning saying what is exposed), false refuses to start
    sandbox_allow_unsafe: bool = False
    # math: a symbolic answer check (math-verify in a child process) that runs past this wall
    # clock or this address space is stopped and the answer counts as wrong
    answer_check_timeout_s: float = Field(5.0, gt=0)
    answer_check_memory_mb: int = Field(512, ge=256)
    challenge: str = "tw-coin_collector"  # textworld
    textworld_level: int = Field(1, ge=1)
    game_cache_dir: str = "~/.cache/spear/textworld"
    # training games generated (and cached) on demand
    textworld_train_games: int = Field(2000, ge=1)
    textworld_gen_workers: int = Field(2, ge=1)  # processes generating games
    invalid_action_penalty: float = Field(0.1, ge=0)  # textworld: inadmissible action
    # textworld: number the admissible actions in the prompt; an answer may be a number
    textworld_numbered_actions: bool = False

    @field_validator("name")
    @classmethod
    def _known_task(cls, v: str) -> str:
        from spear.tasks import TaskPluginError, resolve_task

        try:
            resolve_task(v)  # imports a plugin: an unknown or broken one is one line here
        except TaskPluginError as e:
            raise ValueError(f"{v!r}: {str(e).removeprefix(f'task.name={v}: ')}") from None
        return v


class RolloutConfig(_Section):
    tasks_per_step: int = Field(16, ge=1)  # B
    group_size: int = Field(8, ge=1)  # G
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # 0 = off
    max_turns: int = Field(4, ge=1)
    max_new_tokens: int = Field(48, ge=1)  # per turn
    max_response_tokens: int = Field(192, ge=1)  # per episode, all turns
    max_context_tokens: int = Field(512, ge=16)
    layout: Literal["episode", "turn"] = "episode"
    history_length: int = Field(2, ge=0)  # turn layout: observation/action pairs kept
    # tool-call parser (spear.rollout.parsers) of the tool tasks (arithmetic, math); None = the
    # task's own format (hermes, which their system prompts ask for). TextWorld reads
    # <action>...</action> itself and takes none
    parser: str | None = None
    env_step_timeout_s: float = Field(10.0, gt=0)
    tool_timeout_s: float = Field(5.0, gt=0)
    max_observation_chars: int = Field(512, ge=16)
    # True: old log-probs are the policy's own before the update (verl's way): taken from the
    # update's forward pass when the update is one optimizer step (ppo_epochs=1, one mini-batch),
    # else a separate forward pass. False: the sampler's log-probs (needs untruncated sampling)
    recompute_old_logprobs: bool = True
    # the HF engine keeps each turn's KV cache and prefills only the new tokens of the episode's
    # next turn (same weights, prompt continues the last one); false: prefill every turn anew
    keep_kv_cache: bool = True

    @model_validator(mode="after")
    def _sampler_logprobs(self) -> RolloutConfig:
        if not self.recompute_old_logprobs and (self.top_p < 1 or self.top_k):
            raise ValueError(
                "recompute_old_logprobs=false uses the sampler's log-probs, which top_p / top_k "
                "truncate: set rollout.top_p=1 and rollout.top_k=0, or recompute_old_logprobs=true"
            )
        return self


class ToolBonusConfig(_Section):
    """Intrinsic tool-call reward: min(cap, alpha * n_calls) * phi(step)."""

    mode: Literal["none", "constant", "cosine"] = "none"
    alpha: float = Field(0.1, ge=0)
    cap: float = Field(1.0, ge=0)
    horizon: int = Field(200, ge=1)  # T_tool of the cosine fade-out
    count: Literal["tool_calls", "turns"] = "tool_calls"


class RewardConfig(_Section):
    tool_bonus: ToolBonusConfig = ToolBonusConfig()
    invalid_call_penalty: float = Field(0.0, ge=0)  # per invalid tool call / action


class FilterConfig(_Section):
    """Dr.BoT response filters and the low-variance group filter."""

    overlong: bool = False
    incomplete: bool = False
    repetitive: bool = False
    unreadable: bool = False
    ngram: int = Field(20, ge=1)
    ngram_repeats: int = Field(10, ge=2)
    group_keep_ratio: float = Field(1.0, gt=0, le=1)  # rho; 1 disables
    group_filter_type: Literal["std", "std_rev"] = "std"


class AdvantageConfig(_Section):
    estimator: str = "grpo"
    norm_by_std: bool = True
    eps: float = Field(1e-6, gt=0)
    # group baseline over all samples (turns) of a group, as the reference (§5.2, §5.3); "episode"
    # = one unit per episode (mean of its turns). The same in the episode layout.
    stats_over: Literal["episode", "sample"] = "sample"
    gigpo_gamma: float = Field(0.95, ge=0, le=1)
    gigpo_step_weight: float = Field(1.0, ge=0)
    gigpo_norm_by_std: bool = True


class LossConfig(_Section):
    policy_loss: str = "vanilla"
    clip_low: float = Field(0.2, gt=0, lt=1)
    clip_high: float = Field(0.2, gt=0)
    clip_c: float = Field(3.0, gt=1)  # dual clip
    aggregation: str = "token-mean"
    max_response_len: int | None = (
        None  # Dr.GRPO constant; None = a sample's budget: rollout.max_response_tokens (episode layout) or max_new_tokens (turn)
    )
    entropy_coef: float = 0.0
    kl_coef: float = Field(0.0, ge=0)  # KL loss against the frozen initial policy (spear.reference)
    kl_type: str = "k3"  # a spear.algo.kl estimator: k1, k2, k3 (= low_var_kl), abs; "+" = k2 grad
    clip_cov_ratio: float = Field(2e-4, gt=0, le=1)
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float = Field(2e-4, gt=0, le=1)
    kl_cov_coef: float = Field(1.0, ge=0)


class ReplayConfig(_Section):
    """Self-imitation learning: the replay buffer and its loss."""

    enabled: bool = False
    capacity: int = Field(2048, ge=1)  # B: the trigger unit and draw size, not a storage limit
    history_size: int = Field(10240, ge=1)  # H, group means kept for the baseline
    tolerate_steps: int = Field(5, ge=0)
    trigger_ratio: float = Field(1.5, gt=0)
    sample_size: int | None = None  # None = capacity
    sampling: Literal["uniform", "prioritized"] = "uniform"
    recalibration: Literal["median", "decay"] = "median"
    normalize_by_std: bool = False
    std_eps: float = Field(1e-6, gt=0)
    keep: Literal["positive", "non_negative"] = "positive"
    decay_weight: float = Field(0.1, gt=0, le=1)
    consume: Literal["clear", "sliding"] = "clear"
    # the clock tolerate_steps is measured on: the current step, or (the reference's) the newest
    # stored sample, which keeps old successes counting through a drought (spear/replay.py)
    staleness: Literal["current_step", "newest_entry"] = "current_step"
    recompute_old_logprobs: bool = False
    loss_coef: ScheduleSpec = {"kind": "cosine_up", "value": 1.0, "horizon": 200}
    policy_loss: str | None = None  # None = loss.policy_loss
    clip_cov_ratio: float = Field(0.02, gt=0, le=1)
    clip_cov_lb: float = 2.0
    clip_cov_ub: float = 60.0
    kl_cov_ratio: float = Field(0.02, gt=0, le=1)

    _schedule = field_validator("loss_coef")(_check_schedule)


class OptimConfig(_Section):
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(1.0, gt=0)
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    ppo_epochs: int = Field(1, ge=1)
    mini_batch_size: int | None = None  # samples per optimizer step; None = the whole batch
    micro_batch_size: int = Field(32, ge=1)  # samples per forward/backward
    # run a prefix shared by several rows (system prompt, a group's task prompt) through the
    # decoder once per micro-batch and hand its KV cache to the rows; same values up to rounding
    share_prefix: bool = True


class EvalConfig(_Section):
    every: int = Field(10, ge=0)  # steps; 0 = only before and after training
    num_tasks: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0)  # 0 = greedy
    # n > 0: also sample n episodes per held-out task at sample_temperature and report
    # eval/pass@k (unbiased estimator) for each k of pass_at and eval/mean@n (their success)
    samples: int = Field(0, ge=0)
    sample_temperature: float = Field(1.0, gt=0)
    pass_at: list[int] = []  # k values; empty = [1, samples]

    @model_validator(mode="after")
    def _pass_at(self) -> EvalConfig:
        if self.pass_at and not self.samples:
            raise ValueError("eval.pass_at needs eval.samples (n sampled episodes per task) > 0")
        bad = [k for k in self.pass_at if not 1 <= k <= self.samples]
        if bad:
            raise ValueError(
                f"eval.pass_at={bad} must lie in 1..eval.samples={self.samples}: pass@k needs at "
                "least k samples per task"
            )
        return self

    @property
    def ks(self) -> list[int]:
        """The k of the reported pass@k (none when ``samples`` is 0)."""
        if not self.samples:
            return []
        return sorted(set(self.pass_at or [1, self.samples]))

    # which split the evaluations play: "test" (held out) or, for tasks that have one,
    # "validation" (for choosing settings without touching the held-out split; lookup and
    # textworld have one)
    split: Literal["test", "validation"] = "test"


class LoggingConfig(_Section):
    tensorboard: bool = True  # when tensorboard is installed
    wandb: bool = False
    wandb_project: str = "spear"
    progress: bool = True


class DistributedConfig(_Section):
    """Scale-out on Ray and torch.distributed, used when ``trainer.backend=ray``.

    A count of 0 keeps that part in the driver process (``env_workers=0``: envs run in the
    driver's threads; ``rollout_workers=0``: the driver generates; ``train_ranks=0``: the driver
    updates). CPU requests may be fractional: an actor asking for more CPUs than a node has
    would wait forever, so requests are checked against the cluster (and against ``num_cpus``
    here when a local cluster is started).
    """

    address: str | None = None  # None: start a local Ray cluster; "auto" / "host:port": join one
    num_cpus: int | None = Field(None, ge=1)  # local cluster size; None = all of this machine
    env_workers: int = Field(2, ge=0)  # env-worker actors (episodes spread over them)
    cpus_per_env_worker: float = Field(0.25, gt=0)
    env_worker_concurrency: int = Field(16, ge=1)  # env calls one env worker runs at once
    rollout_workers: int = Field(1, ge=0)  # engine replicas in data parallel
    driver_generates: bool = False  # the driver's engine takes one share next to the workers
    cpus_per_rollout_worker: float = Field(0.5, gt=0)
    gpus_per_rollout_worker: float = Field(0.0, ge=0)  # > 0: the engine runs on a GPU
    rollout_engine: Literal["hf", "vllm"] = "hf"  # vllm: pip install 'spear[vllm]', GPUs only
    vllm_gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    train_ranks: int = Field(0, ge=0)  # FSDP2 data-parallel ranks as actors
    cpus_per_train_rank: float = Field(0.5, gt=0)
    gpus_per_train_rank: float = Field(0.0, ge=0)  # > 0: NCCL ranks on GPUs; 0: gloo on CPU
    worker_threads: int = Field(1, ge=1)  # torch threads in each rollout worker / train rank
    call_timeout_s: float = Field(300.0, gt=0)  # per remote call; a worker missing it has crashed
    start_timeout_s: float = Field(180.0, gt=0)  # for a new actor to answer (or ranks to join)

    @model_validator(mode="after")
    def _fits(self) -> DistributedConfig:
        if self.rollout_engine == "vllm" and self.gpus_per_rollout_worker <= 0:
            raise ValueError(
                "rollout_engine=vllm needs GPUs: set distributed.gpus_per_rollout_worker (e.g. 1)"
            )
        if self.rollout_engine == "vllm" and self.rollout_workers == 0:
            raise ValueError(
                "rollout_engine=vllm runs in rollout workers: set rollout_workers >= 1"
            )
        if self.driver_generates and self.rollout_engine != "hf":
            raise ValueError(
                "driver_generates shares the work with HF replicas only (rollout_engine=hf)"
            )
        if self.num_cpus is None or self.address is not None:
            return self  # a cluster joined at run time is checked at run time
        parts = (
            ("env_workers", "cpus_per_env_worker", self.env_workers, self.cpus_per_env_worker),
            ("rollout_workers", "cpus_per_rollout_worker", self.rollout_workers, self.cpus_per_rollout_worker),
            ("train_ranks", "cpus_per_train_rank", self.train_ranks, self.cpus_per_train_rank),
        )  # fmt: skip
        for _, per, count, cpus in parts:
            if count and cpus > self.num_cpus:
                raise ValueError(
                    f"{per}={cpus:g} exceeds num_cpus={self.num_cpus}: such an actor would wait "
                    "forever; request a fraction (e.g. 0.25)"
                )
        total = sum(count * cpus for _, _, count, cpus in parts)
        if total > self.num_cpus + 1e-9:
            asked = " + ".join(f"{count} {n} x {cpus:g}" for n, _, count, cpus in parts if count)
            raise ValueError(
                f"{asked} = {total:g} CPUs exceeds num_cpus={self.num_cpus}; lower the per-actor "
                "CPUs (fractions are fine) or the counts"
            )
        return self


class TrainerConfig(_Section):
    steps: int = Field(40, ge=0)
    seed: int = 0
    run_dir: str | None = None  # None = runs/<preset>-<timestamp>
    save_every: int = Field(20, ge=0)  # 0 = only at the end
    device: Literal["auto", "cpu", "cuda"] = "auto"
    backend: Literal["local", "ray"] = "local"  # ray: scale out as `distributed` says
    num_threads: int = Field(0, ge=0)  # torch CPU threads; 0 = torch's default
    retain_freed_memory: bool = True  # glibc keeps freed memory for reuse (spear.runtime)
    max_nonfinite_skips: int = Field(10, ge=1)  # consecutive skipped updates before stopping
