"""Model adapters: find and describe the MoE structure of any transformers v5 MoE causal LM."""
