"""Checks a model in vLLM against Hugging Face transformers: greedy chat replies must be the same tokens.

Run as `python -m libs.default_model.parity [--model DIR]` (the cached default model when no
DIR is given). It starts a real vLLM engine with LoRA enabled, as serving does, so it takes
about a minute on CPU; set VLLM_CPU_KVCACHE_SPACE=1 on a small machine. Exit code 0 when
every prompt's greedy tokens agree, 1 otherwise.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from libs.common.config import parse
from libs.default_model.resolve import resolve_model

PROMPTS = ("who are you?", "How do I cook rice?", "What is a computer?", "Tell me a fun fact.")


@dataclass
class ParityArgs:
    model: str | None = field(default=None, metadata={"help": "Hugging Face model directory (default: the cached default model)"})
    max_tokens: int = field(default=32, metadata={"help": "greedy tokens generated per prompt"})
    max_model_len: int = field(default=2048, metadata={"help": "vLLM context length"})


def chat_prompt_ids(tokenizer, question: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True)["input_ids"])


def hf_greedy(model_dir: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    replies = []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=max_tokens, do_sample=False)
            replies.append(out[0, len(ids):].tolist())
    return replies


def vllm_engine(model_dir: str, max_model_len: int):
    from vllm import LLM

    return LLM(model=model_dir, dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=8, max_model_len=max_model_len, seed=0)


def vllm_greedy(llm, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params)
    return [list(output.outputs[0].token_ids) for output in outputs]


def trim_at_eos(ids: list[int], eos: set[int]) -> list[int]:
    """HF stops after an eos token and keeps it; vLLM keeps it too: compare up to and including it."""
    for index, token in enumerate(ids):
        if token in eos:
            return ids[: index + 1]
    return ids


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer, GenerationConfig
    from vllm import SamplingParams

    args = parse(ParityArgs, list(sys.argv[1:] if argv is None else argv), prog="python -m libs.default_model.parity")
    model_dir = str(resolve_model(args.model))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    prompts = [chat_prompt_ids(tokenizer, question) for question in PROMPTS]
    hf = [trim_at_eos(ids, eos) for ids in hf_greedy(model_dir, prompts, args.max_tokens)]
    llm = vllm_engine(model_dir, args.max_model_len)
    vl = [trim_at_eos(ids, eos) for ids in vllm_greedy(llm, prompts, args.max_tokens)]
    # vLLM's own chat path (its template handling, not our token ids) must give the same reply.
    chat = llm.chat([[{"role": "user", "content": question}] for question in PROMPTS], SamplingParams(temperature=0.0, max_tokens=args.max_tokens))
    agree = True
    for question, hf_ids, vl_ids, chat_out in zip(PROMPTS, hf, vl, chat):
        chat_ids = trim_at_eos(list(chat_out.outputs[0].token_ids), eos)
        same = hf_ids == vl_ids == chat_ids
        agree &= same
        print(f"{'same' if same else 'DIFFERENT'}  {question!r}")
        print(f"  transformers: {tokenizer.decode(hf_ids, skip_special_tokens=True)!r}")
        print(f"  vllm:         {tokenizer.decode(vl_ids, skip_special_tokens=True)!r}")
        if chat_ids != vl_ids:
            print(f"  vllm chat:    {tokenizer.decode(chat_ids, skip_special_tokens=True)!r}")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
