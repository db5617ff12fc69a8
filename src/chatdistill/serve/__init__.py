"""OpenAI-compatible HTTP server (chat and text completions, SSE streaming, continuous batching),
Prometheus metrics and a web chat page for a trained student."""
