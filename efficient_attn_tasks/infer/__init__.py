"""What a trained checkpoint does on its own (loaded by efficient_attn_tasks/run/checkpoint.py): score a split or
files (evaluate.py), translate lines (translate.py), continue a text (generate.py). The command lines are in
efficient_attn_tasks/commands/."""
