"""One module per CLI subcommand, each holding thin Typer functions over library code; :mod:`emactl.cli`
registers them. The library is imported inside the functions: it imports torch, which
``emactl --help`` must not wait for."""
