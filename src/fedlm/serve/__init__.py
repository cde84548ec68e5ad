"""`fedlm serve`: the device's own OpenAI-compatible endpoint, answering with the edge fused with the cloud."""
