"""Running models fast: kernels chosen at load time, greedy decoding with a static KV cache (and
an optionally compiled decode step), and the decode/prefill speed benchmark."""
