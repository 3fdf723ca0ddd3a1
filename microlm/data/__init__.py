"""Pipeline A's data: sources, cleaning rules, dedup, the pretraining corpus build, SFT conversations
and the derived tasks with checkable answers."""
