"""Engine integrations (vLLM connector, HF transformers); each module is import-guarded."""
