"""The `attrib` command: the only part of the program that reads argv.

    common      errors, device, logging, output, loading data and ensembles, the owners CSV
    engine      train, generate, attribute, info (models/ without the service)
    validate    validate classes|fidelity|copies (experiments/)
    operations  migrate, import, owner, key, register (the service's database)
    serve       serve, worker, demo-setup (running the service)
    main        the parser and the entry point
"""

from app.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
