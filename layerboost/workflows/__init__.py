"""The workflows above the stages: `run` (the whole pipeline into one folder, resumable stage by stage),
`compare` (the paper's comparison table at equal budgets) and `report` (a run's report.md and figures)."""
