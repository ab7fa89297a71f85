"""The `attrib` command: the only part of the program that reads argv.

    common      errors, device, logging, output, loading data and ensembles, the owners CSV
    parsers     every command's flags and the function that runs it (imported when it runs,
                so `serve`, `migrate` and `key` start without torch)
    engine      train, generate, attribute, info (models/ without the service)
    validate    validate classes|fidelity|copies (experiments/)
    operations  migrate, import, owner, key, register, opt-out, retrain (the service's database)
    serve       serve, worker (running the service)
    demo        demo-setup (what `make run` does first)
    main        the entry point
"""

from app.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
