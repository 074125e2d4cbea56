"""The embedded default model: a tiny Llama with a ChatML BPE tokenizer, built reproducibly from text shipped here."""
