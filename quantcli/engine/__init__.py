"""A numpy forward pass for llama-family GGUF decoders (llama, qwen2, qwen3, gemma3), run one
layer at a time over many chunks, with llama.cpp's tokenizers and perplexity semantics.

    from quantcli.engine.perplexity import PerplexityOptions, evaluate
    result = evaluate("model.gguf", text, PerplexityOptions(ctx=512, chunks=16), base="f32.gguf")
"""
