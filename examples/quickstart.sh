#!/usr/bin/env sh
# The main job on the example model: F32 base -> Q4_K_M (llama-quantize's bytes) -> verify -> report.
set -e
MODEL=$(python examples/fetch_model.py)
quantcli dequantize "$MODEL" models/gemma3-270m-f32.gguf --force
quantcli quantize models/gemma3-270m-f32.gguf models/gemma3-270m-q4_k_m.gguf --type Q4_K_M --force
quantcli verify models/gemma3-270m-q4_k_m.gguf --type Q4_K_M
quantcli report models/gemma3-270m-q4_k_m.gguf --no-tensors
