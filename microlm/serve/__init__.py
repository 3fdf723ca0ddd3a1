"""Stage B6: vLLM deployment — the serving environment (``env``), a managed server process
(``server``), an OpenAI-compatible client with load timings (``client``) and the stages
(``smoke``: health, models, structured output, greedy parity with ``transformers``)."""
