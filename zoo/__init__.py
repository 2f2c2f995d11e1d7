"""The offline benchmark zoo: tasks from data that packages ship, a tiny open_clip model
pretrained here, and one fine-tuned checkpoint per task."""
