"""UniCTask-GRPO algorithm core: data, prompts, Dr.GRPO objective, DSOG controller. No Ray inside."""
