"""Few-shot evaluation: tasks read from their official files, prompts, demonstrations,
the official metrics, and the runner behind `eval.py`."""
