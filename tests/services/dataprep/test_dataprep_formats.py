"""Row formats detected per row with ms-swift's field names and aliases."""

import pytest

from services.dataprep import formats
from services.dataprep.template import TOOL_CALL

U, A = "user", "assistant"
CALL = '{"name": "add", "arguments": "{\\"a\\": 1}"}'  # OpenAI style: arguments as JSON text


def chat(*turns):
    return [{"role": role, "content": content} for role, content in turns]


@pytest.mark.parametrize("row, messages", [
    ({"messages": chat((U, "q"), (A, "r")), "id": 3}, chat((U, "q"), (A, "r"))),
    ({"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                        {"from": "gpt", "value": "r"}, {"from": "observation", "value": "o"},
                        {"from": "bot", "value": "r2"}]},
     chat(("system", "s"), (U, "q"), (A, "r"), ("tool", "o"), (A, "r2"))),
    ({"conversation": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "r"}], "system": "s"},
     chat(("system", "s"), (U, "q"), (A, "r"))),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "tool_call", "content": CALL},
                   {"role": "tool_response", "content": "42"}, {"role": "assistant", "content": "r"}]},
     [*chat((U, "q")), {"role": A, "content": CALL, TOOL_CALL: {"name": "add", "arguments": {"a": 1}}},
      *chat(("tool", "42"), (A, "r"))]),
    ({"instruction": "Translate", "input": "chat", "output": "cat", "system": "s"},
     chat(("system", "s"), (U, "Translate\nchat"), (A, "cat"))),
    ({"instruction": "Say hi", "input": None, "output": "hi"}, chat((U, "Say hi"), (A, "hi"))),
    ({"instruction": "Say hi", "input": "", "output": "hi"}, chat((U, "Say hi"), (A, "hi"))),
    ({"query": "q2", "response": "r2", "history": [["q1", "r1"]], "system": "s"},
     chat(("system", "s"), (U, "q1"), (A, "r1"), (U, "q2"), (A, "r2"))),
    ({"prompt": "q", "completion": "r", "system_prompt": "s"}, chat(("system", "s"), (U, "q"), (A, "r"))),
    ({"question": "q", "answer": "r"}, chat((U, "q"), (A, "r"))),
    ({"problem": "1+1", "solution": "2"}, chat((U, "1+1"), (A, "2"))),
    ({"query": "q", "response": "r", "solution": "ignored"}, chat((U, "q"), (A, "r"))),
    ({"text": "Once upon a time."}, chat((A, "Once upon a time."))),
    ({"query": "q", "response": "r", "system": ""}, chat((U, "q"), (A, "r"))),
])
def test_formats_become_the_same_conversation(row, messages):
    result = formats.to_conversation(row)
    assert isinstance(result, formats.Conversation), result
    assert result.messages == messages
    assert result.losses == [None] * len(messages)


def test_message_loss_is_read_and_not_handed_to_the_template_and_extra_keys_are():
    row = {"messages": [{"role": "user", "content": "q", "loss": True},
                        {"role": "assistant", "content": "r", "loss": False, "name": "bob", "weight": None},
                        {"role": "tool", "content": "o", "tool_call_id": "t1"},
                        {"role": "assistant", "content": "r2"}]}
    result = formats.to_conversation(row)
    assert result.losses == [True, False, None, None]
    assert result.messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r", "name": "bob"},
                               {"role": "tool", "content": "o", "tool_call_id": "t1"},
                               {"role": "assistant", "content": "r2"}]


def test_columns_rename_before_detection_and_problems_name_the_row_own_column():
    columns = formats.parse_columns('{"q": "query", "a": "response"}')
    result = formats.to_conversation({"q": "hello", "a": "world"}, columns)
    assert result.messages == chat((U, "hello"), (A, "world"))
    problem = formats.to_conversation({"q": "hello", "a": 7}, columns)
    assert (problem.field, problem.reason, problem.message) == ("a", "invalid_content", "expected a string; got 7")
    chat_columns = formats.parse_columns('{"dialog": "messages"}')
    problem = formats.to_conversation({"dialog": [{"role": "user", "content": "x"}]}, chat_columns)
    assert (problem.field, problem.reason) == ("dialog", "no_assistant")
    with pytest.raises(ValueError):
        formats.parse_columns('["q", "query"]')


@pytest.mark.parametrize("row, field, reason, message", [
    ([1], None, "invalid_json", "expected a JSON object; got [1]"),
    ({"foo": 1, "bar": 2}, None, "unknown_format",
     "no known row format (messages, conversations, instruction/output, query/response, text); keys: bar, foo"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role", "invalid_role",
     'expected one of system, user, assistant, tool, tool_call, tool_response; got "bot"'),
    ({"conversations": [{"from": "alien", "value": "x"}]}, "conversations[0].from", "invalid_role",
     'expected one of system, human, user, gpt, bot, assistant, tool, function, observation, tool_response, '
     'function_call, tool_call; got "alien"'),
    ({"conversations": [{"from": "human", "value": None}]}, "conversations[0].value", "invalid_content",
     "expected a string; got null"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r", "loss": "yes"}]},
     "messages[1].loss", "invalid_messages", 'expected true or false; got "yes"'),
    ({"messages": [{"role": "user", "content": "q"}]}, "messages", "no_assistant", "no assistant message to train on"),
    ({"query": "q"}, "response", "no_assistant",
     "no response to train on (expected one of response, answer, output, targets, target, answer_key, answers, "
     "solution, text, completion, content)"),
    ({"instruction": "i", "input": 3, "output": "o"}, "input", "invalid_content", "expected a string; got 3"),
    ({"query": "q", "response": "r", "history": [["a"]]}, "history[0]", "invalid_content",
     'expected [query, response] strings; got ["a"]'),
    ({"query": "q", "response": "r", "system": 5}, "system", "invalid_content", "expected a string; got 5"),
])
def test_bad_rows_name_their_field(row, field, reason, message):
    problem = formats.to_conversation(row)
    assert isinstance(problem, formats.Problem)
    assert (problem.field, problem.reason, problem.message) == (field, reason, message)


def test_forced_format_takes_only_its_columns():
    both = {"messages": chat((U, "m"), (A, "n")), "query": "q", "response": "r"}
    assert formats.to_example(both).messages == chat((U, "m"), (A, "n"))  # auto: messages win
    assert formats.to_example(both, fmt="query_response").messages == chat((U, "q"), (A, "r"))
    assert formats.to_example({"text": "t", "response": "r"}, fmt="text").messages == chat((A, "t"))
    problem = formats.to_example({"query": "q", "response": "r"}, fmt="sharegpt")
    assert (problem.field, problem.reason, problem.message) == (
        None, "unknown_format", "not a sharegpt row (--format sharegpt expects conversations or conversation); "
                                "keys: query, response")
    assert formats.to_example({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "r"}]},
                              fmt="messages").reason == "unknown_format"


def test_sharegpt_agent_rows_with_function_call_and_observation():
    row = {"tools": [{"name": "add"}], "conversations": [
        {"from": "human", "value": "2+3?"}, {"from": "function_call", "value": '{"name": "add", "arguments": {}}'},
        {"from": "observation", "value": "5"}, {"from": "gpt", "value": "5"}]}
    example = formats.to_example(row)
    assert [m["role"] for m in example.messages] == [U, A, "tool", A]
    assert example.messages[1][TOOL_CALL] == {"name": "add", "arguments": {}}
    assert example.tools == [{"name": "add"}]


@pytest.mark.parametrize("row, field, reason", [
    ({"messages": chat((U, "q"), (A, "r")), "tools": "{nope"}, "tools", "invalid_tools"),
    ({"messages": chat((U, "q"), (A, "r")), "tools": {"name": "add"}}, "tools", "invalid_tools"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "tool_call", "content": "add(1)"}]},
     "messages[1].content", "invalid_content"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "tool_response", "content": None}]},
     "messages[1].content", "invalid_content"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "r"}]},
     "messages[0].content", "invalid_content"),
])
def test_bad_agent_rows_name_their_field(row, field, reason):
    problem = formats.to_example(row)
    assert (problem.field, problem.reason) == (field, reason), problem


def test_row_kinds_detected_from_their_columns():
    assert formats.to_example({"messages": chat((U, "q"), (A, "r"))}).kind == "sft"
    assert formats.to_example({"messages": chat((U, "q"))}).kind == "prompt"
    assert formats.to_example({"messages": chat((U, "q"), (A, "r")), "label": False}).kind == "kto"
    pair = formats.to_example({"query": "q", "response": "r", "rejected_response": "x", "margin": 1})
    assert (pair.kind, pair.margin, pair.rejected) == ("preference", 1.0, chat((U, "q"), (A, "x")))
    openai = formats.to_example({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None,
                                "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}]},
                                {"role": "tool", "content": "1"}, {"role": "assistant", "content": "r"}]})
    assert openai.messages[1]["content"] == "" and openai.messages[1]["tool_calls"][0]["function"]["name"] == "f"


def test_openai_tool_calls_get_their_arguments_as_an_object():
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}]},
        {"role": "tool", "content": "1", "tool_call_id": "c1"}, {"role": "assistant", "content": "r"}]}
    message = formats.to_example(row).messages[1]
    assert message["tool_calls"] == [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 1}}}]
    row["messages"][1]["tool_calls"][0]["function"]["arguments"] = "{broken"
    problem = formats.to_example(row)
    assert (problem.field, problem.reason) == ("messages[1].tool_calls", "invalid_messages")
    assert problem.message.startswith("[0].function.arguments: not JSON")


@pytest.mark.parametrize("row, field, reason", [
    ({"dialog": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]}, "dialog", "not_prompt"),
    ({"q": "2+2?", "a": "4"}, "q", "not_prompt"),
])
def test_forced_prompt_rows_ending_on_an_answer_name_the_row_own_column(row, field, reason):
    columns = {"dialog": "messages", "q": "query", "a": "response"}
    problem = formats.to_example(row, columns, task="prompt", fmt="messages" if "dialog" in row else "auto")
    if "q" in row:  # a query row under --task prompt is a prompt; its response column is kept as an extra
        assert problem.kind == "prompt" and problem.extras == {"a": "4"}
    else:
        assert (problem.field, problem.reason) == (field, reason)


def test_margin_from_csv_text_and_bad_margins():
    row = {"query": "q", "response": "r", "rejected_response": "x"}
    assert formats.to_example({**row, "margin": "0.25"}).margin == 0.25
    assert formats.to_example({**row, "margin": ""}).margin is None
    for bad in ("lots", True, [1]):
        problem = formats.to_example({**row, "margin": bad})
        assert (problem.field, problem.reason) == ("margin", "invalid_label")
