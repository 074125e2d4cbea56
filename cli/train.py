"""`tuneforge sft` and `tuneforge pt`: clients of the trainer's gRPC API that prepare raw
datasets through dataprep (chat template for sft; plain text + eos, every token trained, for
pt), submit the job, show its progress and publish nothing themselves.

Without `--trainer_address` (or `--dataprep_address`) the service it needs runs in this
process on 127.0.0.1 for the command's lifetime, so one command trains end to end; with
them it talks to running services, which must share this machine's filesystem (paths are
sent absolute).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import sys
from dataclasses import dataclass, field
from typing import Iterator

from tqdm import tqdm

from libs.common import channels
from libs.common import config as cfg
from libs.common.errors import FailedPrecondition
from libs.common.server import create_server
from protos.tuneforge.trainer.v1 import trainer_pb2 as pb
from services.dataprep.inputs import TXT_MODES
from services.trainer import client
from services.trainer.config import METHOD_CONFIGS, RLHF_TYPES, CpoConfig, GrpoConfig, TrainConfig

# dataprep writes this file last: a directory holding it is a prepared dataset
PREPARED_MARKER = "manifest.json"
# where raw datasets are prepared, inside the run directory
PREPARED_SUBDIR = "dataset"
PREPARED_VAL_SUBDIR = "val_dataset"


@dataclass
class SftCommandConfig(TrainConfig):
    """`tuneforge sft`: one SFT job run through the trainer service, from raw or prepared data."""

    REQUIRED = ("dataset", "output_dir")

    dataset: list[str] = field(default_factory=list, metadata={
        "help": "JSONL conversation files (prepared through dataprep into OUTPUT_DIR/dataset), "
                "or one dataset directory dataprep already prepared"})
    trainer_address: str | None = field(default=None, metadata={
        "help": "host:port of a trainer service; unset runs one in this process"})
    val_dataset: list[str] = field(default_factory=list, metadata={
        "help": "eval data like --dataset (prepared into OUTPUT_DIR/val_dataset), or one prepared directory"})
    max_length: int = field(default=2048, metadata={
        "help": "longest tokenized row kept when preparing raw datasets (the packed row length with --packing); "
                "longer rows are rejected"})
    packing: bool = field(default=False, metadata={
        "help": "pack prepared rows into rows of max_length tokens; samples stay apart (block-diagonal mask)"})
    streaming: bool = field(default=False, metadata={
        "help": "prepare with bounded memory (packing works on windows of rows)"})
    system: str | None = field(default=None, metadata={
        "help": "system prompt inserted when preparing raw datasets, in rows without one"})
    tls_ca: str | None = field(default=None, metadata={
        "help": "PEM CA certificates to trust: call --dataprep_address and --trainer_address over TLS "
                "(env TUNEFORGE_TLS_CA)"})
    tls_client_cert: str | None = field(default=None, metadata={
        "help": "PEM certificate to present to services that require mutual TLS (env TUNEFORGE_TLS_CLIENT_CERT)"})
    tls_client_key: str | None = field(default=None, metadata={
        "help": "PEM private key of tls_client_cert (env TUNEFORGE_TLS_CLIENT_KEY)"})

    # what dataprep prepares raw rows as (`tuneforge pt` narrows it)
    TASK = "sft"

    def problems(self) -> list[str]:
        found = super().problems()
        for name in ("dataset", "val_dataset"):
            found.extend(_dataset_problems(name, getattr(self, name)))
        found.extend(channels.client_problems(self.tls_ca, self.tls_client_cert, self.tls_client_key))
        if self.max_length < 0:
            found.append(f"max_length: expected 0 (no limit) or a positive number; got {self.max_length}")
        if self.packing and self.max_length == 0:
            found.append("packing: needs max_length > 0 (the length of a packed row)")
        if self.packing and len(self.dataset) == 1 and is_prepared(self.dataset[0]) and not is_packed(self.dataset[0]):
            found.append(f"packing: {self.dataset[0]} was prepared without packing; prepare it with --packing true, "
                         f"or give the raw files")
        return found


@dataclass
class PtCommandConfig(SftCommandConfig):
    """`tuneforge pt`: continued pre-training through the trainer service: no chat template,
    every token trained (rows' texts + eos), full training by default as `swift pt`."""

    train_type: str = field(default="full", metadata={
        "help": "full (every weight; checkpoints are Hugging Face model directories), lora or qlora (PEFT adapters)"})
    dataset: list[str] = field(default_factory=list, metadata={
        "help": "corpus files (.txt, .jsonl, .json, .csv, .parquet; .txt and .jsonl also .gz or .zst), directories "
                "or globs of them (prepared through dataprep into OUTPUT_DIR/dataset), or one prepared dataset "
                "directory"})
    max_length: int = field(default=2048, metadata={
        "help": "the block size unless --block_size is given; with --packing, documents are split at max_length "
                "and the pieces packed into rows of max_length; no text is dropped for its length"})
    block_size: int | None = field(default=None, metadata={
        "help": "the corpus' tokens, each document ending in eos, joined and cut into rows of this many tokens "
                "(run_clm's group_texts); unset means max_length"})
    drop_last_block: bool = field(default=True, metadata={
        "help": "drop the last block when shorter than block_size (as run_clm; counted in the dataset manifest) "
                "or keep it as a shorter row (false)"})
    txt_mode: str = field(default="file", metadata={
        "help": "a .txt file is one document (file) or one document per non-blank line (line)",
        "choices": list(TXT_MODES)})

    TASK = "pt"

    def problems(self) -> list[str]:
        from services.dataprep.config import PrepareConfig

        corpus = PrepareConfig(task="pt", max_length=self.max_length, packing=self.packing,
                               block_size=self.block_size, txt_mode=self.txt_mode)
        found = super().problems() + corpus.corpus_problems()
        if self.predict_with_generate:
            found.append("predict_with_generate: pt trains every token of a row: there is no prompt to answer")
        return found


# What dataprep prepares raw rows as for each --rlhf_type.
RLHF_TASKS = {"dpo": "preference", "orpo": "preference", "cpo": "preference", "simpo": "preference", "rm": "reward",
              "kto": "kto", "grpo": "prompt", "ppo": "prompt", "gkd": "sft"}
# Flags of `tuneforge rlhf` that are a method's own arguments (services.trainer.config's method dataclasses).
METHOD_FLAGS = ("beta", "loss_type", "loss_weights", "label_smoothing", "rpo_alpha", "discopop_tau", "cpo_alpha",
                "simpo_gamma", "desirable_weight", "undesirable_weight", "center_rewards_coefficient",
                # grpo's
                "num_generations", "max_completion_length", "temperature", "top_p", "top_k", "reward_funcs",
                "reward_weights", "reward_model", "external_plugins", "epsilon", "epsilon_high", "num_iterations",
                "scale_rewards", "dynamic_sample", "max_resample_times", "log_completions",
                "async_generate",
                "cosine_min_len_value_wrong", "cosine_max_len_value_wrong", "cosine_min_len_value_correct",
                "cosine_max_len_value_correct", "cosine_max_len", "repetition_n_grams", "repetition_max_penalty",
                "soft_max_length", "soft_cache_length",
                # ppo's (reward_model, max_completion_length, temperature: above)
                "num_ppo_epochs", "num_mini_batches", "kl_coef", "cliprange", "cliprange_value", "vf_coef", "gamma",
                "lam", "whiten_rewards", "missing_eos_penalty",
                # gkd's (beta, max_completion_length, temperature: above)
                "teacher_model", "teacher_adapters", "lmbda", "seq_kd", "sft_alpha")


@dataclass
class RlhfCommandConfig(SftCommandConfig):
    """`tuneforge rlhf`: preference or reward training through the trainer service (ms-swift's
    `swift rlhf` flags); raw datasets are prepared with the method's task. A method flag left
    unset takes that method's default (e.g. --beta: 2.0 for simpo, 0.1 for the others)."""

    rlhf_type: str | None = field(default=None, metadata={
        "help": f"the method: {', '.join(RLHF_TYPES)}", "choices": list(RLHF_TYPES)})
    ref_model: str | None = field(default=None, metadata={
        "help": "dpo/kto: reference model directory; unset means the policy's starting weights (LoRA: adapter off)"})
    ref_adapters: list[str] = field(default_factory=list, metadata={
        "help": "dpo/kto: LoRA adapter directory applied to the reference (e.g. the SFT adapter)"})
    precompute_ref_log_probs: bool = field(default=False, metadata={
        "help": "dpo/kto: compute the reference log-probs in one pass before training, then free the reference"})
    beta: float | None = field(default=None, metadata={
        "help": "dpo/kto/cpo: reward temperature (0.1); simpo: reward scale (2.0); orpo: lambda (0.1); "
                "gkd: JSD interpolation, 0 forward KL, 1 reverse KL (0.5)"})
    loss_type: list[str] | None = field(default=None, metadata={
        "help": "dpo: one or more of sigmoid, hinge, ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot, "
                "aot_unpaired (aot_pair), apo_zero, apo_down, discopop, sft, sigmoid_norm; kto: kto or apo_zero_unpaired; "
                "cpo: sigmoid, hinge, ipo or simpo"})
    loss_weights: list[float] | None = field(default=None, metadata={"help": "dpo: a weight per --loss_type"})
    label_smoothing: float | None = field(default=None, metadata={"help": "dpo/cpo/simpo: label smoothing (0)"})
    rpo_alpha: float | None = field(default=None, metadata={"help": "dpo: weight of the chosen answers' NLL (unset: none)"})
    discopop_tau: float | None = field(default=None, metadata={"help": "dpo --loss_type discopop: its temperature (0.05)"})
    cpo_alpha: float | None = field(default=None, metadata={"help": "cpo/simpo: weight of the chosen answers' NLL (1.0)"})
    simpo_gamma: float | None = field(default=None, metadata={"help": "simpo (and cpo --loss_type simpo): target margin (1.0)"})
    desirable_weight: float | None = field(default=None, metadata={"help": "kto: weight of desirable rows (1.0)"})
    undesirable_weight: float | None = field(default=None, metadata={"help": "kto: weight of undesirable rows (1.0)"})
    center_rewards_coefficient: float | None = field(default=None, metadata={
        "help": "rm: weight of mean((r_chosen + r_rejected)^2) (unset: none)"})
    # grpo (services.trainer.config.GrpoConfig has each one's meaning and default)
    num_generations: int | None = field(default=None, metadata={"help": "grpo: completions per prompt (8)"})
    max_completion_length: int | None = field(default=None, metadata={
        "help": "grpo/ppo/gkd: most tokens a completion has (512)"})
    temperature: float | None = field(default=None, metadata={"help": "grpo/ppo/gkd: sampling temperature (0.9)"})
    top_p: float | None = field(default=None, metadata={"help": "grpo: nucleus sampling mass (0.9)"})
    top_k: int | None = field(default=None, metadata={
        "help": "grpo: sample among the k likeliest tokens (50; -1: all)"})
    reward_funcs: list[str] | None = field(default=None, metadata={
        "help": "grpo: reward functions: accuracy, format, cosine, repetition, soft_overlong, or --external_plugins'"})
    reward_weights: list[float] | None = field(default=None, metadata={
        "help": "grpo: a weight per reward function, then per reward model (1 each)"})
    reward_model: list[str] | None = field(default=None, metadata={
        "help": "grpo: reward model checkpoints (of --rlhf_type rm) scoring prompt + completion; ppo: one, required (it initialises the value model too)"})
    external_plugins: list[str] | None = field(default=None, metadata={
        "help": "grpo: Python files defining reward functions name(completions, **kwargs) -> list[float]"})
    epsilon: float | None = field(default=None, metadata={"help": "grpo: clip range of the ratio (0.2)"})
    epsilon_high: float | None = field(default=None, metadata={"help": "grpo: upper clip range (unset: epsilon)"})
    num_iterations: int | None = field(default=None, metadata={"help": "grpo: optimizer steps per rollout (1)"})
    scale_rewards: str | None = field(default=None, metadata={"help": "grpo: group, batch or none (group)"})
    dynamic_sample: bool | None = field(default=None, metadata={
        "help": "grpo: regenerate groups whose rewards are all equal (false)"})
    max_resample_times: int | None = field(default=None, metadata={"help": "grpo --dynamic_sample: most tries (3)"})
    log_completions: bool | None = field(default=None, metadata={
        "help": "grpo: write completions.jsonl (step, prompt, completion, rewards) in the run directory (false)"})
    async_generate: bool | None = field(default=None, metadata={
        "help": "grpo --use_vllm: generate the next rollout while this one trains, one rollout off-policy (false)"})
    cosine_min_len_value_wrong: float | None = field(default=None, metadata={"help": "reward cosine (-0.5)"})
    cosine_max_len_value_wrong: float | None = field(default=None, metadata={"help": "reward cosine (0.0)"})
    cosine_min_len_value_correct: float | None = field(default=None, metadata={"help": "reward cosine (1.0)"})
    cosine_max_len_value_correct: float | None = field(default=None, metadata={"help": "reward cosine (0.5)"})
    cosine_max_len: int | None = field(default=None, metadata={"help": "reward cosine (max_completion_length)"})
    repetition_n_grams: int | None = field(default=None, metadata={"help": "reward repetition (3)"})
    repetition_max_penalty: float | None = field(default=None, metadata={"help": "reward repetition (-1.0)"})
    soft_max_length: int | None = field(default=None, metadata={"help": "reward soft_overlong (max_completion_length)"})
    soft_cache_length: int | None = field(default=None, metadata={"help": "reward soft_overlong (required by it)"})
    use_vllm: bool = field(default=False, metadata={
        "help": "grpo: generate with vLLM (--vllm_mode) instead of transformers generate"})
    vllm_mode: str = field(default="colocate", metadata={
        "help": "colocate (a vLLM engine in the training process) or server (the serving service)"})
    vllm_server_host: str | None = field(default=None, metadata={"help": "vllm_mode server: the serving host"})
    vllm_server_port: int = field(default=8000, metadata={
        "help": "vllm_mode server: the serving process's admin gRPC port (`tuneforge deploy --grpc_port`, printed at "
                "its start as `admin gRPC HOST:PORT`), not its HTTP port"})
    vllm_enable_lora: bool | None = field(default=None, metadata={
        "help": "grpo --use_vllm with LoRA: sync the adapter to vLLM (true) or the weights with it merged in (false); "
                "unset: merged in colocate (lora), the adapter in server mode"})
    num_ppo_epochs: int | None = field(default=None, metadata={"help": "ppo: passes over each rollout (4)"})
    num_mini_batches: int | None = field(default=None, metadata={
        "help": "ppo: optimizer steps per pass over a rollout (1)"})
    kl_coef: float | None = field(default=None, metadata={"help": "ppo: weight of the per-token KL penalty (0.05)"})
    cliprange: float | None = field(default=None, metadata={"help": "ppo: clip range of the policy ratio (0.2)"})
    cliprange_value: float | None = field(default=None, metadata={"help": "ppo: clip range of the value (0.2)"})
    vf_coef: float | None = field(default=None, metadata={"help": "ppo: weight of the value loss (0.1)"})
    gamma: float | None = field(default=None, metadata={"help": "ppo: GAE discount (1.0)"})
    lam: float | None = field(default=None, metadata={"help": "ppo: GAE lambda (0.95)"})
    whiten_rewards: bool | None = field(default=None, metadata={"help": "ppo: whiten the per-token rewards (false)"})
    missing_eos_penalty: float | None = field(default=None, metadata={
        "help": "ppo: subtracted from the score of a completion without a stop token (unset: none)"})
    teacher_model: str | None = field(default=None, metadata={
        "help": "gkd: the teacher model directory (required; the student's vocabulary)"})
    teacher_adapters: list[str] | None = field(default=None, metadata={
        "help": "gkd: LoRA adapter directories applied to the teacher"})
    lmbda: float | None = field(default=None, metadata={
        "help": "gkd: share of steps trained on the student's own generations (0.5)"})
    seq_kd: bool | None = field(default=None, metadata={
        "help": "gkd: off-policy steps train on the teacher's generations (false)"})
    sft_alpha: float | None = field(default=None, metadata={
        "help": "gkd: weight of the answers' NLL on steps the student did not generate (0)"})

    REQUIRED = ("dataset", "output_dir", "rlhf_type")

    @property
    def TASK(self) -> str:  # noqa: N802 (SftCommandConfig's class constant, per method here)
        return RLHF_TASKS.get(self.rlhf_type, "preference")

    def __post_init__(self) -> None:
        self.rlhf_arguments_problems: list[str] = []
        if self.rlhf_type in METHOD_CONFIGS:
            name, cls = METHOD_CONFIGS[self.rlhf_type]
            setattr(self, name, self._method_config(cls))
        super().__post_init__()

    def _method_config(self, cls):
        """The method's dataclass from the flags given; flags it does not take are problems."""
        own = {f.name for f in dataclasses.fields(cls)}
        values = {}
        for flag in METHOD_FLAGS:
            value = getattr(self, flag)
            if value is None:
                continue
            if flag not in own:
                self.rlhf_arguments_problems.append(f"{flag}: not an argument of rlhf_type {self.rlhf_type}")
            elif flag == "loss_type" and cls in (CpoConfig, GrpoConfig):
                if len(value) != 1:
                    self.rlhf_arguments_problems.append(f"loss_type: {self.rlhf_type} takes one loss type")
                values[flag] = value[0]
            else:
                values[flag] = value
        return cls(**values)

    def problems(self) -> list[str]:
        # the method's own problems, named by the flag (dpo.beta -> beta)
        prefix = f"{METHOD_CONFIGS[self.rlhf_type][0]}." if self.rlhf_type in METHOD_CONFIGS else None
        return self.rlhf_arguments_problems + [problem.removeprefix(prefix) if prefix else problem
                                               for problem in super().problems()]


def _dataset_problems(name: str, specs: list[str]) -> list[str]:
    from services.dataprep.inputs import split_sample

    # raw files may carry ms-swift's FILE#N (N rows drawn by dataprep); a prepared directory may not
    sampled = {spec: split_sample(spec)[0] for spec in specs}
    missing = [spec for spec, path in sampled.items() if not pathlib.Path(path).exists()]
    if missing:
        return [f"{name}: not found: {', '.join(missing)}"]
    found = [f"{name}: {spec}: a prepared dataset directory cannot be sampled (#N); sample its raw files"
             for spec, path in sampled.items() if spec != path and is_prepared(path)]
    paths = [spec for spec, path in sampled.items() if spec == path]
    prepared = [p for p in paths if is_prepared(p)]
    if prepared and len(specs) > 1:
        found.append(f"{name}: a prepared dataset directory must be given alone, "
                     f"not with other datasets: {', '.join(prepared)}")
    directories = [p for p in paths if pathlib.Path(p).is_dir() and p not in prepared and not _holds_dataset_files(p)]
    if directories:
        found.append(f"{name}: not a prepared dataset (no {PREPARED_MARKER}) and holds no dataset files: "
                     f"{', '.join(directories)}")
    return found


def _holds_dataset_files(directory: str) -> bool:
    """A directory of raw dataset files (dataprep reads every one under it)."""
    from services.dataprep.inputs import file_type

    return any(p.is_file() and file_type(str(p)) for p in pathlib.Path(directory).rglob("*"))


def is_prepared(path: str | pathlib.Path) -> bool:
    return (pathlib.Path(path) / PREPARED_MARKER).is_file()


def is_packed(path: str | pathlib.Path) -> bool:
    """A prepared dataset whose rows were packed (its manifest says how)."""
    try:
        return bool(json.loads((pathlib.Path(path) / PREPARED_MARKER).read_text()).get("packing"))
    except (OSError, ValueError, AttributeError):
        return False


def job_config(command: SftCommandConfig, dataset_dir: str, dataprep_address: str,
               val_dataset_dir: str | None = None) -> TrainConfig:
    """The job the trainer runs: the command's TrainConfig fields, with absolute paths."""
    values = {f.name: getattr(command, f.name) for f in dataclasses.fields(TrainConfig)}
    if command.grpo is not None:  # files the job reads: absolute, as the other paths
        values["grpo"] = dataclasses.replace(
            command.grpo, external_plugins=[str(pathlib.Path(p).resolve()) for p in command.grpo.external_plugins],
            reward_model=[str(pathlib.Path(p).resolve()) for p in command.grpo.reward_model])
    values.update(ref_model=str(pathlib.Path(command.ref_model).resolve()) if command.ref_model else None,
                  adapters=[str(pathlib.Path(p).resolve()) for p in command.adapters],
                  ref_adapters=[str(pathlib.Path(p).resolve()) for p in command.ref_adapters])
    values.update(dataset=str(pathlib.Path(dataset_dir).resolve()), dataprep_address=dataprep_address,
                  val_dataset=str(pathlib.Path(val_dataset_dir).resolve()) if val_dataset_dir else None,
                  output_dir=str(pathlib.Path(command.output_dir).resolve()),
                  model=str(pathlib.Path(command.model).resolve()) if command.model else None,
                  tokenizer=str(pathlib.Path(command.tokenizer).resolve()) if command.tokenizer else None,
                  resume_from_checkpoint=(str(pathlib.Path(command.resume_from_checkpoint).resolve())
                                          if command.resume_from_checkpoint else None))
    if command.deepspeed and command.deepspeed.endswith(".json"):  # a file, not a preset name
        values.update(deepspeed=str(pathlib.Path(command.deepspeed).resolve()))
    return TrainConfig(**values)


@contextlib.contextmanager
def local_dataprep() -> Iterator[str]:
    """A dataprep service in this process on 127.0.0.1; yields its address."""
    from services.dataprep.config import DataprepServerConfig
    from services.dataprep.servicer import DataprepServicer, register

    config = DataprepServerConfig()
    servicer = DataprepServicer(config)
    server, port, _health = create_server("127.0.0.1:0", register(servicer), "dataprep",
                                          config.max_streams, config.unary_threads)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        servicer.shutdown(5)
        server.stop(1).wait()


@contextlib.contextmanager
def local_trainer() -> Iterator[str]:
    """A trainer service in this process on 127.0.0.1 (jobs still train in child
    processes); yields its address. Leaving it cancels a running job, which publishes."""
    from services.trainer.jobs import JobManager
    from services.trainer.servicer import register

    jobs = JobManager(max_concurrent_jobs=1)
    server, port, _health = create_server("127.0.0.1:0", lambda s: register(s, jobs), "trainer")
    try:
        yield f"127.0.0.1:{port}"
    finally:
        jobs.shutdown()
        server.stop(1).wait()


def prepare_config(command: SftCommandConfig, datasets: list[str], output_dir: pathlib.Path):
    """How dataprep prepares the command's raw datasets (sft: chat template; pt: plain text
    + eos, every token trained, cut into blocks or packed)."""
    from services.dataprep.config import PrepareConfig

    corpus = ({"block_size": command.block_size, "drop_last_block": command.drop_last_block,
               "txt_mode": command.txt_mode} if isinstance(command, PtCommandConfig) else {})
    return PrepareConfig(model=command.model, tokenizer=command.tokenizer, dataset=list(datasets),
                         output_dir=str(output_dir),
                         max_length=command.max_length, system=command.system, task=command.TASK,
                         use_chat_template=command.TASK != "pt", packing=command.packing,
                         streaming=command.streaming, **corpus)


def prepare(command: SftCommandConfig, dataprep_address: str, datasets: list[str] | None = None,
            subdir: str = PREPARED_SUBDIR) -> str:
    """The prepared dataset directory for the command's `--dataset` (or `datasets`): given,
    or prepared now into OUTPUT_DIR/`subdir`."""
    datasets = command.dataset if datasets is None else datasets
    if len(datasets) == 1 and is_prepared(datasets[0]):
        return str(pathlib.Path(datasets[0]).resolve())
    from libs.dataset import client as dataprep_client
    from services.dataprep import cli as dataprep_cli

    output_dir = pathlib.Path(command.output_dir).resolve() / subdir
    config = dataprep_cli.absolute(prepare_config(command, datasets, output_dir))
    manifest = dataprep_client.prepare(dataprep_address, config)
    print(dataprep_cli.summary(manifest), file=sys.stderr)
    return str(output_dir)


# The methods' metrics the progress bar shows beside the loss (all are in logging.jsonl).
SHOWN_METRICS = ("rewards/accuracies", "rewards/margins", "accuracy", "kl", "reward")


class ProgressBar:
    """Renders a job's WatchJob events as one tqdm bar over optimizer steps."""

    def __init__(self, desc: str):
        self.desc = desc
        self.bar: tqdm | None = None  # opened when the job reports its step count

    def __call__(self, event: pb.WatchJobResponse) -> None:
        kind = event.WhichOneof("event")
        if kind == "job" and event.job.total_steps and self.bar is None:
            self.bar = tqdm(total=event.job.total_steps, initial=event.job.step, desc=self.desc, unit=" step",
                            file=sys.stderr, dynamic_ncols=True)
        elif kind == "step" and self.bar is not None:
            step = event.step
            self.bar.update(step.step - self.bar.n)
            shown = {name.split("/")[-1]: f"{step.metrics[name]:.3f}" for name in SHOWN_METRICS if name in step.metrics}
            self.bar.set_postfix(loss=f"{step.loss:.4f}", lr=f"{step.learning_rate:.2e}",
                                 tok_s=f"{step.tokens_per_second:.0f}", **shown, refresh=False)
        elif kind == "checkpoint" and self.bar is not None:
            self.bar.write(f"checkpoint {event.checkpoint.path}", file=sys.stderr)
        elif kind == "eval" and self.bar is not None:
            extra = "".join(f", {name} {value:.4f}" for name, value in sorted(event.eval.metrics.items()))
            self.bar.write(f"step {event.eval.step}: eval_loss {event.eval.eval_loss:.4f} over {event.eval.eval_rows} "
                           f"rows{extra}", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_job(address: str, config: TrainConfig, desc: str) -> pb.Job:
    """Submits the job and follows it to its end; Ctrl-C cancels it (it publishes a
    checkpoint at its current step) and waits for that before re-raising."""
    job_id = client.submit(address, config)
    bar = ProgressBar(desc)
    try:
        return client.wait(address, job_id, on_event=bar)
    except KeyboardInterrupt:
        bar.close()
        print(f"cancelling job {job_id}: it publishes a checkpoint at its current step", file=sys.stderr)
        client.cancel(address, job_id)
        client.wait(address, job_id)
        raise
    finally:
        bar.close()


def summary(job: pb.Job) -> str:
    state = pb.JobState.Name(job.state).removeprefix("JOB_STATE_").lower()
    where = f" -> {job.last_checkpoint}" if job.last_checkpoint else ""
    return f"job {job.id} {state} after {job.step}/{job.total_steps} steps{where}"


def run_command(command: SftCommandConfig, desc: str) -> int:
    channels.configure(command.tls_ca, command.tls_client_cert, command.tls_client_key)
    if channels.credentials() is not None and not (command.dataprep_address and command.trainer_address):
        # the in-process services have no certificate; a TLS client would find plaintext there
        raise FailedPrecondition("the dataprep and trainer this command starts in-process (without "
                                 "--dataprep_address / --trainer_address) serve plaintext on 127.0.0.1; give both "
                                 "addresses of services that serve TLS, or leave tls_ca and TUNEFORGE_TLS_CA unset",
                                 field="tls_ca")
    with contextlib.ExitStack() as services:
        dataprep_address = command.dataprep_address or services.enter_context(local_dataprep())
        dataset_dir = prepare(command, dataprep_address)
        val_dir = (prepare(command, dataprep_address, command.val_dataset, PREPARED_VAL_SUBDIR)
                   if command.val_dataset else None)
        trainer_address = command.trainer_address or services.enter_context(local_trainer())
        job = run_job(trainer_address, job_config(command, dataset_dir, dataprep_address, val_dir), desc=desc)
    print(summary(job))
    return 0 if job.state == pb.JOB_STATE_SUCCEEDED else 1


def with_launch_environment(argv: list[str]) -> list[str]:
    """ms-swift's NPROC_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT as flags
    before the user's (a flag given on the command line wins): the job then runs under
    torchrun in the trainer's training process (services.trainer.launch)."""
    from services.trainer import launch

    return [arg for name, value in launch.from_environment().items() for arg in (f"--{name}", value)] + list(argv)


def main(argv: list[str]) -> int:
    return run_command(cfg.parse(SftCommandConfig, with_launch_environment(argv), prog="tuneforge sft"), desc="sft")


def rlhf_main(argv: list[str]) -> int:
    command = cfg.parse(RlhfCommandConfig, with_launch_environment(argv), prog="tuneforge rlhf")
    return run_command(command, desc=command.rlhf_type)


def pt_main(argv: list[str]) -> int:
    return run_command(cfg.parse(PtCommandConfig, with_launch_environment(argv), prog="tuneforge pt"), desc="pt")
