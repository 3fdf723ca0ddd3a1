"""Serving (B6): the vLLM environment (``env``), a managed server process (``server``; vLLM runs
through ``vllm_launch``, which keeps special-token text in messages plain), an
OpenAI-compatible client with load timings (``client``), and what the ``serve_*`` stages run on
them: parity checks (``smoke``), the load benchmark (``bench``) and the stability run (``soak``)."""
