"""Tokens and labels under real chat templates other than the default model's:
Qwen2.5's and Llama-3's Jinja (testdata/, byte for byte) on the default model's
tokenizer with their special tokens added, and the built-in `--template`s."""

import json
import pathlib

import pytest

from libs.common.errors import InvalidArgument
from services.dataprep import template, templates
from services.dataprep.template import IGNORE_INDEX
from tests.services.dataprep.invariants import reference

TESTDATA = pathlib.Path(__file__).parent / "testdata"
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}]
TWO_ROUNDS = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "  Paris.  "},
              {"role": "user", "content": "And Italy?"}, {"role": "assistant", "content": "Rome."}]


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def spell(tokenizer, parts: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """(text, trained) pieces -> the ids and labels they make, piece by piece."""
    input_ids, labels = [], []
    for text, trained in parts:
        piece = ids(tokenizer, text)
        input_ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return input_ids, labels


def test_fixtures_are_the_real_templates_and_the_built_ins_ship_them(qwen, llama):
    assert "You are Qwen, created by Alibaba Cloud." in qwen.chat_template and "<tool_call>" in qwen.chat_template
    assert "<|start_header_id|>" in llama.chat_template and "| trim" in llama.chat_template
    assert templates.load("qwen") == (TESTDATA / "qwen2_5.jinja").read_text()
    assert templates.load("llama3") == (TESTDATA / "llama3.jinja").read_text()
    special = llama.convert_tokens_to_ids(["<|begin_of_text|>", "<|eot_id|>"])
    assert len(set(special)) == 2 and all(i >= 3072 for i in special)  # added, single tokens


def test_qwen2_5_multi_turn_ids_and_labels(qwen):
    im_end = qwen.convert_tokens_to_ids("<|im_end|>")
    expected_ids, expected_labels = spell(qwen, [
        (f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
         "<|im_start|>assistant\n", False),
        ("  Paris.  <|im_end|>", True),
        ("\n<|im_start|>user\nAnd Italy?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Rome.<|im_end|>", True),
        ("\n", False),
    ])
    encoded = template.encode(qwen, TWO_ROUNDS)
    assert encoded.input_ids == reference(qwen, TWO_ROUNDS) == expected_ids
    assert encoded.labels == expected_labels
    assert [qwen.decode([i]) for i in encoded.labels if i != IGNORE_INDEX][-1] == "<|im_end|>"
    assert encoded.labels.count(im_end) == 2


def test_qwen2_5_tools_tool_call_and_tool_response(qwen):
    """ms-swift's tool_call turn becomes Qwen's <tool_call> block (trained); the tool
    response, grouped in a user turn by the template, never trains."""
    from services.dataprep import formats

    row = {"tools": json.dumps(TOOLS), "messages": [
        {"role": "user", "content": "What is 2+3?"},
        {"role": "tool_call", "content": '{"name": "add", "arguments": {"a": 2, "b": 3}}'},
        {"role": "tool_response", "content": "5"},
        {"role": "assistant", "content": "It is 5."}]}
    example = formats.to_example(row)
    assert example.tools == TOOLS
    encoded = template.encode(qwen, example.messages, example.losses, tools=example.tools)

    openai_style = [row["messages"][0],
                    {"role": "assistant", "content": "",
                     "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
                    {"role": "tool", "content": "5"}, row["messages"][3]]
    tools_text = "\n".join(json.dumps(t) for t in TOOLS)
    expected_ids, expected_labels = spell(qwen, [
        (f"<|im_start|>system\n{QWEN_SYSTEM}\n\n# Tools\n\nYou may call one or more functions to assist with the "
         "user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
         f"{tools_text}\n</tools>\n\nFor each function call, return a json object with function name and arguments "
         "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
         "<args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
         "<|im_start|>assistant\n", False),
        ('<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>', True),
        ("\n<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n<|im_start|>assistant\n", False),
        ("It is 5.<|im_end|>", True),
        ("\n", False),
    ])
    assert encoded.input_ids == reference(qwen, openai_style, tools=TOOLS) == expected_ids
    assert encoded.labels == expected_labels


def test_qwen2_5_consecutive_tool_responses_under_loss_scale_all(qwen):
    """Two tool responses share one user turn in Qwen's rendering; under `all` the
    run is cut out whole and everything else trains."""
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "calling"},
                {"role": "tool", "content": "a"}, {"role": "tool", "content": "b"},
                {"role": "assistant", "content": "done"}]
    encoded = template.encode(qwen, messages, loss_scale="all")
    expected_ids, expected_labels = spell(qwen, [
        (f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
         "calling<|im_end|>\n", True),
        ("<|im_start|>user\n<tool_response>\na\n</tool_response>\n<tool_response>\nb\n</tool_response><|im_end|>\n",
         False),
        ("<|im_start|>assistant\ndone<|im_end|>\n", True),
    ])
    assert encoded.input_ids == reference(qwen, messages) == expected_ids
    assert encoded.labels == expected_labels


def test_llama3_ids_and_labels_with_bos_and_trimmed_content(llama):
    expected_ids, expected_labels = spell(llama, [
        ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nCapital of France?<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("Paris.<|eot_id|>", True),  # the template trims the answer's spaces
        ("<|start_header_id|>user<|end_header_id|>\n\nAnd Italy?<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("Rome.<|eot_id|>", True),
    ])
    encoded = template.encode(llama, TWO_ROUNDS)
    assert encoded.input_ids == reference(llama, TWO_ROUNDS) == expected_ids
    assert encoded.labels == expected_labels
    assert encoded.input_ids[0] == llama.convert_tokens_to_ids("<|begin_of_text|>")


def test_llama3_last_round_and_message_loss(llama):
    head = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nCapital of France?<|eot_id|>" \
           "<|start_header_id|>assistant<|end_header_id|>\n\n"
    middle = "<|start_header_id|>user<|end_header_id|>\n\nAnd Italy?<|eot_id|>" \
             "<|start_header_id|>assistant<|end_header_id|>\n\n"
    last_round = template.encode(llama, TWO_ROUNDS, loss_scale="last_round")
    assert last_round.labels == spell(llama, [(head + "Paris.<|eot_id|>" + middle, False), ("Rome.<|eot_id|>", True)])[1]
    first_only = template.encode(llama, TWO_ROUNDS, losses=[None, None, None, False])
    assert first_only.labels == spell(llama, [(head, False), ("Paris.<|eot_id|>", True),
                                              (middle + "Rome.<|eot_id|>", False)])[1]


@pytest.mark.parametrize("messages", [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo 👋"},
     {"role": "assistant", "content": "ça va ✓"}],
    [{"role": "user", "content": "  spaces  "}, {"role": "assistant", "content": "\n\nnewlines\n\n"},
     {"role": "user", "content": "again"}, {"role": "assistant", "content": ""}],
])
@pytest.mark.parametrize("which", ["qwen", "llama", "tokenizer"])
def test_input_ids_equal_apply_chat_template(request, which, messages):
    tokenizer = request.getfixturevalue(which)
    encoded = template.encode(tokenizer, messages)
    assert encoded.input_ids == reference(tokenizer, messages)
    assert template.encode_prompt(tokenizer, messages[:-1]) == reference(tokenizer, messages[:-1],
                                                                         add_generation_prompt=True)


@pytest.mark.parametrize("which,trained", [
    ("qwen", "Hello! How can I help?<|im_end|>ok<|im_end|>"),
    ("llama", "Hello! How can I help?<|eot_id|>ok<|eot_id|>"),
])
def test_an_opening_answer_trains_on_qwen_and_llama3(request, which, trained):
    """A conversation opening with an answer: the template's ids, both answers
    trained from after the preamble (Qwen's default system prompt, Llama's bos and header)."""
    tokenizer = request.getfixturevalue(which)
    messages = [{"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "hm"},
                {"role": "assistant", "content": "ok"}]
    encoded = template.encode(tokenizer, messages)
    assert encoded.input_ids == reference(tokenizer, messages)
    assert tokenizer.decode([i for i in encoded.labels if i != IGNORE_INDEX]) == trained


def test_builtin_default_template_is_ms_swift_default(default_model):
    """ms-swift's `default`: default system, '### Human:'/'### Assistant:' rounds joined
    by a blank line (not trained), eos after the last answer (trained)."""
    tokenizer = template.load_tokenizer(default_model, "default")
    eos = tokenizer.eos_token
    encoded = template.encode(tokenizer, TWO_ROUNDS)
    expected_ids, expected_labels = spell(tokenizer, [
        ("You are a helpful assistant.\n\n### Human:\nCapital of France?\n\n### Assistant:\n", False),
        ("  Paris.  ", True),
        ("\n\n### Human:\nAnd Italy?\n\n### Assistant:\n", False),
        ("Rome." + eos, True),
    ])
    assert encoded.input_ids == expected_ids and encoded.labels == expected_labels
    own_system = template.encode(tokenizer, [{"role": "system", "content": "S"}, *TWO_ROUNDS[:2]])
    assert tokenizer.decode(own_system.input_ids).startswith("S\n\n### Human:\n")


def test_builtin_chatml_and_llama3_on_the_default_tokenizer(default_model):
    chatml = template.load_tokenizer(default_model, "chatml")
    encoded = template.encode(chatml, TWO_ROUNDS[:2])
    assert (encoded.input_ids, encoded.labels) == spell(chatml, [
        ("<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n", False),
        ("  Paris.  <|im_end|>", True), ("\n", False)])
    with pytest.raises(InvalidArgument, match="template 'llama3' does not fit .*'bos_token' is undefined"):
        template.load_tokenizer(default_model, "llama3")  # no bos token: refused once, not row by row


def test_builtin_replaces_the_model_own_template(llama_dir, qwen_dir):
    chatml = template.load_tokenizer(llama_dir, "chatml")  # Llama-3's tokenizer dir, ChatML by name
    assert chatml.chat_template == templates.load("chatml")
    qwen = template.load_tokenizer(llama_dir, "qwen")
    assert template.encode(qwen, TWO_ROUNDS).input_ids == reference(qwen, TWO_ROUNDS)


def test_unknown_template_is_one_line_invalid_argument(default_model):
    with pytest.raises(InvalidArgument) as error:
        template.load_tokenizer(default_model, "vicuna")
    assert str(error.value).count("\n") == 0
    assert "unknown template 'vicuna'" in str(error.value) and "chatml, default, llama3, qwen" in str(error.value)


def test_plain_text_with_eos_for_pretraining(tokenizer):
    """--use_chat_template false: texts concatenated as written, then eos; every token trains under `all`."""
    eos = tokenizer.eos_token_id
    encoded = template.encode_plain(tokenizer, [{"role": "assistant", "content": "Once upon a time."}])
    assert encoded.input_ids == ids(tokenizer, "Once upon a time.") + [eos]
    assert encoded.labels == encoded.input_ids
    chat = template.encode_plain(tokenizer, [{"role": "user", "content": "Question:\n"},
                                             {"role": "assistant", "content": "Answer."}], loss_scale="default")
    q, a = ids(tokenizer, "Question:\n"), ids(tokenizer, "Answer.")
    assert ids(tokenizer, "Question:\nAnswer.") == q + a  # the pieces tokenize apart here, so the mask is exact
    assert chat.input_ids == q + a + [eos]
    assert chat.labels == [IGNORE_INDEX] * len(q) + a + [eos]


def test_prepare_with_a_qwen_model_dir_writes_apply_chat_template_ids_for_agent_rows(tmp_path, qwen_dir, qwen):
    """--model pointing at a model directory with Qwen2.5's template: a sharegpt agent
    row with tools goes through the whole pipeline into exactly the template's ids."""
    import pyarrow as pa

    from services.dataprep.config import PrepareConfig
    from services.dataprep.pipeline import prepare

    row = {"tools": TOOLS, "conversations": [
        {"from": "human", "value": "What is 2+3?"},
        {"from": "function_call", "value": json.dumps({"name": "add", "arguments": {"a": 2, "b": 3}})},
        {"from": "observation", "value": "5"}, {"from": "gpt", "value": "It is 5."}]}
    data = tmp_path / "agent.jsonl"
    data.write_text(json.dumps(row) + "\n")
    manifest = prepare(PrepareConfig(model=str(qwen_dir), dataset=[str(data)], output_dir=str(tmp_path / "out"),
                                     loss_scale="last_round"))
    table = pa.ipc.open_file(pa.memory_map(str(tmp_path / "out" / manifest["shards"][0]["file"]))).read_all()
    got = table.to_pylist()[0]
    openai_style = [{"role": "user", "content": "What is 2+3?"},
                    {"role": "assistant", "content": "",
                     "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
                    {"role": "tool", "content": "5"}, {"role": "assistant", "content": "It is 5."}]
    assert got["input_ids"] == reference(qwen, openai_style, tools=TOOLS)
    # last_round: everything after the last user turn that is not a tool response, as default here
    assert qwen.decode([i for i in got["labels"] if i != IGNORE_INDEX]) == \
        '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>It is 5.<|im_end|>'
    assert manifest["chat_template_sha256"] == template.template_fingerprint(qwen)
