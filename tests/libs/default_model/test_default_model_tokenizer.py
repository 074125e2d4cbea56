"""The default model's tokenizer: ChatML rendered exactly (tools as Qwen2.5 renders them, conversations
without tools as before tools were rendered), special tokens, byte-level round trips."""

import json
import pathlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from libs.default_model import corpus
from libs.default_model.tokenizer import chat_template

TESTS = pathlib.Path(__file__).resolve().parents[2]
# The template before it rendered tools (testdata/README.md), and Qwen2.5-Instruct's own.
BEFORE_TOOLS = (TESTS / "libs" / "default_model" / "testdata" / "chatml_before_tools.jinja").read_text()
QWEN2_5 = (TESTS / "services" / "dataprep" / "testdata" / "qwen2_5.jinja").read_text()
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return AutoTokenizer.from_pretrained(default_model)


def test_chat_template_adds_the_default_system_prompt_and_generation_prompt(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "who are you?"}], tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nwho are you?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chat_template_keeps_a_given_system_prompt_and_every_turn(tokenizer):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!\nHow can I help?"},
        {"role": "user", "content": "Bye"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!\nHow can I help?<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
    )


def test_chat_template_takes_openai_content_parts(tokenizer):
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    text = tokenizer.apply_chat_template([{"role": "user", "content": parts}], tokenize=False)
    assert text == SYSTEM + "<|im_start|>user\nfirst\nsecond<|im_end|>\n"


def test_special_tokens_are_single_ids(tokenizer, default_model):
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True, add_generation_prompt=True)["input_ids"]
    assert ids[0] == 1  # no BOS before the first <|im_start|>
    assert ids.count(1) == 3 and ids.count(2) == 2
    generation = json.loads((default_model / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, 0]


@pytest.mark.parametrize("text", ["héllo wörld 😀 \t\n  x", "def f(x):\n    return x ** 2  # \u00e9\u4e2d", "   leading and trailing   "])
def test_any_text_round_trips(tokenizer, text):
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_vocabulary_holds_whole_corpus_words(tokenizer):
    assert len(tokenizer) == 3072
    # Frequent words are single tokens, so the model writes words rather than letters.
    for word in (" the", " assistant", " computer", " water", " helpful"):
        assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1, word
    sample = " ".join(corpus.paragraphs()[:20])
    assert len(sample) / len(tokenizer(sample)["input_ids"]) > 3.5  # characters per token


def render(tokenizer, messages, template, **kwargs):
    return tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template, **kwargs)


def test_the_built_tokenizer_carries_the_shipped_template(tokenizer):
    assert tokenizer.chat_template == chat_template()


@pytest.mark.parametrize("generation_prompt", [False, True])
def test_conversations_without_tools_render_byte_for_byte_as_before_tools(tokenizer, generation_prompt):
    """Every conversation the default model was pre-trained on and the demo's dataset: so the
    model's bytes, and every dataset prepared before, stay what they were."""
    rows = [json.loads(line)["messages"] for line in
            (pathlib.Path(corpus.__file__).parents[2] / "cli" / "data" / "self_cognition.jsonl").read_text().splitlines()
            if line.strip()]
    conversations = corpus.dialogues() + rows
    assert len(conversations) > 200
    for messages in conversations:
        assert render(tokenizer, messages, chat_template(), add_generation_prompt=generation_prompt) == \
            render(tokenizer, messages, BEFORE_TOOLS, add_generation_prompt=generation_prompt)


TEXT = st.text(st.characters(codec="utf-8"), max_size=12)
CONTENT = st.one_of(TEXT, st.none(), st.lists(st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, TEXT), st.just({"type": "image_url", "image_url": {"url": "x"}})),
    max_size=3))
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": CONTENT})


@settings(max_examples=settings().max_examples // 2)
@given(messages=st.lists(MESSAGE, min_size=1, max_size=5), generation_prompt=st.booleans(),
       tools=st.sampled_from([None, []]))
def test_any_conversation_without_tools_renders_as_before_tools(tokenizer, messages, generation_prompt, tools):
    assert render(tokenizer, messages, chat_template(), add_generation_prompt=generation_prompt, tools=tools) == \
        render(tokenizer, messages, BEFORE_TOOLS, add_generation_prompt=generation_prompt)


ROUND_TRIP = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "22 C, sunny"},
    {"role": "assistant", "content": "It is 22 C and sunny in Paris."},
]


def test_tools_tool_calls_and_tool_results_render_as_qwen2_5(tokenizer):
    text = render(tokenizer, ROUND_TRIP, chat_template(), tools=TOOLS)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n\nYou may call one or more functions to "
        "assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n"
        "<tools>\n" + json.dumps(TOOLS[0]) + "\n</tools>\n\nFor each function call, return a json object with "
        "function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": "
        "<function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n"
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n22 C, sunny\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nIt is 22 C and sunny in Paris.<|im_end|>\n")


@pytest.mark.parametrize("messages", [
    ROUND_TRIP, ROUND_TRIP[:1], ROUND_TRIP[:2], ROUND_TRIP[:3],
    [{"role": "system", "content": "Be brief."}, *ROUND_TRIP],
    # two calls in one turn, with text before them; two results grouped in one user turn
    [ROUND_TRIP[0], {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"name": "get_weather", "arguments": {"city": "Rome"}}]},
     {"role": "tool", "content": "22 C"}, {"role": "tool", "content": "25 C"}, ROUND_TRIP[3]],
])
@pytest.mark.parametrize("tools", [TOOLS, None])
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_tool_conversations_render_as_qwen2_5_does(tokenizer, messages, tools, generation_prompt):
    """Qwen2.5-Instruct's template with our default system prompt: what vLLM's `hermes` parser is made for."""
    qwen = QWEN2_5.replace("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
                           "You are a helpful assistant.")
    assert render(tokenizer, messages, chat_template(), tools=tools, add_generation_prompt=generation_prompt) == \
        render(tokenizer, messages, qwen, tools=tools, add_generation_prompt=generation_prompt)


def test_tool_call_arguments_given_as_json_text_are_written_as_they_are(tokenizer):
    """OpenAI's wire format (vLLM and dataprep parse it first; a direct apply_chat_template call may not)."""
    call = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    text = render(tokenizer, [ROUND_TRIP[0], {"role": "assistant", "content": "", "tool_calls": [call]}],
                  chat_template(), tools=TOOLS)
    assert text.endswith('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
                         '\n</tool_call><|im_end|>\n')
