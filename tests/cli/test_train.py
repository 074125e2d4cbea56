"""`tuneforge sft` end to end: raw JSONL prepared through an in-process dataprep and trained
by an in-process trainer; full training through given real services, publishing a Hugging
Face model directory with its tokenizer; user errors as one line each, exit 2."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import pyarrow as pa
from pyarrow import ipc

from cli.main import main as tuneforge
from libs.common import config as cfg
from libs.common.errors import Problems
from libs.common import checkpoint
from cli import train as cli


def write_raw(path, answer):
    questions = ["who are you?", "What is your name?", "Introduce yourself.", "Who made you?"]
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": answer}]}) + "\n"
                            for q in questions))
    return path


@pytest.mark.slow
def test_sft_prepares_raw_data_and_trains_with_in_process_services(tmp_path, capsys):
    raw = write_raw(tmp_path / "raw.jsonl", "I am Ada.")
    run = tmp_path / "run"
    code = tuneforge(["sft", "--dataset", str(raw), "--output_dir", str(run), "--max_steps", "3",
                      "--save_steps", "2", "--lora_rank", "4"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert (run / cli.PREPARED_SUBDIR / "manifest.json").is_file()
    assert "prepared 4 rows: 4 kept" in err
    assert "sft" in err and "3/3" in err  # the progress bar reached the end
    assert [p.name for p in checkpoint.checkpoints(run)] == ["checkpoint-2", "checkpoint-3"]
    final = run / "checkpoint-3"
    checkpoint.verify(final)
    assert (final / "adapter_model.safetensors").is_file()
    assert out.strip().endswith(f"after 3/3 steps -> {final}")
    assert json.loads((final / "args.json").read_text())["dataset"] == str(run / cli.PREPARED_SUBDIR)


@pytest.mark.slow
def test_full_sft_publishes_a_hugging_face_model_with_its_tokenizer(trainer, prepared_dataset, dataprep_address,
                                                                     default_model, tmp_path, capsys):
    run = tmp_path / "full"
    flags = ["sft", "--dataset", prepared_dataset, "--output_dir", str(run), "--train_type", "full",
             "--max_steps", "2", "--save_steps", "1", "--learning_rate", "1e-3", "--trainer_address", trainer.address,
             "--dataprep_address", dataprep_address]
    code = tuneforge(flags)
    _out, err = capsys.readouterr()
    assert code == 0, err
    final = run / "checkpoint-2"
    uninterrupted = (run / "logging.jsonl").read_text()
    weights = (final / "model.safetensors").read_bytes()
    # a full run resumes exactly too: from checkpoint-1, the same step 2, bit for bit
    code = tuneforge(flags + ["--resume_from_checkpoint", str(run / "checkpoint-1")])
    assert code == 0, capsys.readouterr().err
    assert (run / "logging.jsonl").read_text().splitlines()[0] == uninterrupted.splitlines()[0]
    resumed = [json.loads(line) for line in (run / "logging.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in uninterrupted.splitlines()]
    assert [(e["step"], e["loss"], e["grad_norm"]) for e in resumed] == [(e["step"], e["loss"], e["grad_norm"])
                                                                         for e in expected]
    assert (final / "model.safetensors").read_bytes() == weights
    checkpoint.verify(final)
    assert not (final / "adapter_config.json").exists()
    assert json.loads((final / "args.json").read_text())["train_type"] == "full"
    # a model directory on its own: weights, config and tokenizer with its chat template
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(default_model).chat_template
    trained = AutoModelForCausalLM.from_pretrained(final)
    base = AutoModelForCausalLM.from_pretrained(default_model)
    changed = [name for name, p in trained.state_dict().items() if not torch.equal(p, base.state_dict()[name])]
    # every kind of weight trained, not only adapted projections
    assert any("norm" in name for name in changed) and any("embed_tokens" in name for name in changed)
    # serving hot-loads adapters only: a full checkpoint is announced without an adapter name
    published = [e for e in trainer.jobs.watch_checkpoints(only_new=False, is_active=lambda: False)
                 if e.path == str(final)]
    assert published and published[0].adapter_name == ""


def test_user_errors_are_one_line_each_and_exit_2(tmp_path, capsys):
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "manifest.json").write_text("{}")
    code = tuneforge(["sft", "--dataset", str(prepared), str(tmp_path / "raw.jsonl"), "--output_dir",
                      str(tmp_path / "run"), "--train_type", "full", "--quant_bits", "4", "--lora_rank", "0", "--max_lenght", "9"])
    _out, err = capsys.readouterr()
    assert code == 2
    lines = err.strip().splitlines()
    assert all(line.startswith("tuneforge sft: error: ") for line in lines), lines
    for expected in ("unknown flag --max_lenght (did you mean 'max_length'?)", "quant_bits: 4-bit weights cannot be fully fine-tuned",
                     "lora_rank: must be positive", f"dataset: not found: {tmp_path / 'raw.jsonl'}"):
        assert any(expected in line for line in lines), (expected, lines)
    code = tuneforge(["sft", "--dataset", str(prepared), str(prepared), "--output_dir", str(tmp_path / "run")])
    assert code == 2 and "must be given alone" in capsys.readouterr().err


def test_pt_prepares_plain_text_with_every_token_trained_and_sft_flags_reach_dataprep(tmp_path):
    (tmp_path / "manifest.json").write_text('{"packing": {"max_length": 64}}')  # a packed prepared dataset
    pt = cfg.parse(cli.PtCommandConfig, ["--dataset", str(tmp_path), "--output_dir", str(tmp_path / "run"),
                                         "--packing", "true", "--streaming", "true", "--max_length", "64"])
    assert pt.train_type == "full"  # as swift pt
    prepare = cli.prepare_config(pt, ["a.jsonl"], tmp_path / "out")
    assert (prepare.task, prepare.use_chat_template, prepare.packing, prepare.streaming, prepare.max_length) == (
        "pt", False, True, True, 64)
    sft = cfg.parse(cli.SftCommandConfig, ["--dataset", str(tmp_path), "--output_dir", str(tmp_path / "run")])
    prepare = cli.prepare_config(sft, ["a.jsonl"], tmp_path / "out")
    assert (prepare.task, prepare.use_chat_template, prepare.packing) == ("sft", True, False)
    with pytest.raises(Problems, match="packing: needs max_length > 0"):
        cfg.parse(cli.PtCommandConfig, ["--dataset", str(tmp_path), "--output_dir", str(tmp_path / "r"),
                                        "--packing", "true", "--max_length", "0"])
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(Problems, match="was prepared without packing"):
        cfg.parse(cli.SftCommandConfig, ["--dataset", str(tmp_path), "--output_dir", str(tmp_path / "r"),
                                         "--packing", "true"])
    with pytest.raises(Problems, match="val_dataset: not found"):
        cfg.parse(cli.SftCommandConfig, ["--dataset", str(tmp_path), "--output_dir", str(tmp_path / "r"),
                                         "--val_dataset", str(tmp_path / "missing.jsonl")])


def test_pt_corpus_flags_reach_dataprep_and_are_checked_as_they_parse(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt.gz").write_bytes(b"")  # a raw directory: a dataset, as dataprep reads it
    pt = cfg.parse(cli.PtCommandConfig, ["--dataset", str(tmp_path / "corpus"), "--output_dir", str(tmp_path / "run"),
                                         "--block_size", "128", "--drop_last_block", "false", "--txt_mode", "line"])
    prepare = cli.prepare_config(pt, pt.dataset, tmp_path / "out")
    assert (prepare.task, prepare.block_size, prepare.drop_last_block, prepare.txt_mode) == ("pt", 128, False, "line")
    sft = cfg.parse(cli.SftCommandConfig, ["--dataset", str(tmp_path / "corpus"), "--output_dir", str(tmp_path / "r")])
    assert (cli.prepare_config(sft, sft.dataset, tmp_path / "o").block_size, sft.packing) == (None, False)
    with pytest.raises(Problems) as error:
        cfg.parse(cli.PtCommandConfig, ["--dataset", str(tmp_path), "--output_dir", str(tmp_path / "r"),
                                        "--block_size", "64", "--packing", "true"])
    assert "block_size: with --packing true, pt text is split at max_length and packed" in str(error.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(Problems, match=r"not a prepared dataset \(no manifest.json\) and holds no dataset files"):
        cfg.parse(cli.PtCommandConfig, ["--dataset", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "r")])


@pytest.mark.slow
def test_pt_trains_blocks_of_a_txt_corpus_whose_long_document_was_once_rejected(tmp_path, capsys):
    """A document far longer than --max_length (`tuneforge pt` used to reject it: "every row was
    rejected") is cut into block_size blocks with the others and trains; nothing is dropped."""
    corpus = tmp_path / "corpus"
    (corpus / "more").mkdir(parents=True)
    (corpus / "long.txt").write_text(" ".join(["Ada is an assistant developed by Bo."] * 40))
    (corpus / "more" / "short.txt").write_text("Bo built Ada to answer questions.\n")
    run = tmp_path / "run"
    code = tuneforge(["pt", "--dataset", str(corpus), "--output_dir", str(run), "--max_length", "32",
                      "--block_size", "32", "--drop_last_block", "false", "--max_steps", "3", "--save_steps", "3",
                      "--per_device_train_batch_size", "2", "--learning_rate", "1e-3"])
    _out, err = capsys.readouterr()
    assert code == 0, err
    manifest = json.loads((run / cli.PREPARED_SUBDIR / "manifest.json").read_text())
    assert manifest["rows_rejected"] == 0 and manifest["pt"]["tokens_dropped"] == {}
    assert manifest["pt"]["tokens_in"] == manifest["pt"]["tokens_out"] > 8 * 32
    table = pa.concat_tables([ipc.open_file(p).read_all() for p in sorted((run / cli.PREPARED_SUBDIR).glob("*.arrow"))])
    rows = table.to_pylist()
    assert [r["length"] for r in rows[:-1]] == [32] * (len(rows) - 1) and 0 < rows[-1]["length"] <= 32
    assert all(r["labels"] == r["input_ids"] for r in rows)  # every token trained, no padding inside a block
    entries = [json.loads(line) for line in (run / "logging.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in entries if "loss" in e]
    assert len(losses) == 3 and all(loss == loss and loss > 0 for loss in losses)
    assert (run / "checkpoint-3" / "model.safetensors").is_file()


@pytest.mark.slow
def test_pt_with_packing_trains_every_token_of_packed_plain_text(tmp_path, capsys):
    texts = ["Ada is an assistant developed by Bo.", "The quick brown fox jumps over the lazy dog.",
             "Bo built Ada to answer questions.", "Packing puts several samples in one row.",
             "Every token of pre-training text is trained.", "A short one."]
    raw = tmp_path / "corpus.jsonl"
    raw.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    run = tmp_path / "run"
    code = tuneforge(["pt", "--dataset", str(raw), "--val_dataset", str(raw), "--output_dir", str(run),
                      "--packing", "true", "--max_length", "40", "--max_steps", "4", "--save_steps", "4",
                      "--eval_steps", "2", "--learning_rate", "1e-3"])
    _out, err = capsys.readouterr()
    assert code == 0, err
    table = pa.concat_tables([ipc.open_file(p).read_all() for p in sorted((run / cli.PREPARED_SUBDIR).glob("*.arrow"))])
    rows = table.to_pylist()
    assert "seq_lens" in table.column_names and any(len(r["seq_lens"]) > 1 for r in rows)  # really packed
    assert sum(len(r["seq_lens"]) for r in rows) == len(texts)
    assert all(r["labels"] == r["input_ids"] for r in rows)  # every token trained, no chat template
    assert (run / "val_dataset" / "manifest.json").is_file()
    entries = [json.loads(line) for line in (run / "logging.jsonl").read_text().splitlines()]
    assert [e["step"] for e in entries if "loss" in e] == [1, 2, 3, 4]
    assert [e["step"] for e in entries if "eval_loss" in e] == [2, 4]
    assert (run / "checkpoint-4" / "model.safetensors").is_file()  # full, as swift pt
