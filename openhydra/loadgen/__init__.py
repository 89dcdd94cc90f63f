"""``openhydra-bench``: a load generator for the OpenAI endpoint (TTFT, ITL/TPOT, output tok/s)."""
