"""An OpenAI-compatible HTTP server around the engine (`python -m reference serve`, or `python -m reference.server`).

    protocol.py     request bodies (pydantic), OpenAI's error shape, response and stream-chunk builders
    prompts.py      tokenizing prompts on a worker thread, after cheap checks that refuse what cannot fit
    engine_thread.py  the one thread that owns the LLMEngine: admits requests, steps, streams deltas back
    metrics.py      Prometheus metrics in the server's own registry
    app.py          the FastAPI app: routes, API key, limits, timeouts, client disconnects
    graceful.py     uvicorn's server with our shutdown order (SIGTERM / SIGINT)
    cli.py          the `serve` flags and `run_serve`
    load.py         a load generator: Poisson arrivals against a running server, latency percentiles

Data flows one way: HTTP handler -> EngineThread.submit -> (engine thread) LLMEngine -> Update deltas ->
the handler's asyncio queue -> JSON or server-sent events. Only the engine thread touches the engine.
This package imports nothing on its own, so the load generator (a client) does not pull in FastAPI.
"""

MAX_REQUEST_BYTES = 2 << 20  # default body limit: far more than a max_model_len prompt takes, even as token ids
