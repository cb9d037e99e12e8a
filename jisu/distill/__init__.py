"""Knowledge distillation: train a pruned or smaller student to match its teacher's next-token distributions
(`jisu distill`, `jisu prune ... --distill STEPS`), and the table that says what it recovered."""
