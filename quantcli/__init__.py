"""quantcli: LLM quantization from the command line, byte-identical to llama.cpp where it matters."""

__version__ = "0.1.0"
