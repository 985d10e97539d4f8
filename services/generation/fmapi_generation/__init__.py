"""fmapi generation service: one vLLM engine for one model, over gRPC (``fmapi.generation.v1``).

Run with ``python -m fmapi_generation`` (settings: ``FMAPI_GENERATION_*`` env or ``--kebab``
flags, see :mod:`.config`). Modules: ``config`` (settings), ``validation`` (pure request checks),
``chat`` (templates, one BOS), ``tools`` (forced/auto tool calls), ``jsontext`` (valid JSON
strings while streaming), ``engine`` (the only vLLM/torch importer), ``service`` (the use case),
``servicer`` (proto <-> domain), ``server`` (wiring), ``modelimport`` (``fmapi models import``).
"""
