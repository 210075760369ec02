"""The dropping engine: hooks on a stock transformers model, and what they rest on. Nothing here knows a
method by name or imports anything else of the package."""
