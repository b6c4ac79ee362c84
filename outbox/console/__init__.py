"""The operator's web console (``outbox console``): a server-rendered UI over the store.

Starlette + Jinja2 (autoescaped) + a vendored htmx, served by uvicorn; it reads and acts only
through ``outbox.store.Store``'s named operations. It never writes SQL, never imports gRPC,
the client or the daemon, and never loads the Recrypt API key. Its dependencies come with the
``console`` extra (``pip install 'recrypt-outbox[console]'``); ``commands`` is importable
without them.
"""
