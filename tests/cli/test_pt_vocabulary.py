"""`--tokenizer` with an extended vocabulary (the Chinese-LLaMA recipe): dataprep tokenizes with it,
the trainer resizes the embeddings and head before LoRA with modules_to_save embed_tokens,lm_head,
checkpoints carry the tokenizer, and `export --merge_lora` writes a model of the new vocabulary."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
import torch
from pyarrow import ipc
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from cli import train as cli
from cli.main import main as tuneforge
from libs.common import config as cfg
from libs.common.errors import Problems
from libs.default_model.resolve import resolve_model

NEW_WORDS = ["zorblaxian", "quuxotic", "flimbrel"]


@pytest.fixture(scope="module")
def extended_tokenizer(tmp_path_factory):
    """The default model's tokenizer with three new words as single tokens."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None))
    base = len(tokenizer)
    assert tokenizer.add_tokens(NEW_WORDS) == len(NEW_WORDS)
    out = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(out)
    return out, base


def test_lora_with_a_larger_vocabulary_must_train_embeddings_and_head_whole(tmp_path, extended_tokenizer):
    tokenizer_dir, base = extended_tokenizer
    (tmp_path / "c.jsonl").write_text('{"text": "hello"}\n')
    args = ["--dataset", str(tmp_path / "c.jsonl"), "--output_dir", str(tmp_path / "run"), "--tokenizer",
            str(tokenizer_dir), "--train_type", "lora"]
    with pytest.raises(Problems) as info:
        cfg.parse(cli.PtCommandConfig, args)
    assert (f"tokenizer: its {base + 3} tokens resize the model's {base}-row embeddings and output head; with "
            "train_type lora the new rows are trained only as whole modules: add --modules_to_save embed_tokens "
            "lm_head") in str(info.value)
    cfg.parse(cli.PtCommandConfig, args + ["--modules_to_save", "embed_tokens", "lm_head"])  # accepted
    cfg.parse(cli.PtCommandConfig, args[:-2] + ["--train_type", "full"])  # full trains every row anyway
    with pytest.raises(Problems, match="tokenizer: .*/missing: no such directory"):
        cfg.parse(cli.PtCommandConfig, args[:5] + [str(tmp_path / "missing")])


def test_run_clms_tokenizer_name_or_path_is_read_as_tokenizer(tmp_path, extended_tokenizer, capsys):
    tokenizer_dir, _base = extended_tokenizer
    (tmp_path / "c.txt").write_text("hello")
    args = ["--dataset", str(tmp_path / "c.txt"), "--output_dir", str(tmp_path / "run"), "--train_type", "lora",
            "--modules_to_save", "embed_tokens", "lm_head"]
    config = cfg.parse(cli.PtCommandConfig, args + ["--tokenizer_name_or_path", str(tokenizer_dir)], prog="tuneforge pt")
    assert config.tokenizer == str(tokenizer_dir)
    assert capsys.readouterr().err.splitlines() == [
        f"tuneforge pt: note: --tokenizer_name_or_path is run_clm's name for --tokenizer: read as --tokenizer "
        f"{tokenizer_dir}"]
    with pytest.raises(Problems) as info:
        cfg.parse(cli.PtCommandConfig, args + ["--tokenizer_name_or_path", str(tokenizer_dir), "--tokenizer",
                                               str(tmp_path)], prog="tuneforge pt")
    assert (f"--tokenizer_name_or_path {tokenizer_dir} and --tokenizer {tmp_path} disagree (--tokenizer_name_or_path "
            "is run_clm's name for --tokenizer); give one") in str(info.value)


@pytest.mark.slow
def test_pt_with_an_extended_tokenizer_trains_new_rows_and_merges_to_the_new_vocabulary(
        tmp_path, extended_tokenizer, capsys):
    tokenizer_dir, base = extended_tokenizer
    texts = [f"The {w} word is new, and {w} appears twice." for w in NEW_WORDS] * 4
    raw = tmp_path / "corpus.jsonl"
    raw.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    run = tmp_path / "run"
    code = tuneforge(["pt", "--dataset", str(raw), "--output_dir", str(run), "--tokenizer", str(tokenizer_dir),
                      "--train_type", "lora", "--modules_to_save", "embed_tokens", "lm_head",
                      "--max_steps", "3", "--save_steps", "3", "--learning_rate", "1e-2", "--max_length", "64"])
    _out, err = capsys.readouterr()
    assert code == 0, err
    new_ids = AutoTokenizer.from_pretrained(tokenizer_dir).convert_tokens_to_ids(NEW_WORDS)
    assert new_ids == [base, base + 1, base + 2]
    table = pa.concat_tables([ipc.open_file(p).read_all() for p in sorted((run / cli.PREPARED_SUBDIR).glob("*.arrow"))])
    seen = {t for row in table.column("input_ids").to_pylist() for t in row}
    assert set(new_ids) <= seen  # dataprep tokenized with the extended tokenizer

    checkpoint_dir = run / "checkpoint-3"
    assert len(AutoTokenizer.from_pretrained(checkpoint_dir)) == base + 3  # the tokenizer travels with it
    weights = load_file(checkpoint_dir / "adapter_model.safetensors")
    embed = next(t for k, t in weights.items() if "embed_tokens" in k)
    head = next(t for k, t in weights.items() if "lm_head" in k)
    assert embed.shape[0] == head.shape[0] == base + 3
    original = AutoModelForCausalLM.from_pretrained(resolve_model(None)).get_input_embeddings().weight
    assert not torch.equal(embed[:base], original)  # trained whole

    merged = tmp_path / "merged"
    assert tuneforge(["export", "--adapters", str(checkpoint_dir), "--merge_lora", "true",
                      "--output_dir", str(merged)]) == 0, capsys.readouterr().err
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert model.get_input_embeddings().weight.shape[0] == base + 3
    assert json.loads((merged / "config.json").read_text())["vocab_size"] == base + 3
    assert torch.equal(model.get_input_embeddings().weight, embed.float())
    assert len(AutoTokenizer.from_pretrained(merged)) == base + 3
