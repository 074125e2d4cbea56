"""Configs of the dataprep entrypoints: one preparation, the `prepare` command, the server."""

from __future__ import annotations

from dataclasses import dataclass, field

from libs.common import paths
from libs.common.server import ServerOptions
from services.dataprep.formats import FORMATS, TASKS, parse_columns
from services.dataprep.inputs import TXT_MODES
from services.dataprep.templates import NAMES as TEMPLATE_NAMES
from services.dataprep.loss_scale import LOSS_SCALES

ENGINES = ("local", "ray")


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass
class PrepareConfig:
    """One preparation: dataset rows in, tokenized Arrow shards out. Flag names are
    ms-swift's (`--model`, `--dataset`, `--max_length`, `--truncation_strategy`,
    `--system`, `--loss_scale`, `--columns`, `--data_seed`; run_clm's `--block_size`)."""

    model: str | None = field(default=None, metadata={
        "help": "model directory whose tokenizer and chat template are used; unset means the embedded default model"})
    tokenizer: str | None = field(default=None, metadata={
        "help": "tokenizer directory used instead of the model's (an extended vocabulary; run_clm's "
                "--tokenizer_name_or_path); its chat template renders the rows"})
    dataset: list[str] = field(default_factory=list, metadata={
        "help": "dataset files (.jsonl, .json array, .csv, .parquet, .txt; .jsonl and .txt also as .gz or .zst), "
                "directories or globs of them; PATH#N samples N rows (seeded by --data_seed); row formats: "
                "docs/dataset-format.md"})
    output_dir: str = field(default="", metadata={
        "help": "directory receiving shard-NNNNN.arrow, rejects.jsonl and manifest.json (our files there are replaced)"})
    max_length: int = field(default=2048, metadata={
        "help": "longest tokenized row, in tokens; longer rows follow --truncation_strategy; 0 means no limit "
                "(task pt: the block size unless --block_size is given; with --packing, where documents are split)"})
    truncation_strategy: str = field(default="delete", metadata={
        "help": "rows longer than max_length: delete (rejected, reason too_long), left (drop their first tokens) "
                "or right (drop their last tokens); task pt never truncates", "choices": ["delete", "left", "right"]})
    system: str | None = field(default=None, metadata={
        "help": "system prompt inserted in rows that do not start with a system message"})
    loss_scale: str = field(default="default", metadata={
        "help": "tokens that train: default (every assistant turn), last_round (the assistant turns after the last "
                "user turn) or all (every token); a message's own loss wins; tool responses never train",
        "choices": list(LOSS_SCALES)})
    columns: str | None = field(default=None, metadata={
        "help": "JSON object renaming row columns before format detection, e.g. '{\"q\": \"query\", \"a\": \"response\"}'"})
    task: str = field(default="auto", metadata={
        "help": "what the rows train: sft, pt (plain text + eos, every token trained), preference (chosen/rejected "
                "pairs), reward (pairs with an optional margin), kto (rows with a true/false label), prompt (prompts "
                "for GRPO/PPO, extra columns kept); auto takes the kind most of the first 256 valid rows have",
        "choices": list(TASKS)})
    format: str = field(default="auto", metadata={
        "help": "row format: messages, sharegpt, alpaca, query_response or text; auto detects it per row",
        "choices": list(FORMATS)})
    template: str | None = field(default=None, metadata={
        "help": "built-in chat template replacing the model's own: " + ", ".join(TEMPLATE_NAMES)
                + "; unset uses the model's own Jinja template"})
    use_chat_template: bool = field(default=True, metadata={
        "help": "false: no chat template, a row's texts are concatenated and end with eos (what `tuneforge pt` uses)"})
    data_seed: int = field(default=42, metadata={"help": "seed of PATH#N sampling"})
    shard_rows: int = field(default=1000, metadata={"help": "rows per shard file"})
    packing: bool = field(default=False, metadata={
        "help": "pack rows into rows of at most max_length tokens (best-fit-decreasing); packed rows carry "
                "position_ids restarting at 0 per sample and seq_lens (docs/dataset-format.md)"})
    streaming: bool = field(default=False, metadata={
        "help": "bounded memory whatever the dataset size: packing works on windows of rows instead of the "
                "whole dataset"})
    num_proc: int = field(default=1, metadata={
        "help": "processes tokenizing in parallel, each on one core: the cores to use (--engine ray without "
                "--ray_address: the CPUs of the local Ray runtime); the output is identical whatever the number"})
    engine: str = field(default="local", metadata={
        "help": "where rows are decoded and tokenized: local (this process, or --num_proc workers) or ray (Ray Data "
                "tasks; packing and shard writing stay here); the output is byte-identical either way",
        "choices": list(ENGINES)})
    ray_address: str | None = field(default=None, metadata={
        "help": "--engine ray: address of an existing Ray cluster (host:port of its head, or 'auto'); unset starts "
                "a local Ray runtime for this preparation"})
    block_size: int | None = field(default=None, metadata={
        "help": "task pt without packing: the documents' tokens, each document ending in eos, are joined and cut "
                "into rows of this many tokens (run_clm's group_texts); unset means max_length"})
    drop_last_block: bool = field(default=True, metadata={
        "help": "task pt without packing: drop the last block when it is shorter than block_size (as run_clm; "
                "counted in the manifest's pt.tokens_dropped), or keep it as a shorter row (false)"})
    txt_mode: str = field(default="file", metadata={
        "help": "a .txt file is one document (file) or holds one document per non-blank line (line)",
        "choices": list(TXT_MODES)})

    @property
    def pt_block_size(self) -> int:
        """The length of a pt block: --block_size, else max_length."""
        return self.block_size if self.block_size is not None else self.max_length

    def problems(self) -> list[str]:
        found = []
        if not self.dataset:
            found.append("dataset: at least one dataset file is required")
        if not self.output_dir:
            found.append("output_dir: required")
        if self.system is not None and not _utf8(self.system):
            found.append("system: not UTF-8 text (a lone surrogate, e.g. from an argument that is not UTF-8)")
        if self.max_length < 0:
            found.append(f"max_length: expected 0 (no limit) or a positive number; got {self.max_length}")
        try:
            parse_columns(self.columns)
        except ValueError as exc:
            found.append(f"columns: {exc}")
        if self.task not in TASKS:
            found.append(f"task: expected one of {', '.join(TASKS)}; got {self.task!r}")
        if self.format not in FORMATS:
            found.append(f"format: expected one of {', '.join(FORMATS)}; got {self.format!r}")
        if self.template is not None and self.template not in TEMPLATE_NAMES:
            found.append(f"template: unknown template {self.template!r}; built-in templates: "
                         f"{', '.join(TEMPLATE_NAMES)}")
        if self.shard_rows < 1:
            found.append(f"shard_rows: expected a positive number; got {self.shard_rows}")
        if self.packing and self.max_length == 0:
            found.append("packing: needs max_length > 0 (the length of a packed row)")
        if self.num_proc < 1:
            found.append(f"num_proc: expected a positive number; got {self.num_proc}")
        if self.engine not in ENGINES:
            found.append(f"engine: expected one of {', '.join(ENGINES)}; got {self.engine!r}")
        if self.ray_address is not None and self.engine != "ray":
            found.append("ray_address: only --engine ray runs on a Ray cluster; add --engine ray")
        found.extend(self.corpus_problems())
        found.extend(paths.problems({"model": self.model, "tokenizer": self.tokenizer, "dataset": self.dataset,
                                     "output_dir": self.output_dir}))
        return found

    def corpus_problems(self) -> list[str]:
        """The problems of the pt and .txt flags (also checked by `tuneforge pt` as it parses)."""
        found = []
        if self.txt_mode not in TXT_MODES:
            found.append(f"txt_mode: expected one of {', '.join(TXT_MODES)}; got {self.txt_mode!r}")
        if self.block_size is not None:
            if self.block_size < 1:
                found.append(f"block_size: expected a positive number; got {self.block_size}")
            elif self.task != "pt":
                found.append("block_size: only --task pt groups text into blocks")
            elif self.packing:
                found.append("block_size: with --packing true, pt text is split at max_length and packed; "
                             "leave block_size unset")
        elif self.task == "pt" and not self.packing and self.max_length == 0:
            found.append("block_size: task pt cuts text into blocks; give --block_size (or --max_length > 0)")
        if self.task == "pt" and self.truncation_strategy != "delete":
            found.append("truncation_strategy: task pt never truncates (text is cut into blocks, or split to "
                         "pack); leave it unset")
        return found


@dataclass
class PrepareCommandConfig(PrepareConfig):
    """`tuneforge prepare`: a preparation, run in this process or through a dataprep service."""

    dataprep_address: str | None = field(default=None, metadata={
        "help": "host:port of a dataprep service to run the preparation on; unset runs it in this process"})


@dataclass
class DataprepServerConfig(ServerOptions):
    """`tuneforge serve dataprep`."""

    # Training holds one ReadShards per rank for a whole epoch: 2 epochs x 32 ranks, their eval
    # reads and the watchers of preparations fit, at the cost of a thread per open stream.
    max_streams: int = field(default=128, metadata={
        "help": "ReadShards and WatchPreparation streams served at once, each holding a server thread for its "
                "life; one more fails at once with RESOURCE_EXHAUSTED naming this flag"})
    max_concurrent: int = field(default=1, metadata={
        "help": "preparations running at once; more wait in state PENDING (tokenizing is CPU-bound)"})
    max_pending: int = field(default=16, metadata={
        "help": "preparations waiting to run; PrepareDataset beyond this fails with RESOURCE_EXHAUSTED"})
    keep_finished: int = field(default=256, metadata={
        "help": "finished preparations remembered for Get/Watch; the oldest are forgotten first"})

    def problems(self) -> list[str]:
        found = super().problems()
        for name in ("max_concurrent", "keep_finished"):
            if getattr(self, name) < 1:
                found.append(f"{name}: expected a positive number; got {getattr(self, name)}")
        if self.max_pending < 0:
            found.append(f"max_pending: expected 0 or more; got {self.max_pending}")
        return found
