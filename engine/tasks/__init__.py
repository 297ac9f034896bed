"""Small, self-checking tasks for demos and tests (prompts, gold answers, reward functions)."""
