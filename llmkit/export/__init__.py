"""Export trained models to other runtimes' formats (``llmkit export``)."""
