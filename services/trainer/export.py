"""`tuneforge export --adapters DIR --merge_lora true` (ms-swift's `swift export`): merges a
LoRA adapter into its base model and publishes the result, atomically and with a sha256
manifest, as a standalone Hugging Face model directory (safetensors, config,
generation_config, tokenizer with its chat template, args.json) that transformers and vLLM
load without PEFT. A reward model's adapter (PEFT task_type SEQ_CLS, its head trained whole
beside it) merges into a sequence-classification model directory that
AutoModelForSequenceClassification loads as it is."""

from __future__ import annotations

import json
import pathlib
import sys
from dataclasses import asdict, dataclass, field

from tqdm import tqdm

from libs.common import checkpoint
from libs.common import config as cfg
from libs.common.errors import FailedPrecondition, InvalidArgument, TuneForgeError
from libs.common import adapter_dir
from services.trainer import vocabulary

DTYPES = ("float32", "bfloat16", "float16")
# config.json fields that decide the weights' shapes: two bases that differ in one of them
# cannot take the same adapter.
SHAPE_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size")
MERGED_SUFFIX = "-merged"


@dataclass
class ExportConfig:
    """Merge one LoRA adapter into its base model and write the merged model directory."""

    adapters: list[str] = field(default_factory=list, metadata={
        "help": "the LoRA adapter: an adapter directory, or a run directory (its newest checkpoint)"})
    merge_lora: bool = field(default=False, metadata={
        "help": "merge the adapter into the base weights (the only export this command does; pass true)"})
    model: str | None = field(default=None, metadata={
        "help": "base model directory; unset: the adapter's args.json `model`, as ms-swift reads it"})
    output_dir: str | None = field(default=None, metadata={
        "help": "where the merged model goes (must not exist); unset: ADAPTER_DIR-merged"})
    torch_dtype: str | None = field(default=None, metadata={
        "help": "dtype of the saved weights (merging is always done in float32); unset: the base model's",
        "choices": list(DTYPES)})
    max_shard_size: str = field(default="5GB", metadata={"help": "largest safetensors file before sharding"})

    def problems(self) -> list[str]:
        found = []
        if len(self.adapters) != 1:
            found.append(f"adapters: give exactly one adapter directory; got {len(self.adapters)}")
        if not self.merge_lora:
            found.append("merge_lora: export only merges LoRA adapters for now; pass --merge_lora true")
        return found


@dataclass(frozen=True)
class Plan:
    """What an export reads and writes, resolved and checked before any weight is loaded."""

    adapter: pathlib.Path  # the adapter directory itself
    base: pathlib.Path  # the base model directory
    output: pathlib.Path
    torch_dtype: str


def _config_json(model_dir: pathlib.Path) -> dict:
    try:
        return json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FailedPrecondition(f"{model_dir / 'config.json'} is not readable JSON: {exc}", field="model") from exc


def _shape_differences(a: dict, b: dict) -> list[str]:
    return [f"{name} {a.get(name)} != {b.get(name)}" for name in SHAPE_FIELDS if a.get(name) != b.get(name)]


def plan(config: ExportConfig) -> Plan:
    """Resolves the adapter, base model and output; every user mistake found here is a
    TuneForgeError naming its flag."""
    from libs.default_model.resolve import resolve_model

    info = adapter_dir.inspect(config.adapters[0], field="adapters")
    adapter_config = json.loads((info.path / adapter_dir.ADAPTER_CONFIG).read_text())
    if adapter_config.get("peft_type", "LORA") != "LORA":
        raise InvalidArgument(f"{info.path} holds a {adapter_config['peft_type']} adapter; only LoRA merges",
                              field="adapters")
    if info.has_manifest:
        checkpoint.verify(info.path)
    if config.model is not None:
        base = resolve_model(config.model)
        recorded = adapter_dir.normalize(info.base_model) if info.base_model else None
        if recorded is not None and recorded != base and (recorded / "config.json").is_file():
            differences = _shape_differences(_config_json(recorded), _config_json(base))
            if differences:
                raise InvalidArgument(f"{info.path} was trained on {recorded}, whose shapes differ from {base} "
                                      f"({'; '.join(differences)})", field="model")
    elif info.base_model is None:
        raise InvalidArgument(f"{info.path} records no base model (no `model` in args.json, no "
                              "base_model_name_or_path in adapter_config.json); give --model", field="model")
    else:
        try:
            base = resolve_model(str(adapter_dir.normalize(info.base_model)))
        except TuneForgeError as exc:
            raise FailedPrecondition(f"base model {info.base_model} recorded by {info.path} is not usable: "
                                     f"{exc.message}; give --model", field="model") from exc
    output = pathlib.Path(config.output_dir or f"{info.path}{MERGED_SUFFIX}").expanduser().resolve()
    if output.exists():
        raise FailedPrecondition(f"{output} already exists; remove it or choose another --output_dir",
                                 field="output_dir")
    dtype = config.torch_dtype or str(_config_json(base).get("dtype") or _config_json(base).get("torch_dtype")
                                      or "float32")
    if dtype not in DTYPES:
        raise InvalidArgument(f"{base} stores weights as {dtype}; give --torch_dtype one of {', '.join(DTYPES)}",
                              field="torch_dtype")
    return Plan(adapter=info.path, base=base, output=output, torch_dtype=dtype)


def load_adapted(plan: Plan):
    """The base model in float32 with the adapter's weights in place (a PeftModel). An
    adapter that does not fit the base (other module names or shapes) is an InvalidArgument."""
    import torch
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    lora = LoraConfig.from_pretrained(plan.adapter)
    lora.inference_mode = True
    weights_file = plan.adapter / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise FailedPrecondition(f"{plan.adapter} has no adapter_model.safetensors", field="adapters")
    weights = load_file(weights_file)
    mismatch = f"{plan.adapter} does not fit base model {plan.base}"
    if is_classifier(lora):
        base = _classifier_base(plan, weights, mismatch)
    else:
        base = AutoModelForCausalLM.from_pretrained(plan.base, dtype=torch.float32)
    if _tokenizer_source(plan) != plan.base:  # trained with --tokenizer: the base gets its rows first
        vocabulary.fit(base, len(vocabulary.load(str(plan.adapter), plan.base)))
    try:
        model = get_peft_model(base, lora)
        loaded = set_peft_model_state_dict(model, weights)
    except (ValueError, RuntimeError) as exc:  # peft: unknown target modules; torch: size mismatch
        first = str(exc).strip().splitlines()
        detail = next((line.strip() for line in first if "size mismatch" in line), first[0] if first else "")
        raise InvalidArgument(f"{mismatch}: {detail}", field="adapters") from exc
    missing = [key for key in loaded.missing_keys if "lora_" in key]
    if loaded.unexpected_keys or missing:
        keys = (loaded.unexpected_keys or missing)[:3]
        raise InvalidArgument(f"{mismatch}: {'unexpected' if loaded.unexpected_keys else 'missing'} "
                              f"{', '.join(keys)}", field="adapters")
    return model.eval()


def is_classifier(lora) -> bool:
    """A sequence-classification adapter (a reward model: tuneforge rlhf --rlhf_type rm)."""
    return lora.task_type == "SEQ_CLS"  # a str, or peft's TaskType (a str enum)


def _classifier_base(plan: Plan, weights: dict, mismatch: str):
    """The base as a sequence-classification model with as many labels as the adapter's head
    has rows, and the pad token id it pools by (transformers: the last token that is not
    padding)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    heads = [tensor for key, tensor in weights.items() if key.endswith(".score.weight")]
    if len(heads) != 1:
        raise InvalidArgument(f"{plan.adapter} is a sequence-classification adapter without its `score` head "
                              "(modules_to_save)", field="adapters")
    tokenizer = AutoTokenizer.from_pretrained(_tokenizer_source(plan))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            plan.base, dtype=torch.float32, num_labels=heads[0].shape[0], pad_token_id=pad_id)
    except ValueError as exc:  # no sequence-classification class for the base's architecture
        raise InvalidArgument(f"{mismatch}: {str(exc).splitlines()[0]}", field="adapters") from exc


def _tokenizer_source(plan: Plan) -> pathlib.Path:
    """An adapter saved with its own tokenizer (added tokens, new chat template) wins."""
    return plan.adapter if (plan.adapter / "tokenizer_config.json").is_file() else plan.base


def export(config: ExportConfig) -> pathlib.Path:
    """Runs the export; returns the published merged model directory."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig

    from services.trainer.checkpointing import git_revision, package_versions

    resolved = plan(config)
    stages = tqdm(total=4, desc="export", unit=" stage", file=sys.stderr, dynamic_ncols=True)
    try:
        stages.set_postfix_str("load base + adapter")
        model = load_adapted(resolved)
        stages.update()
        stages.set_postfix_str("merge")
        with torch.no_grad():
            merged = model.merge_and_unload(progressbar=True, safe_merge=True)
        merged = merged.to(getattr(torch, resolved.torch_dtype))
        stages.update()
        stages.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(_tokenizer_source(resolved))
        stages.update()
        stages.set_postfix_str(f"write {resolved.output.name}")
        args = {**asdict(config), "adapters": [str(resolved.adapter)], "model": str(resolved.base),
                "output_dir": str(resolved.output), "torch_dtype": resolved.torch_dtype,
                "versions": package_versions(), "git_revision": git_revision()}
        adapter_args = resolved.adapter / adapter_dir.ARGS
        if adapter_args.is_file():
            args["adapter_args"] = json.loads(adapter_args.read_text())

        def build(tmp: pathlib.Path) -> None:
            merged.save_pretrained(tmp, max_shard_size=config.max_shard_size)
            tokenizer.save_pretrained(tmp)
            generates = not is_classifier(model.peft_config["default"])  # a reward model scores, it does not generate
            if generates and not (tmp / "generation_config.json").is_file():
                GenerationConfig.from_model_config(merged.config).save_pretrained(tmp)
            (tmp / "args.json").write_text(json.dumps(args, indent=2, sort_keys=True, default=str) + "\n")

        path = checkpoint.publish(resolved.output, build)
        stages.update()
    except BaseException:
        stages.leave = False  # erase the bar: the error line that follows stands alone
        raise
    finally:
        stages.close()
    return path


def main(argv: list[str]) -> int:
    config = cfg.parse(ExportConfig, argv, prog="tuneforge export")
    path = export(config)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
