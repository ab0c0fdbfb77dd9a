"""Engine integrations (vLLM connector, HF transformers); each module is import-guarded."""

__all__: list[str] = []
