"""One module per command: `run(options, progress=None) -> Result`, plain Python, no typer or rich."""
