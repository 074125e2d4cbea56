"""POST /tokenize and /detokenize, as vLLM serves them."""
