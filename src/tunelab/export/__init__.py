"""Export: merged weights, GGUF for llama.cpp, Ollama."""
