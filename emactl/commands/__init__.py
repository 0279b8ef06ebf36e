"""One module per CLI subcommand. Each holds thin Typer functions over library code."""
