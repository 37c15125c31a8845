"""`speccompile serve`: a bundle behind the OpenAI HTTP API (FastAPI + uvicorn), with Prometheus metrics, a bounded
queue, and scale-out as a Ray Serve deployment.

    command.py    the CLI's entry: a clear error when the serve extra is missing
    options.py    what a server is started with, and the loaded state a process (or a Ray replica) serves
    protocol.py   the request bodies (pydantic) and the response objects, OpenAI's shapes
    api_errors.py OpenAI-style error objects and the handlers that turn every failure into one
    guards.py     the API key and the body's size, checked before a route reads the body
    runner.py     runs each request's Generator.stream in its own thread; admission, cancellation, shutdown
    metrics.py    Prometheus metrics and the `usage` object (the one place cache figures are read)
    app.py        the FastAPI routes
    server.py     uvicorn: one process, SIGTERM drains and exits 0
    ray_app.py    the same app as a Ray Serve deployment of N replicas

The layer sits above the runtime and below the CLI; the server drives the Generator only through its public
API (stream's keywords and the stats dict), so a scheduler that batches concurrent calls needs no change here.
"""
