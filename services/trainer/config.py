"""The trainer's configs: `TrainConfig` (one training job, ms-swift flag names), one dataclass
per RLHF method for that method's own arguments (TRL's habit), and `TrainerServerConfig`
(the trainer service process)."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from dataclasses import dataclass, field
from typing import Any

from libs.common import checkpoint, paths
from libs.common import config as cfg
from libs.common.errors import TuneForgeError
from libs.common.server import ServerOptions
from services.trainer import devices, distributed

TRAIN_TYPES = ("lora", "qlora", "full")
# Train types whose checkpoints are PEFT adapters (the base model stays frozen).
ADAPTER_TRAIN_TYPES = ("lora", "qlora")
LR_SCHEDULERS = ("cosine", "linear", "constant")
DTYPES = ("float32", "bfloat16", "float16")
RLHF_TYPES = ("dpo", "kto", "orpo", "simpo", "cpo", "rm", "grpo", "ppo", "gkd")
# Methods that compare the policy with a reference model (the others have none).
REFERENCE_METHODS = ("dpo", "kto", "grpo", "ppo")
# Methods that generate what they train on from prompt rows (services.trainer.methods: `online`).
ONLINE_METHODS = ("grpo", "ppo", "gkd")
VLLM_MODES = ("colocate", "server")
# Every loss type of TRL 1.16's DPOTrainer, and aot_pair: ms-swift's (TRL < 1.0's) name of aot_unpaired.
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "aot_pair", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")


def _positive_beta(beta: float) -> list[str]:
    return [] if beta > 0 else [f"beta: must be positive; got {beta}"]


@dataclass
class DpoConfig:
    """--rlhf_type dpo: direct preference optimisation against a reference model."""

    beta: float = field(default=0.1, metadata={"help": "temperature of the implicit reward beta x (log pi - log ref)"})
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"], metadata={
        "help": f"one or more of {', '.join(DPO_LOSS_TYPES)}; several are summed with loss_weights"})
    loss_weights: list[float] | None = field(default=None, metadata={
        "help": "a weight per loss_type (default 1 each)"})
    label_smoothing: float = field(default=0.0, metadata={
        "help": "the probability that a pair's labels are flipped (cDPO; ms-swift applies it to sigmoid too)"})
    rpo_alpha: float | None = field(default=None, metadata={
        "help": "adds rpo_alpha x the NLL of the chosen answers (mean over their tokens), as ms-swift"})
    discopop_tau: float = field(default=0.05, metadata={
        "help": "loss_type discopop: temperature of the mix of its logistic and exponential losses"})

    def problems(self) -> list[str]:
        found = _positive_beta(self.beta)
        unknown = [t for t in self.loss_type if t not in DPO_LOSS_TYPES]
        if not self.loss_type or unknown:
            found.append(f"loss_type: expected one or more of {', '.join(DPO_LOSS_TYPES)}; got "
                         f"{', '.join(unknown) or 'none'}")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            found.append(f"loss_weights: {len(self.loss_weights)} weights for {len(self.loss_type)} loss types")
        if not 0.0 <= self.label_smoothing < 0.5:
            found.append(f"label_smoothing: must be in [0, 0.5); got {self.label_smoothing}")
        elif "exo_pair" in self.loss_type and self.label_smoothing == 0:
            found.append("label_smoothing: loss_type exo_pair needs it positive (the EXO paper recommends 1e-3)")
        if self.rpo_alpha is not None and self.rpo_alpha < 0:
            found.append(f"rpo_alpha: must not be negative; got {self.rpo_alpha}")
        if self.discopop_tau <= 0:
            found.append(f"discopop_tau: must be positive; got {self.discopop_tau}")
        return found


@dataclass
class KtoConfig:
    """--rlhf_type kto: Kahneman-Tversky optimisation on rows labelled desirable or not."""

    beta: float = field(default=0.1, metadata={"help": "temperature of the implicit reward"})
    loss_type: list[str] = field(default_factory=lambda: ["kto"], metadata={
        "help": f"{' or '.join(KTO_LOSS_TYPES)}"})
    desirable_weight: float = field(default=1.0, metadata={"help": "weight of the desirable rows' losses"})
    undesirable_weight: float = field(default=1.0, metadata={"help": "weight of the undesirable rows' losses"})

    def problems(self) -> list[str]:
        found = _positive_beta(self.beta)
        if len(self.loss_type) != 1 or self.loss_type[0] not in KTO_LOSS_TYPES:
            found.append(f"loss_type: expected one of {', '.join(KTO_LOSS_TYPES)}; got {', '.join(self.loss_type)}")
        for name in ("desirable_weight", "undesirable_weight"):
            if getattr(self, name) <= 0:
                found.append(f"{name}: must be positive; got {getattr(self, name)}")
        return found

    def job_problems(self, job: "TrainConfig") -> list[str]:
        """The job's fields KTO cannot train with (named as the job's own fields)."""
        found = []
        if self.loss_type == ["kto"] and job.per_device_train_batch_size < 2:
            found.append(f"per_device_train_batch_size: rlhf_type kto needs at least 2 rows a micro-batch: its KL term "
                         f"is estimated from mismatched pairs within one (a row's prompt with another row's answer), "
                         f"and desirable and undesirable rows must meet in a batch; got "
                         f"{job.per_device_train_batch_size} (raise it and lower gradient_accumulation_steps to keep "
                         f"the global batch)")
        if job.precompute_ref_log_probs:
            found.append("precompute_ref_log_probs: not supported by rlhf_type kto: its KL pairs are made per "
                         "micro-batch, so the reference runs beside the policy")
        return found


@dataclass
class OrpoConfig:
    """--rlhf_type orpo: odds-ratio preference optimisation (no reference model)."""

    beta: float = field(default=0.1, metadata={"help": "ORPO's lambda: weight of the odds-ratio term"})

    def problems(self) -> list[str]:
        return _positive_beta(self.beta)


@dataclass
class CpoConfig:
    """--rlhf_type cpo: contrastive preference optimisation (no reference model)."""

    beta: float = field(default=0.1, metadata={"help": "temperature of the implicit reward"})
    loss_type: str = field(default="sigmoid", metadata={"help": f"one of {', '.join(CPO_LOSS_TYPES)}"})
    cpo_alpha: float = field(default=1.0, metadata={"help": "weight of the chosen answers' NLL"})
    label_smoothing: float = field(default=0.0, metadata={"help": "label smoothing of the sigmoid and simpo loss types"})
    simpo_gamma: float = field(default=1.0, metadata={"help": "target reward margin of loss_type simpo"})

    def problems(self) -> list[str]:
        found = _positive_beta(self.beta)
        if self.loss_type not in CPO_LOSS_TYPES:
            found.append(f"loss_type: expected one of {', '.join(CPO_LOSS_TYPES)}; got {self.loss_type!r}")
        if self.cpo_alpha < 0:
            found.append(f"cpo_alpha: must not be negative; got {self.cpo_alpha}")
        if not 0.0 <= self.label_smoothing < 0.5:
            found.append(f"label_smoothing: must be in [0, 0.5); got {self.label_smoothing}")
        return found


@dataclass
class SimpoConfig:
    """--rlhf_type simpo: SimPO, length-normalised rewards with a target margin (no reference)."""

    beta: float = field(default=2.0, metadata={"help": "scale of the length-normalised reward"})
    simpo_gamma: float = field(default=1.0, metadata={"help": "target reward margin (ms-swift's default 1.0)"})
    cpo_alpha: float = field(default=1.0, metadata={"help": "weight of the chosen answers' NLL (0: pure SimPO)"})
    label_smoothing: float = field(default=0.0, metadata={"help": "label smoothing of the SimPO loss"})

    def problems(self) -> list[str]:
        found = _positive_beta(self.beta)
        if self.cpo_alpha < 0:
            found.append(f"cpo_alpha: must not be negative; got {self.cpo_alpha}")
        if not 0.0 <= self.label_smoothing < 0.5:
            found.append(f"label_smoothing: must be in [0, 0.5); got {self.label_smoothing}")
        return found


@dataclass
class RewardConfig:
    """--rlhf_type rm: a reward model (sequence-classification head, one output) on pairs."""

    center_rewards_coefficient: float | None = field(default=None, metadata={
        "help": "adds this x mean((r_chosen + r_rejected)^2), centring the rewards on 0"})

    def problems(self) -> list[str]:
        if self.center_rewards_coefficient is not None and self.center_rewards_coefficient < 0:
            return [f"center_rewards_coefficient: must not be negative; got {self.center_rewards_coefficient}"]
        return []


GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")


@dataclass
class GrpoConfig:
    """--rlhf_type grpo: group relative policy optimisation on the policy's own completions of
    prompt rows, scored by reward functions and/or a reward model (ms-swift's flags and
    defaults; docs/rlhf.md)."""

    num_generations: int = field(default=8, metadata={"help": "completions per prompt (a group); at least 2"})
    max_completion_length: int = field(default=512, metadata={"help": "most tokens a completion may have"})
    temperature: float = field(default=0.9, metadata={"help": "sampling temperature (the log-probs use it too)"})
    top_p: float = field(default=0.9, metadata={"help": "nucleus sampling: the smallest set of tokens with this mass"})
    top_k: int = field(default=50, metadata={"help": "sample among the k likeliest tokens; -1 (or 0): all"})
    reward_funcs: list[str] = field(default_factory=list, metadata={
        "help": "reward functions: built-ins (accuracy, format, cosine, repetition, soft_overlong) or functions of "
                "--external_plugins"})
    reward_weights: list[float] | None = field(default=None, metadata={
        "help": "a weight per reward function, then per reward model (default 1 each)"})
    reward_model: list[str] = field(default_factory=list, metadata={
        "help": "reward model checkpoints (of tuneforge rlhf --rlhf_type rm) scoring prompt + completion"})
    external_plugins: list[str] = field(default_factory=list, metadata={
        "help": "Python files defining reward functions name(completions, **kwargs) -> list[float]"})
    loss_type: str = field(default="grpo", metadata={"help": f"one of {', '.join(GRPO_LOSS_TYPES)}"})
    epsilon: float = field(default=0.2, metadata={"help": "clip range of the probability ratio (its lower side)"})
    epsilon_high: float | None = field(default=None, metadata={
        "help": "upper clip range (DAPO's clip-higher); unset: epsilon"})
    beta: float = field(default=0.04, metadata={"help": "weight of the KL to the reference; 0 loads no reference"})
    num_iterations: int = field(default=1, metadata={"help": "optimizer steps each rollout is trained for"})
    scale_rewards: str = field(default="group", metadata={
        "help": "advantages divided by the std of the group's rewards (group), of the step's (batch), or not (none)"})
    dynamic_sample: bool = field(default=False, metadata={
        "help": "DAPO's dynamic sampling: a group whose rewards are all equal is generated again (new seeds)"})
    max_resample_times: int = field(default=3, metadata={"help": "dynamic_sample: most regenerations per rollout"})
    log_completions: bool = field(default=False, metadata={
        "help": "write every completion with its rewards to completions.jsonl in the run directory"})
    async_generate: bool = field(default=False, metadata={
        "help": "generate the next rollout (with the policy of this rollout's start) while this one trains: one "
                "rollout off-policy, the first on-policy; vLLM only (use_vllm), one process"})
    # the built-in rewards' parameters (ms-swift's)
    cosine_min_len_value_wrong: float = field(default=-0.5, metadata={
        "help": "cosine: reward of an empty wrong answer"})
    cosine_max_len_value_wrong: float = field(default=0.0, metadata={
        "help": "cosine: reward of the longest wrong answer"})
    cosine_min_len_value_correct: float = field(default=1.0, metadata={
        "help": "cosine: reward of an empty right answer"})
    cosine_max_len_value_correct: float = field(default=0.5, metadata={
        "help": "cosine: reward of the longest right answer"})
    cosine_max_len: int | None = field(default=None, metadata={"help": "cosine: the longest length; unset: "
                                                                       "max_completion_length"})
    repetition_n_grams: int = field(default=3, metadata={"help": "repetition: n-gram size"})
    repetition_max_penalty: float = field(default=-1.0, metadata={"help": "repetition: the most negative reward"})
    soft_max_length: int | None = field(default=None, metadata={
        "help": "soft_overlong: the length penalised fully; unset: max_completion_length"})
    soft_cache_length: int | None = field(default=None, metadata={
        "help": "soft_overlong: the penalty ramps over the last soft_cache_length tokens before soft_max_length"})

    def reward_params(self):
        from services.trainer.rewards import RewardParams

        return RewardParams.of(self)

    def problems(self) -> list[str]:
        from services.trainer import rewards

        found = []
        if self.num_generations < 2:
            found.append(f"num_generations: a group needs at least 2 completions (advantages compare them); got "
                         f"{self.num_generations}")
        if self.max_completion_length < 1:
            found.append(f"max_completion_length: must be positive; got {self.max_completion_length}")
        if self.temperature <= 0:
            found.append(f"temperature: must be positive (GRPO samples); got {self.temperature}")
        if not 0 < self.top_p <= 1:
            found.append(f"top_p: must be in (0, 1]; got {self.top_p}")
        if self.top_k < -1:
            found.append(f"top_k: must be positive, or -1 (or 0) for no limit; got {self.top_k}")
        if self.loss_type not in GRPO_LOSS_TYPES:
            found.append(f"loss_type: expected one of {', '.join(GRPO_LOSS_TYPES)}; got {self.loss_type!r}")
        if self.epsilon <= 0:
            found.append(f"epsilon: must be positive; got {self.epsilon}")
        if self.epsilon_high is not None and self.epsilon_high < self.epsilon:
            found.append(f"epsilon_high: must be at least epsilon ({self.epsilon}); got {self.epsilon_high}")
        if self.beta < 0:
            found.append(f"beta: must not be negative (0 loads no reference); got {self.beta}")
        if self.num_iterations < 1:
            found.append(f"num_iterations: must be at least 1; got {self.num_iterations}")
        if self.scale_rewards not in SCALE_REWARDS:
            found.append(f"scale_rewards: expected one of {', '.join(SCALE_REWARDS)}; got {self.scale_rewards!r}")
        if self.async_generate and self.dynamic_sample:
            found.append("async_generate: not with dynamic_sample (regenerating a group would share the engine with "
                         "the rollout generated ahead)")
        if self.max_resample_times < 0:
            found.append(f"max_resample_times: must not be negative; got {self.max_resample_times}")
        found.extend(rewards.problems(self.reward_funcs, self.reward_weights, self.external_plugins,
                                      self.reward_model, self.reward_params()))
        return found

    def job_problems(self, job: "TrainConfig") -> list[str]:
        """The job's fields GRPO cannot train with (named as the job's own fields)."""
        found = []
        completions = job.per_device_train_batch_size * job.gradient_accumulation_steps
        if completions % self.num_generations:
            found.append(f"per_device_train_batch_size: counts completions: per_device_train_batch_size x "
                         f"gradient_accumulation_steps ({job.per_device_train_batch_size} x "
                         f"{job.gradient_accumulation_steps} = {completions}) must be a multiple of num_generations "
                         f"({self.num_generations}), so that each rank generates whole groups")
        if job.max_steps > 0 and job.max_steps % self.num_iterations:
            found.append(f"max_steps: must be a multiple of num_iterations ({self.num_iterations}): each rollout "
                         f"trains that many steps; got {job.max_steps}")
        if self.async_generate and not job.use_vllm:
            found.append("async_generate: needs use_vllm (colocate or server): transformers generation samples from "
                         "the policy itself, which trains meanwhile")
        if self.async_generate and job.nproc_per_node * job.nnodes > 1:
            found.append(f"async_generate: one process only for now (the in-flight rollout a checkpoint keeps is one "
                         f"rank's); got nproc_per_node x nnodes = {job.nproc_per_node * job.nnodes}")
        return found


@dataclass
class PpoConfig:
    """--rlhf_type ppo: proximal policy optimisation with a reward model, a value model initialised
    from it and a frozen reference (TRL 0.x's PPOTrainer semantics, as ms-swift)."""

    reward_model: list[str] = field(default_factory=list, metadata={
        "help": "a reward model (a checkpoint of `tuneforge rlhf --rlhf_type rm`): scores the completions and "
                "initialises the value model; required, one"})
    max_completion_length: int = field(default=512, metadata={"help": "most tokens a completion may have"})
    temperature: float = field(default=0.9, metadata={
        "help": "sampling temperature (no top-p/top-k, as TRL 0.x's PPO); the log-probs use it too"})
    num_ppo_epochs: int = field(default=4, metadata={"help": "passes over each rollout"})
    num_mini_batches: int = field(default=1, metadata={
        "help": "optimizer steps per pass over a rollout (each rollout holds this many steps' completions)"})
    kl_coef: float = field(default=0.05, metadata={"help": "weight of the per-token KL penalty to the reference"})
    cliprange: float = field(default=0.2, metadata={"help": "clip range of the policy ratio"})
    cliprange_value: float = field(default=0.2, metadata={"help": "clip range of the value around the rollout's"})
    vf_coef: float = field(default=0.1, metadata={"help": "weight of the value loss"})
    gamma: float = field(default=1.0, metadata={"help": "discount of GAE"})
    lam: float = field(default=0.95, metadata={"help": "lambda of GAE"})
    whiten_rewards: bool = field(default=False, metadata={"help": "whiten the per-token rewards (mean kept)"})
    missing_eos_penalty: float | None = field(default=None, metadata={
        "help": "subtracted from the score of a completion that did not end on a stop token (unset: none)"})

    def problems(self) -> list[str]:
        found = []
        if not self.reward_model:
            found.append("reward_model: required (a checkpoint of `tuneforge rlhf --rlhf_type rm`)")
        elif len(self.reward_model) > 1:
            found.append(f"reward_model: ppo takes one reward model (it initialises the value model); got "
                         f"{len(self.reward_model)}")
        if self.max_completion_length < 1:
            found.append(f"max_completion_length: must be positive; got {self.max_completion_length}")
        if self.temperature <= 0:
            found.append(f"temperature: must be positive; got {self.temperature}")
        for name in ("num_ppo_epochs", "num_mini_batches"):
            if getattr(self, name) < 1:
                found.append(f"{name}: must be at least 1; got {getattr(self, name)}")
        for name in ("kl_coef", "vf_coef"):
            if getattr(self, name) < 0:
                found.append(f"{name}: must not be negative; got {getattr(self, name)}")
        for name in ("cliprange", "cliprange_value"):
            if getattr(self, name) <= 0:
                found.append(f"{name}: must be positive; got {getattr(self, name)}")
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                found.append(f"{name}: must be in [0, 1]; got {getattr(self, name)}")
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            found.append(f"missing_eos_penalty: must not be negative; got {self.missing_eos_penalty}")
        return found


@dataclass
class GkdConfig:
    """--rlhf_type gkd: generalized knowledge distillation from a teacher (Agarwal et al., 2024)."""

    teacher_model: str | None = field(default=None, metadata={
        "help": "the teacher: a model directory with the student's vocabulary; required"})
    teacher_adapters: list[str] = field(default_factory=list, metadata={
        "help": "LoRA adapter directories applied to the teacher (e.g. an SFT adapter)"})
    lmbda: float = field(default=0.5, metadata={
        "help": "the share of steps trained on the student's own generations (on-policy); the others on the "
                "dataset's answers (or the teacher's, with seq_kd)"})
    beta: float = field(default=0.5, metadata={
        "help": "interpolation of the generalized JSD: 0 forward KL(teacher || student), 1 reverse KL"})
    max_completion_length: int = field(default=512, metadata={"help": "most tokens a generated answer may have"})
    temperature: float = field(default=0.9, metadata={
        "help": "sampling temperature of the generations (the divergence is taken at 1, as TRL and ms-swift)"})
    seq_kd: bool = field(default=False, metadata={
        "help": "off-policy steps train on the teacher's generations instead of the dataset's answers"})
    sft_alpha: float = field(default=0.0, metadata={
        "help": "adds sft_alpha x the NLL of the answers on steps not generated by the student"})

    def problems(self) -> list[str]:
        found = []
        if not self.teacher_model:
            found.append("teacher_model: required (a model directory with the student's vocabulary)")
        if not 0.0 <= self.lmbda <= 1.0:
            found.append(f"lmbda: must be in [0, 1]; got {self.lmbda}")
        if not 0.0 <= self.beta <= 1.0:
            found.append(f"beta: must be in [0, 1]; got {self.beta}")
        if self.temperature <= 0:
            found.append(f"temperature: must be positive; got {self.temperature}")
        if self.max_completion_length < 1:
            found.append(f"max_completion_length: must be positive; got {self.max_completion_length}")
        if self.sft_alpha < 0:
            found.append(f"sft_alpha: must not be negative; got {self.sft_alpha}")
        return found


# The dataset kinds (a prepared dataset's task) each method trains on, and what they hold.
METHOD_KINDS = {
    None: (("sft", "pt"), "conversations or texts with trained tokens (prepared with task sft or pt)"),
    "dpo": (("preference", "reward"), "chosen/rejected pairs (task preference)"),
    "orpo": (("preference", "reward"), "chosen/rejected pairs (task preference)"),
    "cpo": (("preference", "reward"), "chosen/rejected pairs (task preference)"),
    "simpo": (("preference", "reward"), "chosen/rejected pairs (task preference)"),
    "rm": (("preference", "reward"), "chosen/rejected pairs, optionally with a margin (task reward)"),
    "kto": (("kto",), "answers labelled desirable or undesirable (task kto: a boolean `label` column)"),
    "grpo": (("prompt",), "prompts ending on a user turn, extra columns for the reward functions (task prompt)"),
    "ppo": (("prompt",), "prompts to generate from (task prompt)"),
    "gkd": (("sft", "prompt"), "conversations with answers (task sft; task prompt with --lmbda 1 or --seq_kd)"),
}

# --rlhf_type -> the TrainConfig field holding that method's arguments, and their dataclass
METHOD_CONFIGS = {"dpo": ("dpo", DpoConfig), "kto": ("kto", KtoConfig), "orpo": ("orpo", OrpoConfig),
                  "cpo": ("cpo", CpoConfig), "simpo": ("simpo", SimpoConfig), "rm": ("rm", RewardConfig),
                  "grpo": ("grpo", GrpoConfig), "ppo": ("ppo", PpoConfig), "gkd": ("gkd", GkdConfig)}


@dataclass
class TrainConfig:
    """One supervised fine-tuning job. Field names and defaults follow ms-swift's `swift sft`."""

    # Fields a job cannot start without (a class attribute, not a field: commands that fill
    # some of them in themselves narrow it).
    REQUIRED = ("dataset", "dataprep_address", "output_dir")

    model: str | None = field(default=None, metadata={"help": "base model directory; unset means the embedded default model"})
    dataset: str | None = field(default=None, metadata={"help": "prepared dataset directory on the dataprep service"})
    dataprep_address: str | None = field(default=None, metadata={"help": "host:port of the dataprep service"})
    output_dir: str | None = field(default=None, metadata={"help": "run directory; checkpoints go to OUTPUT_DIR/checkpoint-<step>"})
    train_type: str = field(default="lora", metadata={"help": "lora (PEFT adapters), qlora (PEFT adapters on a 4-bit nf4 base, bitsandbytes) or full (every weight; checkpoints are Hugging Face model directories)"})
    quant_bits: int | None = field(default=None, metadata={"help": "bits of the frozen base's weights: 4 (nf4, bitsandbytes) with qlora; unset means 4 for qlora, unquantized otherwise"})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"],
                                      metadata={"help": "module names to adapt, or all-linear (every linear layer but the output head)"})
    modules_to_save: list[str] = field(default_factory=list, metadata={
        "help": "lora/qlora: modules trained whole and saved beside the adapter (e.g. lm_head embed_tokens)"})
    tokenizer: str | None = field(default=None, metadata={
        "help": "tokenizer directory used instead of the model's (run_clm's --tokenizer_name_or_path): a larger "
                "vocabulary resizes the embeddings and output head before training (new rows: transformers' mean "
                "resizing); the tokenizer is saved with every checkpoint"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute activations in the backward pass: less memory, about a third more compute"})
    learning_rate: float = field(default=1e-4, metadata={"help": "peak learning rate"})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "cosine, linear or constant"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "fraction of the steps spent warming up linearly"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (not applied to 1-D parameters)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the gradient norm to this; 0 disables clipping"})
    per_device_train_batch_size: int = field(default=1, metadata={"help": "rows per micro-batch"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    num_train_epochs: float = field(default=1.0, metadata={"help": "passes over the data (ignored when max_steps > 0)"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; -1 derives them from num_train_epochs"})
    save_steps: int = field(default=500, metadata={"help": "publish a checkpoint every N steps (and always at the end)"})
    save_total_limit: int | None = field(default=None, metadata={
        "help": "keep the newest N checkpoints (and the best by eval loss when eval runs); unset keeps all"})
    eval_steps: int | None = field(default=None, metadata={
        "help": "evaluate every N steps (and at the end) when there is eval data; unset means save_steps"})
    split_dataset_ratio: float = field(default=0.0, metadata={
        "help": "fraction of the dataset's rows held out for eval, by row id (row k when ceil((k+1)r) > ceil(kr)): "
                "the same rows whatever the order, epoch or number of processes"})
    dataset_shuffle: bool = field(default=True, metadata={
        "help": "read the training rows in a new order every epoch, seeded by --seed (dataprep's block shuffle: "
                "shards, then rows within each); false keeps file order"})
    val_dataset: str | None = field(default=None, metadata={"help": "prepared eval dataset directory on the dataprep service"})
    predict_with_generate: bool = field(default=False, metadata={
        "help": "sft/pt eval also generates each eval row's last answer (greedy, max_new_tokens) and scores it "
                "against the row's with ms-swift's nlg metric (rouge-1/2/l, bleu-4; docs/training.md)"})
    max_new_tokens: int = field(default=64, metadata={
        "help": "predict_with_generate: most tokens generated per answer"})
    logging_steps: int = field(default=1, metadata={"help": "log every N steps"})
    seed: int = field(default=42, metadata={"help": "random seed (LoRA init, dropout, the order of the rows)"})
    model_name: str | None = field(default=None, metadata={"help": "self-cognition name recorded in args.json"})
    model_author: str | None = field(default=None, metadata={"help": "self-cognition author recorded in args.json"})
    adapter_name: str | None = field(default=None, metadata={"help": "name serving loads the adapters under (default: basename of output_dir)"})
    torch_dtype: str = field(default="float32", metadata={
        "help": "float32, bfloat16 or float16: the forward's precision; trained weights stay float32 (autocast, or "
                "DeepSpeed's/FSDP2's own mixed precision), float16 with a loss scaler"})
    attn_impl: str | None = field(default=None, metadata={
        "help": "attention kernel: sdpa, eager, flash_attention_2 (CUDA, flash_attn package) or flex_attention "
                "(CUDA); unset: the model's default (sdpa)"})
    resume_from_checkpoint: str | None = field(default=None, metadata={
        "help": "checkpoint directory to continue from exactly: weights, optimizer, scheduler, RNG, step and data cursor"})
    resume_only_model: bool = field(default=False, metadata={
        "help": "with resume_from_checkpoint: load the weights only; optimizer, scheduler, step and data start afresh"})
    # Distributed (services.trainer.distributed, services.trainer.launch). The launch fields
    # are read from ms-swift's environment variables by `tuneforge sft`.
    nproc_per_node: int = field(default=1, metadata={
        "help": "training processes on this node (NPROC_PER_NODE); more than 1 runs the job under torchrun"})
    nnodes: int = field(default=1, metadata={"help": "nodes taking part (NNODES)"})
    node_rank: int = field(default=0, metadata={"help": "this node's index among nnodes (NODE_RANK)"})
    master_addr: str = field(default="127.0.0.1", metadata={"help": "address of node 0's rendezvous (MASTER_ADDR)"})
    master_port: int | None = field(default=None, metadata={
        "help": "port of node 0's rendezvous (MASTER_PORT); unset picks a free one (one node only)"})
    deepspeed: str | None = field(default=None, metadata={
        "help": "DeepSpeed ZeRO: zero2, zero3 or a DeepSpeed JSON file; unset uses DDP when distributed"})
    fsdp: bool = field(default=False, metadata={"help": "shard parameters, gradients and optimizer state with FSDP2"})
    ddp_timeout: int = field(default=1800, metadata={
        "help": "seconds a collective may wait for the other ranks before the job fails"})
    device: str = field(default="auto", metadata={
        "help": "auto (cuda:LOCAL_RANK when CUDA is present, else cpu), cpu, cuda, or cuda:N (one process)"})
    ddp_backend: str | None = field(default=None, metadata={
        "help": "process-group backend: nccl or gloo; unset: nccl on CUDA, gloo on the CPU"})
    # RLHF (services.trainer.methods; docs/rlhf.md)
    rlhf_type: str | None = field(default=None, metadata={"cli": False, 
        "help": f"training method: {', '.join(RLHF_TYPES)}; unset trains supervised (sft, pt)"})
    adapters: list[str] = field(default_factory=list, metadata={
        "help": "LoRA adapter directory to start from (continue an SFT adapter), as ms-swift's --adapters"})
    ref_model: str | None = field(default=None, metadata={"cli": False, 
        "help": "dpo/kto: reference model directory; unset means the policy's starting weights (LoRA: adapter off)"})
    ref_adapters: list[str] = field(default_factory=list, metadata={"cli": False, 
        "help": "dpo/kto: LoRA adapter directory applied to the reference (e.g. the SFT adapter)"})
    precompute_ref_log_probs: bool = field(default=False, metadata={"cli": False, 
        "help": "dpo/kto: compute the reference log-probs in one pass before training, then free the reference"})
    dpo: DpoConfig | None = None
    kto: KtoConfig | None = None
    orpo: OrpoConfig | None = None
    cpo: CpoConfig | None = None
    simpo: SimpoConfig | None = None
    rm: RewardConfig | None = None
    grpo: GrpoConfig | None = None
    # Online methods' generation (services.trainer.rollout): transformers generate, or vLLM
    use_vllm: bool = field(default=False, metadata={"cli": False,
        "help": "online methods: generate with vLLM (--vllm_mode) instead of transformers generate"})
    vllm_mode: str = field(default="colocate", metadata={"cli": False,
        "help": "colocate (a vLLM engine in the training process) or server (the serving service at "
                "vllm_server_host:vllm_server_port)"})
    vllm_server_host: str | None = field(default=None, metadata={"cli": False,
        "help": "vllm_mode server: host of TuneForge's serving service (its gRPC port)"})
    vllm_server_port: int = field(default=8000, metadata={"cli": False,
        "help": "vllm_mode server: the serving service's admin gRPC port (`tuneforge deploy --grpc_port`, printed "
                "at its start as `admin gRPC HOST:PORT`), not its HTTP port; 8000 is TRL's default"})
    vllm_enable_lora: bool | None = field(default=None, metadata={"cli": False,
        "help": "LoRA policies: sync the adapter itself to vLLM (true) or the base weights with the adapter merged "
                "in (false); unset: merged in colocate with train_type lora (vLLM's CPU LoRA kernels made generation "
                "3x slower), the adapter otherwise (server: the only way to a separate engine; qlora)"})
    ppo: PpoConfig | None = None
    gkd: GkdConfig | None = None

    def __post_init__(self) -> None:
        # the method named by rlhf_type always has its arguments (its defaults when none are given)
        if self.rlhf_type in METHOD_CONFIGS:
            name, cls = METHOD_CONFIGS[self.rlhf_type]
            if getattr(self, name) is None:
                setattr(self, name, cls())

    @property
    def method_config(self):
        """The arguments of the method rlhf_type names (None for supervised training)."""
        return getattr(self, METHOD_CONFIGS[self.rlhf_type][0]) if self.rlhf_type in METHOD_CONFIGS else None

    def problems(self) -> list[str]:
        """Every problem at once, each naming its field; empty when the job can start."""
        found: list[str] = paths.problems({
            "model": self.model, "tokenizer": self.tokenizer, "dataset": self.dataset, "output_dir": self.output_dir,
            "val_dataset": self.val_dataset, "resume_from_checkpoint": self.resume_from_checkpoint, "deepspeed": self.deepspeed,
            "ref_model": self.ref_model, "adapters": self.adapters, "ref_adapters": self.ref_adapters})
        unusable = {problem.split(":", 1)[0] for problem in found}  # no filesystem call may see these
        if self.train_type not in TRAIN_TYPES:
            found.append(f"train_type: expected one of {', '.join(TRAIN_TYPES)}; got {self.train_type!r}")
        found.extend(self._combination_problems())
        for name in self.REQUIRED:
            if not getattr(self, name):
                found.append(f"{name}: required")
        positive = ("lora_rank", "lora_alpha", "per_device_train_batch_size", "gradient_accumulation_steps",
                    "save_steps", "logging_steps", "learning_rate")
        for name in positive:
            if getattr(self, name) <= 0:
                found.append(f"{name}: must be positive; got {getattr(self, name)}")
        if not 0.0 <= self.lora_dropout < 1.0:
            found.append(f"lora_dropout: must be in [0, 1); got {self.lora_dropout}")
        if not self.target_modules or any(not m for m in self.target_modules):
            found.append("target_modules: give module names or all-linear")
        elif "all-linear" in self.target_modules and len(self.target_modules) > 1:
            found.append("target_modules: all-linear cannot be combined with module names")
        if self.lr_scheduler_type not in LR_SCHEDULERS:
            found.append(f"lr_scheduler_type: expected one of {', '.join(LR_SCHEDULERS)}; got {self.lr_scheduler_type!r}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            found.append(f"warmup_ratio: must be in [0, 1]; got {self.warmup_ratio}")
        if self.weight_decay < 0:
            found.append(f"weight_decay: must not be negative; got {self.weight_decay}")
        if self.max_grad_norm < 0:
            found.append(f"max_grad_norm: must not be negative (0 disables clipping); got {self.max_grad_norm}")
        if self.max_steps == 0 or self.max_steps < -1:
            found.append(f"max_steps: must be positive, or -1 to derive it from num_train_epochs; got {self.max_steps}")
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            found.append(f"num_train_epochs: must be positive when max_steps is -1; got {self.num_train_epochs}")
        if self.torch_dtype not in DTYPES:
            found.append(f"torch_dtype: expected one of {', '.join(DTYPES)}; got {self.torch_dtype!r}")
        model_problems = _model_problems(self.model) if self.model and "model" not in unusable else []
        found.extend(model_problems)
        if not model_problems and "model" not in unusable and self.is_adapter:
            found.extend(_module_problems(self.model, self.target_modules, self.modules_to_save))
        if self.tokenizer and not model_problems and not {"model", "tokenizer"} & unusable:
            found.extend(_vocabulary_problems(self))
        if self.save_total_limit is not None and self.save_total_limit < 1:
            found.append(f"save_total_limit: must be at least 1 (unset keeps all); got {self.save_total_limit}")
        if self.eval_steps is not None and self.eval_steps < 1:
            found.append(f"eval_steps: must be positive; got {self.eval_steps}")
        if not 0.0 <= self.split_dataset_ratio < 1.0:
            found.append(f"split_dataset_ratio: must be in [0, 1); got {self.split_dataset_ratio}")
        if self.split_dataset_ratio > 0 and self.val_dataset:
            found.append("split_dataset_ratio: give either split_dataset_ratio or val_dataset, not both")
        if self.resume_from_checkpoint and "resume_from_checkpoint" not in unusable:
            found.extend(_resume_problems(self.resume_from_checkpoint, self.train_type,
                                          None if self.resume_only_model else self.nproc_per_node * self.nnodes))
        elif self.resume_only_model and not self.resume_from_checkpoint:
            found.append("resume_only_model: needs resume_from_checkpoint")
        # a resumed run continues its directory
        if self.output_dir and "output_dir" not in unusable and not self.resume_from_checkpoint:
            published = checkpoint.checkpoints(self.output_dir)
            if published:
                found.append(f"output_dir: {self.output_dir} already holds checkpoints ({published[-1].name}); "
                             f"choose a new run directory")
        found.extend(distributed.problems(self, check_files="deepspeed" not in unusable))
        found.extend(devices.problems(self))
        found.extend(self._method_problems(unusable))
        # NaN passes every `<` check above unnoticed, and an infinity some: said once, first
        not_finite = {name: value for name, value in self._floats() if not math.isfinite(value)}
        return ([f"{name}: must be a finite number; got {value}" for name, value in not_finite.items()]
                + [problem for problem in found if problem.split(":", 1)[0] not in not_finite])

    def _floats(self) -> list[tuple[str, float]]:
        """Every float argument by name, the method's own included (as `dpo.beta`)."""
        found = [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
                 if isinstance(getattr(self, f.name), float)]
        method = self.method_config
        if method is not None:
            prefix = METHOD_CONFIGS[self.rlhf_type][0]
            for f in dataclasses.fields(method):
                values = getattr(method, f.name)
                for value in values if isinstance(values, list) else [values]:
                    if isinstance(value, float):
                        found.append((f"{prefix}.{f.name}", value))
        return found

    def _method_problems(self, unusable: set[str]) -> list[str]:
        """The RLHF fields: a known method, only its own arguments, and a reference only where
        the method has one (`unusable`: path fields already refused, not to be looked at)."""
        found: list[str] = []
        if self.rlhf_type is not None and self.rlhf_type not in RLHF_TYPES:
            return [f"rlhf_type: expected one of {', '.join(RLHF_TYPES)}; got {self.rlhf_type!r}"]
        for rlhf_type, (name, _cls) in METHOD_CONFIGS.items():
            value = getattr(self, name)
            if value is not None and rlhf_type != self.rlhf_type:
                found.append(f"{name}: arguments of rlhf_type {rlhf_type}, but rlhf_type is {self.rlhf_type}")
            elif value is not None:
                found.extend(f"{name}.{problem}" for problem in value.problems())
        if self.kto is not None and self.rlhf_type == "kto":
            found.extend(self.kto.job_problems(self))
        if self.grpo is not None and self.rlhf_type == "grpo":
            found.extend(self.grpo.job_problems(self))
        found.extend(self._online_problems())
        if self.rlhf_type in ("ppo", "gkd"):
            found.extend(self._ppo_gkd_model_problems(unusable))
        if self.rlhf_type == "ppo" and self.precompute_ref_log_probs:
            found.append("precompute_ref_log_probs: not for rlhf_type ppo: it scores its own generations, which "
                         "exist only once a rollout has made them")
        if self.rlhf_type == "ppo" and self.nproc_per_node * self.nnodes > 1:
            found.append("nproc_per_node: rlhf_type ppo trains on one process (its value model's optimizer is that "
                         "process's own)")
        has_reference = self.rlhf_type in REFERENCE_METHODS
        for name in ("ref_model", "ref_adapters", "precompute_ref_log_probs"):
            if getattr(self, name) and not has_reference:
                found.append(f"{name}: rlhf_type {self.rlhf_type or 'unset (supervised training)'} has no reference "
                             f"model (only {', '.join(REFERENCE_METHODS)})")
        if self.adapters and not self.is_adapter:
            found.append("adapters: only for lora and qlora (train_type full trains a whole model)")
        if len(self.adapters) > 1:
            found.append(f"adapters: training continues one adapter; got {len(self.adapters)}")
        for name in ("adapters", "ref_adapters"):
            if name not in unusable:
                found.extend(f"{name}: {path} is not a directory" if not pathlib.Path(path).is_dir() else
                             f"{name}: {path} is not a PEFT adapter (no adapter_config.json)"
                             for path in getattr(self, name) if not (pathlib.Path(path) / "adapter_config.json").is_file())
        if self.ref_model and "ref_model" not in unusable:
            ref_problems = [f"ref_model: {problem.removeprefix('model: ')}" for problem in _model_problems(self.ref_model)]
            found.extend(ref_problems)
            if not ref_problems and "model" not in unusable and not (self.model and _model_problems(self.model)):
                found.extend(_tokenizer_problems(self.model, self.ref_model))
        return found

    def _ppo_gkd_model_problems(self, unusable: set[str]) -> list[str]:
        """PPO's reward model and GKD's teacher: directories that load, with the model's
        vocabulary (their distributions and scores are read on the student's token ids)."""
        if self.rlhf_type == "ppo":
            if len(self.ppo.reward_model) != 1:
                return []  # the method's own problems say how many it takes
            name, path, adapters = "reward_model", self.ppo.reward_model[0], []
        else:
            name, path, adapters = "teacher_model", self.gkd.teacher_model, self.gkd.teacher_adapters
        if not path:
            return []  # the method's own problems say it is required
        found = paths.problems({name: path, "teacher_adapters": adapters})
        if found:
            return found
        if self.rlhf_type == "ppo":
            from services.trainer.rewards import model as reward_model

            problems = reward_model.problems([path])  # each names reward_model
        else:
            problems = [f"teacher_model: {p.removeprefix('model: ')}" for p in _model_problems(path)]
            problems.extend(f"teacher_adapters: {a} is not a PEFT adapter (no adapter_config.json)"
                            for a in adapters if not (pathlib.Path(a) / "adapter_config.json").is_file())
        if problems or "model" in unusable or (self.model and _model_problems(self.model)):
            return problems
        if self.rlhf_type == "ppo":
            return _tokenizer_problems(self.model, _reward_base(path), name,
                                       "the reward model must score the policy's token ids")
        return _tokenizer_problems(self.model, path, name, "vocabulary mismatch: the teacher's and the student's "
                                   "next-token distributions must be over the same token ids")

    def _online_problems(self) -> list[str]:
        """The generation fields: only for online methods, and what online methods cannot do."""
        found = []
        online = self.rlhf_type in ONLINE_METHODS
        if not online:
            given = [name for name in ("use_vllm", "vllm_server_host") if getattr(self, name)]
            for name in given + (["vllm_enable_lora"] if self.vllm_enable_lora is not None else []):
                found.append(f"{name}: only for the online methods ({', '.join(ONLINE_METHODS)}), which generate; "
                               f"rlhf_type is {self.rlhf_type or 'unset (supervised training)'}")
            return found
        if self.vllm_mode not in VLLM_MODES:
            found.append(f"vllm_mode: expected one of {', '.join(VLLM_MODES)}; got {self.vllm_mode!r}")
        elif self.use_vllm and self.vllm_mode == "server" and not self.vllm_server_host:
            found.append("vllm_server_host: vllm_mode server needs the serving service's host "
                         "(--vllm_server_host, --vllm_server_port)")
        elif self.use_vllm and self.vllm_mode == "colocate" and self.nproc_per_node * self.nnodes > 1:
            found.append(f"vllm_mode: colocate runs one vLLM engine inside a single training process; this job has "
                         f"{self.nproc_per_node * self.nnodes} (nproc_per_node x nnodes): use --vllm_mode server")
        if not 0 < self.vllm_server_port < 65536:
            found.append(f"vllm_server_port: expected a port number; got {self.vllm_server_port}")
        if self.vllm_enable_lora is not None and not self.is_adapter:
            found.append(f"vllm_enable_lora: only for LoRA policies; train_type is {self.train_type} (its weights are "
                         "loaded into vLLM whole)")
        elif self.vllm_enable_lora is False and self.train_type == "qlora":
            found.append("vllm_enable_lora: a qlora policy's 4-bit base weights cannot take the merged adapter: "
                         "leave it unset or true (vLLM applies the adapter to the full-precision base)")
        elif self.vllm_enable_lora is False and self.use_vllm and self.vllm_mode == "server":
            found.append("vllm_enable_lora: vllm_mode server syncs the policy as an adapter (merged weights cannot "
                         "reach a separate engine on CPU): leave it unset or true, or use --vllm_mode colocate")
        if self.split_dataset_ratio > 0 or self.val_dataset:
            found.append(f"{'split_dataset_ratio' if self.split_dataset_ratio > 0 else 'val_dataset'}: rlhf_type "
                         f"{self.rlhf_type} has no eval loss (it trains on its own generations)")
        if self.fsdp:
            found.append(f"fsdp: rlhf_type {self.rlhf_type} generates with each rank's whole policy: use DDP or "
                         f"--deepspeed zero2 (FSDP2 and ZeRO-3 are not supported for online methods yet)")
        elif self.deepspeed:
            try:
                stage = distributed.deepspeed_json(self.deepspeed).get("zero_optimization", {}).get("stage", 0)
            except ValueError:  # said by distributed.problems
                stage = 0
            if stage == 3:
                found.append(f"deepspeed: rlhf_type {self.rlhf_type} generates with each rank's whole policy: use "
                             f"DDP or --deepspeed zero2 (ZeRO-3 and FSDP2 are not supported for online methods yet)")
        return found

    def _generation_problems(self) -> list[str]:
        """--predict_with_generate: supervised eval with each rank's whole model."""
        if not self.predict_with_generate:
            return []
        found = []
        if self.rlhf_type is not None:
            found.append(f"predict_with_generate: sft and pt only; rlhf_type {self.rlhf_type} has its own eval")
        elif not (self.val_dataset or self.split_dataset_ratio > 0):
            found.append("predict_with_generate: needs eval data (--val_dataset or --split_dataset_ratio)")
        if self.max_new_tokens < 1:
            found.append(f"max_new_tokens: must be at least 1; got {self.max_new_tokens}")
        stage = 0
        if self.deepspeed:
            try:
                stage = distributed.deepspeed_json(self.deepspeed).get("zero_optimization", {}).get("stage", 0)
            except ValueError:  # said by distributed.problems
                pass
        if self.fsdp or stage == 3:
            # each rank generates its own rows with its whole model; sharded parameters would make
            # every forward a collective all ranks must join, token by token
            found.append(f"predict_with_generate: not with {'--fsdp' if self.fsdp else 'ZeRO-3'} (sharded "
                         f"parameters); use DDP or --deepspeed zero2")
        return found

    def _combination_problems(self) -> list[str]:
        """Flags that do not go with the train type."""
        found = self._generation_problems()
        if self.quant_bits is not None and self.quant_bits != 4:
            found.append(f"quant_bits: only 4 (nf4, bitsandbytes) is supported; got {self.quant_bits}")
        elif self.quant_bits == 4 and self.train_type == "full":
            found.append("quant_bits: 4-bit weights cannot be fully fine-tuned; use --train_type qlora")
        elif self.quant_bits == 4 and self.train_type == "lora":
            found.append("quant_bits: LoRA on a 4-bit base is --train_type qlora")
        if self.modules_to_save and self.train_type == "full":
            found.append("modules_to_save: only for lora and qlora (full trains every module)")
        if any(not m for m in self.modules_to_save):
            found.append("modules_to_save: module names must not be empty")
        return found

    @property
    def is_adapter(self) -> bool:
        """Checkpoints are PEFT adapters (lora, qlora), not whole models (full)."""
        return self.train_type in ADAPTER_TRAIN_TYPES

    def resolved_eval_steps(self) -> int:
        return self.eval_steps or self.save_steps

    def resolved_adapter_name(self) -> str:
        """The name serving loads this run's adapters under."""
        return self.adapter_name or pathlib.Path(self.output_dir or "").resolve().name


# What a checkpoint must hold to resume from it (written by services.trainer.checkpointing).
RESUME_FILES = checkpoint.RESUME_STATE


def _resume_problems(path: str, train_type: str, processes: int | None) -> list[str]:
    """`processes`: how many the job trains with, when it resumes the optimizer and data
    cursors (one per rank: a checkpoint resumes on as many processes as trained it)."""
    directory = pathlib.Path(path)
    if not directory.is_dir():
        return [f"resume_from_checkpoint: {path} is not a directory"]
    try:
        checkpoint.verify(directory)
    except TuneForgeError as exc:
        return [f"resume_from_checkpoint: {exc.message}"]
    missing = [name for name in RESUME_FILES if not (directory / name).is_file()]
    if missing:
        return [f"resume_from_checkpoint: {path} has no {', '.join(missing)}: not a trainer checkpoint"]
    is_adapter = (directory / "adapter_config.json").is_file()
    if is_adapter != (train_type in ADAPTER_TRAIN_TYPES):
        kind = "a LoRA adapter" if is_adapter else "a full model"
        return [f"resume_from_checkpoint: {path} holds {kind}, which train_type {train_type} cannot continue"]
    if processes is not None:
        try:
            state = json.loads((directory / "trainer_state.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            return [f"resume_from_checkpoint: {directory / 'trainer_state.json'}: cannot read: {exc}"]
        trained = len(state.get("data_cursors") or [None]) if isinstance(state, dict) else 1
        if trained != processes:
            return [f"resume_from_checkpoint: {path} was trained by {trained} processes; resume it with as many "
                    f"(nproc_per_node x nnodes; this job has {processes}), or add --resume_only_model true"]
    return []


def _model_problems(model: str) -> list[str]:
    from libs.default_model.resolve import resolve_model

    try:
        resolve_model(model)
    except TuneForgeError as exc:
        return [f"model: {exc.message}"]
    return []


def _reward_base(path: str) -> str:
    """The directory holding a reward model's tokenizer: a full model's own, an adapter's base."""
    from services.trainer.rewards import model as reward_model

    found, is_adapter = reward_model.describe(path)
    if not is_adapter:
        return str(found)
    from libs.common import adapter_dir

    base = adapter_dir.inspect(found, field="reward_model").base_model
    return str(adapter_dir.normalize(base)) if base else str(found)


def _tokenizer_problems(model: str | None, ref_model: str, name: str = "ref_model",
                        why: str = "the reference must score the same token ids") -> list[str]:
    """A reference (a teacher, a reward model) reads the policy's token ids: its tokenizer must
    be the model's."""
    from transformers import AutoTokenizer

    from libs.default_model.resolve import resolve_model

    try:
        ours, theirs = AutoTokenizer.from_pretrained(resolve_model(model)), AutoTokenizer.from_pretrained(ref_model)
    except (OSError, ValueError) as exc:
        return [f"{name}: cannot load its tokenizer: {exc}"]
    if ours.get_vocab() != theirs.get_vocab():
        return [f"{name}: its tokenizer differs from the model's ({len(theirs)} tokens, the model's {len(ours)}): "
                f"{why}"]
    return []


def _module_problems(model: str | None, target_modules: list[str], modules_to_save: list[str]) -> list[str]:
    """Module names the model does not have, found before any work starts from the model's
    config alone (an empty skeleton on the meta device: no weights read). Nothing to check,
    nothing loaded, for the default all-linear."""
    named = [m for m in target_modules if m != "all-linear"]
    if not named and not modules_to_save:
        return []
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from libs.default_model.resolve import resolve_model

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model(model)))
    except (OSError, ValueError) as exc:  # not a causal LM transformers knows
        return [f"model: cannot build {model or 'the default model'} from its config.json: {exc}"]
    names = {name.rsplit(".", 1)[-1] for name, _ in skeleton.named_modules()}
    found = []
    for field_name, wanted in (("target_modules", named), ("modules_to_save", modules_to_save)):
        missing = [m for m in wanted if m not in names]
        if missing:
            found.append(f"{field_name}: the model has no module named {', '.join(missing)}")
    return found


def _vocabulary_problems(config: TrainConfig) -> list[str]:
    """A tokenizer with more tokens than the model has rows resizes the embeddings and the head:
    with an adapter, those must be trained and saved whole, or the new rows stay random and are
    lost with the checkpoint."""
    from libs.default_model.resolve import resolve_model
    from services.trainer import vocabulary

    model_dir = resolve_model(config.model)
    try:
        size = len(vocabulary.load(config.tokenizer, model_dir))
    except TuneForgeError as exc:
        return [str(exc)]
    rows = vocabulary.embedding_rows(model_dir)
    if size <= rows or not config.is_adapter:
        return []
    wanted = {"embed_tokens", "lm_head"}
    missing = sorted(wanted - set(config.modules_to_save))
    if not missing:
        return []
    return [f"tokenizer: its {size} tokens resize the model's {rows}-row embeddings and output head; with "
            f"train_type {config.train_type} the new rows are trained only as whole modules: add "
            f"--modules_to_save {' '.join(sorted(wanted | set(config.modules_to_save)))}"]


def from_arguments(message: Any) -> TrainConfig:
    """A TrainConfig from a `TrainingArguments` message (unset fields take the defaults above);
    raises Problems listing every problem."""
    return cfg.from_proto(TrainConfig, message)


def to_arguments(config: TrainConfig):
    """The `TrainingArguments` message carrying `config`."""
    from protos.tuneforge.trainer.v1 import trainer_pb2

    return cfg.to_proto(config, trainer_pb2.TrainingArguments)


def as_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


@dataclass
class TrainerServerConfig(ServerOptions):
    """`tuneforge serve trainer`: the service process."""

    max_concurrent_jobs: int = field(default=1, metadata={"help": "jobs training at once; the rest wait PENDING in order"})
    cancel_timeout: float = field(default=60.0, metadata={"help": "seconds a cancelled job gets to publish its checkpoint before it is killed"})
    torch_threads: int = field(default=0, metadata={
        "help": "intra-op CPU threads per training process; 0 shares the cores among max_concurrent_jobs"})
    keep_finished_jobs: int = field(default=256, metadata={
        "help": "finished jobs remembered for GetJob, ListJobs, WatchJob and the checkpoint feed; the oldest are "
                "forgotten first (their run directories stay)"})
    finished_job_retention: float = field(default=7 * 24 * 3600.0, metadata={
        "help": "seconds a finished job is remembered (default a week); then forgotten, its run directory kept"})

    def problems(self) -> list[str]:
        found = super().problems()
        if self.keep_finished_jobs < 1:
            found.append(f"keep_finished_jobs: must be at least 1; got {self.keep_finished_jobs}")
        if not self.finished_job_retention > 0:
            found.append(f"finished_job_retention: must be positive; got {self.finished_job_retention}")
        if self.max_concurrent_jobs < 1:
            found.append(f"max_concurrent_jobs: must be at least 1; got {self.max_concurrent_jobs}")
        if self.torch_threads < 0:
            found.append(f"torch_threads: must not be negative; got {self.torch_threads}")
        if self.cancel_timeout <= 0:
            found.append(f"cancel_timeout: must be positive; got {self.cancel_timeout}")
        return found
