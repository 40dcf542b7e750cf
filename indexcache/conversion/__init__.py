"""Where a run's DSA checkpoint comes from: dense-to-DSA conversion (llama, GLM-4.7-Flash), the offline SmolLM2
asset, tiny models, and `model.source` resolution. The model families themselves live in `indexcache.model`."""
